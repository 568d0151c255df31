"""The report stage: every summary number recomputed from the per-fold files it was built from."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from hnct import report
from hnct.common import write_json
from hnct.evaluate import evaluate_classify
from hnct.metrics.classification import classification_metrics

PUBLISHED = report.Path(__file__).resolve().parents[1] / "workflow" / "report" / "published_laryngealct.tsv"


@pytest.fixture()
def fold_outputs(tmp_path):
    """Two models × three folds of classification predictions and their evaluate outputs."""
    rng = np.random.default_rng(3)
    metric_files, prediction_files, history_files = [], [], []
    for model, signal in (("cnn3d", 2.0), ("resnet18", 0.5)):
        for fold in range(3):
            labels = rng.integers(0, 2, 30)
            labels[:3] = [0, 1, 1]
            probability = 1 / (1 + np.exp(-(signal * (labels - 0.5) + rng.normal(0, 1, 30))))
            train = tmp_path / "results" / "train" / "classify" / model / f"fold{fold}"
            train.mkdir(parents=True)
            predictions = train / "val_predictions.csv"
            pd.DataFrame({"case": [f"C{fold}-{i}" for i in range(30)], "label": labels,
                          "probability": probability, "fold": fold}).to_csv(predictions, index=False)
            pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.9, 0.7, 0.6], "val_loss": [1.0, 0.8, 0.75],
                          "val_auc": [0.6, 0.7, 0.8], "val_f1": [0.5, 0.6, 0.7], "lr": 1e-4,
                          "seconds": 1.0}).to_csv(train / "history.csv", index=False)
            out = tmp_path / "results" / "evaluate" / "classify" / model / f"fold{fold}"
            evaluate_classify(predictions, out / "metrics.json", out / "per_case.csv", model, fold)
            metric_files.append(str(out / "metrics.json"))
            prediction_files.append(str(predictions))
            history_files.append(str(train / "history.csv"))
    return tmp_path, metric_files, prediction_files, history_files


def test_summary_is_recomputable_from_the_fold_table(fold_outputs):
    root, metrics, predictions, _ = fold_outputs
    out = root / "results" / "report"
    report.write_tables(metrics, predictions, out, PUBLISHED, n_bootstrap=200, seed=7)
    by_fold = pd.read_csv(out / "metrics_by_fold.csv")
    summary = pd.read_csv(out / "metrics_summary.csv")
    assert len(by_fold) == 6
    assert set(summary["metric"]) == set(report.CLASSIFY_COLUMNS)
    for _, row in summary.iterrows():
        folds = by_fold[(by_fold["task"] == row["task"]) & (by_fold["model"] == row["model"])][row["source_key"]]
        assert row["mean"] == pytest.approx(folds.mean(), abs=1e-9)
        assert row["sd"] == pytest.approx(folds.std(ddof=1), abs=1e-9)
        # The pooled value is the metric on all out-of-fold predictions of that model.
        pooled = pd.concat([pd.read_csv(p) for p in predictions if f"/{row['model']}/" in p])
        expected = classification_metrics(pooled["label"], pooled["probability"], threshold=0.5)[row["metric"]]
        assert row["pooled"] == pytest.approx(expected, abs=1e-9)
        assert row["ci_low"] <= row["pooled"] + 1e-12 <= row["ci_high"] + 2e-12
    # The stronger synthetic model is ahead on AUC.
    auc = summary[summary["metric"] == "auc"].set_index("model")["mean"]
    assert auc["cnn3d"] > auc["resnet18"]
    # Paper tables and the published comparison are written.
    assert "| cnn3d |" in (out / "metrics_summary.md").read_text()
    assert r"\begin{tabular}" in (out / "metrics_summary.tex").read_text()
    comparison = pd.read_csv(out / "comparison_published.csv").set_index(["model", "setting", "metric"])
    # by evaluation kind: the published single-best-fold test AUC (no test set in this run)...
    best_fold = comparison.loc[("resnet18", "test_best_fold", "auc")]
    assert best_fold["published"] == pytest.approx(0.8923124805477747) and np.isnan(best_fold["this_run"])
    # ...and this run's CV mean beside the mean of the published per-fold validation AUCs
    published = pd.read_csv(PUBLISHED, sep="\t", comment="#")
    val_folds = published[(published["model"] == "resnet18") & published["setting"].str.startswith("val_fold")]
    cv = comparison.loc[("resnet18", "cv", "auc")]
    assert cv["published"] == pytest.approx(val_folds["auc"].mean()) and cv["published_n"] == 5
    assert cv["this_run"] == pytest.approx(auc["resnet18"], abs=1e-12)
    # the metrics_test table exists with its header and no rows when no ensemble is given
    assert pd.read_csv(out / "metrics_test.csv").empty


def test_bootstrap_is_seeded(fold_outputs):
    _, _, predictions, _ = fold_outputs
    pooled = report.read_predictions(predictions[:3])
    a = report.bootstrap_ci(pooled, n_bootstrap=100, seed=1)
    b = report.bootstrap_ci(pooled, n_bootstrap=100, seed=1)
    c = report.bootstrap_ci(pooled, n_bootstrap=100, seed=2)
    assert a == b and a != c


def test_figures_are_written_as_png_and_svg(fold_outputs):
    root, _, predictions, histories = fold_outputs
    out = root / "figures"
    assert report.main(["figures", "--predictions", *predictions, "--histories", *histories,
                        "--out-dir", str(out)]) == 0
    for name in ("roc_pr", "confusion", "calibration", "training_curves", "segmentation_boxplots"):
        assert (out / f"{name}.png").stat().st_size > 5000, name
        svg = (out / f"{name}.svg").read_text()
        assert svg.startswith("<?xml") and "<svg" in svg


def test_cohort_table_counts_exclusions(tmp_path):
    cohort = tmp_path / "cohort.tsv"
    pd.DataFrame({"case": ["A1", "A2", "B1", "B2"], "patient": ["a1", "a2", "b1", "b2"],
                  "collection": ["A", "A", "B", "B"], "t_stage": ["T4a", "T2", "", "T1"]}).to_csv(cohort, sep="\t", index=False)
    exclusions = tmp_path / "exclusions.tsv"
    pd.DataFrame({"case": ["B2"], "stage": ["convert"], "file": ["x.dcm"], "reason": ["missing slice"]}).to_csv(
        exclusions, sep="\t", index=False)
    table = report.cohort_table(cohort, exclusions)
    assert table.loc["A", "T4"] == 1 and table.loc["A", "T2"] == 1
    assert table.loc["B", "excluded"] == 1 and table.loc["all", "total"] == 4


def test_crop_qa_mosaic(tmp_path):
    sidecars = []
    for i in range(3):
        image = sitk.GetImageFromArray(np.full((8, 20, 20), -100, np.int16))
        label = sitk.GetImageFromArray(np.zeros((8, 20, 20), np.uint8))
        label[5:15, 5:15, 4] = 1
        sitk.WriteImage(image, str(tmp_path / f"c{i}.nrrd"))
        sitk.WriteImage(label, str(tmp_path / f"c{i}_label.nrrd"))
        write_json(tmp_path / f"c{i}.json", {"status": "ok", "case": f"c{i}", "volume": str(tmp_path / f"c{i}.nrrd"),
                                               "label": str(tmp_path / f"c{i}_label.nrrd")})
        sidecars.append(str(tmp_path / f"c{i}.json"))
    write_json(tmp_path / "bad.json", {"status": "excluded", "case": "bad", "reason": "x"})
    report.plot_crop_qa(sidecars + [str(tmp_path / "bad.json")], tmp_path / "qa.png", {})
    assert (tmp_path / "qa.png").stat().st_size > 2000 and (tmp_path / "qa.svg").exists()
