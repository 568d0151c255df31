# train{task, model, fold}: one GPU job per task x model x fold (hnct.train; CPU where no GPU).
# classify reads folds.tsv and the crops of the cases it lists (results/crops/{case}.json); segment
# reads the fold's slice list and the slices sidecars of its cases (label names). Both also predict
# the held-out test cases with the best model (test_predictions.csv; header-only without a test set,
# and for segment). A killed job resumes from checkpoints/last.pt on rerun (same config and code only).


rule train_fold:
    input:
        unpack(get_train_inputs),
    output:
        best="results/train/{task}/{model}/fold{fold}/best.pt",
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
        code=code_version(
            "train", "data", "models", "models.cnn3d", "models.snet", "losses"
        ),
    shell:
        "python -m hnct.train --task {wildcards.task} --model {wildcards.model} --fold {wildcards.fold}"
        " --out-dir {params.out_dir:q} --config {params.config:q} --folds {input.folds:q}"
        " --fold-slices={input.fold_slices:q} --crops-dir results/crops"
        " --slices-dir results/slices --threads {threads} --log {log:q}"


# Only with slices.source: volume (the crops are then not upstream of folds.tsv): one table of every
# crop sidecar and its checksum, so that a changed crop still reruns classification training.
rule index_crops:
    input:
        crops=expand("results/crops/{case}.json", case=CASES),
    output:
        index="results/train/crops_index.tsv",
    log:
        "logs/index_crops/all.log",
    localrule: True
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_version("data"),
    shell:
        "python -m hnct.data index --sidecars {input.crops:q} --out {output.index:q} --log {log:q}"
