"""The paper's tables and figures from every evaluate output, for people and for ``snakemake --report``.

Tables (``results/report/``):

``metrics_by_fold.csv``   one row per task × model × fold: every scalar of that fold's
                          ``metrics.json`` (nested keys joined with ``.``).
``metrics_summary.csv``   per task × model × metric: the **pooled** out-of-fold estimate (the metric on
                          every validation prediction of every fold: classification at P(T4) >= 0.5;
                          segmentation the Metrics Reloaded summary of every per-case row) with its
                          95 % CI (percentile, ``report.bootstrap`` resamples, ``report.seed``) from a
                          **patient-cluster bootstrap** stratified by class (hnct.metrics.bootstrap:
                          a patient's scans are resampled together), and in its own columns the mean
                          and SD of the per-fold values (``source_key`` of metrics_by_fold).
``metrics_test.csv``      classification on the held-out test set, per model × setting × metric:
                          ``test_ensemble`` (mean P(T4) of the fold models) and ``test_best_fold``
                          (see hnct.evaluate), threshold 0.5, the value with its patient-cluster
                          bootstrap CI over the test patients. No rows when there is no test set.
``metrics_summary.md`` / ``.tex``   the CV tables (pooled [CI] column group, then fold mean ± SD) and,
                          beside them, the test-set table, for papers.
``comparison_published.csv`` / ``.md``   this run beside the published LaryngealCT numbers
                          (``workflow/report/published_laryngealct.tsv``, with its sources), by
                          evaluation kind: ``cv`` (mean over validation folds; published: mean of
                          its ``val_fold*`` rows), ``test_best_fold`` and ``test_ensemble``.

``permutation_control.csv`` / ``.md``   the permuted-label control (``train.permutation_seeds``): per
                          model, the real pooled AUC with its CI beside the pooled AUC of each run
                          trained on permuted training-side labels, their mean, SD and range, and the
                          permutation p-value (:func:`permutation_table`).

Figures (PNG and SVG): ROC and PR curves per model with the fold spread, confusion matrices,
training curves per model × fold, a reliability diagram, Dice/HD95 box plots, the cohort
table (collection × T-stage with exclusions) and a crop QA mosaic.

Every summary number can be recomputed from ``metrics_by_fold.csv`` and the fold predictions
(``tests/test_report.py`` does so).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from hnct.common import InputError, atomic_path, read_image, read_json, setup_logging
from hnct.metrics.bootstrap import bootstrap_intervals
from hnct.tasks import add_plugins_argument, get_task, load_plugins

log = logging.getLogger("hnct.report")

# Metrics shown in the paper's tables, in order, with their display names.
CLASSIFY_COLUMNS = {
    "auc": "AUC",
    "pr_auc": "PR-AUC",
    "f1_macro": "macro-F1",
    "balanced_accuracy": "Bal. acc.",
    "sensitivity": "T4 sens.",
    "specificity": "Spec.",
    "mcc": "MCC",
}
# Segmentation after Metrics Reloaded (hnct.metrics.segmentation.summarise_cases): quality over the
# cases whose reference holds the structure, and detection in its own table.
SEGMENT_COLUMNS = {
    "dice": "Dice",
    "iou": "IoU",
    "nsd": "NSD",
    "hd95_median_mm": "HD95 median (mm)",
    "n_hd95_not_finite": "no finite HD95 (cases)",
    "snet_slice_dice": "slice Dice (S-Net, every slice)",
}
DETECTION_COLUMNS = {
    "case_sensitivity": "case sens.",
    "fp_rate_negative": "FP rate (no structure)",
    "lesion_sensitivity": "lesion sens.",
    "lesion_precision": "lesion prec.",
}
# A task's report_kind (hnct.tasks) picks its tables (title suffix, columns), its pooled CIs and figures.
KIND_TABLES = {
    "classification": [("", CLASSIFY_COLUMNS)],
    "segmentation": [(", segmentation (Dice, IoU, NSD: cases with the structure; HD95: both masks present)",
                      SEGMENT_COLUMNS),
                     (", detection (components matched at IoU >= evaluate.detection_iou)", DETECTION_COLUMNS)],
}
KIND_COLUMNS = {kind: {k: v for _, columns in tables for k, v in columns.items()}
                for kind, tables in KIND_TABLES.items()}
# Counts of cases: printed without decimals (pooled) and with one (the mean over folds).
COUNT_METRICS = {"n_hd95_not_finite"}
CLASSIFICATION = "classification"
SEGMENTATION = "segmentation"
METRIC_TITLES = {"inner_auc": "AUC", "inner_dice": "Dice"}
CELL_NOTE = ("pooled: the estimate on every out-of-fold prediction [its 95 % CI, patient-cluster bootstrap "
             "stratified by class]; folds: mean ± SD across the validation folds")


def report_kind(task: str) -> str:
    return get_task(task).report_kind


# ---------------------------------------------------------------------------------------------
# Reading evaluate outputs


def flatten(payload: dict, prefix: str = "") -> dict[str, float]:
    """Every numeric scalar of a nested dict, keys joined with ``.`` (lists and strings skipped)."""
    flat: dict[str, float] = {}
    for key, value in payload.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        elif isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, (int, float)) or value is None:
            flat[name] = float("nan") if value is None else float(value)
    return flat


def metrics_by_fold(metric_files: Iterable[str | Path]) -> pd.DataFrame:
    """One row per metrics.json (task, model, fold from the file's own fields)."""
    rows = []
    for path in metric_files:
        payload = read_json(path)
        row = {"task": payload["task"], "model": payload["model"], "fold": int(payload["fold"])}
        row.update({k: v for k, v in flatten(payload).items() if k != "fold"})
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=["task", "model", "fold"])
    return table.sort_values(["task", "model", "fold"]).reset_index(drop=True)


def headline_key(columns: Iterable[str], metric: str) -> str | None:
    """The metrics.json key that holds ``metric`` at the default operating point.

    The evaluate stage nests threshold-dependent metrics (``at_0.5.f1_macro``); a
    threshold-free metric (``auc``) may sit at the top level; segmentation's headline numbers sit
    under ``summary`` (hnct.segeval). Prefer the top level, then the 0.5 threshold, then ``summary``.
    """
    columns = list(columns)
    for candidate in (metric, f"at_0.5.{metric}", f"threshold_0.5.{metric}", f"summary.{metric}"):
        if candidate in columns:
            return candidate
    matches = [c for c in columns if c.split(".")[-1] == metric]
    return sorted(matches, key=len)[0] if matches else None


def read_folds(folds_files: Iterable[str | Path]) -> dict[str, pd.DataFrame]:
    """Each task's ``results/folds/{task}/folds.tsv`` (case, patient, collection, label, fold), by task."""
    tables = {}
    for path in folds_files:
        path = Path(path)
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        missing = {"case", "patient"} - set(table.columns)
        if missing:
            raise InputError(f"folds of {path.parent.name}", path, f"missing columns {sorted(missing)}")
        tables[path.parent.name] = table.assign(source=str(path))
    return tables


def with_patients(rows: pd.DataFrame, task: str, folds: dict[str, pd.DataFrame] | None) -> pd.DataFrame:
    """``rows`` (a ``case`` column) with each case's ``patient`` (and ``collection``) from the task's folds.

    Without any folds table (a call from Python without one) every scan is its own patient, and the
    log says so; with one, a case it does not list is an error naming the case and the table.
    """
    rows = rows.assign(case=rows["case"].astype(str))
    if folds is None:
        log.warning("%s: no folds table given: each scan is resampled as its own patient", task)
        return rows.assign(patient=rows["case"], collection="")
    if task not in folds:
        raise InputError(task, "results/folds/{task}/folds.tsv", "no folds table for this task")
    table = folds[task].drop_duplicates("case").set_index("case")
    unknown = sorted(set(rows["case"]) - set(table.index))
    if unknown:
        raise InputError(unknown[0], table["source"].iloc[0],
                         f"{len(unknown)} predicted case(s) are not in the folds table, e.g. {unknown[:3]}")
    extra = [c for c in ("patient", "collection") if c in table.columns]
    return rows.drop(columns=[c for c in extra if c in rows.columns]).join(table[extra], on="case")


# ---------------------------------------------------------------------------------------------
# Pooled estimates and their patient-level intervals


def pooled_metrics(labels: np.ndarray, probability: np.ndarray, checked: bool = False) -> dict[str, float]:
    """The headline classification metrics at threshold 0.5, from hnct.metrics.classification
    (``checked``: the arrays already passed its ``check_inputs``)."""
    from hnct.metrics.classification import classification_metrics

    result = classification_metrics(labels, probability, threshold=0.5, checked=checked)
    return {metric: float(result.get(metric, math.nan)) for metric in CLASSIFY_COLUMNS}


def classification_intervals(predictions: pd.DataFrame, n_bootstrap: int, seed: int) -> dict[str, dict]:
    """Pooled headline metrics of ``label, probability, patient`` rows and their patient-level CIs."""
    from hnct.metrics.classification import check_inputs

    labels, probability = check_inputs(predictions["label"].to_numpy(), predictions["probability"].to_numpy(float))
    return bootstrap_intervals(lambda index: pooled_metrics(labels[index], probability[index], checked=True),
                               predictions["patient"].to_numpy(), labels, n_bootstrap, seed)


def segmentation_intervals(per_case: pd.DataFrame, n_bootstrap: int, seed: int) -> dict[str, dict]:
    """Pooled Metrics Reloaded summary of per-case rows (with ``patient``) and patient-level CIs,
    stratified by whether the reference holds the structure."""
    from hnct.metrics.segmentation_summary import case_arrays, summarise_arrays

    arrays = case_arrays(per_case)
    return bootstrap_intervals(lambda index: summarise_arrays(arrays, index), per_case["patient"].to_numpy(),
                               arrays["present"].astype(int), n_bootstrap, seed)


def bootstrap_ci(predictions: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 7,
                 alpha: float = 0.05) -> dict[str, tuple[float, float, float]]:
    """``metric: (ci_low, ci_high, pooled)`` of classification predictions (``patient`` optional:
    without it every row is its own patient)."""
    if "patient" not in predictions:
        predictions = predictions.assign(patient=predictions["case"] if "case" in predictions
                                         else np.arange(len(predictions)))
    found = classification_intervals(predictions, n_bootstrap, seed)
    return {m: (v["ci_low"], v["ci_high"], v["estimate"]) for m, v in found.items()}


SUMMARY_COLUMNS = ["task", "model", "metric", "n_cases", "n_patients", "pooled", "ci_low", "ci_high",
                   "n_resamples", "source_key", "n_folds", "n_folds_finite", "mean", "sd"]


def summary_table(by_fold: pd.DataFrame, pooled: dict[tuple[str, str], pd.DataFrame] | None = None,
                  n_bootstrap: int = 1000, seed: int = 7) -> pd.DataFrame:
    """Per task × model × headline metric: the pooled out-of-fold estimate with its patient-level
    bootstrap CI, and the mean ± SD of the per-fold values (``source_key`` of metrics_by_fold).

    ``pooled``: (task, model) -> the pooled rows with ``patient`` (classification: predictions;
    segmentation: per-case metrics).
    """
    rows = []
    for (task, model), group in by_fold.groupby(["task", "model"], sort=True):
        kind = report_kind(task)
        if kind not in KIND_COLUMNS:
            log.info("%s: report kind %r has no summary table here", task, kind)
            continue
        frame = (pooled or {}).get((task, model))
        intervals = {}
        if frame is not None and not frame.empty:
            compute = classification_intervals if kind == CLASSIFICATION else segmentation_intervals
            intervals = compute(frame, n_bootstrap, seed)
        for metric in KIND_COLUMNS[kind]:
            key = headline_key(group.columns, metric)
            values = group[key].astype(float) if key else pd.Series(dtype=float)
            finite = values[np.isfinite(values)]
            found = intervals.get(metric, {"estimate": math.nan, "ci_low": math.nan, "ci_high": math.nan,
                                           "n_resamples": 0})
            rows.append({
                "task": task, "model": model, "metric": metric,
                "n_cases": int(len(frame)) if frame is not None else 0,
                "n_patients": int(frame["patient"].nunique()) if frame is not None and len(frame) else 0,
                "pooled": found["estimate"], "ci_low": found["ci_low"], "ci_high": found["ci_high"],
                "n_resamples": found["n_resamples"], "source_key": key or "",
                "n_folds": int(len(values)), "n_folds_finite": int(len(finite)),
                "mean": float(finite.mean()) if len(finite) else math.nan,
                "sd": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
            })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def read_predictions(files: Iterable[str | Path]) -> pd.DataFrame:
    frames = [pd.read_csv(f, dtype={"case": str}) for f in files]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["case", "label", "probability", "fold"])
    return pd.concat(frames, ignore_index=True)


def group_prediction_files(files: Iterable[str | Path]) -> dict[tuple[str, str], list[Path]]:
    """Map (task, model) to its fold files, from ``results/{stage}/{task}/{model}/fold{k}/...`` paths."""
    grouped: dict[tuple[str, str], list[Path]] = {}
    for f in files:
        path = Path(f)
        task, model = path.parts[-4], path.parts[-3]
        grouped.setdefault((task, model), []).append(path)
    return grouped


# ---------------------------------------------------------------------------------------------
# Writing tables


def interval_cell(estimate: float, low: float, high: float, digits: int = 3) -> str:
    """``estimate [low, high]``: the interval printed beside the very number it belongs to."""
    if not np.isfinite(estimate):
        return "n/a"
    text = f"{estimate:.{digits}f}"
    if np.isfinite(low) and np.isfinite(high):
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def spread_cell(mean: float, sd: float, digits: int = 3) -> str:
    """``mean ± SD`` across folds (no interval: it is not the pooled estimate)."""
    if not np.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if np.isfinite(sd) else "")


def paper_table(summary: pd.DataFrame, task: str, columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Model rows; one column group of pooled estimates with their CIs, then one of fold mean ± SD."""
    names = columns or KIND_COLUMNS[report_kind(task)]
    part = summary[(summary["task"] == task) & summary["metric"].isin(list(names))]
    if part.empty:
        return pd.DataFrame()
    counts = part["metric"].isin(COUNT_METRICS).to_numpy()
    part = part.assign(
        pooled_cell=[interval_cell(*v, digits=0 if count else 3)
                     for v, count in zip(part[["pooled", "ci_low", "ci_high"]].to_numpy(float), counts)],
        fold_cell=[spread_cell(*v, digits=1 if count else 3)
                   for v, count in zip(part[["mean", "sd"]].to_numpy(float), counts)])
    order = [m for m in names if m in set(part["metric"])]
    pooled = part.pivot(index="model", columns="metric", values="pooled_cell")[order]
    folds = part.pivot(index="model", columns="metric", values="fold_cell")[order]
    table = pd.concat([pooled.rename(columns=lambda m: f"{names[m]} (pooled)"),
                       folds.rename(columns=lambda m: f"{names[m]} (folds)")], axis=1)
    table.index.name = "model"
    return table


def markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "_no results_\n"
    header = [table.index.name or ""] + list(table.columns)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, row in table.iterrows():
        lines.append("| " + " | ".join([str(model)] + [str(v) for v in row.tolist()]) + " |")
    return "\n".join(lines) + "\n"


def latex(table: pd.DataFrame, caption: str) -> str:
    if table.empty:
        return f"% {caption}: no results\n"
    cols = "l" + "c" * len(table.columns)
    esc = lambda s: str(s).replace("_", r"\_").replace("±", r"$\pm$").replace("%", r"\%")  # noqa: E731
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{esc(caption)}}}", rf"\begin{{tabular}}{{{cols}}}",
             r"\hline", " & ".join([esc(table.index.name or "")] + [esc(c) for c in table.columns]) + r" \\",
             r"\hline"]
    for model, row in table.iterrows():
        lines.append(" & ".join([esc(model)] + [esc(v) for v in row.tolist()]) + r" \\")
    lines += [r"\hline", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


COMPARISON_SETTINGS = ("cv", "test_best_fold", "test_ensemble")
COMPARISON_COLUMNS = ["model", "setting", "metric", "this_run", "this_run_sd", "published", "published_n"]


def comparison_with_published(summary: pd.DataFrame, published_tsv: str | Path,
                              tests: pd.DataFrame | None = None) -> pd.DataFrame:
    """This run beside the published LaryngealCT numbers, where the evaluation kind matches.

    ``cv``: this run's mean (SD) over validation folds beside the mean of the published per-fold
    validation rows (``val_fold*``; ``published_n`` of them). ``test_best_fold`` / ``test_ensemble``:
    this run's test-set value beside the published test value of the same setting. A row is kept
    when either side has a number.
    """
    published = pd.read_csv(published_tsv, sep="\t", comment="#")
    classification = [t for t in set(summary["task"]) | set(tests["task"] if tests is not None else [])
                      if report_kind(t) == CLASSIFICATION]
    ours = summary[summary["task"].isin(classification)]
    tests = tests if tests is not None else pd.DataFrame(columns=TEST_COLUMNS)
    tests = tests[tests["task"].isin(classification)]
    models = sorted(set(published["model"]) | set(ours["model"]) | set(tests["model"]))
    rows = []
    for model in models:
        for setting in COMPARISON_SETTINGS:
            if setting == "cv":
                theirs = published[(published["model"] == model) & published["setting"].str.startswith("val_fold")]
            else:
                theirs = published[(published["model"] == model) & (published["setting"] == setting)]
            for metric in CLASSIFY_COLUMNS:
                if setting == "cv":
                    mine = ours[(ours["model"] == model) & (ours["metric"] == metric)]
                    value = float(mine["mean"].iloc[0]) if len(mine) else math.nan
                    sd = float(mine["sd"].iloc[0]) if len(mine) else math.nan
                else:
                    mine = tests[(tests["model"] == model) & (tests["setting"] == setting) & (tests["metric"] == metric)]
                    value, sd = (float(mine["value"].iloc[0]) if len(mine) else math.nan), math.nan
                their = theirs[metric].astype(float) if metric in theirs else pd.Series(dtype=float)
                their_value = float(their.mean()) if len(their) else math.nan
                if not (np.isfinite(value) or np.isfinite(their_value)):
                    continue
                rows.append({"model": model, "setting": setting, "metric": metric, "this_run": value,
                             "this_run_sd": sd, "published": their_value, "published_n": int(len(their))})
    return pd.DataFrame(rows, columns=COMPARISON_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Held-out test set (hnct.evaluate ensemble: results/evaluate/classify/{model}/test_ensemble/)

TEST_SETTINGS = ("test_ensemble", "test_best_fold")
TEST_COLUMNS = ["task", "model", "setting", "fold", "n_cases", "n_positive", "n_patients", "metric", "value",
                "ci_low", "ci_high"]


def test_table(test_metric_files: Iterable[str | Path], n_bootstrap: int = 1000, seed: int = 7,
               folds: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """One row per model × setting × headline metric of the test set; none for a run without test set.

    ``value`` is the metric on the test predictions (``predictions.csv`` beside the ensemble's
    ``metrics.json``: column ``probability`` for the ensemble, ``prob_fold{k}`` for the best fold,
    the same numbers as the ensemble's metrics.json) and ``ci_*`` its patient-level bootstrap CI
    (test patients from the task's folds table).
    """
    rows = []
    for path in test_metric_files:
        payload = read_json(path)
        if not payload.get("test_set"):
            log.info("%s: no test set (%s): no test rows for %s", path, payload.get("reason", ""), payload.get("model"))
            continue
        predictions = pd.read_csv(Path(path).with_name("predictions.csv"), dtype={"case": str})
        predictions = with_patients(predictions, payload["task"], folds)
        best = payload["best_fold"]
        for setting, block, fold, column in (
                ("test_ensemble", payload, "+".join(str(k) for k in payload["folds"]), "probability"),
                ("test_best_fold", best, str(best["fold"]), f"prob_fold{best['fold']}")):
            found = classification_intervals(predictions.assign(probability=predictions[column]), n_bootstrap, seed)
            for metric in CLASSIFY_COLUMNS:
                rows.append({"task": payload["task"], "model": payload["model"], "setting": setting, "fold": fold,
                             "n_cases": int(block["n_cases"]), "n_positive": int(block["n_positive"]),
                             "n_patients": int(predictions["patient"].nunique()), "metric": metric,
                             "value": found[metric]["estimate"], "ci_low": found[metric]["ci_low"],
                             "ci_high": found[metric]["ci_high"]})
    return pd.DataFrame(rows, columns=TEST_COLUMNS)


def test_paper_table(tests: pd.DataFrame) -> pd.DataFrame:
    """Model × setting rows ("resnet18, 5-fold ensemble"), the headline metrics as columns."""
    if tests.empty:
        return pd.DataFrame()

    def label(row):
        if row["setting"] == "test_ensemble":
            return f"{row['model']}, {len(row['fold'].split('+'))}-fold ensemble"
        return f"{row['model']}, best fold ({row['fold']})"
    cells = tests.assign(row=tests.apply(label, axis=1),
                         cell=[interval_cell(*v) for v in tests[["value", "ci_low", "ci_high"]].to_numpy(float)])
    table = cells.pivot(index="row", columns="metric", values="cell")
    table = table[[m for m in CLASSIFY_COLUMNS if m in table.columns]].rename(columns=CLASSIFY_COLUMNS)
    table.index.name = "model"
    return table


TABLE_FILES = {
    "by_fold": "metrics_by_fold.csv",
    "summary": "metrics_summary.csv",
    "test": "metrics_test.csv",
    "markdown": "metrics_summary.md",
    "latex": "metrics_summary.tex",
    "comparison": "comparison_published.csv",
    "comparison_md": "comparison_published.md",
}
FIGURE_FILES = {
    "roc_pr": "roc_pr.png",
    "confusion": "confusion.png",
    "calibration": "calibration.png",
    "training": "training_curves.png",
    "segmentation": "segmentation_boxplots.png",
}


def pooled_rows(prediction_files: list[str], per_case_files: list[str],
                folds: dict[str, pd.DataFrame] | None) -> dict[tuple[str, str], pd.DataFrame]:
    """(task, model) -> its out-of-fold rows with patients: classification predictions, segmentation
    per-case metrics."""
    pooled = {}
    for files, kind in ((prediction_files, CLASSIFICATION), (per_case_files, SEGMENTATION)):
        for key, group in group_prediction_files(files).items():
            if report_kind(key[0]) == kind:
                pooled[key] = with_patients(read_predictions(group), key[0], folds)
    return pooled


def write_tables(metric_files: list[str], prediction_files: list[str], out_dir: str | Path,
                 published_tsv: str | Path, n_bootstrap: int, seed: int,
                 outputs: dict[str, str | Path] | None = None,
                 test_metric_files: list[str] | None = None, folds_files: list[str] | None = None,
                 per_case_files: list[str] | None = None) -> None:
    """Write the tables into ``out_dir`` under their standard names, or to ``outputs`` paths.

    ``test_metric_files``: the test-set ensembles' ``metrics.json`` (with ``predictions.csv`` beside);
    ``folds_files``: ``results/folds/{task}/folds.tsv`` (the patient of every case, for the
    bootstrap); ``per_case_files``: the segmentation tasks' per-case metrics.
    """
    out = {key: Path(out_dir) / name for key, name in TABLE_FILES.items()}
    out.update({key: Path(path) for key, path in (outputs or {}).items()})
    folds = read_folds(folds_files) if folds_files else None
    by_fold = metrics_by_fold(metric_files)
    pooled = pooled_rows(prediction_files, per_case_files or [], folds)
    summary = summary_table(by_fold, pooled, n_bootstrap=n_bootstrap, seed=seed)
    tests = test_table(test_metric_files or [], n_bootstrap=n_bootstrap, seed=seed, folds=folds)
    if test_metric_files and tests.empty:
        log.info("no test set in this run: the test-set table has no rows")
    _write_csv(by_fold, out["by_fold"])
    _write_csv(summary, out["summary"])
    _write_csv(tests, out["test"])
    md, tex = [], []
    for task in sorted(set(summary["task"]) | set(tests["task"])):
        for suffix, columns in KIND_TABLES.get(report_kind(task), []):
            title = f"{get_task(task).report_title}{suffix} (validation folds)"
            table = paper_table(summary, task, columns)
            if not table.empty:
                md.append(f"### {title}\n\n{CELL_NOTE}\n\n" + markdown(table))
                tex.append(latex(table, f"{title}. {CELL_NOTE}."))
        task_tests = tests[tests["task"] == task]
        if not task_tests.empty:  # the test set beside the task's CV table
            title = f"{get_task(task).report_title} (held-out test set)"
            table = test_paper_table(task_tests)
            md.append(f"### {title}\n\nthreshold 0.5 [95 % CI, patient-cluster bootstrap over the test "
                      "patients]; best fold: highest validation AUC\n\n" + markdown(table))
            tex.append(latex(table, title))
    _write_text("\n".join(md) or "_no results_\n", out["markdown"])
    _write_text("\n".join(tex) or "% no results\n", out["latex"])
    comparison = comparison_with_published(summary, published_tsv, tests)
    _write_csv(comparison, out["comparison"])
    lines = ["| model | evaluation | metric | this run | published (LaryngealCT) |", "|---|---|---|---|---|"]
    kinds = {"cv": "validation folds (mean)", "test_best_fold": "test, single best fold",
             "test_ensemble": "test, fold ensemble"}
    for _, row in comparison.iterrows():
        mine = _fmt(row["this_run"]) + (f" ± {row['this_run_sd']:.3f}" if np.isfinite(row["this_run_sd"]) else "")
        lines.append(f"| {row['model']} | {kinds[row['setting']]} | {row['metric']} | {mine} | {_fmt(row['published'])} |")
    _write_text("\n".join(lines) + "\n", out["comparison_md"])


def _fmt(value: float) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.3f}"


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.10g")


def _write_text(text: str, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------------------------------------
# The permuted-label control

PERMUTATION_COLUMNS = ["task", "model", "run", "permutation_seed", "metric", "value", "ci_low", "ci_high",
                       "n_resamples", "n_folds", "n_cases", "n_patients", "sd", "min", "max", "p_permutation"]
PERMUTATION_NOTE = (
    "Each permuted run is the same model trained on every outer fold with the labels of that fold's "
    "training side permuted (patients shuffled among patients with as many scans, class counts kept; "
    "the inner selection as in the real run), then scored on the outer fold's true labels; pooled AUC "
    "of its out-of-fold predictions. Real: the pooled AUC [95 % CI, patient-cluster bootstrap "
    "stratified by class]. p: (1 + permuted runs with AUC >= real) / (1 + runs), at least 1 / (1 + runs). "
    "A real AUC within the permuted runs' range means the model learnt nothing from the image.")


def group_permuted_files(files: Iterable[str | Path]) -> dict[tuple[str, str, int], list[Path]]:
    """Map (task, model, seed) to its fold files, from
    ``results/train_permuted/{task}/{model}/seed{seed}/fold{k}/val_predictions.csv`` paths."""
    grouped: dict[tuple[str, str, int], list[Path]] = {}
    for f in files:
        path = Path(f)
        seed = path.parts[-3]
        if not seed.startswith("seed") or not seed[4:].isdigit():
            raise InputError("permuted-label control", path, "not under a seed{N}/fold{k}/ folder")
        grouped.setdefault((path.parts[-5], path.parts[-4], int(seed[4:])), []).append(path)
    return grouped


def permutation_table(real_files: list[str], permuted_files: list[str], n_bootstrap: int, seed: int,
                      folds: dict[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Per task × model with permuted runs: the real pooled AUC with its patient-cluster bootstrap CI
    (the metrics_summary number), each permutation seed's pooled AUC, and the null's mean, SD, range
    and the Monte Carlo permutation p-value (rows ``real``, ``permuted``, ``permuted_mean``)."""
    from hnct.metrics.classification import roc_auc

    real = group_prediction_files(real_files)
    permuted: dict[tuple[str, str], dict[int, list[Path]]] = {}
    for (task, model, perm_seed), files in group_permuted_files(permuted_files).items():
        permuted.setdefault((task, model), {})[perm_seed] = files
    rows = []
    for (task, model), by_seed in sorted(permuted.items()):
        if (task, model) not in real:
            raise InputError(f"{task} {model}", "results/train/{task}/{model}/fold{k}/val_predictions.csv",
                             "permuted-label runs without the real run's predictions")
        frame = with_patients(read_predictions(real[(task, model)]), task, folds)
        found = classification_intervals(frame, n_bootstrap, seed)["auc"]
        seed_rows = []
        for perm_seed, files in sorted(by_seed.items()):
            pooled = with_patients(read_predictions(files), task, folds)
            seed_rows.append({"task": task, "model": model, "run": "permuted", "permutation_seed": perm_seed,
                              "value": roc_auc(pooled["label"].to_numpy(int), pooled["probability"].to_numpy(float)),
                              "n_folds": len(files), "n_cases": len(pooled),
                              "n_patients": int(pooled["patient"].nunique())})
        values = np.array([r["value"] for r in seed_rows if np.isfinite(r["value"])])
        # a NaN real AUC counts as beaten by every run
        beaten = int((values >= found["estimate"]).sum()) if np.isfinite(found["estimate"]) else len(values)
        n_folds = len(real[(task, model)])
        rows.append({"task": task, "model": model, "run": "real", "value": found["estimate"],
                     "ci_low": found["ci_low"], "ci_high": found["ci_high"], "n_resamples": found["n_resamples"],
                     "n_folds": n_folds, "n_cases": len(frame), "n_patients": int(frame["patient"].nunique()),
                     "p_permutation": (1 + beaten) / (1 + len(values)) if len(values) else math.nan})
        rows += seed_rows
        rows.append({"task": task, "model": model, "run": "permuted_mean", "n_folds": n_folds,
                     "value": float(values.mean()) if len(values) else math.nan,
                     "sd": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                     "min": float(values.min()) if len(values) else math.nan,
                     "max": float(values.max()) if len(values) else math.nan})
    table = pd.DataFrame(rows, columns=PERMUTATION_COLUMNS).assign(metric="auc")
    return table.astype({"permutation_seed": "Int64"})


def permutation_markdown(table: pd.DataFrame) -> str:
    """One table per task: the real AUC [CI] beside the permuted runs' AUCs, mean ± SD (range), p."""
    sections = []
    for task, rows in table.groupby("task", sort=True):
        lines = []
        for model, group in rows.groupby("model", sort=True):
            real = group[group["run"] == "real"].iloc[0]
            runs = group[group["run"] == "permuted"]
            null = group[group["run"] == "permuted_mean"].iloc[0]
            per_seed = ", ".join(f"seed {int(r.permutation_seed)}: {_fmt(r.value)}" for r in runs.itertuples())
            spread = (f"{_fmt(null['value'])} ± {_fmt(null['sd'])} ({_fmt(null['min'])} to {_fmt(null['max'])})"
                      if np.isfinite(null["sd"]) else _fmt(null["value"]))
            p = "n/a" if not np.isfinite(real["p_permutation"]) else f"{real['p_permutation']:.2f}"
            lines.append(f"| {model} | {interval_cell(real['value'], real['ci_low'], real['ci_high'])} | "
                         f"{per_seed} | {spread} | {p} |")
        header = ("| model | real AUC [95 % CI] | permuted-label AUC per seed | permuted mean ± SD (range) | "
                  "p (permutation) |\n|---|---|---|---|---|")
        sections.append(f"### Permuted-label control: {get_task(task).report_title} (validation folds)\n\n"
                        f"{PERMUTATION_NOTE}\n\n{header}\n" + "\n".join(lines) + "\n")
    return "\n".join(sections) or "_no permuted-label runs_\n"


def write_permutation_control(real_files: list[str], permuted_files: list[str], out_csv: str | Path,
                              out_markdown: str | Path, n_bootstrap: int, seed: int,
                              folds_files: list[str] | None = None) -> pd.DataFrame:
    """``permutation_control.csv`` (:func:`permutation_table`) and its markdown table."""
    folds = read_folds(folds_files) if folds_files else None
    table = permutation_table(real_files, permuted_files, n_bootstrap, seed, folds)
    _write_csv(table, Path(out_csv))
    _write_text(permutation_markdown(table), Path(out_markdown))
    return table


# ---------------------------------------------------------------------------------------------
# Figures


def _pyplot(style: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": int(style.get("dpi", 110)), "font.size": float(style.get("font_size", 10)),
                         "axes.grid": True, "grid.alpha": 0.3, "svg.hashsalt": "hnct", "svg.fonttype": "none"})
    return plt


def save_figure(fig, png: str | Path) -> None:
    """PNG and SVG side by side (same stem), written atomically; SVG metadata without a date."""
    png = Path(png)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", metadata={"Software": None})
    with atomic_path(png.with_suffix(".svg")) as tmp:
        fig.savefig(tmp, format="svg", bbox_inches="tight", metadata={"Date": None})


def plot_roc_pr(prediction_files: list[str], png: str | Path, style: dict) -> None:
    from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve, average_precision_score

    plt = _pyplot(style)
    grouped = group_prediction_files(prediction_files)
    keys = sorted(grouped)
    fig, axes = plt.subplots(2, max(1, len(keys)), figsize=(3.2 * max(1, len(keys)), 6.4), squeeze=False)
    for col, key in enumerate(keys):
        model = key[1]
        roc_ax, pr_ax = axes[0, col], axes[1, col]
        folds = sorted(grouped[key])
        pooled = read_predictions(folds)
        for f in folds:
            frame = pd.read_csv(f)
            if frame["label"].nunique() < 2:
                continue
            fpr, tpr, _ = roc_curve(frame["label"], frame["probability"])
            roc_ax.plot(fpr, tpr, color="0.6", lw=0.8)
            prec, rec, _ = precision_recall_curve(frame["label"], frame["probability"])
            pr_ax.plot(rec, prec, color="0.6", lw=0.8)
        if pooled["label"].nunique() == 2:
            fpr, tpr, _ = roc_curve(pooled["label"], pooled["probability"])
            auc = roc_auc_score(pooled["label"], pooled["probability"])
            roc_ax.plot(fpr, tpr, color="C0", lw=2, label=f"pooled AUC {auc:.2f}")
            prec, rec, _ = precision_recall_curve(pooled["label"], pooled["probability"])
            ap = average_precision_score(pooled["label"], pooled["probability"])
            pr_ax.plot(rec, prec, color="C1", lw=2, label=f"pooled AP {ap:.2f}")
            pr_ax.axhline(pooled["label"].mean(), color="k", ls=":", lw=1, label="prevalence")
        roc_ax.plot([0, 1], [0, 1], "k:", lw=1)
        roc_ax.set(title=f"{model}: ROC (grey: folds)", xlabel="1 - specificity", ylabel="T4 sensitivity",
                   xlim=(0, 1), ylim=(0, 1.02))
        pr_ax.set(title=f"{model}: precision-recall", xlabel="recall (T4)", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        roc_ax.legend(loc="lower right", fontsize="small")
        pr_ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


def plot_confusion(prediction_files: list[str], png: str | Path, style: dict, threshold: float = 0.5) -> None:
    plt = _pyplot(style)
    grouped = group_prediction_files(prediction_files)
    keys = sorted(grouped)
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(2.8 * max(1, len(keys)), 2.8), squeeze=False)
    for col, key in enumerate(keys):
        model = key[1]
        pooled = read_predictions(grouped[key])
        truth = pooled["label"].to_numpy(int)
        pred = (pooled["probability"].to_numpy(float) >= threshold).astype(int)
        matrix = np.array([[np.sum((truth == t) & (pred == p)) for p in (0, 1)] for t in (0, 1)])
        ax = axes[0, col]
        ax.imshow(matrix, cmap="Blues")
        for t in (0, 1):
            for p in (0, 1):
                ax.text(p, t, str(matrix[t, p]), ha="center", va="center",
                        color="white" if matrix[t, p] > matrix.max() / 2 else "black", fontsize=12)
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["non-T4", "T4"], yticklabels=["non-T4", "T4"],
               xlabel="predicted", ylabel="true", title=f"{model} (pooled, p≥{threshold})")
        ax.grid(False)
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


def plot_calibration(prediction_files: list[str], png: str | Path, style: dict, bins: int = 10) -> None:
    plt = _pyplot(style)
    grouped = group_prediction_files(prediction_files)
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    edges = np.linspace(0, 1, bins + 1)
    for i, key in enumerate(sorted(grouped)):
        model = key[1]
        pooled = read_predictions(grouped[key])
        prob = pooled["probability"].to_numpy(float)
        truth = pooled["label"].to_numpy(float)
        which = np.clip(np.digitize(prob, edges) - 1, 0, bins - 1)
        xs, ys = [], []
        for b in range(bins):
            inside = which == b
            if inside.any():
                xs.append(prob[inside].mean())
                ys.append(truth[inside].mean())
        ax.plot(xs, ys, "o-", color=f"C{i}", label=model)
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
    ax.set(xlabel="predicted P(T4)", ylabel="observed T4 fraction", title="Reliability (pooled out-of-fold)",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize="small")
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


def plot_training_curves(history_files: list[str], png: str | Path, style: dict) -> None:
    """One column per task x model: loss (training solid, inner validation dashed: the same loss
    definition, hnct.train) above the inner-validation metric, one colour per fold. The outer folds
    the metrics tables report are in no curve (history.csv never holds them)."""
    plt = _pyplot(style)
    grouped: dict[tuple[str, str], list[Path]] = {}
    for f in history_files:
        path = Path(f)
        grouped.setdefault((path.parts[-4], path.parts[-3]), []).append(path)
    keys = sorted(grouped)
    columns = max(1, len(keys))
    fig, axes = plt.subplots(2, columns, figsize=(3.4 * columns, 6.0), squeeze=False)
    for col, (task, model) in enumerate(keys):
        loss_ax, metric_ax = axes[0, col], axes[1, col]
        metric = get_task(task).metric_name
        for fold_file in sorted(grouped[(task, model)]):
            history = pd.read_csv(fold_file)
            fold = fold_file.parent.name
            line, = loss_ax.plot(history["epoch"], history["train_loss"], lw=1, label=fold)
            if "inner_loss" in history:
                loss_ax.plot(history["epoch"], history["inner_loss"], lw=1, ls="--", color=line.get_color())
            if metric in history:
                metric_ax.plot(history["epoch"], history[metric], lw=1, color=line.get_color(), label=fold)
        # two short lines per title: long one-line titles of neighbouring columns ran into each other
        loss_ax.set_title(f"{task} / {model}\nloss: train —, inner val - -", fontsize="small")
        loss_ax.set(xlabel="epoch", ylabel="loss")
        metric_ax.set_title(f"{task} / {model}\ninner-validation {METRIC_TITLES.get(metric, metric)}",
                            fontsize="small")
        metric_ax.set(xlabel="epoch", ylim=(0, 1.02))
        metric_ax.legend(fontsize="x-small")
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


def plot_segmentation_boxes(per_case_files: list[str], png: str | Path, style: dict) -> None:
    plt = _pyplot(style)
    frames = []
    for f in per_case_files:
        path = Path(f)
        frame = pd.read_csv(path)
        if frame.empty:
            continue
        frames.append(frame.assign(model=path.parts[-3]))
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    if frames:
        data = pd.concat(frames, ignore_index=True)
        models = sorted(data["model"].unique())
        # Dice is empty (NaN) where the reference lacks the structure, HD95 where a mask is empty: dropped
        # below, so the boxes are Metrics Reloaded's sets (no stand-in distance exists to draw).
        for ax, metric, label in ((axes[0], "dice", "Dice per case (structure present)"),
                                  (axes[1], "hd95_mm", "HD95 per case (mm, both masks present)")):
            if metric not in data:
                ax.set_title(f"{label}: not reported")
                continue
            values = [data.loc[data["model"] == m, metric].dropna().to_numpy(float) for m in models]
            ax.boxplot(values, tick_labels=models, showmeans=True)
            ax.set(title=label, ylabel=label.split(" per")[0])
    else:
        for ax in axes:
            ax.set_title("no segmentation results")
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


def cohort_table(cohort_tsv: str | Path, exclusions_tsv: str | Path) -> pd.DataFrame:
    """Cases per collection × T-stage, with the excluded cases counted per collection."""
    cohort = pd.read_csv(cohort_tsv, sep="\t", dtype=str, keep_default_na=False)
    excluded = pd.read_csv(exclusions_tsv, sep="\t", dtype=str, keep_default_na=False)
    stage = cohort["t_stage"].replace("", "unknown").str.upper().str.extract(r"^(TIS|T[0-4]|UNKNOWN)", expand=False)
    cohort = cohort.assign(stage=stage.fillna("other"))
    table = pd.crosstab(cohort["collection"], cohort["stage"])
    excluded_cases = set(excluded["case"]) if "case" in excluded else set()
    table["excluded"] = cohort.groupby("collection")["case"].apply(lambda s: int(s.isin(excluded_cases).sum()))
    table["total"] = cohort.groupby("collection").size()
    table.loc["all"] = table.sum()
    return table


def plot_cohort(cohort_tsv: str | Path, exclusions_tsv: str | Path, png: str | Path, csv_out: str | Path, style: dict) -> None:
    plt = _pyplot(style)
    table = cohort_table(cohort_tsv, exclusions_tsv)
    _write_csv(table.reset_index(), Path(csv_out))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(table.columns), 0.9 + 0.35 * len(table)))
    ax.axis("off")
    cells = ax.table(cellText=table.values, rowLabels=table.index, colLabels=table.columns, loc="center", cellLoc="center")
    cells.scale(1, 1.3)
    ax.set_title("Cases per collection and T-stage (excluded: not used by any task)")
    save_figure(fig, png)
    plt.close(fig)


def plot_crop_qa(crop_sidecars: list[str], png: str | Path, style: dict, max_cases: int = 64) -> None:
    """Mid-axial slice of every crop, window 40/400, label outline in red: a larynx in every tile."""
    import SimpleITK as sitk
    from skimage.segmentation import find_boundaries

    plt = _pyplot(style)
    tiles = []
    for path in sorted(crop_sidecars)[:max_cases]:
        sidecar = read_json(path)
        if sidecar.get("status") != "ok":
            continue
        case = str(sidecar["case"])
        image = sitk.GetArrayFromImage(read_image(case, sidecar["volume"], "crop"))
        label = (sitk.GetArrayFromImage(read_image(case, sidecar["label"], "crop label map"))
                 if sidecar.get("label") else None)
        mid = image.shape[0] // 2
        tiles.append((sidecar["case"], image[mid], None if label is None else label[mid]))
    n = max(1, len(tiles))
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (case, image, label) in zip(axes.ravel(), tiles):
        ax.imshow(np.clip(image, -160, 240), cmap="gray", vmin=-160, vmax=240)
        if label is not None and label.any():
            outline = np.ma.masked_where(~find_boundaries(label > 0), np.ones_like(label))
            ax.imshow(outline, cmap="autumn", alpha=1.0, interpolation="nearest")
        ax.set_title(case, fontsize=6)
    fig.suptitle("Crop QA: mid-axial slice of each crop (W 400 / L 40), label outline")
    fig.tight_layout()
    save_figure(fig, png)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hnct.report", description=__doc__.split("\n")[0])
    parser.add_argument("--log", default=None)
    sub = parser.add_subparsers(dest="command", required=True)

    tables = sub.add_parser("tables", help="metrics_by_fold, metrics_summary (csv, md, tex), comparison")
    tables.add_argument("--metrics", nargs="*", default=[])
    tables.add_argument("--predictions", nargs="*", default=[])
    tables.add_argument("--test-metrics", nargs="*", default=[],
                        help="results/evaluate/{task}/{model}/test_ensemble/metrics.json")
    tables.add_argument("--folds", nargs="*", default=[],
                        help="results/folds/{task}/folds.tsv: every case's patient, for the patient-level bootstrap")
    tables.add_argument("--per-case", nargs="*", default=[],
                        help="results/evaluate/{task}/{model}/fold{k}/per_case.csv of the segmentation tasks")
    add_plugins_argument(tables)
    tables.add_argument("--published", required=True)
    tables.add_argument("--out-dir", default="results/report", help="standard names here, unless --out-<table> is given")
    for key in TABLE_FILES:
        tables.add_argument(f"--out-{key.replace('_', '-')}", dest=f"out_{key}", default=None)
    tables.add_argument("--bootstrap", type=int, required=True, help="report.bootstrap")
    tables.add_argument("--seed", type=int, required=True, help="report.seed")

    figures = sub.add_parser("figures", help="ROC/PR, confusion, calibration, training curves, seg box plots")
    figures.add_argument("--predictions", nargs="*", default=[],
                         help="validation predictions of the classification tasks")
    add_plugins_argument(figures)
    figures.add_argument("--histories", nargs="*", default=[])
    figures.add_argument("--per-case", nargs="*", default=[])
    figures.add_argument("--out-dir", default="results/report", help="standard names here, unless --out-<figure> is given")
    for key in FIGURE_FILES:
        figures.add_argument(f"--out-{key.replace('_', '-')}", dest=f"out_{key}", default=None)
    figures.add_argument("--dpi", type=int, default=110)
    figures.add_argument("--font-size", type=float, default=10)

    cohort = sub.add_parser("cohort", help="cohort table and figure")
    cohort.add_argument("--cohort", required=True)
    cohort.add_argument("--exclusions", required=True)
    cohort.add_argument("--out-png", required=True)
    cohort.add_argument("--out-csv", required=True)
    cohort.add_argument("--dpi", type=int, default=110)
    cohort.add_argument("--font-size", type=float, default=10)

    qa = sub.add_parser("crop-qa", help="crop QA mosaic")
    qa.add_argument("--crops", nargs="*", default=[])
    qa.add_argument("--out-png", required=True)
    qa.add_argument("--dpi", type=int, default=110)
    qa.add_argument("--font-size", type=float, default=10)

    permutation = sub.add_parser("permutation", help="the permuted-label control table (csv, md)")
    permutation.add_argument("--real-predictions", nargs="*", default=[],
                             help="results/train/{task}/{model}/fold{k}/val_predictions.csv of the permuted models")
    permutation.add_argument("--permuted-predictions", nargs="*", default=[],
                             help="results/train_permuted/{task}/{model}/seed{s}/fold{k}/val_predictions.csv")
    permutation.add_argument("--folds", nargs="*", default=[], help="results/folds/{task}/folds.tsv")
    add_plugins_argument(permutation)
    permutation.add_argument("--out-csv", required=True)
    permutation.add_argument("--out-markdown", required=True)
    permutation.add_argument("--bootstrap", type=int, required=True, help="report.bootstrap")
    permutation.add_argument("--seed", type=int, required=True, help="report.seed")

    args = parser.parse_args(argv)
    setup_logging(args.log)
    style = {"dpi": getattr(args, "dpi", 110), "font_size": getattr(args, "font_size", 10)}
    load_plugins(getattr(args, "plugins", []))
    if args.command == "tables":
        outputs = {key: getattr(args, f"out_{key}") for key in TABLE_FILES if getattr(args, f"out_{key}")}
        write_tables(args.metrics, args.predictions, args.out_dir, args.published, args.bootstrap, args.seed, outputs,
                     test_metric_files=args.test_metrics, folds_files=args.folds, per_case_files=args.per_case)
    elif args.command == "figures":
        out = {key: getattr(args, f"out_{key}") or Path(args.out_dir) / name for key, name in FIGURE_FILES.items()}
        plot_roc_pr(args.predictions, out["roc_pr"], style)
        plot_confusion(args.predictions, out["confusion"], style)
        plot_calibration(args.predictions, out["calibration"], style)
        plot_training_curves(args.histories, out["training"], style)
        plot_segmentation_boxes(args.per_case, out["segmentation"], style)
    elif args.command == "cohort":
        plot_cohort(args.cohort, args.exclusions, args.out_png, args.out_csv, style)
    elif args.command == "crop-qa":
        plot_crop_qa(args.crops, args.out_png, style)
    elif args.command == "permutation":
        write_permutation_control(args.real_predictions, args.permuted_predictions, args.out_csv, args.out_markdown,
                                  args.bootstrap, args.seed, args.folds)
    log.info("report %s written", args.command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
