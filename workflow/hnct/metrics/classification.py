"""Binary classification metrics for T4 (positive, label 1) vs non-T4 (label 0).

Inputs are the true labels (0/1) and the predicted probability of T4 per case. A case is
predicted T4 when ``probability >= threshold`` (the convention of scikit-learn's ``roc_curve``
thresholds, so a Youden threshold reproduces its ROC point exactly).

Written with numpy, and checked against scikit-learn to 1e-9 in ``tests/test_metrics_classification.py``:

* threshold-free: ``auc`` (ROC-AUC, Mann-Whitney with average ranks for ties = ``roc_auc_score``),
  ``pr_auc`` (average precision, the step sum over distinct thresholds = ``average_precision_score``),
  ``brier`` (mean squared error of the probability = ``brier_score_loss``);
* at a threshold: ``accuracy``, ``balanced_accuracy``, ``f1_macro``, ``sensitivity`` (T4 recall),
  ``specificity`` (non-T4 recall), ``mcc`` (0 when a row or column of the confusion matrix is empty,
  as scikit-learn), the confusion matrix ``[[tn, fp], [fn, tp]]`` (rows true, columns predicted) and
  its four cells.

A set with one class only (a validation fold without T4) never raises: the metrics that need both
classes (``auc``, ``pr_auc``, ``balanced_accuracy``, ``f1_macro``, ``mcc``, and ``sensitivity``
without T4 / ``specificity`` without non-T4, the Youden threshold) are NaN and ``reasons`` says why.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.stats import rankdata

DEFAULT_THRESHOLD = 0.5
# Metrics that are undefined unless both T4 and non-T4 cases are present.
NEEDS_BOTH_CLASSES = ("auc", "pr_auc", "balanced_accuracy", "f1_macro", "mcc")
NAN = float("nan")


def check_inputs(labels: Any, probability: Any) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int 0/1 and probabilities as float64 in [0, 1], same length; ValueError otherwise."""
    labels = np.asarray(labels)
    probability = np.asarray(probability, dtype=np.float64)
    if labels.ndim != 1 or probability.ndim != 1 or len(labels) != len(probability):
        raise ValueError(f"labels and probabilities must be 1D of one length, got {labels.shape} and {probability.shape}")
    if len(labels) == 0:
        raise ValueError("no predictions")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(labels.tolist()) - {0, 1})[:5]}")
    if not np.isfinite(probability).all() or (probability < 0).any() or (probability > 1).any():
        raise ValueError("probabilities must be finite and within [0, 1]")
    return labels.astype(np.int64), probability


def _single_class_reason(labels: np.ndarray) -> str | None:
    n_pos = int(labels.sum())
    if n_pos == 0:
        return f"only non-T4 cases ({len(labels)}): needs T4 and non-T4"
    if n_pos == len(labels):
        return f"only T4 cases ({len(labels)}): needs T4 and non-T4"
    return None


def roc_auc(labels: np.ndarray, probability: np.ndarray) -> float:
    """ROC-AUC = P(score of a T4 case > score of a non-T4 case) + 0.5 P(tie); NaN with one class."""
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN
    ranks = rankdata(probability, method="average")
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(labels: np.ndarray, probability: np.ndarray) -> float:
    """PR-AUC as average precision: sum over distinct thresholds (descending) of ΔRecall × Precision."""
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == len(labels):
        return NAN
    order = np.argsort(-probability, kind="mergesort")
    scores, truth = probability[order], labels[order]
    # The last index of each run of equal scores: one ROC/PR point per distinct threshold.
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]
    tp = np.cumsum(truth)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def brier_score(labels: np.ndarray, probability: np.ndarray) -> float:
    """Mean squared difference between P(T4) and the label (0 best, 0.25 a constant 0.5)."""
    return float(np.mean((probability - labels) ** 2))


def confusion(labels: np.ndarray, predicted: np.ndarray) -> dict[str, int]:
    """tn, fp, fn, tp with T4 = positive."""
    return {
        "tn": int(np.sum((labels == 0) & (predicted == 0))),
        "fp": int(np.sum((labels == 0) & (predicted == 1))),
        "fn": int(np.sum((labels == 1) & (predicted == 0))),
        "tp": int(np.sum((labels == 1) & (predicted == 1))),
    }


def positive_f1(truth: Any, predicted: Any) -> float:
    """F1 of the positive class from boolean truth and prediction (0 when neither has a positive:
    scikit-learn's ``zero_division=0``); segment's slice-level detection F1."""
    cells = confusion(np.asarray(truth).astype(np.int64), np.asarray(predicted).astype(np.int64))
    denominator = 2 * cells["tp"] + cells["fp"] + cells["fn"]
    return 2 * cells["tp"] / denominator if denominator else 0.0


def threshold_metrics(labels: Any, probability: Any, threshold: float = DEFAULT_THRESHOLD,
                      checked: bool = False) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro-F1, sensitivity, specificity, MCC and confusion at ``threshold``.

    ``checked``: the caller has already run ``check_inputs`` on these arrays (a bootstrap checks
    once, not on every resample)."""
    if not checked:
        labels, probability = check_inputs(labels, probability)
    reasons: dict[str, str] = {}
    if not np.isfinite(threshold):
        # No threshold to apply (a Youden threshold on a single-class set): nothing to count.
        names = ("accuracy", "balanced_accuracy", "f1_macro", "sensitivity", "specificity", "mcc")
        reason = "no threshold: the Youden threshold needs T4 and non-T4 cases"
        return {"threshold": NAN, **{name: NAN for name in names}, "confusion_matrix": None,
                "tn": None, "fp": None, "fn": None, "tp": None, "reasons": {name: reason for name in names}}
    predicted = (probability >= threshold).astype(np.int64)
    cells = confusion(labels, predicted)
    tn, fp, fn, tp = cells["tn"], cells["fp"], cells["fn"], cells["tp"]
    n = tn + fp + fn + tp
    sensitivity = tp / (tp + fn) if tp + fn else NAN
    specificity = tn / (tn + fp) if tn + fp else NAN
    if tp + fn == 0:
        reasons["sensitivity"] = "no T4 case: sensitivity is undefined"
    if tn + fp == 0:
        reasons["specificity"] = "no non-T4 case: specificity is undefined"
    single = _single_class_reason(labels)
    if single:
        balanced = f1_macro = mcc = NAN
        for name in ("balanced_accuracy", "f1_macro", "mcc"):
            reasons[name] = single
    else:
        balanced = (sensitivity + specificity) / 2.0
        # Per-class F1 = 2TP / (2TP + FP + FN); both classes occur, so neither denominator is 0.
        f1_t4 = 2 * tp / (2 * tp + fp + fn)
        f1_non_t4 = 2 * tn / (2 * tn + fn + fp)
        f1_macro = (f1_t4 + f1_non_t4) / 2.0
        denominator = math.sqrt(float(tp + fp) * float(tp + fn) * float(tn + fp) * float(tn + fn))
        # One predicted class only: MCC's denominator is 0; scikit-learn (and hnct) report 0.
        mcc = (float(tp) * tn - float(fp) * fn) / denominator if denominator else 0.0
    return {
        "threshold": float(threshold),
        "accuracy": (tp + tn) / n,
        "balanced_accuracy": balanced,
        "f1_macro": f1_macro,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "mcc": mcc,
        "confusion_matrix": [[tn, fp], [fn, tp]],
        **cells,
        "reasons": reasons,
    }


def ranking_metrics(labels: Any, probability: Any, checked: bool = False) -> dict[str, Any]:
    """ROC-AUC, PR-AUC (average precision) and Brier score (threshold-free); ``checked`` as above."""
    if not checked:
        labels, probability = check_inputs(labels, probability)
    reasons = {}
    single = _single_class_reason(labels)
    if single:
        reasons = {"auc": single, "pr_auc": single}
    return {
        "auc": roc_auc(labels, probability),
        "pr_auc": average_precision(labels, probability),
        "brier": brier_score(labels, probability),
        "reasons": reasons,
    }


def youden_threshold(labels: Any, probability: Any) -> tuple[float, float]:
    """The threshold maximising Youden's J = sensitivity + specificity - 1, and that J.

    Candidates are the distinct predicted probabilities (a case is T4 when ``p >= threshold``);
    of equal J the highest threshold wins (fewest T4 calls). NaN, NaN with one class.
    """
    labels, probability = check_inputs(labels, probability)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return NAN, NAN
    order = np.argsort(-probability, kind="mergesort")
    scores, truth = probability[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]
    tpr = np.cumsum(truth)[last] / n_pos
    fpr = np.cumsum(1 - truth)[last] / n_neg
    j = tpr - fpr
    best = int(np.argmax(j))  # first maximum = highest threshold (scores run high to low)
    return float(scores[last[best]]), float(j[best])


def classification_metrics(labels: Any, probability: Any, threshold: float = DEFAULT_THRESHOLD,
                           checked: bool = False) -> dict[str, Any]:
    """Every metric at one threshold, flat: ``auc, pr_auc, brier, accuracy, ..., tn, fp, fn, tp, reasons``.

    ``checked``: ``labels`` and ``probability`` are already ``check_inputs``' int64/float64 arrays."""
    if not checked:
        labels, probability = check_inputs(labels, probability)
    ranking = ranking_metrics(labels, probability, checked=True)
    at = threshold_metrics(labels, probability, threshold, checked=True)
    reasons = {**ranking.pop("reasons"), **at.pop("reasons")}
    return {**ranking, **at, "reasons": reasons}


def evaluate_predictions(labels: Any, probability: Any, default_threshold: float = DEFAULT_THRESHOLD,
                         youden: tuple[float, float, str] | None = None) -> dict[str, Any]:
    """The evaluate stage's metrics: threshold-free ones at the top, ``at_0.5`` and ``at_youden`` blocks.

    ``youden``: ``(threshold, J, chosen_on)`` chosen elsewhere and applied here unchanged (hnct.evaluate:
    on the selected model's inner-validation predictions; a NaN threshold with ``chosen_on`` saying why
    there is none); None: chosen on these same predictions (optimistic; ``chosen_on`` says so).
    ``thresholds`` holds the default threshold, the Youden threshold, its J (on the predictions it
    was chosen on) and ``youden_chosen_on``; ``reasons`` (metric path -> why it is NaN) and
    ``reason`` (one line, empty when both classes are present) explain every NaN.
    """
    labels, probability = check_inputs(labels, probability)
    ranking = ranking_metrics(labels, probability)
    given = youden is not None
    if not given:
        youden = (*youden_threshold(labels, probability), "these predictions (optimistic)")
    youden, youden_j, chosen_on = float(youden[0]), float(youden[1]), str(youden[2])
    at_default = threshold_metrics(labels, probability, default_threshold)
    at_youden = threshold_metrics(labels, probability, youden)
    reasons = dict(ranking.pop("reasons"))
    reasons.update({f"at_{default_threshold:g}.{k}": v for k, v in at_default.pop("reasons").items()})
    youden_reasons = at_youden.pop("reasons")
    if given and not math.isfinite(youden):  # why the data it is chosen on gave none
        youden_reasons = {k: f"no Youden threshold: {chosen_on}" for k in youden_reasons}
        reasons["thresholds.youden"] = f"no Youden threshold: {chosen_on}"
    reasons.update({f"at_youden.{k}": v for k, v in youden_reasons.items()})
    single = _single_class_reason(labels)
    if single and not given:
        reasons["thresholds.youden"] = single
    return {
        "n_cases": int(len(labels)),
        "n_positive": int(labels.sum()),
        "n_negative": int(len(labels) - labels.sum()),
        **ranking,
        "thresholds": {"default": float(default_threshold), "youden": youden, "youden_j": youden_j,
                       "youden_chosen_on": chosen_on},
        f"at_{default_threshold:g}": at_default,
        "at_youden": at_youden,
        "reasons": reasons,
        # A string either way: the report flattens numbers only, so no empty "reason" column appears.
        "reason": f"single class: {single}; metrics needing both classes are NaN" if single else "",
    }
