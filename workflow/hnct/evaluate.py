"""evaluate{task, model, fold}: metrics of one validation fold.

classify: reads ``val_predictions.csv`` (``case, label, probability, fold``; probability = P(T4))
and writes

* ``metrics.json``: ``task, model, fold, n_cases, n_positive, n_negative``, the threshold-free
  ``auc`` (ROC-AUC), ``pr_auc`` (average precision), ``brier``; ``thresholds`` (``default`` 0.5,
  ``youden`` chosen on this fold's predictions by Youden's J, and ``youden_j``); ``at_0.5`` and
  ``at_youden`` (accuracy, balanced accuracy, macro-F1, T4 sensitivity, specificity, MCC,
  confusion matrix ``[[tn, fp], [fn, tp]]``); ``reasons``/``reason`` for every NaN (a fold with one
  class never fails). NaN is written as JSON ``null``. See :mod:`hnct.metrics.classification`.
* ``per_case.csv``: ``case, fold, label, probability, pred_at_0.5, pred_at_youden, squared_error``.

segment: hands the remaining arguments to :func:`hnct.segeval.main` (per-case 3D masks, Dice,
HD95, NSD), e.g. ``--predictions --fold-slices --out-metrics --out-per-case --masks-dir
--nsd-tolerance-mm --threshold --model --fold --log``.
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
from hnct.metrics.classification import DEFAULT_THRESHOLD, check_inputs, evaluate_predictions

log = logging.getLogger("hnct.evaluate")

PREDICTION_COLUMNS = ("case", "label", "probability", "fold")


class PredictionsError(ValueError):
    """A predictions file cannot be evaluated (names the file and the reason)."""


def read_classify_predictions(path: str | Path, fold: int | None = None) -> pd.DataFrame:
    """Read and check ``val_predictions.csv``: columns, one row per case, labels 0/1, P(T4) in [0, 1]."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path}: predictions file does not exist")
    table = pd.read_csv(path, dtype={"case": str})
    missing = [c for c in PREDICTION_COLUMNS if c not in table.columns]
    if missing:
        raise PredictionsError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(PREDICTION_COLUMNS)})")
    if table.empty:
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


def _json_safe(value: Any) -> Any:
    """NaN -> None (strict JSON ``null``), recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def evaluate_classify(predictions: str | Path, out_metrics: str | Path, out_per_case: str | Path,
                      model: str, fold: int, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Write ``metrics.json`` and ``per_case.csv`` of one classification fold; returns the metrics."""
    table = read_classify_predictions(predictions, fold)
    labels = table["label"].to_numpy(int)
    probability = table["probability"].to_numpy(float)
    metrics = evaluate_predictions(labels, probability, default_threshold=threshold)
    if metrics["reason"]:
        log.warning("%s fold %s: %s", model, fold, metrics["reason"])
    payload = {"task": "classify", "model": model, "fold": int(fold), "predictions": str(predictions), **metrics}
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
    write_json(out_metrics, _json_safe(payload))
    log.info("classify %s fold %s: %d cases (%d T4): AUC %.3f, PR-AUC %.3f, macro-F1@%g %.3f, Youden %.3f",
             model, fold, metrics["n_cases"], metrics["n_positive"], metrics["auc"], metrics["pr_auc"],
             threshold, metrics[f"at_{threshold:g}"]["f1_macro"], youden)
    return payload


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", choices=["classify", "segment"])
    known, rest = first.parse_known_args(argv)
    if known.task == "segment":
        # Segmentation metrics live in hnct.segeval; import lazily so classify never needs it.
        from hnct.segeval import main as seg_main

        return int(seg_main(rest) or 0)

    parser = argparse.ArgumentParser(prog="hnct evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, choices=["classify", "segment"])
    parser.add_argument("--predictions", required=True, help="val_predictions.csv (case, label, probability, fold)")
    parser.add_argument("--out-metrics", required=True, help="metrics.json")
    parser.add_argument("--out-per-case", required=True, help="per_case.csv")
    parser.add_argument("--model", required=True)
    parser.add_argument("--fold", required=True, type=int)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD, help="default P(T4) threshold")
    parser.add_argument("--log", help="log file (also logged to stderr)")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    try:
        evaluate_classify(args.predictions, args.out_metrics, args.out_per_case, args.model, args.fold,
                          threshold=args.threshold)
    except PredictionsError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
