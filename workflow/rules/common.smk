# Everything that is not a rule: config validation, the cohort table read once,
# input functions, code versions, one wildcard_constraints block.

import glob
import json
import os
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

# The hnct package lives beside the rules; shell jobs (local or inside a SLURM job, which
# parses this file again) import it from here, so no install is needed on the cluster.
HNCT_DIR = Path(workflow.basedir) / "workflow"
sys.path.insert(0, str(HNCT_DIR))

import hnct.cohort  # noqa: E402
import hnct.common  # noqa: E402
import hnct.convert  # noqa: E402
import hnct.structures  # noqa: E402
import hnct.models  # noqa: E402
import hnct.tasks  # noqa: E402

hnct.common.prepare_job_environment(HNCT_DIR)


def structure_names_of_last_structures():
    """convert.structure_names as the command-line config files give them, where one sets
    convert.structures (None where none does: Snakemake's own merge stands).

    The names belong to a structure list, which a later config file replaces whole; Snakemake
    merges mappings key by key, so the demo's names (config/config.yaml) would leak into a cohort
    config's (config/hanseg.yaml) and name structures its list does not have. So the last file that
    sets structures starts the names afresh (its own, or none), and files after it that give only
    names add theirs key by key, as Snakemake does.
    """
    from snakemake.common.configfile import load_configfile

    names = None
    for path in workflow.overwrite_configfiles or []:
        section = (load_configfile(path) or {}).get("convert") or {}
        if "structures" in section:
            names = dict(section.get("structure_names") or {})
        elif names is not None:
            names.update(section.get("structure_names") or {})
    return names


if (_names := structure_names_of_last_structures()) is not None:
    config.setdefault("convert", {})["structure_names"] = _names

validate(config, schema="../../config/schema.yaml", set_default=True)

# Tasks and models come from the registries (hnct/tasks/, hnct/models/) and the plugin modules.
PLUGINS = list(config["plugins"])
hnct.tasks.load_plugins(PLUGINS)
# What every registry-driven command gets (in params: a changed plugin list reruns them).
PLUGINS_ARG = " ".join(["--plugins", *PLUGINS]) if PLUGINS else ""
TASKS = list(config["tasks"])
TASK = {task: hnct.tasks.get_task(task) for task in TASKS}
for _task in TASKS:
    config["train"][_task] = hnct.tasks.train_section(
        _task, config["train"].get(_task, {})
    )
    for _model in config["models"].get(_task, []):
        hnct.models.get_model(
            _model, _task
        )  # an unknown name: an error naming the registered ones

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
# A CT given as a volume file (the table's ct_file, relative to dicom_root) is read from a local folder.
if SOURCE != "local" and "ct_file" in COHORT and (COHORT["ct_file"] != "").any():
    raise ValueError(
        f"cohort.source is {SOURCE!r}, but the cohort table gives ct_file for case(s) "
        f"{list(COHORT.loc[COHORT['ct_file'] != '', 'case'])[:5]}: a CT volume file needs source local"
    )
# The cohort's series_uid per case (convert's --series-uid).
SERIES_UID = hnct.convert.series_uid_param(COHORT)
# Whether convert reads a mask folder: for mask labels, or beside an RTSTRUCT/SEG when mask_dir is set.
CONVERT_READS_MASKS = config["convert"]["labels"] == "nrrd" or (
    config["convert"]["labels"] != "none" and bool(config["convert"]["mask_dir"])
)
N_FOLDS = int(config["folds"]["n_folds"])
FOLDS = list(range(N_FOLDS))


wildcard_constraints:
    case="|".join(CASES) if CASES else "NO_CASES",
    fold=r"\d+",
    task="|".join(TASKS) if TASKS else "NO_TASKS",
    model="[a-z][a-z0-9_]*",


def code_version(*modules):
    """A hash of the hnct modules a job runs; in ``params`` it makes a code change rerun the job.

    Snakemake tracks params, inputs and script files itself, not the modules a shell command
    imports; this brings the stage's own code (and hnct.common) into its params. It is
    hnct.tasks.code_hash, the trainer's checkpoint fingerprint too.
    """
    return hnct.tasks.code_hash(modules)[:16]


def tasks_where(attribute):
    """The configured tasks whose registry entry has ``attribute`` set, as a wildcard pattern."""
    names = [task for task in TASKS if getattr(TASK[task], attribute)]
    return "|".join(names) if names else "NO_TASKS"


def get_slice_structure():
    """The structure that marks an exported slice positive: the one task that trains on slices
    names it; '' when no configured task does (the index still counts every structure).
    """
    names = sorted({TASK[task].slice_structure(config) for task in TASKS} - {None})
    if len(names) > 1:
        raise ValueError(
            f"tasks {TASKS} name different slice structures {names}: export_slices marks one"
        )
    return names[0] if names else ""


def cli_options(options):
    """``--name value`` pairs (each value shell-quoted; a list gives its items) from a task's option dict."""
    import shlex

    return " ".join(
        f"--{name} "
        + (
            " ".join(shlex.quote(str(v)) for v in value)
            if isinstance(value, (list, tuple))
            else shlex.quote(str(value))
        )
        for name, value in options.items()
    )


def case_row(wildcards):
    return COHORT.loc[wildcards.case]


def get_case_ct_file(wildcards):
    """The case's CT volume file (the table's ct_file below dicom_root), '' for a DICOM case."""
    ct_file = case_row(wildcards).get("ct_file", "")
    return str(Path(DICOM_ROOT) / ct_file) if ct_file else ""


def get_convert_inputs(wildcards):
    """Every file convert reads for one case, named: ``dicom`` (get_case_dicom), ``ct`` (the CT
    volume file) and ``labels`` (the mask files and the annotation table), so that an edited
    mask reruns that case's convert only. Only files that exist: a missing one is not a DAG error
    but bad input, which convert reports and excludes the case for."""
    ct_file = get_case_ct_file(wildcards)
    dicom = [] if ct_file else get_case_dicom(wildcards)
    inputs = {
        "dicom": dicom,
        "ct": [ct_file] if ct_file and os.path.isfile(ct_file) else [],
        "labels": [],
    }
    # The demo's masks lie in its case folder, a directory() output that is already the dicom input.
    if CONVERT_READS_MASKS and SOURCE != "demo":
        folder = get_case_dicom_dir(wildcards)
        mask_dir = config["convert"]["mask_dir"].replace("{dicom_dir}", folder)
        table = config["convert"]["annotation_table"].replace("{dicom_dir}", folder)
        try:
            _, masks = hnct.structures.find_masks(
                wildcards.case, mask_dir, config["convert"]["mask_pattern"]
            )
        except hnct.common.InputError:
            masks = {}  # no mask folder: convert names it when it excludes the case
        seen = set(dicom)
        files = sorted(str(path) for path in masks.values())
        files += [table] if table and os.path.isfile(table) else []
        inputs["labels"] = [f for f in files if f not in seen]
    return inputs


# The CT's options, per case: a DICOM series' reading checks, or a volume file's rounding tolerance,
# so that changing one reruns only the cases it concerns.
def get_convert_ct_args(wildcards):
    """convert's CT options for one case (the params of rule convert_series)."""
    options = config["convert"]
    ct_file = get_case_ct_file(wildcards)
    if ct_file:
        return f"--ct-file {shlex.quote(ct_file)} --ct-rounding-tolerance-hu {options['ct_rounding_tolerance_hu']}"
    return (
        f"--series-uid {shlex.quote(SERIES_UID(wildcards))}"
        f" --gantry-tilt {options['gantry_tilt']} --max-tilt-deg {options['max_tilt_deg']}"
        f" --max-spacing-spread {options['max_spacing_spread']}"
        f" --max-slice-gap-mm {options['max_slice_gap_mm']} --slice-step-mm {options['slice_step_mm']}"
    )


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
    return list(config["models"].get(task, []))


# The per-case sidecars the configured tasks read (classify: crops, segment: slices): the stages
# the workflow runs for every case, and what the exclusions table collects. A cohort without a
# slice-based task exports no slices.
CASE_SIDECARS = sorted({TASK[task].fold_sidecars for task in TASKS}) or [
    "results/slices/{case}.json"
]
# Tasks that preprocess whole volumes (registry: plan): their per-case sidecars too.
CASE_SIDECARS += [
    f"results/preprocess/{task}/{{case}}.json" for task in TASKS if TASK[task].plan
]


def get_case_sidecars(wildcards=None):
    return [f for pattern in CASE_SIDECARS for f in expand(pattern, case=CASES)]


def get_final_output():
    outputs = ["results/exclusions.tsv"]
    outputs += get_case_sidecars()
    for task in TASKS:
        outputs.append(f"results/folds/{task}/folds.tsv")
        outputs += expand(
            "results/evaluate/{task}/{model}/fold{fold}/metrics.json",
            task=task,
            model=models_for(task),
            fold=FOLDS,
        )
    outputs += report_test_metric_files(None)
    outputs += get_report_outputs()
    return outputs


# --- report inputs (workflow/rules/report.smk) ---

# The published numbers live in the repository, not in the working directory.
PUBLISHED_NUMBERS = str(
    Path(workflow.basedir) / "workflow/report/published_laryngealct.tsv"
)


def tasks_of_kind(kind):
    return [task for task in TASKS if TASK[task].report_kind == kind]


def report_files(pattern, tasks=None):
    """``pattern`` (with {task}, {model}, {fold}) for every configured task, model and fold."""
    return [
        pattern.format(task=task, model=model, fold=fold)
        for task in (TASKS if tasks is None else tasks)
        for model in models_for(task)
        for fold in FOLDS
    ]


def report_metric_files(wildcards):
    return report_files("results/evaluate/{task}/{model}/fold{fold}/metrics.json")


def report_test_metric_files(wildcards):
    """The test-set ensemble of every model of the tasks that have one."""
    return [
        f"results/evaluate/{task}/{model}/test_ensemble/metrics.json"
        for task in TASKS
        if TASK[task].test_ensemble
        for model in models_for(task)
    ]


def report_test_prediction_files(wildcards):
    return [
        f.replace("metrics.json", "predictions.csv")
        for f in report_test_metric_files(wildcards)
    ]


def report_prediction_files(wildcards):
    """Validation predictions of the classification tasks (ROC/PR, confusion, calibration)."""
    return report_files(
        "results/train/{task}/{model}/fold{fold}/val_predictions.csv",
        tasks_of_kind("classification"),
    )


def report_history_files(wildcards):
    return report_files("results/train/{task}/{model}/fold{fold}/history.csv")


def report_per_case_files(wildcards):
    """Per-case metrics of the segmentation tasks (box plots)."""
    return report_files(
        "results/evaluate/{task}/{model}/fold{fold}/per_case.csv",
        tasks_of_kind("segmentation"),
    )


def get_structures_per_case(wildcards):
    """Per-case, per-structure metrics of one task of report_kind structures (report_structures)."""
    return report_files(
        "results/evaluate/{task}/{model}/fold{fold}/per_case.csv", [wildcards.task]
    )


def get_structures_predictions(wildcards):
    return report_files(
        "results/train/{task}/{model}/fold{fold}/val_predictions.csv", [wildcards.task]
    )


def report_crop_sidecars(wildcards):
    return expand("results/crops/{case}.json", case=CASES)


FIGURES = [
    "roc_pr",
    "confusion",
    "calibration",
    "training_curves",
    "segmentation_boxplots",
]


# The per-structure report of each task of report_kind "structures" (workflow/rules/report_structures.smk).
STRUCTURES_REPORT = (
    "table.csv",
    "table.md",
    "boxplots.png",
    "dice_heatmap.png",
    "overlays.png",
)


def get_report_outputs():
    # The shortcut checks (report.smk: shortcut_checks) where a task classifies.
    shortcuts = (
        ["results/report/baselines.csv"] if tasks_of_kind("classification") else []
    )
    # The permuted-label control (report.smk: permutation_control) where train.permutation_seeds is set.
    shortcuts += ["results/report/permutation_control.csv"] if PERMUTATION_RUNS else []
    return (
        [
            "results/report/metrics_summary.csv",
            "results/report/cohort.png",
            "results/report/crop_qa.png",
        ]
        + expand("results/report/{figure}.png", figure=FIGURES)
        # issue 13: the ROI names no structure matched (rule tabulate_unmatched_rois, convert.smk)
        + (
            ["results/report/unmatched_rois.tsv"]
            if config["convert"]["labels"] != "none"
            else []
        )
        + shortcuts
        + expand(
            "results/report/structures/{task}/{name}",
            task=tasks_of_kind("structures"),
            name=STRUCTURES_REPORT,
        )
    )


# --- training inputs (workflow/rules/train.smk) ---

TRAIN_SHARED_KEYS = (
    "seed",
    "device",
    "num_workers",
    "checkpoint_every",
    "selection",
    "inner_folds",
)


def train_config_json(task, model):
    """What the trainer of ``task`` x ``model`` gets as --config: the task's section without the keys
    of the task's other models, plus the shared keys. One model's hyperparameter reruns that model.
    """
    others = hnct.models.other_models_keys(task, model)
    section = {k: v for k, v in config["train"][task].items() if k not in others}
    shared = {key: config["train"][key] for key in TRAIN_SHARED_KEYS}
    return json.dumps({**shared, **section}, sort_keys=True)


# A training job depends on its fold tables alone, not on every case's sidecar: the fold tables are
# made from the sidecars the task reads (its registry entry's fold_sidecars, e.g. the crops for
# classify, the slices for segment), so a changed case reruns them and then training, and the
# trainer finds the sidecars of the cases the table lists in the folder its train_options name. One
# edge per job instead of one per case and job keeps the DAG of thousands of cases fast
# (benchmarks/dag_scale.py).
def get_train_inputs(wildcards):
    """The task's named training inputs (registry: train_inputs) for this fold."""
    return {
        name.replace("-", "_"): pattern.format(task=wildcards.task, fold=wildcards.fold)
        for name, pattern in TASK[wildcards.task].train_inputs.items()
    }


def get_train_options(wildcards, input):
    """``--<input> path`` of every named input plus the task's constant options (train_options)."""
    named = {
        name: input[name.replace("-", "_")]
        for name in TASK[wildcards.task].train_inputs
    }
    return cli_options({**named, **TASK[wildcards.task].train_options})


def get_train_config(wildcards):
    return train_config_json(wildcards.task, wildcards.model)


def get_train_code(wildcards):
    """Beside the rule's static code_version: the task's and the model's own modules (all of
    hnct.tasks.training_modules, the checkpoint fingerprint's list)."""
    return code_version(*hnct.tasks.training_modules(wildcards.task, wildcards.model))


# --- evaluation inputs (workflow/rules/evaluate.smk) ---


def get_evaluate_inputs(wildcards):
    inputs = {
        "predictions": "results/train/{task}/{model}/fold{fold}/val_predictions.csv".format(
            **wildcards
        )
    }
    for name, pattern in TASK[wildcards.task].evaluate_inputs.items():
        inputs[name.replace("-", "_")] = pattern.format(**wildcards)
    return inputs


def get_evaluate_options(wildcards, input):
    """The task's extra inputs and its options (registry: evaluate_options; only what it uses)."""
    task = TASK[wildcards.task]
    named = {name: input[name.replace("-", "_")] for name in task.evaluate_inputs}
    options = {
        name: str(value).format(**wildcards)
        for name, value in task.evaluate_options(config).items()
    }
    return cli_options({**named, **options})


def get_task_code(wildcards):
    """Beside a rule's static code_version: the task's own module and the modules it names."""
    task = TASK[wildcards.task]
    return code_version(task.__module__, *task.modules)


def get_evaluate_mem_mb(wildcards):
    return TASK[wildcards.task].evaluate_mem_mb


# --- whole-volume preprocessing inputs (workflow/rules/preprocess.smk) ---


def get_preprocess_options(step):
    """A params function: the task's options of preprocessing ``step`` (registry: preprocess_options)."""

    def options(wildcards):
        return cli_options(TASK[wildcards.task].preprocess_options(config)[step])

    return options


def get_preprocess_sidecars(wildcards):
    return expand(
        "results/preprocess/{task}/{case}.json", task=wildcards.task, case=CASES
    )


# --- fold inputs (workflow/rules/folds.smk) ---


def get_fold_sidecars(wildcards):
    """The per-case sidecars the task's folds read (registry: fold_sidecars)."""
    return expand(TASK[wildcards.task].fold_sidecars, case=CASES)


def get_fold_options(wildcards):
    return cli_options(TASK[wildcards.task].fold_options(config))


def train_priority(wildcards):
    """The task's registry train_priority: long-training tasks' jobs start first (their folds and
    fold slice lists too), short jobs fill the cores beside them."""
    return TASK[wildcards.task].train_priority


# export_slices feeds only the tasks that train on slices: their priority, so that no short training
# job of another task (startable once every crop is done) takes a core from the last slice exports
# (Snakemake does not pass a job's priority on to the jobs it waits for).
SLICES_PRIORITY = max(
    [TASK[task].train_priority for task in TASKS if TASK[task].slice_lists], default=0
)


def train_runtime(wildcards, attempt):
    """Minutes; each retry asks for more (and resumes from the checkpoint)."""
    return config["resources"]["train_runtime_min"] * attempt


# --- permuted-label control inputs (train.smk: train_permuted_fold; report.smk: permutation_control) ---

PERMUTATION_SEEDS = [int(seed) for seed in config["train"]["permutation_seeds"]]


def permutation_runs():
    """(task, model) pairs of the permuted-label control: the listed models (default: the first one)
    of each configured task that supports it."""
    tasks = [task for task in TASKS if TASK[task].label_permutation]
    chosen = config["train"]["permutation_models"]
    if chosen is None:
        return [(task, models_for(task)[0]) for task in tasks if models_for(task)]
    runs = [
        (task, model) for task in tasks for model in models_for(task) if model in chosen
    ]
    unknown = sorted(set(chosen) - {model for _, model in runs})
    if unknown:
        trained = {task: models_for(task) for task in tasks}
        raise ValueError(
            f"train.permutation_models: {unknown} trained by no task with a permuted-label control "
            f"(tasks and their models: {trained or 'none configured'})"
        )
    return runs


PERMUTATION_RUNS = permutation_runs() if PERMUTATION_SEEDS else []
PERMUTED_TRAIN_DIR = "results/train_permuted/{task}/{model}/seed{seed}/fold{fold}"


def get_permuted_train_options(wildcards, input):
    return f"{get_train_options(wildcards, input)} --permutation-seed {int(wildcards.seed)}"


def permutation_prediction_files(directory):
    """The outer-fold predictions under ``directory`` (a pattern of task, model, fold, and seed for the
    permuted runs) of every permuted model, in fold order (the real ones: the metrics summary's order,
    so the bootstrap draws the same resamples)."""
    seeds = PERMUTATION_SEEDS if "{seed}" in directory else [None]
    return [
        f"{directory.format(task=task, model=model, seed=seed, fold=fold)}/val_predictions.csv"
        for task, model in PERMUTATION_RUNS
        for seed in seeds
        for fold in FOLDS
    ]
