# Everything that is not a rule: config validation, the cohort table read once,
# input functions, code versions, one wildcard_constraints block.

import glob
import hashlib
import json
import os
import sys
from pathlib import Path

from snakemake.utils import validate

# The hnct package lives beside the rules; shell jobs (local or inside a SLURM job, which
# parses this file again) import it from here, so no install is needed on the cluster.
HNCT_DIR = Path(workflow.basedir) / "workflow"
sys.path.insert(0, str(HNCT_DIR))

import hnct.cohort  # noqa: E402
import hnct.common  # noqa: E402

hnct.common.prepare_job_environment(HNCT_DIR)


validate(config, schema="../../config/schema.yaml", set_default=True)

SOURCE = config["cohort"]["source"]
if SOURCE == "demo":
    import hnct.demo  # noqa: E402

    DICOM_ROOT = "results/demo/dicom"
    COHORT = hnct.demo.plan_cohort(**config["demo"])
else:
    DICOM_ROOT = config["cohort"]["dicom_root"]
    if not config["cohort"]["table"]:
        raise ValueError(
            f"cohort.source is {SOURCE!r}: set cohort.table to a cohort TSV (see config/README.md)"
        )
    COHORT = hnct.cohort.read_cohort(config["cohort"]["table"])

CASES = list(COHORT["case"])
TASKS = list(config["tasks"])
N_FOLDS = int(config["folds"]["n_folds"])
FOLDS = list(range(N_FOLDS))


wildcard_constraints:
    case="|".join(CASES) if CASES else "NO_CASES",
    fold=r"\d+",
    task="classify|segment",
    model="[a-z0-9]+",


def code_version(*modules):
    """A hash of the hnct modules a job runs; in ``params`` it makes a code change rerun the job.

    Snakemake tracks params, inputs and script files itself, not the modules a shell
    command imports; this brings the stage's own code (and hnct.common) into its params.
    """
    digest = hashlib.sha256()
    for module in ("common",) + modules:
        parts = module.split(".")
        path = HNCT_DIR.joinpath("hnct", *parts[:-1], parts[-1] + ".py")
        if not path.exists():
            path = HNCT_DIR.joinpath("hnct", *parts, "__init__.py")
        digest.update(module.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def case_row(wildcards):
    return COHORT.loc[wildcards.case]


def get_case_dicom(wildcards):
    """What convert reads for one case: the demo case's folder, a local folder's files, or a fetch sidecar."""
    row = case_row(wildcards)
    if SOURCE == "demo":
        return f"{DICOM_ROOT}/{row['dicom_dir']}"  # the case's folder (rule demo_case)
    if SOURCE == "local":
        folder = Path(DICOM_ROOT) / row["dicom_dir"]
        files = sorted(
            p for p in glob.glob(f"{folder}/**/*", recursive=True) if os.path.isfile(p)
        )
        # A missing or empty folder is not a DAG error: convert excludes the case with the reason.
        return files
    return [f"results/fetch/{wildcards.case}.json"]


def get_case_dicom_dir(wildcards):
    row = case_row(wildcards)
    return (
        str(Path(DICOM_ROOT) / row["dicom_dir"])
        if row["dicom_dir"]
        else str(Path(DICOM_ROOT))
    )


def get_upstream_fetch(wildcards):
    return (
        f"results/fetch/{wildcards.case}.json" if SOURCE in ("tcia", "manifest") else ""
    )


def models_for(task):
    return list(config["models"][task])


def get_final_output():
    outputs = ["results/exclusions.tsv"]
    outputs += expand("results/slices/{case}.json", case=CASES)
    for task in TASKS:
        outputs.append(f"results/folds/{task}/folds.tsv")
        outputs += expand(
            "results/evaluate/{task}/{model}/fold{fold}/metrics.json",
            task=task,
            model=models_for(task),
            fold=FOLDS,
        )
    if "classify" in TASKS:
        outputs += report_test_metric_files(None)
    outputs += get_report_outputs()
    return outputs


# --- report inputs (workflow/rules/report.smk) ---

# The published numbers live in the repository, not in the working directory.
PUBLISHED_NUMBERS = str(
    Path(workflow.basedir) / "workflow/report/published_laryngealct.tsv"
)


def report_metric_files(wildcards):
    return [
        f"results/evaluate/{task}/{model}/fold{fold}/metrics.json"
        for task in TASKS
        for model in models_for(task)
        for fold in FOLDS
    ]


def report_test_metric_files(wildcards):
    """The test-set ensemble of every classification model (segment has none)."""
    return expand(
        "results/evaluate/classify/{model}/test_ensemble/metrics.json",
        model=models_for("classify") if "classify" in TASKS else [],
    )


def report_test_prediction_files(wildcards):
    return [
        f.replace("metrics.json", "predictions.csv")
        for f in report_test_metric_files(wildcards)
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
    return [
        f.replace("metrics.json", "per_case.csv")
        for f in report_metric_files(wildcards)
        if "/segment/" in f
    ]


def report_crop_sidecars(wildcards):
    return expand("results/crops/{case}.json", case=CASES)


FIGURES = [
    "roc_pr",
    "confusion",
    "calibration",
    "training_curves",
    "segmentation_boxplots",
]


def get_report_outputs():
    return [
        "results/report/metrics_summary.csv",
        "results/report/cohort.png",
        "results/report/crop_qa.png",
    ] + expand("results/report/{figure}.png", figure=FIGURES)


# --- training inputs (workflow/rules/train.smk) ---

TRAIN_SHARED_KEYS = ("seed", "device", "num_workers", "checkpoint_every")
# What the trainer gets as --config: the task's section plus the shared keys (a change reruns it).
TRAIN_CONFIG_JSON = {
    task: json.dumps(
        {
            **{key: config["train"][key] for key in TRAIN_SHARED_KEYS},
            **config["train"][task],
        },
        sort_keys=True,
    )
    for task in ("classify", "segment")
}


# A training job depends on its fold table alone, not on every case's sidecar: the fold tables are
# made from the slices sidecars of all cases (rule split_folds), so a changed case reruns them and
# then training, and the trainer finds the sidecars of the cases the table lists in
# results/crops/ and results/slices/. One edge per job instead of one per case and job keeps the DAG
# of thousands of cases fast (benchmarks/dag_scale.py). The crops are upstream of the fold tables
# only when slices are cut from the crop; with slices.source: volume, classification also depends on
# results/train/crops_index.tsv (made by index_crops, the one job that reads every crop sidecar).
CROPS_BEFORE_FOLDS = config["slices"]["source"] == "crop"


def get_train_inputs(wildcards):
    """Fold tables of one training job (the other task's inputs are empty)."""
    if wildcards.task == "segment":
        return {
            "folds": "results/folds/segment/folds.tsv",
            "fold_slices": f"results/folds/segment/fold{wildcards.fold}_slices.tsv",
            "crops_index": [],
        }
    return {
        "folds": f"results/folds/{wildcards.task}/folds.tsv",
        "fold_slices": [],
        "crops_index": [] if CROPS_BEFORE_FOLDS else "results/train/crops_index.tsv",
    }


def get_train_config(wildcards):
    return TRAIN_CONFIG_JSON[wildcards.task]


def train_runtime(wildcards, attempt):
    """Minutes; each retry asks for more (and resumes from the checkpoint)."""
    return config["resources"]["train_runtime_min"] * attempt
