"""The paper's tables and figures from every evaluate output, for people and for ``snakemake --report``.

Tables (``results/report/``):

``metrics_by_fold.csv``   one row per task × model × fold: every scalar of that fold's
                          ``metrics.json`` (nested keys joined with ``.``).
``metrics_summary.csv``   per task × model × metric: mean and SD across folds, and for
                          classification a 95 % percentile-bootstrap CI on the pooled
                          out-of-fold predictions (cases resampled with replacement, seeded).
``metrics_test.csv``      classification on the held-out test set, per model × setting ×
                          metric: ``test_ensemble`` (mean P(T4) of the fold models) and
                          ``test_best_fold`` (the model of the fold with the best validation
                          ROC-AUC, see hnct.evaluate), threshold 0.5, with a 95 % percentile-
                          bootstrap CI over the test cases. No rows when there is no test set.
``metrics_summary.md`` / ``.tex``   the CV table and, beside it, the test-set table, for papers.
``comparison_published.csv`` / ``.md``   this run beside the published LaryngealCT numbers
                          (``workflow/report/published_laryngealct.tsv``, with its sources), by
                          evaluation kind: ``cv`` (mean over validation folds; published: mean of
                          its ``val_fold*`` rows), ``test_best_fold`` and ``test_ensemble``.

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

from hnct.common import atomic_path, read_image, read_json, setup_logging
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
SEGMENT_COLUMNS = {
    "dice": "Dice",
    "iou": "IoU",
    "hd95_mm": "HD95 (mm)",
    "nsd": "NSD",
    "snet_slice_dice": "slice Dice (S-Net)",
}
# A task's report_kind (hnct.tasks) picks its columns, its pooled CIs and its figures.
KIND_COLUMNS = {"classification": CLASSIFY_COLUMNS, "segmentation": SEGMENT_COLUMNS,
                "structures": {"dice": "Dice (mean over structures; per structure: hnct.report_structures)"}}
CLASSIFICATION = "classification"
METRIC_TITLES = {"val_auc": "AUC", "val_dice": "Dice"}


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
    threshold-free metric (``auc``) may sit at the top level. Prefer the top level, then
    the 0.5 threshold, then a per-case mean (segmentation: ``mean.dice``).
    """
    columns = list(columns)
    for candidate in (metric, f"at_0.5.{metric}", f"threshold_0.5.{metric}", f"mean.{metric}", f"{metric}.mean"):
        if candidate in columns:
            return candidate
    matches = [c for c in columns if c.split(".")[-1] == metric]
    return sorted(matches, key=len)[0] if matches else None


def summary_table(by_fold: pd.DataFrame, pooled: dict[tuple[str, str], pd.DataFrame] | None = None,
                  n_bootstrap: int = 1000, seed: int = 7) -> pd.DataFrame:
    """Mean ± SD across folds per task × model × headline metric, plus pooled bootstrap CIs."""
    rows = []
    for (task, model), group in by_fold.groupby(["task", "model"], sort=True):
        wanted = KIND_COLUMNS[report_kind(task)]
        cis = {}
        if report_kind(task) == CLASSIFICATION and pooled and (task, model) in pooled:
            cis = bootstrap_ci(pooled[(task, model)], n_bootstrap=n_bootstrap, seed=seed)
        for metric in wanted:
            key = headline_key(group.columns, metric)
            if key is None:
                continue
            values = group[key].astype(float)
            finite = values[np.isfinite(values)]
            low, high, pooled_value = cis.get(metric, (math.nan, math.nan, math.nan))
            rows.append({
                "task": task, "model": model, "metric": metric, "source_key": key,
                "n_folds": int(len(values)), "n_folds_finite": int(len(finite)),
                "mean": float(finite.mean()) if len(finite) else math.nan,
                "sd": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
                "pooled": pooled_value, "ci_low": low, "ci_high": high,
            })
    return pd.DataFrame(rows, columns=["task", "model", "metric", "source_key", "n_folds", "n_folds_finite",
                                       "mean", "sd", "pooled", "ci_low", "ci_high"])


# ---------------------------------------------------------------------------------------------
# Classification: pooled out-of-fold predictions


def pooled_metrics(labels: np.ndarray, probability: np.ndarray) -> dict[str, float]:
    """The headline classification metrics at threshold 0.5, from hnct.metrics.classification."""
    from hnct.metrics.classification import classification_metrics

    result = classification_metrics(labels.astype(int), probability.astype(float), threshold=0.5)
    return {metric: float(result.get(metric, math.nan)) for metric in CLASSIFY_COLUMNS}


def bootstrap_ci(predictions: pd.DataFrame, n_bootstrap: int = 1000, seed: int = 7,
                 alpha: float = 0.05) -> dict[str, tuple[float, float, float]]:
    """95 % percentile bootstrap CI of each headline metric on pooled predictions.

    Cases are resampled with replacement; a resample with a single class gives NaN for the
    metrics that need both and is left out of that metric's percentiles.
    """
    labels = predictions["label"].to_numpy(int)
    probability = predictions["probability"].to_numpy(float)
    point = pooled_metrics(labels, probability)
    rng = np.random.default_rng(seed)
    draws = {metric: [] for metric in CLASSIFY_COLUMNS}
    n = len(labels)
    for _ in range(n_bootstrap):
        index = rng.integers(0, n, size=n)
        with np.errstate(all="ignore"):
            values = pooled_metrics(labels[index], probability[index])
        for metric, value in values.items():
            if np.isfinite(value):
                draws[metric].append(value)
    out = {}
    for metric, values in draws.items():
        if values:
            low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
            out[metric] = (float(low), float(high), point[metric])
        else:
            out[metric] = (math.nan, math.nan, point[metric])
    return out


def read_predictions(files: Iterable[str | Path]) -> pd.DataFrame:
    frames = [pd.read_csv(f) for f in files]
    frames = [f for f in frames if not f.empty]
    if not frames:
        return pd.DataFrame(columns=["case", "label", "probability", "fold"])
    return pd.concat(frames, ignore_index=True)


def group_prediction_files(files: Iterable[str | Path]) -> dict[tuple[str, str], list[Path]]:
    """Map (task, model) to its fold files, from ``results/train/{task}/{model}/fold{k}/...`` paths."""
    grouped: dict[tuple[str, str], list[Path]] = {}
    for f in files:
        path = Path(f)
        task, model = path.parts[-4], path.parts[-3]
        grouped.setdefault((task, model), []).append(path)
    return grouped


# ---------------------------------------------------------------------------------------------
# Writing tables


def format_cell(row: pd.Series, digits: int = 3) -> str:
    if not np.isfinite(row["mean"]):
        return "n/a"
    text = f"{row['mean']:.{digits}f}"
    if np.isfinite(row["sd"]):
        text += f" ± {row['sd']:.{digits}f}"
    if np.isfinite(row.get("ci_low", math.nan)):
        text += f" [{row['ci_low']:.{digits}f}, {row['ci_high']:.{digits}f}]"
    return text


def paper_table(summary: pd.DataFrame, task: str) -> pd.DataFrame:
    names = KIND_COLUMNS[report_kind(task)]
    part = summary[summary["task"] == task]
    if part.empty:
        return pd.DataFrame()
    part = part.assign(cell=part.apply(format_cell, axis=1))
    table = part.pivot(index="model", columns="metric", values="cell")
    table = table[[m for m in names if m in table.columns]].rename(columns=names)
    table.index.name = "model"
    return table


def markdown(table: pd.DataFrame) -> str:
    if table.empty:
        return "_no results_\n"
    header = ["model"] + list(table.columns)
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
             r"\hline", " & ".join(["Model"] + [esc(c) for c in table.columns]) + r" \\", r"\hline"]
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
TEST_COLUMNS = ["task", "model", "setting", "fold", "n_cases", "n_positive", "metric", "value", "ci_low", "ci_high"]


def test_table(test_metric_files: Iterable[str | Path], n_bootstrap: int = 1000, seed: int = 7) -> pd.DataFrame:
    """One row per model × setting × headline metric of the test set; none for a run without test set.

    The value is read from the ensemble's ``metrics.json`` (the ensemble's own keys, or its
    ``best_fold`` block); the CI is a percentile bootstrap over the test cases of ``predictions.csv``
    beside it (column ``probability`` for the ensemble, ``prob_fold{k}`` for the best fold).
    """
    rows = []
    for path in test_metric_files:
        payload = read_json(path)
        if not payload.get("test_set"):
            log.info("%s: no test set (%s): no test rows for %s", path, payload.get("reason", ""), payload.get("model"))
            continue
        predictions = pd.read_csv(Path(path).with_name("predictions.csv"), dtype={"case": str})
        best = payload["best_fold"]
        for setting, block, fold, column in (
                ("test_ensemble", payload, "+".join(str(k) for k in payload["folds"]), "probability"),
                ("test_best_fold", best, str(best["fold"]), f"prob_fold{best['fold']}")):
            flat = flatten(block)
            cis = bootstrap_ci(predictions.assign(probability=predictions[column]), n_bootstrap=n_bootstrap,
                               seed=seed)
            for metric in CLASSIFY_COLUMNS:
                key = headline_key(flat, metric)
                low, high, _ = cis.get(metric, (math.nan, math.nan, math.nan))
                rows.append({"task": payload["task"], "model": payload["model"], "setting": setting, "fold": fold,
                             "n_cases": int(block["n_cases"]), "n_positive": int(block["n_positive"]),
                             "metric": metric, "value": flat[key] if key else math.nan,
                             "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=TEST_COLUMNS)


def test_paper_table(tests: pd.DataFrame) -> pd.DataFrame:
    """Model × setting rows ("resnet18, 5-fold ensemble"), the headline metrics as columns."""
    if tests.empty:
        return pd.DataFrame()
    def label(row):
        if row["setting"] == "test_ensemble":
            return f"{row['model']}, {len(row['fold'].split('+'))}-fold ensemble"
        return f"{row['model']}, best fold ({row['fold']})"
    cells = tests.assign(
        row=tests.apply(label, axis=1),
        cell=tests.apply(lambda r: format_cell({"mean": r["value"], "sd": math.nan, "ci_low": r["ci_low"],
                                                "ci_high": r["ci_high"]}), axis=1))
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


def write_tables(metric_files: list[str], prediction_files: list[str], out_dir: str | Path,
                 published_tsv: str | Path, n_bootstrap: int, seed: int,
                 outputs: dict[str, str | Path] | None = None,
                 test_metric_files: list[str] | None = None) -> None:
    """Write the tables into ``out_dir`` under their standard names, or to ``outputs`` paths.

    ``test_metric_files``: the test-set ensembles' ``metrics.json`` (with ``predictions.csv`` beside).
    """
    out = {key: Path(out_dir) / name for key, name in TABLE_FILES.items()}
    out.update({key: Path(path) for key, path in (outputs or {}).items()})
    by_fold = metrics_by_fold(metric_files)
    pooled = {key: read_predictions(files) for key, files in group_prediction_files(prediction_files).items()
              if report_kind(key[0]) == CLASSIFICATION}
    summary = summary_table(by_fold, pooled, n_bootstrap=n_bootstrap, seed=seed)
    tests = test_table(test_metric_files or [], n_bootstrap=n_bootstrap, seed=seed)
    if test_metric_files and tests.empty:
        log.info("no test set in this run: the test-set table has no rows")
    _write_csv(by_fold, out["by_fold"])
    _write_csv(summary, out["summary"])
    _write_csv(tests, out["test"])
    md, tex = [], []
    for task in sorted(set(summary["task"]) | set(tests["task"])):
        title = f"{get_task(task).report_title} (validation folds)"
        table = paper_table(summary, task)
        if not table.empty:
            md.append(f"### {title}\n\nmean ± SD across folds [95 % bootstrap CI, pooled out-of-fold]\n\n"
                      + markdown(table))
            tex.append(latex(table, title))
        task_tests = tests[tests["task"] == task]
        if not task_tests.empty:  # the test set beside the task's CV table
            title = f"{get_task(task).report_title} (held-out test set)"
            table = test_paper_table(task_tests)
            md.append(f"### {title}\n\nthreshold 0.5 [95 % bootstrap CI over test cases]; best fold: highest "
                      "validation AUC\n\n" + markdown(table))
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
    plt = _pyplot(style)
    grouped: dict[tuple[str, str], list[Path]] = {}
    for f in history_files:
        path = Path(f)
        grouped.setdefault((path.parts[-4], path.parts[-3]), []).append(path)
    keys = sorted(grouped)
    fig, axes = plt.subplots(2, max(1, len(keys)), figsize=(3.0 * max(1, len(keys)), 5.6), squeeze=False)
    for col, (task, model) in enumerate(keys):
        loss_ax, metric_ax = axes[0, col], axes[1, col]
        for fold_file in sorted(grouped[(task, model)]):
            history = pd.read_csv(fold_file)
            fold = fold_file.parent.name
            line, = loss_ax.plot(history["epoch"], history["train_loss"], lw=1, label=f"{fold} train")
            if "val_loss" in history:
                loss_ax.plot(history["epoch"], history["val_loss"], lw=1, ls="--", color=line.get_color())
            metric = get_task(task).metric_name
            if metric in history:
                metric_ax.plot(history["epoch"], history[metric], lw=1, color=line.get_color(), label=fold)
        loss_ax.set(title=f"{task}/{model}: loss (dashed: val)", xlabel="epoch", ylabel="loss")
        metric = get_task(task).metric_name
        metric_ax.set(title="validation " + METRIC_TITLES.get(metric, metric), xlabel="epoch", ylim=(0, 1.02))
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
        for ax, metric, label in ((axes[0], "dice", "Dice per case"), (axes[1], "hd95_mm", "HD95 per case (mm)")):
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
    add_plugins_argument(tables)
    tables.add_argument("--published", required=True)
    tables.add_argument("--out-dir", default="results/report", help="standard names here, unless --out-<table> is given")
    for key in TABLE_FILES:
        tables.add_argument(f"--out-{key.replace('_', '-')}", dest=f"out_{key}", default=None)
    tables.add_argument("--bootstrap", type=int, default=1000)
    tables.add_argument("--seed", type=int, default=7)

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

    args = parser.parse_args(argv)
    setup_logging(args.log)
    style = {"dpi": getattr(args, "dpi", 110), "font_size": getattr(args, "font_size", 10)}
    load_plugins(getattr(args, "plugins", []))
    if args.command == "tables":
        outputs = {key: getattr(args, f"out_{key}") for key in TABLE_FILES if getattr(args, f"out_{key}")}
        write_tables(args.metrics, args.predictions, args.out_dir, args.published, args.bootstrap, args.seed, outputs,
                     test_metric_files=args.test_metrics)
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
    log.info("report %s written", args.command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
