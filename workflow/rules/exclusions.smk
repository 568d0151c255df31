# exclusions: every case a stage or a task could not use, with its reason (hnct.exclusions).


rule collect_exclusions:
    input:
        sidecars=get_case_sidecars,
        fold_excluded=expand("results/folds/{task}/excluded.tsv", task=TASKS),
    output:
        tsv="results/exclusions.tsv",
    log:
        "logs/collect_exclusions/all.log",
    localrule: True
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        code=code_version("exclusions"),
    shell:
        "python -m hnct.exclusions --sidecars {input.sidecars:q}"
        " --fold-excluded {input.fold_excluded:q} --out {output.tsv:q} --log {log:q}"
