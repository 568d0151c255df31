"""evaluate{task, model, fold}: metrics of one validation fold.

classify: reads ``val_predictions.csv`` (``case, label, probability, fold``; probability = P(T4))
of the outer fold and ``inner_predictions.csv`` (the same columns: the selected model's
inner-validation cases, from the training side of the split) and writes

* ``metrics.json``: ``task, model, fold, n_cases, n_positive, n_negative``, the threshold-free
  ``auc`` (ROC-AUC), ``pr_auc`` (average precision), ``brier``; ``thresholds`` (``default`` 0.5,
  ``youden`` chosen by Youden's J on the **inner** predictions and applied unchanged to the outer
  fold, ``youden_j`` there, ``youden_chosen_on``; no inner predictions (``train.selection: fixed``,
  or none given): NaN with the reason, never a threshold chosen on the fold it scores); ``at_0.5`` and
  ``at_youden`` (accuracy, balanced accuracy, macro-F1, T4 sensitivity, specificity, MCC,
  confusion matrix ``[[tn, fp], [fn, tp]]``); ``reasons``/``reason`` for every NaN (a fold with one
  class never fails). NaN is written as JSON ``null``. See :mod:`hnct.metrics.classification`.
* ``per_case.csv``: ``case, fold, label, probability, pred_at_0.5, pred_at_youden, squared_error``.

``python -m hnct.evaluate --task NAME ...`` hands the arguments to the task's ``evaluate_main``
(hnct.tasks): classify is :func:`classify_main` here; segment is :func:`hnct.segeval.main`
(per-case 3D masks, Dice, HD95, NSD; ``--predictions --fold-slices --out-metrics --out-per-case
--masks-dir --nsd-tolerance-mm --threshold --model --fold --log``).

``python -m hnct.evaluate ensemble`` (rule ``ensemble_test``, per model of a task with a test
ensemble, classify): the held-out
test set (``fold == "test"`` in folds.tsv) predicted by every fold's best model
(``results/train/classify/{model}/fold{k}/test_predictions.csv``). Writes

* ``predictions.csv``: ``case, label, probability, n_folds, prob_fold{k}..., pred_at_0.5``, where
  ``probability`` is the mean of the fold models' P(T4) (the 5-fold ensemble);
* ``metrics.json``: the ensemble's metrics, the same keys as a fold's ``metrics.json``
  (:func:`hnct.metrics.classification.evaluate_predictions`, headline threshold 0.5 on the averaged
  probability; ``at_youden`` applies each fold's inner threshold (metrics.json ``thresholds.youden``)
  to that fold's test predictions, and their mean to the ensemble's: never chosen on the test set),
  ``setting: test_ensemble``, ``per_fold`` (each fold model's own test metrics with its validation
  AUC and macro-F1) and ``best_fold``: the **single best fold**, the fold whose model has the highest
  validation ROC-AUC (``auc`` of ``results/evaluate/classify/{model}/fold{k}/metrics.json``; ties:
  higher validation macro-F1 at 0.5, then the lower fold number), with that model's test metrics.
  This is the pair of rows the published LaryngealCT table reports (single best fold, 5-fold ensemble).

No test set (``folds.test: none``, or no case marked test): every fold's test_predictions.csv is
header-only; the ensemble writes a header-only ``predictions.csv`` and a ``metrics.json`` with
``test_set: false`` and the reason, and logs it. The report then shows no test rows.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hnct.common import atomic_path, setup_logging, write_json
from hnct.metrics import json_safe
from hnct.metrics.classification import DEFAULT_THRESHOLD, check_inputs, evaluate_predictions, youden_threshold
from hnct.tasks import add_plugins_argument, evaluate_fold_parser, get_task, load_plugins
from hnct.tasks.classify import Classify

log = logging.getLogger("hnct.evaluate")

PREDICTION_COLUMNS = ("case", "label", "probability", "fold")


class PredictionsError(ValueError):
    """A predictions file cannot be evaluated (names the file and the reason)."""


def read_classify_predictions(path: str | Path, fold: int | None = None, allow_empty: bool = False,
                              what: str = "predictions") -> pd.DataFrame:
    """Read and check ``val_predictions.csv``: columns, one row per case, labels 0/1, P(T4) in [0, 1].

    ``allow_empty``: a header-only file gives an empty table (``test_predictions.csv`` without a
    test set) instead of an error.
    """
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path}: {what} file does not exist")
    table = pd.read_csv(path, dtype={"case": str})
    missing = [c for c in PREDICTION_COLUMNS if c not in table.columns]
    if missing:
        raise PredictionsError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(PREDICTION_COLUMNS)})")
    if table.empty:
        if allow_empty:
            return table
        raise PredictionsError(f"{path}: no predictions (an empty validation fold)")
    duplicated = sorted(set(table.loc[table["case"].duplicated(), "case"]))
    if duplicated:
        raise PredictionsError(f"{path}: case(s) predicted more than once: {duplicated[:5]}")
    if fold is not None and not (table["fold"].astype(str) == str(fold)).all():
        raise PredictionsError(f"{path}: fold column {sorted(set(table['fold'].astype(str)))} is not fold {fold}")
    try:
        check_inputs(table["label"].to_numpy(), table["probability"].to_numpy(float))
    except (ValueError, TypeError) as err:
        raise PredictionsError(f"{path}: {err}") from err
    return table.assign(label=table["label"].astype(int)).sort_values("case").reset_index(drop=True)


def inner_threshold(inner_predictions: str | Path | None, fold: int | None = None) -> tuple[float, float, str]:
    """``(threshold, J, chosen_on)``: Youden's J on the selected model's inner-validation predictions
    (hnct.train's ``inner_predictions.csv``); NaN with the reason when there are none or one class."""
    if inner_predictions is None:
        return math.nan, math.nan, "no inner-validation predictions given"
    table = read_classify_predictions(inner_predictions, fold, allow_empty=True, what="inner predictions")
    if table.empty:
        return math.nan, math.nan, f"{inner_predictions} is empty (train.selection: fixed has no inner validation)"
    value, j = youden_threshold(table["label"].to_numpy(int), table["probability"].to_numpy(float))
    where = f"the inner validation ({len(table)} cases, {int(table['label'].sum())} T4) of {inner_predictions}"
    if not math.isfinite(value):
        return value, j, f"{where} holds one class"
    return value, j, where


def evaluate_classify(predictions: str | Path, out_metrics: str | Path, out_per_case: str | Path,
                      model: str, fold: int, threshold: float = DEFAULT_THRESHOLD,
                      task: str = Classify.name, inner_predictions: str | Path | None = None) -> dict[str, Any]:
    """Write ``metrics.json`` and ``per_case.csv`` of one classification fold; returns the metrics.
    ``inner_predictions``: where the Youden threshold is chosen (None: it is not reported)."""
    table = read_classify_predictions(predictions, fold)
    labels = table["label"].to_numpy(int)
    probability = table["probability"].to_numpy(float)
    metrics = evaluate_predictions(labels, probability, default_threshold=threshold,
                                   youden=inner_threshold(inner_predictions, fold))
    if metrics["reason"]:
        log.warning("%s fold %s: %s", model, fold, metrics["reason"])
    payload = {"task": task, "model": model, "fold": int(fold), "predictions": str(predictions),
               "inner_predictions": str(inner_predictions or ""), **metrics}
    youden = metrics["thresholds"]["youden"]
    per_case = pd.DataFrame({
        "case": table["case"],
        "fold": int(fold),
        "label": labels,
        "probability": probability,
        f"pred_at_{threshold:g}": (probability >= threshold).astype(int),
        "pred_at_youden": (probability >= youden).astype(int) if np.isfinite(youden) else pd.NA,
        "squared_error": (probability - labels) ** 2,
    })
    with atomic_path(out_per_case, suffix=".csv") as tmp:
        per_case.to_csv(tmp, index=False, lineterminator="\n")
    write_json(out_metrics, json_safe(payload))
    log.info("%s %s fold %s: %d cases (%d T4): AUC %.3f, PR-AUC %.3f, macro-F1@%g %.3f, Youden %.3f",
             task, model, fold, metrics["n_cases"], metrics["n_positive"], metrics["auc"], metrics["pr_auc"],
             threshold, metrics[f"at_{threshold:g}"]["f1_macro"], youden)
    return payload


# ---------------------------------------------------------------- test-set ensemble
BEST_FOLD_CRITERION = ("validation ROC-AUC of the fold's best model (metrics.json auc of the fold); "
                       "ties: validation macro-F1 at 0.5, then the lower fold number")


def read_test_predictions(path: str | Path, fold: int) -> pd.DataFrame:
    """A fold model's ``test_predictions.csv``; header-only (no test set) gives an empty table."""
    return read_classify_predictions(path, fold, allow_empty=True, what="test predictions")


def _score(value: Any) -> float:
    return float(value) if value is not None and np.isfinite(float(value)) else -math.inf


def choose_best_fold(val_metrics: list[dict[str, Any]]) -> int:
    """The single best fold: see ``BEST_FOLD_CRITERION``. ``val_metrics``: each fold's metrics.json."""
    ranked = sorted(val_metrics, key=lambda m: (-_score(m.get("auc")),
                                                -_score((m.get(f"at_{DEFAULT_THRESHOLD:g}") or {}).get("f1_macro")),
                                                int(m["fold"])))
    return int(ranked[0]["fold"])


def fold_threshold(val_metrics: dict[str, Any]) -> tuple[float, float, str]:
    """The inner-validation Youden threshold a fold's metrics.json holds, to apply to its test predictions."""
    thresholds = val_metrics.get("thresholds") or {}
    value = thresholds.get("youden")
    chosen_on = str(thresholds.get("youden_chosen_on") or "no inner threshold in the fold's metrics.json")
    j = thresholds.get("youden_j")
    return (math.nan if value is None else float(value), math.nan if j is None else float(j), chosen_on)


def ensemble_threshold(fold_youden: list[tuple[float, float, str]]) -> tuple[float, float, str]:
    """The ensemble's threshold: the mean of the fold models' inner thresholds (NaN unless all have one)."""
    values = [value for value, _, _ in fold_youden]
    if not values or not all(math.isfinite(v) for v in values):
        return math.nan, math.nan, "a fold model has no inner-validation threshold"
    return float(np.mean(values)), math.nan, f"the mean of the {len(values)} fold models' inner-validation thresholds"


def ensemble_test(test_predictions: list[str | Path], val_metrics: list[str | Path], out_predictions: str | Path,
                  out_metrics: str | Path, model: str, threshold: float = DEFAULT_THRESHOLD,
                  task: str = Classify.name) -> dict[str, Any]:
    """Average the fold models' test-set P(T4) per case; metrics of the ensemble and of every fold.

    ``test_predictions[i]`` and ``val_metrics[i]`` belong to the same fold (its number read from the
    metrics.json). Returns the metrics.json payload.
    """
    if len(test_predictions) != len(val_metrics) or not test_predictions:
        raise PredictionsError(f"{model}: {len(test_predictions)} test prediction files but "
                               f"{len(val_metrics)} validation metrics files")
    from hnct.common import read_json

    folds_val = [read_json(path) for path in val_metrics]
    folds = [int(m["fold"]) for m in folds_val]
    tables = [read_test_predictions(path, fold) for path, fold in zip(test_predictions, folds)]
    best_fold = choose_best_fold(folds_val)
    base = {"task": task, "model": model, "setting": "test_ensemble", "folds": folds,
            "best_fold_criterion": BEST_FOLD_CRITERION, "threshold": float(threshold),
            "test_predictions": [str(p) for p in test_predictions]}
    fold_probability = [f"prob_fold{k}" for k in folds]
    columns = ["case", "label", "probability", "n_folds", *fold_probability, f"pred_at_{threshold:g}"]
    empty = [t.empty for t in tables]
    if all(empty):
        reason = "no test set: folds.tsv has no case with fold 'test' (folds.test: none, or none marked test)"
        log.info("%s %s: %s; the ensemble has nothing to evaluate", task, model, reason)
        with atomic_path(out_predictions, suffix=".csv") as tmp:
            pd.DataFrame(columns=columns).to_csv(tmp, index=False, lineterminator="\n")
        payload = {**base, "test_set": False, "n_cases": 0, "reason": reason, "best_fold": {"fold": best_fold},
                   "per_fold": []}
        write_json(out_metrics, json_safe(payload))
        return payload
    if any(empty):
        raise PredictionsError(f"{model}: test predictions of fold(s) "
                               f"{[k for k, e in zip(folds, empty) if e]} are empty, others are not")
    reference = tables[0][["case", "label"]]
    for path, table in zip(test_predictions[1:], tables[1:]):
        if not table[["case", "label"]].equals(reference):
            raise PredictionsError(f"{path}: test cases or labels differ from {test_predictions[0]}")
    labels = reference["label"].to_numpy(int)
    stacked = np.stack([t["probability"].to_numpy(float) for t in tables])  # (folds, cases)
    probability = stacked.mean(axis=0)
    fold_youden = [fold_threshold(val) for val in folds_val]
    metrics = evaluate_predictions(labels, probability, default_threshold=threshold,
                                   youden=ensemble_threshold(fold_youden))
    per_fold = []
    for fold, val, row, youden in zip(folds, folds_val, stacked, fold_youden):
        fold_metrics = evaluate_predictions(labels, row, default_threshold=threshold, youden=youden)
        per_fold.append({"fold": fold, "val_auc": val.get("auc"),
                         "val_f1_macro": (val.get(f"at_{threshold:g}") or {}).get("f1_macro"), **fold_metrics})
    best = next(entry for entry in per_fold if entry["fold"] == best_fold)
    table = pd.DataFrame({"case": reference["case"], "label": labels, "probability": probability,
                          "n_folds": len(tables), **dict(zip(fold_probability, stacked)),
                          f"pred_at_{threshold:g}": (probability >= threshold).astype(int)}, columns=columns)
    with atomic_path(out_predictions, suffix=".csv") as tmp:
        table.to_csv(tmp, index=False, lineterminator="\n")
    payload = {**base, "test_set": True, **metrics, "best_fold": best, "per_fold": per_fold}
    write_json(out_metrics, json_safe(payload))
    log.info("%s %s test set: %d cases (%d T4); %d-fold ensemble AUC %.3f, macro-F1@%g %.3f; "
             "single best fold %d (validation AUC %s): AUC %.3f, macro-F1@%g %.3f", task, model, metrics["n_cases"],
             metrics["n_positive"], len(tables), metrics["auc"], threshold,
             metrics[f"at_{threshold:g}"]["f1_macro"], best_fold, best["val_auc"], best["auc"], threshold,
             best[f"at_{threshold:g}"]["f1_macro"])
    return payload


def ensemble_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m hnct.evaluate ensemble",
                                     description="test-set ensemble of the fold models (classify)")
    parser.add_argument("--task", default=Classify.name, help="a task with a test ensemble (default classify)")
    parser.add_argument("--test-predictions", nargs="+", required=True,
                        help="results/train/{task}/{model}/fold{k}/test_predictions.csv, in fold order")
    parser.add_argument("--val-metrics", nargs="+", required=True,
                        help="results/evaluate/{task}/{model}/fold{k}/metrics.json, same order")
    parser.add_argument("--out-predictions", required=True)
    parser.add_argument("--out-metrics", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    try:
        ensemble_test(args.test_predictions, args.val_metrics, args.out_predictions, args.out_metrics,
                      args.model, threshold=args.threshold, task=args.task)
    except PredictionsError as err:
        log.error("%s", err)
        return 1
    return 0


def classify_main(argv: list[str]) -> int:
    """``--task classify`` (the classify task's ``evaluate_main``): metrics of one fold's predictions."""
    parser = evaluate_fold_parser("hnct evaluate", Classify.name, "val_predictions.csv (case, label, probability, fold)",
                                  __doc__.split("\n\n")[0])
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="default P(T4) threshold")
    parser.add_argument("--inner-predictions",
                        help="inner_predictions.csv of the same model: the Youden threshold is chosen there "
                             "(without it, no Youden threshold is reported)")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    try:
        evaluate_classify(args.predictions, args.out_metrics, args.out_per_case, args.model, args.fold,
                          threshold=args.threshold, task=args.task, inner_predictions=args.inner_predictions)
    except PredictionsError as err:
        log.error("%s", err)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``ensemble ...`` or ``--task NAME ...``: the task's evaluation (hnct.tasks ``evaluate_main``)
    gets every argument but ``--plugins``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ensemble"]:
        return ensemble_main(argv[1:])
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", required=True, help="a registered task (hnct.tasks)")
    add_plugins_argument(first)
    known, rest = first.parse_known_args(argv)
    load_plugins(known.plugins)
    return int(get_task(known.task).evaluate_main(["--task", known.task, *rest]) or 0)


if __name__ == "__main__":
    sys.exit(main())
