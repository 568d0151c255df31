"""The held-out test set: the trainer predicts it with the best model, never trains or validates on it;
the ensemble's numbers are recomputable from the fold models' test_predictions.csv; a run without a
test set goes through trainer, ensemble and report cleanly with no test rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from hnct import data as hdata
from hnct import report
from hnct.evaluate import BEST_FOLD_CRITERION, evaluate_classify, main as evaluate_main
from hnct.metrics.classification import evaluate_predictions
from hnct.models import build_model
from hnct.tasks import get_task
from hnct.train import train_fold
from test_train import classify_cfg, make_cohort

PUBLISHED = Path(__file__).resolve().parents[1] / "workflow" / "report" / "published_laryngealct.tsv"


def with_test_set(folds_tsv: Path, n_test: int) -> list[str]:
    """Mark the last ``n_test`` cases of folds.tsv as ``test`` (both labels among them); returns them."""
    folds = pd.read_csv(folds_tsv, sep="\t", dtype={"case": str, "fold": str})
    test = list(folds["case"].iloc[-n_test:])
    folds.loc[folds["case"].isin(test), "fold"] = "test"
    folds.to_csv(folds_tsv, sep="\t", index=False)
    return test


def train_and_evaluate(root: Path, folds_tsv: Path, n_folds: int, model: str = "cnn3d") -> tuple[list, list]:
    """Every fold as the workflow runs it (sidecars found in the crops folder), evaluated; returns the
    test prediction files and the validation metrics files, in fold order."""
    test_files, metric_files = [], []
    for fold in range(n_folds):
        out = root / "train" / "classify" / model / f"fold{fold}"
        train_fold("classify", model, fold, out, classify_cfg(epochs=2), folds_tsv=folds_tsv,
                   crops_dir=root / "crops")
        evaluated = root / "evaluate" / "classify" / model / f"fold{fold}"
        evaluate_classify(out / "val_predictions.csv", evaluated / "metrics.json", evaluated / "per_case.csv",
                          model, fold)
        test_files.append(str(out / "test_predictions.csv"))
        metric_files.append(str(evaluated / "metrics.json"))
    return test_files, metric_files


def run_ensemble(root: Path, test_files: list, metric_files: list, model: str = "cnn3d") -> tuple[int, Path]:
    out = root / "evaluate" / "classify" / model / "test_ensemble"
    code = evaluate_main(["ensemble", "--test-predictions", *test_files, "--val-metrics", *metric_files,
                          "--out-predictions", str(out / "predictions.csv"),
                          "--out-metrics", str(out / "metrics.json"), "--model", model])
    return code, out


@pytest.mark.slow
def test_trainer_predicts_the_test_set_it_never_trained_or_validated_on(tmp_path):
    folds_tsv, _ = make_cohort(tmp_path, n_cases=14, n_folds=2)
    test_cases = with_test_set(folds_tsv, 4)
    folds = pd.read_csv(folds_tsv, sep="\t", dtype={"case": str, "fold": str})
    test_files, metric_files = train_and_evaluate(tmp_path, folds_tsv, n_folds=2)

    for fold, path in enumerate(test_files):
        out = Path(path).parent
        predictions = pd.read_csv(path, dtype={"case": str})
        assert tuple(predictions.columns) == get_task("classify").prediction_columns
        assert list(pd.read_csv(out / "val_predictions.csv").columns) == list(predictions.columns)
        assert sorted(predictions["case"]) == sorted(test_cases) and (predictions["fold"] == fold).all()
        # What the trainer used, as it recorded it: the test cases are in neither its train nor its val set.
        best = torch.load(out / "best.pt", weights_only=True)
        used = best["cases"]
        assert sorted(used["test"]) == sorted(test_cases)
        assert not set(used["test"]) & (set(used["train"]) | set(used["inner"]) | set(used["val"]))
        assert sorted(used["val"]) == sorted(folds.loc[folds["fold"] == str(fold), "case"])
        assert sorted(used["train"] + used["inner"] + used["val"]) == sorted(folds.loc[folds["fold"] != "test", "case"])
        # ...and the validation predictions never list a test case.
        assert not set(pd.read_csv(out / "val_predictions.csv", dtype={"case": str})["case"]) & set(test_cases)

        # The probabilities are the best checkpoint's: recomputed here from best.pt and the crops.
        cfg = best["config"]
        model = build_model("classify", "cnn3d", cfg)
        model.load_state_dict(best["model_state"])
        model.eval()
        for row in predictions.itertuples(index=False):
            sidecar = json.loads((tmp_path / "crops" / f"{row.case}.json").read_text())
            image = hdata.preprocess_crop(row.case, sidecar["volume"], cfg["hu_clip"], cfg["input_shape"], cfg["fit"])
            with torch.no_grad():
                p = torch.softmax(model(torch.from_numpy(image)[None]).float(), dim=1)[0, 1].item()
            assert row.probability == pytest.approx(p, abs=1e-5)

    code, out = run_ensemble(tmp_path, test_files, metric_files)
    assert code == 0
    recompute_and_check(test_files, metric_files, out)


def recompute_and_check(test_files: list, metric_files: list, out: Path) -> None:
    """The ensemble's CSV and metrics.json against a recomputation from the fold CSVs alone."""
    frames = [pd.read_csv(f, dtype={"case": str}).sort_values("case").reset_index(drop=True) for f in test_files]
    labels = frames[0]["label"].to_numpy(int)
    mean = np.mean([f["probability"].to_numpy(float) for f in frames], axis=0)
    ensemble = pd.read_csv(out / "predictions.csv", dtype={"case": str})
    assert list(ensemble["case"]) == list(frames[0]["case"])
    np.testing.assert_allclose(ensemble["probability"], mean, rtol=0, atol=1e-12)
    assert (ensemble["pred_at_0.5"] == (mean >= 0.5).astype(int)).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_set"] is True and metrics["setting"] == "test_ensemble"
    assert metrics["n_cases"] == len(labels) and metrics["n_positive"] == int(labels.sum())
    predicted = (mean >= 0.5).astype(int)
    if len(set(labels)) == 2:
        assert metrics["auc"] == pytest.approx(skm.roc_auc_score(labels, mean), abs=1e-9)
        assert metrics["pr_auc"] == pytest.approx(skm.average_precision_score(labels, mean), abs=1e-9)
    assert metrics["brier"] == pytest.approx(skm.brier_score_loss(labels, mean), abs=1e-9)
    assert metrics["at_0.5"]["f1_macro"] == pytest.approx(
        skm.f1_score(labels, predicted, average="macro", labels=[0, 1], zero_division=0), abs=1e-9)
    assert metrics["at_0.5"]["confusion_matrix"] == skm.confusion_matrix(labels, predicted, labels=[0, 1]).tolist()
    # per fold: each fold model's own test metrics, and the single best fold by validation AUC
    val = [json.loads(Path(f).read_text()) for f in metric_files]
    for entry, frame, fold_val in zip(metrics["per_fold"], frames, val):
        assert entry["fold"] == fold_val["fold"] and entry["val_auc"] == fold_val["auc"]
        assert entry["brier"] == pytest.approx(skm.brier_score_loss(labels, frame["probability"]), abs=1e-9)
    auc = [v["auc"] if v["auc"] is not None else -np.inf for v in val]
    f1 = [v["at_0.5"]["f1_macro"] for v in val]
    expected_best = sorted(range(len(val)), key=lambda i: (-auc[i], -f1[i], val[i]["fold"]))[0]
    assert metrics["best_fold"]["fold"] == val[expected_best]["fold"]
    assert metrics["best_fold"]["brier"] == pytest.approx(
        skm.brier_score_loss(labels, frames[expected_best]["probability"]), abs=1e-9)
    assert metrics["best_fold_criterion"] == BEST_FOLD_CRITERION


def write_fold_files(root: Path, folds: dict[int, tuple[np.ndarray, float, float]], labels: np.ndarray,
                     model: str = "resnet18") -> tuple[list, list]:
    """Test predictions (given P(T4)) and validation metrics.json (given AUC, macro-F1) per fold."""
    test_files, metric_files = [], []
    for fold, (probability, val_auc, val_f1) in folds.items():
        train = root / "train" / "classify" / model / f"fold{fold}"
        train.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"case": [f"T{i:03d}" for i in range(len(labels))], "label": labels,
                      "probability": probability, "fold": fold}).to_csv(train / "test_predictions.csv", index=False)
        evaluated = root / "evaluate" / "classify" / model / f"fold{fold}"
        evaluated.mkdir(parents=True, exist_ok=True)
        (evaluated / "metrics.json").write_text(json.dumps(
            {"task": "classify", "model": model, "fold": fold, "auc": val_auc, "at_0.5": {"f1_macro": val_f1}}))
        test_files.append(str(train / "test_predictions.csv"))
        metric_files.append(str(evaluated / "metrics.json"))
    return test_files, metric_files


def test_ensemble_is_recomputable_and_best_fold_follows_validation_auc(tmp_path):
    rng = np.random.default_rng(5)
    labels = (rng.random(60) < 0.25).astype(int)
    labels[:2] = [0, 1]
    # fold 1 and 2 tie on validation AUC; fold 2 has the higher validation macro-F1
    folds = {k: (np.clip(0.3 * labels + rng.normal(0.35, 0.2, 60), 0, 1), auc, f1)
             for k, auc, f1 in ((0, 0.70, 0.9), (1, 0.81, 0.6), (2, 0.81, 0.7), (3, None, 0.99))}
    test_files, metric_files = write_fold_files(tmp_path, folds, labels)
    code, out = run_ensemble(tmp_path, test_files, metric_files, model="resnet18")
    assert code == 0
    recompute_and_check(test_files, metric_files, out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_fold"]["fold"] == 2 and metrics["folds"] == [0, 1, 2, 3]
    # the ensemble equals hnct.metrics on the averaged probability (the function evaluate_fold uses)
    mean = np.mean([v[0] for v in folds.values()], axis=0)
    expected = evaluate_predictions(labels, mean)
    for key in ("f1_macro", "mcc", "balanced_accuracy", "sensitivity", "specificity"):
        assert metrics["at_0.5"][key] == pytest.approx(expected["at_0.5"][key], abs=1e-12)

    # the report's test rows are these numbers, beside the published ones of the same kind
    out_dir = tmp_path / "report"
    report.write_tables([], [], out_dir, PUBLISHED, n_bootstrap=100, seed=7,
                        test_metric_files=[str(out / "metrics.json")])
    tests = pd.read_csv(out_dir / "metrics_test.csv", dtype={"fold": str})
    assert set(tests["setting"]) == {"test_ensemble", "test_best_fold"}
    ens = tests[tests["setting"] == "test_ensemble"].set_index("metric")
    best = tests[tests["setting"] == "test_best_fold"].set_index("metric")
    assert ens.loc["auc", "value"] == pytest.approx(metrics["auc"], abs=1e-9)
    assert ens.loc["f1_macro", "value"] == pytest.approx(metrics["at_0.5"]["f1_macro"], abs=1e-9)
    assert best.loc["auc", "value"] == pytest.approx(metrics["best_fold"]["auc"], abs=1e-9)
    assert best.loc["auc", "fold"] == "2" and ens.loc["auc", "fold"] == "0+1+2+3"
    for _, row in tests.iterrows():
        assert row["ci_low"] - 1e-12 <= row["value"] <= row["ci_high"] + 1e-12, row
    assert "held-out test set" in (out_dir / "metrics_summary.md").read_text()
    assert "4-fold ensemble" in (out_dir / "metrics_summary.tex").read_text()
    comparison = pd.read_csv(out_dir / "comparison_published.csv")
    row = comparison[(comparison["model"] == "resnet18") & (comparison["setting"] == "test_ensemble")
                     & (comparison["metric"] == "auc")].iloc[0]
    assert row["this_run"] == pytest.approx(metrics["auc"], abs=1e-9)
    assert row["published"] == pytest.approx(0.8266417678182384)
    assert "test, fold ensemble" in (out_dir / "comparison_published.md").read_text()


def test_ensemble_refuses_folds_that_predicted_different_cases(tmp_path, capfd):
    labels = np.array([0, 1, 0, 1])
    test_files, metric_files = write_fold_files(
        tmp_path, {0: (np.full(4, 0.4), 0.7, 0.5), 1: (np.full(4, 0.6), 0.8, 0.5)}, labels)
    frame = pd.read_csv(test_files[1])
    frame.loc[0, "case"] = "OTHER"
    frame.to_csv(test_files[1], index=False)
    code, out = run_ensemble(tmp_path, test_files, metric_files, model="resnet18")
    assert code == 1 and "differ" in capfd.readouterr().err and not (out / "metrics.json").exists()


def test_no_test_set_runs_cleanly_from_trainer_to_report(tmp_path, capfd):
    """folds.test: none (the demo's default): header-only test predictions, an ensemble that says there
    is no test set, and a report without test rows."""
    folds_tsv, _ = make_cohort(tmp_path, n_cases=8, n_folds=2)
    out = tmp_path / "train" / "classify" / "cnn3d" / "fold0"
    train_fold("classify", "cnn3d", 0, out, classify_cfg(epochs=1), folds_tsv=folds_tsv, crops_dir=tmp_path / "crops")
    empty = pd.read_csv(out / "test_predictions.csv")
    assert empty.empty and tuple(empty.columns) == get_task("classify").prediction_columns
    assert torch.load(out / "best.pt", weights_only=True)["cases"]["test"] == []
    evaluated = tmp_path / "evaluate" / "classify" / "cnn3d" / "fold0"
    evaluate_classify(out / "val_predictions.csv", evaluated / "metrics.json", evaluated / "per_case.csv", "cnn3d", 0)
    capfd.readouterr()
    code, ensemble = run_ensemble(tmp_path, [str(out / "test_predictions.csv")], [str(evaluated / "metrics.json")])
    assert code == 0
    assert "no test set" in capfd.readouterr().err  # the log line
    metrics = json.loads((ensemble / "metrics.json").read_text())
    assert metrics["test_set"] is False and metrics["n_cases"] == 0 and "no test set" in metrics["reason"]
    predictions = pd.read_csv(ensemble / "predictions.csv")
    assert predictions.empty and list(predictions.columns[:3]) == ["case", "label", "probability"]

    report_dir = tmp_path / "report"
    report.write_tables([str(evaluated / "metrics.json")], [str(out / "val_predictions.csv")], report_dir,
                        PUBLISHED, n_bootstrap=20, seed=7, test_metric_files=[str(ensemble / "metrics.json")])
    tests = pd.read_csv(report_dir / "metrics_test.csv")
    assert tests.empty and list(tests.columns) == report.TEST_COLUMNS
    assert "test set" not in (report_dir / "metrics_summary.md").read_text()
    comparison = pd.read_csv(report_dir / "comparison_published.csv")
    ours = comparison[comparison["setting"] != "cv"]
    assert ours["this_run"].isna().all()  # published test rows stay, with nothing of ours beside them
    assert (comparison[(comparison["model"] == "cnn3d") & (comparison["setting"] == "cv")]["this_run"].notna().any())
