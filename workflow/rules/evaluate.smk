# evaluate{task, model, fold}: metrics of one validation fold (hnct.evaluate; segment: hnct.segeval).
# Two rules because the tasks read different inputs: classify only its predictions, segment also
# the fold's slice list, the slice indexes and the crops (3D geometry for HD95 and NSD).


rule evaluate_fold:
    input:
        predictions="results/train/{task}/{model}/fold{fold}/val_predictions.csv",
    output:
        metrics="results/evaluate/{task}/{model}/fold{fold}/metrics.json",
        per_case="results/evaluate/{task}/{model}/fold{fold}/per_case.csv",
    log:
        "logs/evaluate_fold/{task}_{model}_{fold}.log",
    wildcard_constraints:
        task="classify",
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_version("evaluate", "metrics.classification"),
    shell:
        "python -m hnct.evaluate --task {wildcards.task} --predictions {input.predictions:q}"
        " --out-metrics {output.metrics:q} --out-per-case {output.per_case:q}"
        " --model {wildcards.model} --fold {wildcards.fold} --log {log:q}"


rule evaluate_segment_fold:
    input:
        predictions="results/train/segment/{model}/fold{fold}/val_predictions.csv",
        fold_slices="results/folds/segment/fold{fold}_slices.tsv",
        slices=expand("results/slices/{case}.json", case=CASES),
        crops=expand("results/crops/{case}.json", case=CASES),
    output:
        metrics="results/evaluate/segment/{model}/fold{fold}/metrics.json",
        per_case="results/evaluate/segment/{model}/fold{fold}/per_case.csv",
    log:
        "logs/evaluate_fold/segment_{model}_{fold}.log",
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        masks_dir="results/evaluate/segment/{model}/fold{fold}/masks",
        nsd_tolerance_mm=config["evaluate"]["nsd_tolerance_mm"],
        threshold=config["evaluate"]["mask_threshold"],
        code=code_version("evaluate", "segeval", "metrics.segmentation"),
    shell:
        "python -m hnct.evaluate --task segment --predictions {input.predictions:q}"
        " --fold-slices {input.fold_slices:q} --out-metrics {output.metrics:q}"
        " --out-per-case {output.per_case:q} --masks-dir {params.masks_dir:q}"
        " --nsd-tolerance-mm {params.nsd_tolerance_mm} --threshold {params.threshold}"
        " --model {wildcards.model} --fold {wildcards.fold} --log {log:q}"
