"""hnct.metrics.classification: every metric equals scikit-learn's on the same predictions (1e-9)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from hnct.metrics.classification import (
    classification_metrics,
    evaluate_predictions,
    threshold_metrics,
    youden_threshold,
)

TOL = 1e-9


def prediction_sets(n_sets: int = 60, seed: int = 2024):
    """Random prediction sets: imbalanced (8 % T4) and balanced, continuous and heavily tied, tiny and larger."""
    rng = np.random.default_rng(seed)
    sets = []
    for i in range(n_sets):
        n = int(rng.integers(6, 200))
        prevalence = (0.08, 0.3, 0.5)[i % 3]
        labels = (rng.random(n) < prevalence).astype(int)
        labels[rng.integers(n)] = 1  # both classes present
        labels[rng.integers(n)] = 0
        labels[0], labels[1] = 1, 0
        informative = np.clip(0.3 * labels + rng.normal(0.35, 0.25, n), 0, 1)
        if i % 4 == 0:
            probability = np.round(informative, 1)  # many ties, incl. across classes
        elif i % 4 == 1:
            probability = rng.choice([0.0, 0.25, 0.5, 1.0], n)  # exactly 0.5 hits the threshold
        else:
            probability = informative
        sets.append((labels, probability))
    return sets


def sklearn_reference(labels, probability, threshold):
    predicted = (probability >= threshold).astype(int)
    matrix = skm.confusion_matrix(labels, predicted, labels=[0, 1])
    return {
        "auc": skm.roc_auc_score(labels, probability),
        "pr_auc": skm.average_precision_score(labels, probability),
        "brier": skm.brier_score_loss(labels, probability),
        "accuracy": skm.accuracy_score(labels, predicted),
        "balanced_accuracy": skm.balanced_accuracy_score(labels, predicted),
        "f1_macro": skm.f1_score(labels, predicted, average="macro", labels=[0, 1], zero_division=0),
        "sensitivity": skm.recall_score(labels, predicted, pos_label=1, zero_division=0),
        "specificity": skm.recall_score(labels, predicted, pos_label=0, zero_division=0),
        "mcc": skm.matthews_corrcoef(labels, predicted),
        "confusion_matrix": matrix.tolist(),
    }


@pytest.mark.parametrize("threshold", [0.5, 0.25, 0.61])
def test_every_metric_matches_scikit_learn(threshold):
    for labels, probability in prediction_sets():
        ours = classification_metrics(labels, probability, threshold=threshold)
        reference = sklearn_reference(labels, probability, threshold)
        for name, value in reference.items():
            if name == "confusion_matrix":
                assert ours[name] == value
                tn, fp, fn, tp = np.ravel(value)
                assert (ours["tn"], ours["fp"], ours["fn"], ours["tp"]) == (tn, fp, fn, tp)
            else:
                assert abs(ours[name] - value) <= TOL, (name, ours[name], value, labels, probability)
        assert ours["reasons"] == {}


def test_youden_threshold_is_scikit_learns_best_roc_point():
    for labels, probability in prediction_sets():
        threshold, j = youden_threshold(labels, probability)
        fpr, tpr, thresholds = skm.roc_curve(labels, probability, drop_intermediate=False)
        finite = np.isfinite(thresholds)  # sklearn's first point (inf) predicts nothing T4
        youden = tpr[finite] - fpr[finite]
        assert abs(j - youden.max()) <= TOL
        best = thresholds[finite][youden >= youden.max() - 1e-12]
        assert threshold == best.max()  # ties: the highest threshold
        at = threshold_metrics(labels, probability, threshold)
        assert abs(at["sensitivity"] + at["specificity"] - 1 - j) <= TOL


def test_mcc_when_one_class_is_never_predicted_matches_scikit_learn():
    labels = np.array([0, 0, 1, 1, 0])
    probability = np.array([0.1, 0.2, 0.3, 0.4, 0.2])  # nothing reaches 0.5
    ours = threshold_metrics(labels, probability, 0.5)
    assert ours["mcc"] == skm.matthews_corrcoef(labels, (probability >= 0.5).astype(int)) == 0.0
    assert ours["f1_macro"] == pytest.approx(skm.f1_score(labels, np.zeros(5, int), average="macro", zero_division=0), abs=TOL)


@pytest.mark.parametrize("label, missing", [(0, "T4"), (1, "non-T4")])
def test_single_class_fold_gives_nan_with_reasons_never_a_crash(label, missing):
    labels = np.full(7, label)
    probability = np.linspace(0.05, 0.95, 7)
    result = evaluate_predictions(labels, probability)
    for name in ("auc", "pr_auc"):
        assert math.isnan(result[name]) and "needs T4 and non-T4" in result["reasons"][name]
    for name in ("balanced_accuracy", "f1_macro", "mcc"):
        assert math.isnan(result["at_0.5"][name]) and f"at_0.5.{name}" in result["reasons"]
    assert math.isnan(result["thresholds"]["youden"]) and "thresholds.youden" in result["reasons"]
    assert all(math.isnan(result["at_youden"][k]) for k in ("accuracy", "sensitivity", "specificity"))
    assert result["reason"] and "single class" in result["reason"]
    # What is defined is still computed (and equals scikit-learn).
    predicted = (probability >= 0.5).astype(int)
    assert result["at_0.5"]["accuracy"] == pytest.approx(skm.accuracy_score(labels, predicted), abs=TOL)
    assert result["brier"] == pytest.approx(np.mean((probability - label) ** 2), abs=TOL)
    present = "specificity" if label == 0 else "sensitivity"
    absent = "sensitivity" if label == 0 else "specificity"
    assert result["at_0.5"][present] == pytest.approx(skm.recall_score(labels, predicted, pos_label=label), abs=TOL)
    assert math.isnan(result["at_0.5"][absent]) and f"at_0.5.{absent}" in result["reasons"]
    assert result["n_cases"] == 7 and result["n_positive"] == 7 * label


def test_evaluate_predictions_holds_both_operating_points():
    labels, probability = prediction_sets()[2]
    result = evaluate_predictions(labels, probability)
    youden = result["thresholds"]["youden"]
    assert result["thresholds"]["default"] == 0.5 and result["at_0.5"]["threshold"] == 0.5
    assert result["at_youden"]["threshold"] == youden
    reference = sklearn_reference(labels, probability, youden)
    assert result["at_youden"]["confusion_matrix"] == reference["confusion_matrix"]
    assert result["at_youden"]["mcc"] == pytest.approx(reference["mcc"], abs=TOL)
    assert result["reason"] == "" and result["reasons"] == {}


@pytest.mark.parametrize("labels, probability, message", [
    ([0, 2, 1], [0.1, 0.2, 0.3], "0 or 1"),
    ([0, 1], [0.1, 1.2], "within"),
    ([0, 1], [0.1, float("nan")], "finite"),
    ([0, 1, 1], [0.1, 0.2], "one length"),
    ([], [], "no predictions"),
])
def test_bad_inputs_are_refused_with_a_reason(labels, probability, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(labels, probability)
