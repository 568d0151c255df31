# train{task, model, fold}: one GPU job per task x model x fold (hnct.train; CPU where no GPU).
# classify reads the crops (through their sidecars) and folds.tsv; segment reads the fold's slice
# list and the slices sidecars (label names). A killed job resumes from checkpoints/last.pt on rerun.


rule train_fold:
    input:
        unpack(get_train_inputs),
    output:
        best="results/train/{task}/{model}/fold{fold}/best.pt",
        history="results/train/{task}/{model}/fold{fold}/history.csv",
        predictions="results/train/{task}/{model}/fold{fold}/val_predictions.csv",
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
        code=code_version(
            "train", "data", "models", "models.cnn3d", "models.snet", "losses"
        ),
    shell:
        "python -m hnct.train --task {wildcards.task} --model {wildcards.model} --fold {wildcards.fold}"
        " --out-dir {params.out_dir:q} --config {params.config:q} --folds {input.folds:q}"
        " --fold-slices={input.fold_slices:q} --crop-sidecars {input.crops:q}"
        " --slice-sidecars {input.slices:q} --threads {threads} --log {log:q}"
