# preprocess{task, case} for the tasks that train on whole volumes (registry: plan; hnct.preprocess):
# the cohort fingerprint (target spacing from the non-test cases), each case cropped to the body and
# resampled once into uncompressed arrays that training memory-maps, and per fold a plan whose
# intensity normalisation is fitted on that fold's training cases only. Each task's own options
# (registry: preprocess_options) reach only the step that uses them.


rule fingerprint_task:
    input:
        folds="results/folds/{task}/folds.tsv",
        sidecars=get_fold_sidecars,
    output:
        fingerprint="results/preprocess/{task}/fingerprint.json",
    log:
        "logs/fingerprint_task/{task}.log",
    wildcard_constraints:
        task=tasks_where("plan"),
    localrule: True
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        options=get_preprocess_options("fingerprint"),
        code=code_version("preprocess"),
    shell:
        "python -m hnct.preprocess --log {log:q} fingerprint --folds {input.folds:q}"
        " --volume-sidecars {input.sidecars:q} --out {output.fingerprint:q} {params.options}"


rule preprocess_case:
    input:
        volume="results/volumes/{case}",
        sidecar="results/volumes/{case}.json",
        fingerprint="results/preprocess/{task}/fingerprint.json",
    output:
        data=directory("results/preprocess/{task}/{case}"),
        sidecar="results/preprocess/{task}/{case}.json",
    log:
        "logs/preprocess_case/{task}_{case}.log",
    wildcard_constraints:
        task=tasks_where("plan"),
    conda:
        "../../envs/dicom.yaml"
    threads: 1
    resources:
        mem_mb=config["resources"]["preprocess_mem_mb"],
        runtime=20,
    params:
        options=get_preprocess_options("case"),
        code=code_version("preprocess"),
    shell:
        "python -m hnct.preprocess --log {log:q} case --case {wildcards.case:q}"
        " --volume-sidecar {input.sidecar:q} --fingerprint {input.fingerprint:q}"
        " --out-dir {output.data:q} --sidecar {output.sidecar:q} {params.options}"


rule plan_fold:
    input:
        folds="results/folds/{task}/folds.tsv",
        fingerprint="results/preprocess/{task}/fingerprint.json",
        sidecars=get_preprocess_sidecars,
    output:
        plan="results/preprocess/{task}/fold{fold}/plan.json",
    log:
        "logs/plan_fold/{task}_{fold}.log",
    wildcard_constraints:
        task=tasks_where("plan"),
    localrule: True
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        options=get_preprocess_options("plan"),
        code=code_version("preprocess"),
    shell:
        "python -m hnct.preprocess --log {log:q} plan --folds {input.folds:q} --fold {wildcards.fold}"
        " --fingerprint {input.fingerprint:q} --sidecars {input.sidecars:q} --out {output.plan:q}"
        " {params.options}"
