"""hnct.evaluate classify: metrics.json and per_case.csv of one fold from a real val_predictions.csv."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from hnct.evaluate import main


def write_predictions(path, labels, probability, fold=2):
    frame = pd.DataFrame({"case": [f"case-{i:03d}" for i in range(len(labels))], "label": labels,
                          "probability": probability, "fold": fold})
    frame.to_csv(path, index=False)
    return frame


def run(tmp_path, predictions, fold=2, model="resnet18", inner=None):
    out_metrics, out_per_case = tmp_path / "out" / "metrics.json", tmp_path / "out" / "per_case.csv"
    code = main(["--task", "classify", "--predictions", str(predictions), "--out-metrics", str(out_metrics),
                 "--out-per-case", str(out_per_case), "--model", model, "--fold", str(fold)]
                + (["--inner-predictions", str(inner)] if inner else []))
    return code, out_metrics, out_per_case


def test_classify_fold_metrics_match_scikit_learn(tmp_path):
    rng = np.random.default_rng(11)
    labels = (rng.random(80) < 0.2).astype(int)
    labels[:2] = [1, 0]
    probability = np.round(np.clip(0.35 * labels + rng.normal(0.3, 0.2, 80), 0, 1), 2)
    write_predictions(tmp_path / "val_predictions.csv", labels, probability)
    # the selected model's inner-validation predictions (training side): the Youden threshold comes from them
    inner_labels = np.array([1, 0] * 10)
    inner_probability = np.round(np.clip(0.3 * inner_labels + rng.normal(0.35, 0.15, 20), 0, 1), 2)
    write_predictions(tmp_path / "inner_predictions.csv", inner_labels, inner_probability)
    code, out_metrics, out_per_case = run(tmp_path, tmp_path / "val_predictions.csv",
                                          inner=tmp_path / "inner_predictions.csv")
    assert code == 0
    metrics = json.loads(out_metrics.read_text())
    assert (metrics["task"], metrics["model"], metrics["fold"]) == ("classify", "resnet18", 2)
    assert metrics["n_cases"] == 80 and metrics["n_positive"] == int(labels.sum())
    assert metrics["auc"] == pytest.approx(skm.roc_auc_score(labels, probability), abs=1e-9)
    assert metrics["pr_auc"] == pytest.approx(skm.average_precision_score(labels, probability), abs=1e-9)
    assert metrics["brier"] == pytest.approx(skm.brier_score_loss(labels, probability), abs=1e-9)
    for block, threshold in (("at_0.5", 0.5), ("at_youden", metrics["thresholds"]["youden"])):
        predicted = (probability >= threshold).astype(int)
        assert metrics[block]["threshold"] == threshold
        assert metrics[block]["f1_macro"] == pytest.approx(skm.f1_score(labels, predicted, average="macro"), abs=1e-9)
        assert metrics[block]["mcc"] == pytest.approx(skm.matthews_corrcoef(labels, predicted), abs=1e-9)
        assert metrics[block]["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(labels, predicted), abs=1e-9)
        assert metrics[block]["confusion_matrix"] == skm.confusion_matrix(labels, predicted).tolist()
    fpr, tpr, _ = skm.roc_curve(inner_labels, inner_probability)
    assert metrics["thresholds"]["youden_j"] == pytest.approx((tpr - fpr).max(), abs=1e-9)  # J on the inner set
    assert "inner_predictions.csv" in metrics["thresholds"]["youden_chosen_on"]
    per_case = pd.read_csv(out_per_case)
    assert list(per_case.columns) == ["case", "fold", "label", "probability", "pred_at_0.5", "pred_at_youden",
                                      "squared_error"]
    assert per_case["pred_at_0.5"].sum() == metrics["at_0.5"]["tp"] + metrics["at_0.5"]["fp"]
    assert per_case["pred_at_youden"].sum() == metrics["at_youden"]["tp"] + metrics["at_youden"]["fp"]
    assert per_case["squared_error"].mean() == pytest.approx(metrics["brier"], abs=1e-12)


def test_single_class_fold_writes_null_with_a_reason(tmp_path):
    write_predictions(tmp_path / "p.csv", [0, 0, 0, 0], [0.1, 0.7, 0.2, 0.4])
    code, out_metrics, out_per_case = run(tmp_path, tmp_path / "p.csv")
    assert code == 0
    text = out_metrics.read_text()
    metrics = json.loads(text, parse_constant=pytest.fail)  # strict JSON: NaN is written as null
    assert metrics["auc"] is None and "needs T4 and non-T4" in metrics["reasons"]["auc"]
    assert metrics["at_0.5"]["mcc"] is None and metrics["thresholds"]["youden"] is None
    assert metrics["at_0.5"]["accuracy"] == 0.75 and metrics["at_0.5"]["specificity"] == 0.75
    assert "single class" in metrics["reason"]
    per_case = pd.read_csv(out_per_case)
    assert per_case["pred_at_youden"].isna().all() and list(per_case["pred_at_0.5"]) == [0, 1, 0, 0]


@pytest.mark.parametrize("content, message", [
    ("case,label,probability\na,1,0.3\n", "missing column"),
    ("case,label,probability,fold\n", "no predictions"),
    ("case,label,probability,fold\na,1,0.3,2\na,0,0.3,2\n", "more than once"),
    ("case,label,probability,fold\na,1,1.3,2\nb,0,0.3,2\n", "within"),
    ("case,label,probability,fold\na,1,0.3,4\nb,0,0.3,4\n", "is not fold 2"),
])
def test_bad_predictions_are_an_error_naming_the_file(tmp_path, capfd, content, message):
    path = tmp_path / "val_predictions.csv"
    path.write_text(content)
    code, out_metrics, _ = run(tmp_path, path)
    err = capfd.readouterr().err
    assert code == 1 and message in err and str(path) in err and "Traceback" not in err
    assert not out_metrics.exists()


def test_segment_is_handed_to_segeval(monkeypatch):
    """``--task segment`` reaches hnct.segeval.main with every argument (the registry's evaluate_main)."""
    segeval = pytest.importorskip("hnct.segeval")
    received = []
    monkeypatch.setattr(segeval, "main", lambda argv: received.append(list(argv)) or 7)
    argv = ["--task", "segment", "--predictions", "p.csv", "--fold-slices", "f.tsv", "--model", "unet"]
    assert main(argv) == 7
    assert received == [argv]
    assert sys.modules["hnct.segeval"] is segeval
