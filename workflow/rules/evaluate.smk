# evaluate{task, model, fold}: metrics of one validation fold (hnct.evaluate hands it to the task's
# evaluation: classify hnct.evaluate, segment hnct.segeval). The task's registry entry adds its inputs
# (segment: the fold's slice list, whose cases' slices sidecars lead to the slice indexes and the 3D
# source volume and labels for HD95 and NSD; they are upstream of the slice list, so no per-case
# inputs) and the options it uses.
# ensemble_test{task, model}: for tasks with a test ensemble (classify), the held-out test set
# predicted by every fold's best model, averaged (the k-fold ensemble), with each fold's own test
# metrics and the single best fold.


rule evaluate_fold:
    input:
        unpack(get_evaluate_inputs),
    output:
        metrics="results/evaluate/{task}/{model}/fold{fold}/metrics.json",
        per_case="results/evaluate/{task}/{model}/fold{fold}/per_case.csv",
    log:
        "logs/evaluate_fold/{task}_{model}_{fold}.log",
    conda:
        "../../envs/train.yaml"
    threads: 1
    resources:
        mem_mb=get_evaluate_mem_mb,
        runtime=30,
    params:
        options=get_evaluate_options,
        plugins=PLUGINS_ARG,
        code=code_version("evaluate", "tasks"),
        task_code=get_task_code,
    shell:
        "python -m hnct.evaluate --task {wildcards.task} --predictions {input.predictions:q}"
        " --out-metrics {output.metrics:q} --out-per-case {output.per_case:q}"
        " --model {wildcards.model} --fold {wildcards.fold} {params.options} {params.plugins}"
        " --log {log:q}"


rule ensemble_test:
    input:
        test_predictions=expand(
            "results/train/{{task}}/{{model}}/fold{fold}/test_predictions.csv",
            fold=FOLDS,
        ),
        val_metrics=expand(
            "results/evaluate/{{task}}/{{model}}/fold{fold}/metrics.json", fold=FOLDS
        ),
    output:
        predictions="results/evaluate/{task}/{model}/test_ensemble/predictions.csv",
        metrics="results/evaluate/{task}/{model}/test_ensemble/metrics.json",
    log:
        "logs/ensemble_test/{task}_{model}.log",
    wildcard_constraints:
        task=tasks_where("test_ensemble"),
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
        " --out-metrics {output.metrics:q} --task {wildcards.task} --model {wildcards.model}"
        " --log {log:q}"
