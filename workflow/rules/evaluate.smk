# evaluate{task, model, fold}: metrics of one validation fold (hnct.evaluate; segment: hnct.segeval).
# Two rules because the tasks read different inputs: classify only its predictions, segment also
# the fold's slice list (its cases' slices sidecars lead to the slice indexes and the 3D source
# volume and labels for HD95 and NSD; they are upstream of the slice list, so no per-case inputs).
# ensemble_test{model}: classify, the held-out test set predicted by every fold's best model,
# averaged (the k-fold ensemble), with each fold's own test metrics and the single best fold.


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


rule ensemble_test:
    input:
        test_predictions=expand(
            "results/train/classify/{{model}}/fold{fold}/test_predictions.csv",
            fold=FOLDS,
        ),
        val_metrics=expand(
            "results/evaluate/classify/{{model}}/fold{fold}/metrics.json", fold=FOLDS
        ),
    output:
        predictions="results/evaluate/classify/{model}/test_ensemble/predictions.csv",
        metrics="results/evaluate/classify/{model}/test_ensemble/metrics.json",
    log:
        "logs/ensemble_test/classify_{model}.log",
    localrule: True
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        code=code_version("evaluate", "metrics.classification"),
    shell:
        "python -m hnct.evaluate ensemble --test-predictions {input.test_predictions:q}"
        " --val-metrics {input.val_metrics:q} --out-predictions {output.predictions:q}"
        " --out-metrics {output.metrics:q} --model {wildcards.model} --log {log:q}"
