# The paper's tables and figures from every evaluate output, marked for `snakemake --report`.


def report_metric_files(wildcards):
    return [
        f"results/evaluate/{task}/{model}/fold{fold}/metrics.json"
        for task in TASKS
        for model in models_for(task)
        for fold in FOLDS
    ]


def report_train_files(name):
    return [
        f"results/train/{task}/{model}/fold{fold}/{name}"
        for task in TASKS
        for model in models_for(task)
        for fold in FOLDS
    ]


def report_prediction_files(wildcards):
    return [f for f in report_train_files("val_predictions.csv") if "/classify/" in f]


def report_history_files(wildcards):
    return report_train_files("history.csv")


def report_per_case_files(wildcards):
    return [f for f in report_metric_files(wildcards) if "/segment/" in f]


def report_crop_sidecars(wildcards):
    return expand("results/crops/{case}.json", case=CASES)


# The published numbers live in the repository, not in the working directory.
PUBLISHED_NUMBERS = str(Path(workflow.basedir) / "workflow/report/published_laryngealct.tsv")

FIGURES = ["roc_pr", "confusion", "calibration", "training_curves", "segmentation_boxplots"]


def get_report_outputs():
    return [
        "results/report/metrics_summary.csv",
        "results/report/cohort.png",
        "results/report/crop_qa.png",
    ] + expand("results/report/{figure}.png", figure=FIGURES)


rule aggregate_metrics:
    input:
        metrics=report_metric_files,
        predictions=report_prediction_files,
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
        markdown="results/report/metrics_summary.md",
        latex="results/report/metrics_summary.tex",
        comparison=report(
            "results/report/comparison_published.csv",
            category="Metrics",
            caption="../report/comparison_published.rst",
        ),
        comparison_md="results/report/comparison_published.md",
    params:
        out_dir="results/report",
        bootstrap=config["report"]["bootstrap"],
        seed=config["report"]["seed"],
        code=code_version("report", "metrics.classification"),
    log:
        "logs/aggregate_metrics/all.log",
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m hnct.report --log {log} tables --metrics {input.metrics}"
        " --predictions {input.predictions} --published {input.published}"
        " --out-dir {params.out_dir} --bootstrap {params.bootstrap} --seed {params.seed}"


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
    params:
        out_dir="results/report",
        dpi=config["report"]["dpi"],
        font_size=config["report"]["font_size"],
        code=code_version("report"),
    log:
        "logs/plot_results/all.log",
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m hnct.report --log {log} figures --predictions {input.predictions}"
        " --histories {input.histories} --per-case {input.per_case} --out-dir {params.out_dir}"
        " --dpi {params.dpi} --font-size {params.font_size}"


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
    params:
        dpi=config["report"]["dpi"],
        font_size=config["report"]["font_size"],
        code=code_version("report"),
    log:
        "logs/plot_cohort/all.log",
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
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
    params:
        dpi=config["report"]["dpi"],
        font_size=config["report"]["font_size"],
        code=code_version("report"),
    log:
        "logs/plot_crop_qa/all.log",
    conda:
        "../../envs/report.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m hnct.report --log {log} crop-qa --crops {input.crops} --out-png {output.png}"
        " --dpi {params.dpi} --font-size {params.font_size}"
