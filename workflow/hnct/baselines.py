"""Shortcut checks for the classification tasks: results per collection and per manufacturer, and
classifiers that never see an image, so a reader sees how much the image adds.

A cohort pooled from several collections can be "solved" from where a scan came from: in LaryngealCT's
test split T4 prevalence is 23 % outside RADCURE and 5.7 % inside it, and the collection alone reaches
a test AUC of about 0.65. This stage reads only what earlier stages wrote (each task's
``results/folds/{task}/folds.tsv``, the volume sidecars ``results/volumes/{case}.json``, the models'
``val_predictions.csv``) and writes:

``baseline_predictions.csv``  out-of-fold P(T4) of the image-free baselines: ``task, baseline, case,
                              label, probability, fold`` (``fold`` = the validation fold; ``test`` rows
                              are the mean over the fold baselines, like the models' test ensemble).
``baselines.csv``             per task × model (the image models and the baselines) × setting
                              (``cv``, ``test``) × metric: the pooled value and its 95 % CI
                              (patient-cluster bootstrap stratified by class, hnct.metrics.bootstrap).
``metrics_by_group.csv``      the same per collection and per manufacturer (``group_by``, ``group``),
                              with the number of cases, patients and T4 cases of each group.
``shortcuts.md``              both as tables with their captions.

Baselines (scikit-learn ``LogisticRegression``, ``class_weight="balanced"`` so that P(T4) >= 0.5 is a
usable operating point whatever the prevalence; numbers standardised, categories one-hot): fitted on
each outer fold's training cases only (folds.tsv: every non-test case outside the fold) and scored on
that validation fold, the same folds as the models, pooled like them.

* ``collection_only``: the collection (one-hot).
* ``metadata_only``: in-plane pixel spacing (x, y) and slice spacing (z) in mm, manufacturer,
  scanner model (DICOM ManufacturerModelName) and reconstruction kernel, from the volume sidecars.
  The sidecars record the slice spacing, not the SliceThickness tag: the spacing stands for it.

A training fold with one class only gives its validation cases that class's training prevalence
(scikit-learn's ``DummyClassifier(strategy="prior")``), logged.

CLI: ``python -m hnct.baselines --folds results/folds/classify/folds.tsv --volume-sidecars
results/volumes/*.json --predictions results/train/classify/*/fold*/val_predictions.csv --out-dir
results/report --bootstrap 1000 --seed 7``
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from hnct import report
from hnct.common import InputError, exit_status, read_json, setup_logging
from hnct.tasks import add_plugins_argument, get_task, load_plugins

log = logging.getLogger("hnct.baselines")

NUMERIC_METADATA = ("pixel_spacing_x_mm", "pixel_spacing_y_mm", "slice_spacing_mm")
CATEGORICAL_METADATA = ("manufacturer", "scanner", "kernel")
BASELINES = {
    "collection_only": ((), ("collection",)),
    "metadata_only": (NUMERIC_METADATA, CATEGORICAL_METADATA),
}
# Per-group columns: the threshold-free AUC and the two class-wise rates that stay defined in a
# collection that holds one class only.
GROUP_METRICS = ("auc", "balanced_accuracy", "sensitivity", "specificity")
GROUPINGS = ("collection", "manufacturer")
TEST = "test"
OUT_FILES = {
    "predictions": "baseline_predictions.csv",
    "baselines": "baselines.csv",
    "by_group": "metrics_by_group.csv",
    "markdown": "shortcuts.md",
}
BASELINE_COLUMNS = ["task", "model", "image", "setting", "n_cases", "n_patients", "metric", "value",
                    "ci_low", "ci_high"]
GROUP_COLUMNS = ["task", "model", "image", "group_by", "group", "n_cases", "n_patients", "n_positive", "metric",
                 "value", "ci_low", "ci_high"]


def read_case_metadata(folds: pd.DataFrame, folds_file: str | Path, volume_sidecars: Iterable[str | Path]) -> pd.DataFrame:
    """``folds`` with each case's acquisition metadata from its volume sidecar (``results/volumes/{case}.json``).

    A case of the folds table without a sidecar, or with one that is not ``ok`` or has no spacing,
    is an InputError naming the case and the file. A missing manufacturer/scanner/kernel is the
    category ``unknown`` (kept, not dropped).
    """
    by_case = {Path(f).stem: Path(f) for f in volume_sidecars}
    rows = []
    for case in folds["case"]:
        path = by_case.get(case)
        if path is None:
            raise InputError(case, folds_file, "no volume sidecar results/volumes/{case}.json given for this case")
        sidecar = read_json(path)
        if sidecar.get("status") != "ok":
            raise InputError(case, path, f"volume sidecar status is {sidecar.get('status')!r}")
        spacing = sidecar.get("spacing")
        if not spacing or len(spacing) != 3:
            raise InputError(case, path, f"volume sidecar has no (x, y, z) spacing: {spacing!r}")
        rows.append({"case": case, "pixel_spacing_x_mm": float(spacing[0]), "pixel_spacing_y_mm": float(spacing[1]),
                     "slice_spacing_mm": float(spacing[2]),
                     **{key: str(sidecar.get(source) or "unknown")
                        for key, source in (("manufacturer", "manufacturer"), ("scanner", "model"),
                                            ("kernel", "kernel"))}})
    return folds.merge(pd.DataFrame(rows, columns=["case", *NUMERIC_METADATA, *CATEGORICAL_METADATA]), on="case")


def _classifier(numeric: tuple[str, ...], categorical: tuple[str, ...]):
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    columns = ColumnTransformer([("numeric", StandardScaler(), list(numeric)),
                                 ("categorical", OneHotEncoder(handle_unknown="ignore"), list(categorical))])
    return make_pipeline(columns, LogisticRegression(class_weight="balanced", max_iter=1000))


def fit_baseline(cases: pd.DataFrame, name: str) -> pd.DataFrame:
    """Out-of-fold (and test-ensemble) P(T4) of one baseline, fitted per outer fold on its training cases."""
    from sklearn.dummy import DummyClassifier

    numeric, categorical = BASELINES[name]
    features = list(numeric) + list(categorical)
    fold = cases["fold"].astype(str)
    labels = cases["label"].astype(int).to_numpy()
    test = (fold == TEST).to_numpy()
    rows, test_probability = [], []
    for k in sorted(set(fold[~test]), key=int):
        train = ((fold != k) & ~test).to_numpy()
        val = (fold == k).to_numpy()
        if len(set(labels[train])) < 2:
            log.warning("%s fold %s: the training cases hold one class only: the class prior is the prediction", name, k)
            model = DummyClassifier(strategy="prior")
        else:
            model = _classifier(numeric, categorical)
        model.fit(cases.loc[train, features], labels[train])
        rows.append(pd.DataFrame({"case": cases.loc[val, "case"].to_numpy(), "label": labels[val],
                                  "probability": model.predict_proba(cases.loc[val, features])[:, 1], "fold": k}))
        if test.any():
            test_probability.append(model.predict_proba(cases.loc[test, features])[:, 1])
    if test.any():
        rows.append(pd.DataFrame({"case": cases.loc[test, "case"].to_numpy(), "label": labels[test],
                                  "probability": np.mean(test_probability, axis=0), "fold": TEST}))
    return pd.concat(rows, ignore_index=True).assign(baseline=name)


def _interval_rows(frame: pd.DataFrame, metrics: Iterable[str], n_bootstrap: int, seed: int) -> list[dict]:
    found = report.classification_intervals(frame, n_bootstrap, seed)
    return [{"metric": m, "value": found[m]["estimate"], "ci_low": found[m]["ci_low"], "ci_high": found[m]["ci_high"]}
            for m in metrics]


def shortcut_tables(task: str, cases: pd.DataFrame, model_predictions: dict[str, pd.DataFrame],
                    baseline_predictions: pd.DataFrame, n_bootstrap: int,
                    seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(baselines, by_group) rows of one task: every model and baseline, pooled and per group."""
    info = cases.set_index("case")[["patient", "collection", "manufacturer"]]
    entries = [(model, True, frame) for model, frame in sorted(model_predictions.items())]
    entries += [(name, False, group.drop(columns="baseline"))
                for name, group in baseline_predictions.groupby("baseline", sort=True)]
    overall, by_group = [], []
    for model, image, frame in entries:
        frame = frame.assign(case=frame["case"].astype(str))
        unknown = sorted(set(frame["case"]) - set(info.index))
        if unknown:
            raise InputError(unknown[0], f"results/folds/{task}/folds.tsv", f"{model}: predicted case(s) not in the folds table")
        frame = frame.drop(columns=[c for c in info.columns if c in frame.columns]).join(info, on="case")
        settings = {"cv": frame[frame["fold"].astype(str) != TEST], TEST: frame[frame["fold"].astype(str) == TEST]}
        for setting, part in settings.items():
            if part.empty:
                continue
            head = {"task": task, "model": model, "image": image, "setting": setting, "n_cases": len(part),
                    "n_patients": part["patient"].nunique()}
            overall += [{**head, **row} for row in _interval_rows(part, report.CLASSIFY_COLUMNS, n_bootstrap, seed)]
        cv = settings["cv"]
        for grouping in GROUPINGS:
            for group, part in cv.groupby(grouping, sort=True):
                head = {"task": task, "model": model, "image": image, "group_by": grouping, "group": group,
                        "n_cases": len(part), "n_patients": part["patient"].nunique(),
                        "n_positive": int(part["label"].astype(int).sum())}
                by_group += [{**head, **row} for row in _interval_rows(part, GROUP_METRICS, n_bootstrap, seed)]
    return pd.DataFrame(overall, columns=BASELINE_COLUMNS), pd.DataFrame(by_group, columns=GROUP_COLUMNS)


def _cell(row: pd.Series) -> str:
    return report.interval_cell(row["value"], row["ci_low"], row["ci_high"])


def shortcuts_markdown(baselines: pd.DataFrame, by_group: pd.DataFrame) -> str:
    """The two tables with their captions (Markdown)."""
    parts = []
    for (task, setting), part in baselines.groupby(["task", "setting"], sort=True):
        title = get_task(task).report_title
        where = "validation folds, pooled out-of-fold" if setting == "cv" else "held-out test set"
        table = part.assign(cell=part.apply(_cell, axis=1),
                            row=part["model"] + np.where(part["image"], "", " (no image)"))
        table = table.pivot(index="row", columns="metric", values="cell")
        table = table[[m for m in report.CLASSIFY_COLUMNS if m in table.columns]].rename(columns=report.CLASSIFY_COLUMNS)
        table.index.name = "model"
        parts.append(f"### {title}: image models beside image-free baselines ({where})\n\n"
                     "Each cell: the pooled value at P(T4) >= 0.5 [95 % CI, patient-cluster bootstrap stratified "
                     "by class]. `collection_only` sees the collection, `metadata_only` the pixel and slice "
                     "spacing, manufacturer, scanner and kernel; both are logistic regressions fitted on each "
                     "outer fold's training cases and scored on its validation fold. What a model gains over "
                     "them is what the image adds.\n\n" + report.markdown(table))
    for (task, grouping), part in by_group.groupby(["task", "group_by"], sort=True):
        title = get_task(task).report_title
        table = part.assign(cell=part.apply(_cell, axis=1),
                            column=part["group"] + " (" + part["n_positive"].astype(str) + " T4 / "
                            + part["n_cases"].astype(str) + ")")
        table = table.pivot_table(index=["model", "metric"], columns="column", values="cell", aggfunc="first")
        table.index = [f"{model}: {report.CLASSIFY_COLUMNS.get(metric, metric)}" for model, metric in table.index]
        table.index.name = "model: metric"
        parts.append(f"### {title} per {grouping} (validation folds, pooled out-of-fold)\n\n"
                     f"Each {grouping} separately (T4 cases / cases in its header): a model that ranks well "
                     f"overall but not within a {grouping} has learnt the {grouping}, not the T-stage. n/a: "
                     f"the {grouping} holds one class only.\n\n" + report.markdown(table))
    return "\n".join(parts) or "_no classification task_\n"


def run(folds_files: list[str], volume_sidecars: list[str], prediction_files: list[str], out_dir: str | Path,
        n_bootstrap: int, seed: int, outputs: dict[str, str | Path] | None = None) -> dict[str, Path]:
    """Fit the baselines of every classification task and write the four outputs."""
    out = {key: Path(out_dir) / name for key, name in OUT_FILES.items()}
    out.update({key: Path(path) for key, path in (outputs or {}).items()})
    folds = report.read_folds(folds_files)
    grouped = report.group_prediction_files(prediction_files)
    all_predictions, all_baselines, all_groups = [], [], []
    for task in sorted(folds):
        if get_task(task).report_kind != report.CLASSIFICATION:
            continue
        source = folds[task]["source"].iloc[0] if len(folds[task]) else f"results/folds/{task}/folds.tsv"
        cases = read_case_metadata(folds[task].drop(columns="source"), source, volume_sidecars)
        predictions = pd.concat([fit_baseline(cases, name) for name in BASELINES], ignore_index=True)
        models = {model: report.read_predictions(files) for (t, model), files in grouped.items() if t == task}
        baselines, by_group = shortcut_tables(task, cases, models, predictions, n_bootstrap, seed)
        all_predictions.append(predictions.assign(task=task))
        all_baselines.append(baselines)
        all_groups.append(by_group)
        log.info("%s: baselines fitted on %d cases; %d metric rows, %d per-group rows", task, len(cases),
                 len(baselines), len(by_group))
    predictions = (pd.concat(all_predictions, ignore_index=True) if all_predictions
                   else pd.DataFrame(columns=["task", "baseline", "case", "label", "probability", "fold"]))
    baselines = pd.concat(all_baselines, ignore_index=True) if all_baselines else pd.DataFrame(columns=BASELINE_COLUMNS)
    by_group = pd.concat(all_groups, ignore_index=True) if all_groups else pd.DataFrame(columns=GROUP_COLUMNS)
    report._write_csv(predictions[["task", "baseline", "case", "label", "probability", "fold"]], out["predictions"])
    report._write_csv(baselines, out["baselines"])
    report._write_csv(by_group, out["by_group"])
    report._write_text(shortcuts_markdown(baselines, by_group), out["markdown"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hnct.baselines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--folds", nargs="+", required=True, help="results/folds/{task}/folds.tsv")
    parser.add_argument("--volume-sidecars", nargs="+", required=True, help="results/volumes/{case}.json")
    parser.add_argument("--predictions", nargs="*", default=[],
                        help="results/train/{task}/{model}/fold{k}/val_predictions.csv of the image models")
    parser.add_argument("--out-dir", default="results/report", help="standard names here, unless --out-<file>")
    for key in OUT_FILES:
        parser.add_argument(f"--out-{key.replace('_', '-')}", dest=f"out_{key}", default=None)
    parser.add_argument("--bootstrap", type=int, required=True, help="report.bootstrap")
    parser.add_argument("--seed", type=int, required=True, help="report.seed")
    add_plugins_argument(parser)
    parser.add_argument("--log", default=None)
    args = parser.parse_args(argv)
    setup_logging(args.log)
    load_plugins(args.plugins)
    outputs = {key: getattr(args, f"out_{key}") for key in OUT_FILES if getattr(args, f"out_{key}")}
    return exit_status(lambda: run(args.folds, args.volume_sidecars, args.predictions, args.out_dir,
                                   args.bootstrap, args.seed, outputs), log)


if __name__ == "__main__":
    sys.exit(main())
