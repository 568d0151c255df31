# train{task, model, fold}: one GPU job per task x model x fold (hnct.train; CPU where no GPU).
# The task's registry entry (hnct.tasks) names the job's inputs (classify: folds.tsv, and the crops
# of the cases it lists from results/crops/{case}.json; segment: the fold's slice list and the
# slices sidecars of its cases) and the trainer's options; the job's --config holds the task's
# section without the other models' keys. Every model also predicts the held-out test cases with its
# best epoch (test_predictions.csv; header-only without a test set, and for segment). A killed job
# resumes from checkpoints/last.pt on rerun (same config and code only).


rule train_fold:
    input:
        unpack(get_train_inputs),
    output:
        best="results/train/{task}/{model}/fold{fold}/best.pt",
        summary="results/train/{task}/{model}/fold{fold}/best.json",
        history="results/train/{task}/{model}/fold{fold}/history.csv",
        predictions="results/train/{task}/{model}/fold{fold}/val_predictions.csv",
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
        code=code_version("train", "data", "losses", "tasks", "models"),
        task_code=get_train_code,
    shell:
        "python -m hnct.train --task {wildcards.task} --model {wildcards.model} --fold {wildcards.fold}"
        " --out-dir {params.out_dir:q} --config {params.config:q} {params.inputs} {params.plugins}"
        " --threads {threads} --log {log:q}"
