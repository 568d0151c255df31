"""The task registry: one module per task, one class each, registered with ``@register_task``.

A task class is the only place that knows a task's name and what the rest of hnct asks of it:

workflow (read at parse time by workflow/rules/common.smk; nothing here imports torch)
    ``fold_sidecars``     the per-case sidecar pattern its folds read (``results/crops/{case}.json``):
                          the upstream stage whose outputs make a case usable, and that its jobs read
    ``slice_lists``       True when folds also writes per-fold slice lists (``fold{k}_slices.tsv``)
    ``train_inputs``      named input patterns of one training job (``{task}``, ``{fold}`` filled in
                          by the rule); each name is the trainer's ``--<name>`` option
    ``train_options``     constant trainer options (folders where the job finds its cases' sidecars)
    ``evaluate_inputs``   extra named inputs of ``evaluate_fold`` (besides ``predictions``)
    ``evaluate_options``  ``(config) -> {option: value}`` of ``evaluate_fold`` (only what it uses)
    ``fold_options``      ``(config) -> {option: value}`` of ``split_folds`` (how labels are made)
    ``slice_structure``   ``(config) -> name or None``: the structure whose voxels make an exported
                          slice ``positive`` (rule export_slices), for a task that trains on slices
    ``test_ensemble``     True when its folds' test-set predictions are ensembled (rule ensemble_test)
    ``train_priority``    Snakemake priority of its training jobs (and of its fold slice lists): a
                          task whose folds train for minutes sets it above 0, so its jobs start first
                          and the short ones fill the cores beside them (0: scheduler's order)
    ``label_permutation`` the trainer input (its ``prepare`` key, e.g. ``folds_tsv``) holding the
                          ``case, patient, label, fold`` table whose training-side labels a
                          permuted-label control run permutes (``train.permutation_seeds``, rule
                          train_permuted_fold, :func:`hnct.train.permute_training_labels`); None: the
                          task has no permuted-label control (its label does not come from one table)
    ``stratified``        False when its folds are grouped by patient but not stratified by the label
                          (a segmentation task whose label only describes the case): GroupKFold
    ``plan``              True when it trains on whole volumes preprocessed as nnU-Net does (rules
                          fingerprint_task, preprocess_case, plan_fold in workflow/rules/preprocess.smk,
                          :mod:`hnct.preprocess`); ``preprocess_options(config)`` then gives
                          ``{"fingerprint" | "case" | "plan": {option: value}}``, each step's options
    ``report_kind``       ``classification``, ``segmentation`` or ``structures``: the tables and
                          figures it adds to the report (ROC/PR, confusion and calibration; per-case
                          box plots; per-structure tables, box plots, heat map and overlays)
    ``modules``           hnct modules its jobs run besides train/evaluate (hashed into code_version)
folds    ``case_label(case, row, sidecar_path, sidecar, cohort_file, options)``
training ``prepare(cfg, fold, inputs)`` -> a run object (datasets and augmentation, loss, validation
         through ``hnct.metrics``, prediction writing); ``optimizer(cfg, params)``,
         ``scheduler(optimizer, cfg)``; ``metric_name``, ``history_columns``, ``prediction_columns``;
         ``selection_metric`` and ``selection_chooses`` (words for :func:`selection_caption`),
         ``inner_required_labels`` (labels both sides of the inner split hold)

Model selection never sees the reported data (``train.selection``, shared by every task):
``inner`` (default): ``prepare`` holds :func:`inner_rows` of the outer fold's training side out of
training (patient-grouped, stratified: :func:`hnct.splits.inner_split`). The run object the trainer
drives (hnct.train) then has

* ``cases``: ``{"train", "inner", "val", "test"}`` case IDs (``val`` = the outer fold);
* ``train_loader(epoch, num_workers)``, ``loss(outputs, batch)`` (a model that returns a list in
  training mode returns ``[main, aux...]``: the trainer optimises ``loss(list)`` and records
  ``loss(main)``, the definition validation uses, so both curves are on one scale);
* ``validate(model, device, num_workers, amp)`` -> ``(metrics, predictions)`` of the **inner**
  validation cases only; ``metrics`` holds ``metric_name`` and the ``history_columns`` besides
  ``epoch, train_loss, lr, seconds`` (built-in tasks: ``inner_loss``, ``inner_<metric>``);
* ``selection(metrics)`` -> a tuple, larger is better (best epoch, early stopping); the scheduler
  is stepped with ``metrics[metric_name]``;
* ``write_predictions(model, device, num_workers, amp, out_dir, path, split)`` with ``split``
  ``"val"`` (the outer fold, written once after training by the selected model), ``"inner"`` and
  ``"test"``; an empty set gives the header and no rows.

``fixed``: no inner split (``inner_rows`` is all False), ``epochs`` epochs with no validation, no
early stopping and no scheduler step; the last epoch's model predicts.
evaluate ``evaluate_main(argv)``: the ``python -m hnct.evaluate --task <name>`` command
report   ``report_kind`` (above) and ``report_title``, the heading of its tables

Built-in tasks: :mod:`hnct.tasks.classify`, :mod:`hnct.tasks.segment` and :mod:`hnct.tasks.oar`. Plugin modules (config
``plugins``, importable module names) register more tasks and models the same way; every hnct
command that needs the registry takes ``--plugins``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from typing import Any, ClassVar

# Task and model names become path components and wildcards.
NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class Task:
    """Base class of a task; see the module doc for every attribute a task declares."""

    name: ClassVar[str] = ""
    report_kind: ClassVar[str] = ""
    positive_label: ClassVar[str] = "positive"  # what a label-1 case is called in messages
    report_title: ClassVar[str] = ""
    fold_sidecars: ClassVar[str] = ""
    slice_lists: ClassVar[bool] = False
    train_inputs: ClassVar[dict[str, str]] = {}
    train_options: ClassVar[dict[str, str]] = {}
    evaluate_inputs: ClassVar[dict[str, str]] = {}
    evaluate_mem_mb: ClassVar[int] = 1000
    test_ensemble: ClassVar[bool] = False
    train_priority: ClassVar[int] = 0
    label_permutation: ClassVar[str | None] = None
    stratified: ClassVar[bool] = True
    plan: ClassVar[bool] = False
    modules: ClassVar[tuple[str, ...]] = ()
    metric_name: ClassVar[str] = ""
    # what the caption says the epoch is selected on, and what else the inner validation chooses
    selection_metric: ClassVar[str] = ""
    selection_chooses: ClassVar[str] = "the epoch"
    # labels both sides of the inner split must hold (where the training side has them)
    inner_required_labels: ClassVar[tuple[int, ...]] = (0, 1)
    history_columns: ClassVar[tuple[str, ...]] = ()
    prediction_columns: ClassVar[tuple[str, ...]] = ()
    # JSON schema of ``train.<name>`` for a plugin task (built-in tasks: config/schema.yaml)
    config_schema: ClassVar[dict[str, Any] | None] = None

    # ---- workflow
    @classmethod
    def fold_options(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {}

    @classmethod
    def evaluate_options(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {}

    @classmethod
    def slice_structure(cls, config: dict[str, Any]) -> str | None:
        return None

    @classmethod
    def preprocess_options(cls, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {"fingerprint": {}, "case": {}, "plan": {}}

    # ---- folds
    @classmethod
    def case_label(cls, case: str, row, sidecar_path, sidecar: dict[str, Any], cohort_file: str,
                   options: dict[str, Any]) -> tuple[int | None, dict[str, str] | None]:
        """``(label, None)`` for a usable case or ``(None, exclusion row)`` naming stage, file, reason."""
        raise NotImplementedError(f"task {cls.name} does not define case labels")

    # ---- training
    @classmethod
    def prepare(cls, cfg: dict[str, Any], fold: int, inputs: dict[str, Any]):
        raise NotImplementedError(f"task {cls.name} does not define training")

    @classmethod
    def optimizer(cls, cfg: dict[str, Any], parameters):
        raise NotImplementedError(f"task {cls.name} does not define an optimizer")

    @classmethod
    def scheduler(cls, optimizer, cfg: dict[str, Any]):
        """A scheduler stepped with the validation metric after every epoch, or None."""
        return None

    # ---- evaluate
    @classmethod
    def evaluate_main(cls, argv: list[str]) -> int:
        raise NotImplementedError(f"task {cls.name} does not define evaluation")


TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: register ``cls`` under ``cls.name``."""
    if not NAME.match(cls.name or ""):
        raise ValueError(f"task class {cls.__qualname__}: name {cls.name!r} must match {NAME.pattern}")
    if cls.name in TASKS and TASKS[cls.name] is not cls:
        raise ValueError(f"task {cls.name!r} is registered twice ({TASKS[cls.name].__module__} and {cls.__module__})")
    TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> type[Task]:
    """The registered task ``name``; ValueError naming the registered ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(sorted(TASKS))}") from None


def task_names() -> list[str]:
    return sorted(TASKS)


def load_plugins(modules: Iterable[str]) -> None:
    """Import plugin modules (config ``plugins``): their tasks and models register themselves."""
    for module in modules:
        if module:
            importlib.import_module(module)


def evaluate_fold_parser(prog: str, task: str | None, predictions_help: str, description: str | None = None):
    """An argument parser with the options rule ``evaluate_fold`` passes every task's
    ``evaluate_main`` (``--task --predictions --out-metrics --out-per-case --model --fold --log``);
    ``task``: the default of ``--task`` (None: required). The task adds its own options."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--task", default=task, required=task is None)
    parser.add_argument("--predictions", required=True, help=predictions_help)
    parser.add_argument("--out-metrics", required=True, help="metrics.json")
    parser.add_argument("--out-per-case", required=True, help="per_case.csv")
    parser.add_argument("--model", required=True)
    parser.add_argument("--fold", required=True, type=int)
    parser.add_argument("--log", help="log file (also logged to stderr)")
    return parser


def add_plugins_argument(parser) -> None:
    """``--plugins MODULE ...``: what every registry-driven command takes (config ``plugins``)."""
    parser.add_argument("--plugins", nargs="*", default=[],
                        help="modules that register more tasks and models (config plugins)")


# The hnct modules that define every training run; with the task's and the model's own modules
# (training_modules) they are what the trainer's checkpoint fingerprint and the train rule's
# code_version hash: both call code_hash on the same list.
TRAINER_MODULES = ("train", "data", "losses", "splits")


def _package_root():
    from pathlib import Path

    return Path(__file__).resolve().parent.parent


def module_file(module: str):
    """The source file of ``hnct.<module>`` (``crop``, ``metrics.segmentation``, ``hnct.tasks.classify``)
    found by path, or of any other importable module (a plugin)."""
    from pathlib import Path

    name = module.removeprefix("hnct.")
    parts = name.split(".")
    for path in (_package_root().joinpath(*parts[:-1], parts[-1] + ".py"),
                 _package_root().joinpath(*parts, "__init__.py")):
        if path.exists():
            return path
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ValueError(f"module {module!r} cannot be found (a plugin must be on PYTHONPATH)")
    return Path(spec.origin)


def training_modules(task: str, model: str) -> tuple[str, ...]:
    """What defines a run of ``task`` x ``model``: the trainer, the registries, the task's module and
    the modules it names, the model's module. A new model file is a new model (its own jobs); an
    edit of one model's module reruns that model's jobs only."""
    from hnct.models import get_model

    spec = get_task(task)
    return (*TRAINER_MODULES, "tasks", spec.__module__, *spec.modules, "models", get_model(model, task).module)


def code_hash(modules: Iterable[str]) -> str:
    """sha256 (hex) of ``hnct.common`` and the source files of ``modules`` (names and contents): the
    one code hash of hnct (every rule's code_version, the trainer's checkpoint fingerprint)."""
    import hashlib

    root = _package_root()
    digest = hashlib.sha256()
    files = dict.fromkeys(module_file(m) for m in ("common", *modules))
    for path in files:
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def train_section(task: str, given: dict[str, Any]) -> dict[str, Any]:
    """``train.<task>`` with defaults: a built-in task's section is checked by config/schema.yaml; a
    plugin task's by its ``config_schema`` (its defaults filled in, then validated)."""
    schema = get_task(task).config_schema
    if schema is None:
        return given
    import jsonschema

    section = {**{key: prop["default"] for key, prop in schema.get("properties", {}).items()
                  if "default" in prop}, **given}
    try:
        jsonschema.validate(section, schema)
    except jsonschema.ValidationError as error:
        raise ValueError(f"config train.{task}: {error.message}") from None
    return section


# ---------------------------------------------------------------- model selection
SELECTION_MODES = ("inner", "fixed")


def inner_rows(cfg: dict[str, Any], rows, where: str, required_labels: tuple[int, ...] = (0, 1)):
    """Boolean mask of the inner-validation rows (``case, patient, label``) of an outer fold's
    training side: :func:`hnct.splits.inner_split` with ``train.inner_folds`` and ``train.seed`` for
    ``train.selection: inner`` (both sides hold ``required_labels``: the task's
    ``inner_required_labels``); all False for ``fixed``. ``where`` names the fold in errors."""
    import numpy as np

    from hnct.splits import inner_split

    if cfg["selection"] not in SELECTION_MODES:
        raise ValueError(f"train.selection must be one of {', '.join(SELECTION_MODES)}, not {cfg['selection']!r}")
    if cfg["selection"] == "fixed":
        return np.zeros(len(rows), dtype=bool)
    return inner_split(rows, int(cfg["inner_folds"]), int(cfg["seed"]), where, required_labels)


def selection_caption(task: str, config: dict[str, Any]) -> str:
    """One sentence for the report: what ``task``'s reported models were selected on (from the config)."""
    spec = get_task(task)
    train = config["train"]
    section = train.get(task, {})
    epochs, patience = section.get("epochs"), section.get("patience")
    if train["selection"] == "fixed":
        return (f"{task}: {epochs} epoch{'' if epochs == 1 else 's'} on each outer fold's whole training side "
                f"and the last epoch's model, "
                f"no model selection and no tuned threshold; the outer fold is predicted once, after training.")
    return (f"{task}: {spec.selection_chooses} chosen on an inner validation split of each outer fold's "
            f"training side (1/{train['inner_folds']} of its patients, grouped by patient, stratified, "
            f"seed {train['seed']}; {spec.selection_metric or spec.metric_name}, at most {epochs} epochs, "
            f"early stop after {patience} without improvement); the outer fold and the test set never "
            f"take part in the selection and are predicted once, by the selected model.")

import importlib.util  # noqa: E402

from hnct.tasks import classify, oar, segment  # noqa: E402,F401  (register the built-in tasks)
