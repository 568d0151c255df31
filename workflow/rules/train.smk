# train{task, model, fold}: one GPU job per task x model x fold (hnct.train; CPU where no GPU).
# The task's registry entry (hnct.tasks) names the job's inputs (classify: folds.tsv, and the crops
# of the cases it lists from results/crops/{case}.json; segment: the fold's slice list and the
# slices sidecars of its cases) and the trainer's options; the job's --config holds the task's
# section without the other models' keys, with train's shared keys (seed, selection, inner_folds...).
# The epoch is selected on an inner split of the fold's training side (train.selection: inner), never
# on the outer fold; the selected model then predicts the outer fold (val_predictions.csv), the inner
# validation (inner_predictions.csv: classify's threshold is chosen there) and the held-out test cases
# (test_predictions.csv; header-only without a test set, and for segment). A killed job resumes from
# checkpoints/last.pt on rerun (same config and code only).

# What the reported models were selected on, one sentence per task (hnct.tasks.selection_caption):
# the report rules pass it to their captions (workflow/report/*.rst) as params.selection.
SELECTION_CAPTION = " ".join(
    hnct.tasks.selection_caption(task, config) for task in TASKS
)


rule train_fold:
    input:
        unpack(get_train_inputs),
    output:
        best="results/train/{task}/{model}/fold{fold}/best.pt",
        summary="results/train/{task}/{model}/fold{fold}/best.json",
        history="results/train/{task}/{model}/fold{fold}/history.csv",
        predictions="results/train/{task}/{model}/fold{fold}/val_predictions.csv",
        inner_predictions="results/train/{task}/{model}/fold{fold}/inner_predictions.csv",
        test_predictions="results/train/{task}/{model}/fold{fold}/test_predictions.csv",
    log:
        "logs/train_fold/{task}_{model}_{fold}.log",
    priority: train_priority
    conda:
        "../../envs/train.yaml"
    threads: config["resources"]["train_threads"]
    resources:
        gpu=config["resources"]["train_gpus"],
        mem_mb=config["resources"]["train_mem_mb"],
        runtime=train_runtime,
    params:
        out_dir="results/train/{task}/{model}/fold{fold}",
        config=get_train_config,
        inputs=get_train_options,
        plugins=PLUGINS_ARG,
        code=code_version("train", "data", "losses", "splits", "tasks", "models"),
        task_code=get_train_code,
    shell:
        "python -m hnct.train --task {wildcards.task} --model {wildcards.model} --fold {wildcards.fold}"
        " --out-dir {params.out_dir:q} --config {params.config:q} {params.inputs} {params.plugins}"
        " --threads {threads} --log {log:q}"


# train_permuted_fold{task, model, seed, fold}: the permuted-label control (train.permutation_seeds,
# train.permutation_models; tasks whose registry entry has label_permutation: classify). The same job
# as train_fold, with the training side's labels permuted by the trainer (--permutation-seed; outer
# fold and test set keep their true labels; the inner selection as in the real run), in its own folder
# so that no real table, ensemble or figure reads it: only the report's permutation_control table does.
# The job's --config is the real run's: changing the seeds adds or drops these jobs and nothing else.
use rule train_fold as train_permuted_fold with:
    output:
        best=f"{PERMUTED_TRAIN_DIR}/best.pt",
        summary=f"{PERMUTED_TRAIN_DIR}/best.json",
        history=f"{PERMUTED_TRAIN_DIR}/history.csv",
        predictions=f"{PERMUTED_TRAIN_DIR}/val_predictions.csv",
        inner_predictions=f"{PERMUTED_TRAIN_DIR}/inner_predictions.csv",
        test_predictions=f"{PERMUTED_TRAIN_DIR}/test_predictions.csv",
        labels=f"{PERMUTED_TRAIN_DIR}/permuted_labels.tsv",
    log:
        "logs/train_permuted_fold/{task}_{model}_seed{seed}_{fold}.log",
    wildcard_constraints:
        task=tasks_where("label_permutation"),
        seed=r"\d+",
    params:
        out_dir=PERMUTED_TRAIN_DIR,
        inputs=get_permuted_train_options,
