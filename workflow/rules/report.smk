# The paper's tables and figures from every evaluate output, marked for `snakemake --report`.


rule aggregate_metrics:
    input:
        metrics=report_metric_files,
        predictions=report_prediction_files,
        test_metrics=report_test_metric_files,
        test_predictions=report_test_prediction_files,
        per_case=report_per_case_files,
        folds=expand("results/folds/{task}/folds.tsv", task=TASKS),
        published=PUBLISHED_NUMBERS,
    output:
        by_fold=report(
            "results/report/metrics_by_fold.csv",
            category="Metrics",
            caption="../report/metrics_by_fold.rst",
        ),
        summary=report(
            "results/report/metrics_summary.csv",
            category="Metrics",
            caption="../report/metrics_summary.rst",
        ),
        test=report(
            "results/report/metrics_test.csv",
            category="Metrics",
            caption="../report/metrics_test.rst",
        ),
        markdown="results/report/metrics_summary.md",
        latex="results/report/metrics_summary.tex",
        comparison=report(
            "results/report/comparison_published.csv",
            category="Metrics",
            caption="../report/comparison_published.rst",
        ),
        comparison_md="results/report/comparison_published.md",
    log:
        "logs/aggregate_metrics/all.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        bootstrap=config["report"]["bootstrap"],
        seed=config["report"]["seed"],
        plugins=PLUGINS_ARG,
        selection=SELECTION_CAPTION,
        code=code_version(
            "report",
            "metrics.classification",
            "metrics.bootstrap",
            "metrics.segmentation_summary",
            "tasks",
        ),
    shell:
        "python -m hnct.report --log {log} tables {params.plugins} --metrics {input.metrics}"
        " --predictions {input.predictions} --test-metrics {input.test_metrics}"
        " --per-case {input.per_case} --folds {input.folds}"
        " --published {input.published}"
        " --out-by-fold {output.by_fold:q} --out-summary {output.summary:q} --out-test {output.test:q}"
        " --out-markdown {output.markdown:q} --out-latex {output.latex:q}"
        " --out-comparison {output.comparison:q} --out-comparison-md {output.comparison_md:q}"
        " --bootstrap {params.bootstrap} --seed {params.seed}"


rule plot_results:
    input:
        predictions=report_prediction_files,
        histories=report_history_files,
        per_case=report_per_case_files,
    output:
        roc_pr=report(
            "results/report/roc_pr.png",
            category="Classification",
            caption="../report/roc_pr.rst",
        ),
        confusion=report(
            "results/report/confusion.png",
            category="Classification",
            caption="../report/confusion.rst",
        ),
        calibration=report(
            "results/report/calibration.png",
            category="Classification",
            caption="../report/calibration.rst",
        ),
        training=report(
            "results/report/training_curves.png",
            category="Training",
            caption="../report/training_curves.rst",
        ),
        segmentation=report(
            "results/report/segmentation_boxplots.png",
            category="Segmentation",
            caption="../report/segmentation_boxplots.rst",
        ),
        svg=expand("results/report/{figure}.svg", figure=FIGURES),
    log:
        "logs/plot_results/all.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        dpi=config["report"]["dpi"],
        font_size=config["report"]["font_size"],
        plugins=PLUGINS_ARG,
        selection=SELECTION_CAPTION,
        code=code_version("report", "tasks"),
    shell:
        "python -m hnct.report --log {log} figures {params.plugins} --predictions {input.predictions}"
        " --histories {input.histories} --per-case {input.per_case}"
        " --out-roc-pr {output.roc_pr:q} --out-confusion {output.confusion:q}"
        " --out-calibration {output.calibration:q} --out-training {output.training:q}"
        " --out-segmentation {output.segmentation:q} --dpi {params.dpi} --font-size {params.font_size}"


rule plot_cohort:
    input:
        cohort="results/cohort.tsv",
        exclusions="results/exclusions.tsv",
    output:
        png=report(
            "results/report/cohort.png",
            category="Cohort",
            caption="../report/cohort.rst",
        ),
        svg="results/report/cohort.svg",
        table=report(
            "results/report/cohort.csv",
            category="Cohort",
            caption="../report/cohort_table.rst",
        ),
    log:
        "logs/plot_cohort/all.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        dpi=config["report"]["dpi"],
        font_size=config["report"]["font_size"],
        code=code_version("report"),
    shell:
        "python -m hnct.report --log {log} cohort --cohort {input.cohort} --exclusions {input.exclusions}"
        " --out-png {output.png} --out-csv {output.table} --dpi {params.dpi} --font-size {params.font_size}"


rule plot_crop_qa:
    input:
        crops=report_crop_sidecars,
    output:
        png=report(
            "results/report/crop_qa.png",
            category="Cohort",
            caption="../report/crop_qa.rst",
        ),
        svg="results/report/crop_qa.svg",
    log:
        "logs/plot_crop_qa/all.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        dpi=config["report"]["dpi"],
        font_size=config["report"]["font_size"],
        code=code_version("report"),
    shell:
        "python -m hnct.report --log {log} crop-qa --crops {input.crops} --out-png {output.png}"
        " --dpi {params.dpi} --font-size {params.font_size}"


# Shortcut checks (hnct.baselines): the classification metrics per collection and per manufacturer,
# beside logistic-regression baselines that see no image (collection only; spacing, manufacturer,
# scanner, kernel), fitted per outer fold on its training cases. Reads only the folds tables, the
# volume sidecars and the models' validation predictions.
rule shortcut_checks:
    input:
        predictions=report_prediction_files,
        folds=expand(
            "results/folds/{task}/folds.tsv", task=tasks_of_kind("classification")
        ),
        volumes=expand("results/volumes/{case}.json", case=CASES),
    output:
        baselines=report(
            "results/report/baselines.csv",
            category="Shortcut checks",
            caption="../report/baselines.rst",
        ),
        by_group=report(
            "results/report/metrics_by_group.csv",
            category="Shortcut checks",
            caption="../report/metrics_by_group.rst",
        ),
        predictions="results/report/baseline_predictions.csv",
        markdown="results/report/shortcuts.md",
    log:
        "logs/shortcut_checks/all.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        bootstrap=config["report"]["bootstrap"],
        seed=config["report"]["seed"],
        plugins=PLUGINS_ARG,
        code=code_version(
            "baselines", "report", "metrics.classification", "metrics.bootstrap"
        ),
    shell:
        "python -m hnct.baselines --log {log} {params.plugins} --folds {input.folds}"
        " --volume-sidecars {input.volumes} --predictions {input.predictions}"
        " --out-baselines {output.baselines:q} --out-by-group {output.by_group:q}"
        " --out-predictions {output.predictions:q} --out-markdown {output.markdown:q}"
        " --bootstrap {params.bootstrap} --seed {params.seed}"


# The permuted-label control (train.permutation_seeds; rule train_permuted_fold): per model, the real
# pooled AUC with its CI beside the pooled AUC of each permuted-label run. Reads only those models'
# real and permuted validation predictions and the folds tables (patients for the bootstrap), so
# changing the seeds reruns the permuted runs and this table alone.
rule permutation_control:
    input:
        real=permutation_prediction_files("results/train/{task}/{model}/fold{fold}"),
        permuted=permutation_prediction_files(PERMUTED_TRAIN_DIR),
        folds=sorted(
            {f"results/folds/{task}/folds.tsv" for task, _ in PERMUTATION_RUNS}
        ),
    output:
        table=report(
            "results/report/permutation_control.csv",
            category="Shortcut checks",
            caption="../report/permutation_control.rst",
        ),
        markdown="results/report/permutation_control.md",
    log:
        "logs/permutation_control/all.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        bootstrap=config["report"]["bootstrap"],
        seed=config["report"]["seed"],
        plugins=PLUGINS_ARG,
        selection=SELECTION_CAPTION,
        code=code_version(
            "report", "metrics.classification", "metrics.bootstrap", "tasks"
        ),
    shell:
        "python -m hnct.report --log {log} permutation {params.plugins}"
        " --real-predictions {input.real} --permuted-predictions {input.permuted}"
        " --folds {input.folds} --out-csv {output.table:q} --out-markdown {output.markdown:q}"
        " --bootstrap {params.bootstrap} --seed {params.seed}"
