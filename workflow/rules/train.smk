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
