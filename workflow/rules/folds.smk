# folds{task}: the resolved cohort table, then patient-level stratified folds per task (hnct.folds),
# from the per-case sidecars the task's registry entry names (classify: crops; segment: slices).

import json

# The cohort table file (an input: editing it reruns the folds); the demo's is planned from config.
COHORT_TABLE_INPUT = config["cohort"]["table"] if SOURCE != "demo" else []
COHORT_DEMO_CONFIG = (
    json.dumps(config["demo"], sort_keys=True) if SOURCE == "demo" else ""
)
COHORT_MODULES = (
    ("folds", "cohort", "demo") if SOURCE == "demo" else ("folds", "cohort")
)


rule write_cohort:
    input:
        table=COHORT_TABLE_INPUT,
    output:
        cohort="results/cohort.tsv",
    log:
        "logs/write_cohort/all.log",
    localrule: True
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        source=SOURCE,
        demo_config=COHORT_DEMO_CONFIG,
        code=code_version(*COHORT_MODULES),
    shell:
        "python -m hnct.folds --log {log:q} cohort --out {output.cohort:q} --source {params.source}"
        " --table={input.table:q} --demo-config={params.demo_config:q}"


rule split_folds:
    input:
        cohort="results/cohort.tsv",
        sidecars=get_fold_sidecars,
    output:
        folds="results/folds/{task}/folds.tsv",
        splits="results/folds/{task}/splits_final.json",
        excluded="results/folds/{task}/excluded.tsv",
    log:
        "logs/split_folds/{task}.log",
    priority: train_priority
    localrule: True
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        n_folds=config["folds"]["n_folds"],
        seed=config["folds"]["seed"],
        test=config["folds"]["test"],
        test_fraction=config["folds"]["test_fraction"],
        options=get_fold_options,
        plugins=PLUGINS_ARG,
        code=code_version("folds", "splits", "cohort", "tasks"),
        task_code=get_task_code,
    shell:
        "python -m hnct.folds --log {log:q} split --task {wildcards.task} --cohort {input.cohort:q}"
        " --sidecars {input.sidecars:q} --out-folds {output.folds:q} --out-splits {output.splits:q}"
        " --out-excluded {output.excluded:q} --n-folds {params.n_folds}"
        " --seed {params.seed} --test {params.test} --test-fraction {params.test_fraction}"
        " {params.options} {params.plugins}"


# Tasks that train on slices (registry: slice_lists): per fold, every slice of its train and val
# cases, from the indexes.
rule list_fold_slices:
    input:
        folds="results/folds/{task}/folds.tsv",
        sidecars=expand("results/slices/{case}.json", case=CASES),
    output:
        slices=expand("results/folds/{{task}}/fold{fold}_slices.tsv", fold=FOLDS),
    log:
        "logs/list_fold_slices/{task}.log",
    wildcard_constraints:
        task=tasks_where("slice_lists"),
    priority: train_priority
    localrule: True
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        code=code_version("folds", "splits", "cohort"),
    shell:
        "python -m hnct.folds --log {log:q} slices --folds {input.folds:q} --sidecars {input.sidecars:q}"
        " --out {output.slices:q}"
