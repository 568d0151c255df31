"""The report stage: every summary number recomputed from the per-fold files it was built from; every
interval printed beside the estimate it belongs to; patients resampled as units."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from hnct import report
from hnct.common import write_json
from hnct.evaluate import evaluate_classify
from hnct.metrics.bootstrap import cluster_bootstrap_indices
from hnct.metrics.classification import classification_metrics

PUBLISHED = report.Path(__file__).resolve().parents[1] / "workflow" / "report" / "published_laryngealct.tsv"
# "estimate [low, high]" as the report prints a pooled value with its CI.
INTERVAL_CELL = re.compile(r"(-?\d+(?:\.\d+)?) \[(-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?)\]")


def intervals_in(text: str) -> list[tuple[float, float, float]]:
    """Every (estimate, low, high) printed in a markdown/LaTeX report table."""
    return [tuple(float(x) for x in match.groups()) for match in INTERVAL_CELL.finditer(text)]


def assert_every_interval_contains_its_value(report_dir) -> int:
    """The written tables' CSV rows and printed cells: each CI contains the value beside it.
    Returns how many intervals were checked."""
    checked = 0
    for name, value in (("metrics_summary.csv", "pooled"), ("metrics_test.csv", "value"),
                        ("metrics_by_group.csv", "value"), ("baselines.csv", "value"),
                        ("permutation_control.csv", "value")):
        path = report_dir / name
        if not path.exists():
            continue
        table = pd.read_csv(path)
        if table.empty:
            continue
        rows = table[np.isfinite(table["ci_low"].astype(float)) & np.isfinite(table["ci_high"].astype(float))]
        bad = rows[(rows["ci_low"] > rows[value] + 1e-12) | (rows[value] > rows["ci_high"] + 1e-12)]
        assert bad.empty, (name, bad)
        checked += len(rows)
    for name in ("metrics_summary.md", "metrics_summary.tex", "shortcuts.md", "permutation_control.md"):
        path = report_dir / name
        if path.exists():
            cells = intervals_in(path.read_text())
            assert all(low <= estimate <= high for estimate, low, high in cells), (name, cells)
            checked += len(cells)
    return checked


@pytest.fixture()
def fold_outputs(tmp_path):
    """Two models × three folds of classification predictions and their evaluate outputs."""
    rng = np.random.default_rng(3)
    metric_files, prediction_files, history_files, folds_rows = [], [], [], []
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
            if model == "cnn3d":  # the same cases for both models: one folds table
                folds_rows += [{"case": f"C{fold}-{i}", "patient": f"P{fold}-{min(i, 29 - (i == 29))}",
                                "collection": "AB"[i % 2], "label": int(labels[i]), "fold": fold}
                               for i in range(30)]
            pd.DataFrame({"epoch": [1, 2, 3], "train_loss": [0.9, 0.7, 0.6], "inner_loss": [1.0, 0.8, 0.75],
                          "inner_auc": [0.6, 0.7, 0.8], "inner_f1": [0.5, 0.6, 0.7], "lr": 1e-4,
                          "seconds": 1.0}).to_csv(train / "history.csv", index=False)
            out = tmp_path / "results" / "evaluate" / "classify" / model / f"fold{fold}"
            evaluate_classify(predictions, out / "metrics.json", out / "per_case.csv", model, fold)
            metric_files.append(str(out / "metrics.json"))
            prediction_files.append(str(predictions))
            history_files.append(str(train / "history.csv"))
    folds = tmp_path / "results" / "folds" / "classify" / "folds.tsv"
    folds.parent.mkdir(parents=True)
    pd.DataFrame(folds_rows).to_csv(folds, sep="\t", index=False)
    return tmp_path, metric_files, prediction_files, history_files, str(folds)


def test_summary_is_recomputable_from_the_fold_table(fold_outputs):
    root, metrics, predictions, _, folds = fold_outputs
    out = root / "results" / "report"
    report.write_tables(metrics, predictions, out, PUBLISHED, n_bootstrap=200, seed=7, folds_files=[folds])
    by_fold = pd.read_csv(out / "metrics_by_fold.csv")
    summary = pd.read_csv(out / "metrics_summary.csv")
    assert len(by_fold) == 6
    assert set(summary["metric"]) == set(report.CLASSIFY_COLUMNS)
    for _, row in summary.iterrows():
        folds_of = by_fold[(by_fold["task"] == row["task"]) & (by_fold["model"] == row["model"])][row["source_key"]]
        assert row["mean"] == pytest.approx(folds_of.mean(), abs=1e-9)
        assert row["sd"] == pytest.approx(folds_of.std(ddof=1), abs=1e-9)
        # The pooled value is the metric on all out-of-fold predictions of that model.
        pooled = pd.concat([pd.read_csv(p) for p in predictions if f"/{row['model']}/" in p])
        expected = classification_metrics(pooled["label"], pooled["probability"], threshold=0.5)[row["metric"]]
        assert row["pooled"] == pytest.approx(expected, abs=1e-9)
        assert row["n_cases"] == 90 and row["n_patients"] == 87  # one two-scan patient per fold
        assert row["n_resamples"] == 200
    assert assert_every_interval_contains_its_value(out) == 2 * 7 * 2 + 2 * 7  # csv rows, md + tex cells
    # The printed cells: the pooled estimate with its own CI, the fold mean ± SD in its own columns.
    text = (out / "metrics_summary.md").read_text()
    auc = summary[(summary["model"] == "cnn3d") & (summary["metric"] == "auc")].iloc[0]
    assert f"| {auc['pooled']:.3f} [{auc['ci_low']:.3f}, {auc['ci_high']:.3f}] |" in text
    assert f"| {auc['mean']:.3f} ± {auc['sd']:.3f} |" in text
    assert "AUC (pooled)" in text and "AUC (folds)" in text and "patient-cluster bootstrap" in text
    # The stronger synthetic model is ahead on AUC.
    auc = summary[summary["metric"] == "auc"].set_index("model")["mean"]
    assert auc["cnn3d"] > auc["resnet18"]
    # Paper tables and the published comparison are written.
    assert "| cnn3d |" in text
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


def test_a_case_missing_from_the_folds_table_is_an_error_naming_it(fold_outputs):
    root, metrics, predictions, _, folds = fold_outputs
    table = pd.read_csv(folds, sep="\t")
    table[table["case"] != "C1-4"].to_csv(folds, sep="\t", index=False)
    with pytest.raises(report.InputError, match="C1-4"):
        report.write_tables(metrics, predictions, root / "out", PUBLISHED, n_bootstrap=10, seed=7, folds_files=[folds])


def test_bootstrap_is_seeded(fold_outputs):
    _, _, predictions, _, _ = fold_outputs
    pooled = report.read_predictions(predictions[:3])
    a = report.bootstrap_ci(pooled, n_bootstrap=100, seed=1)
    b = report.bootstrap_ci(pooled, n_bootstrap=100, seed=1)
    c = report.bootstrap_ci(pooled, n_bootstrap=100, seed=2)
    assert a == b and a != c


def test_a_two_scan_patient_is_resampled_as_one_unit():
    # Patient P2 has two scans (rows 2 and 3); P5 three (rows 6-8); classes are patient-level.
    patients = ["P0", "P1", "P2", "P2", "P3", "P4", "P5", "P5", "P5", "P6"]
    labels = [0, 1, 1, 1, 0, 0, 1, 1, 1, 0]
    seen_p2 = 0
    for index in cluster_bootstrap_indices(patients, labels, n_bootstrap=300, seed=3):
        counts = np.bincount(index, minlength=len(patients))
        # Every scan of a patient is drawn exactly as often as the patient.
        assert counts[2] == counts[3] and counts[6] == counts[7] == counts[8]
        seen_p2 += counts[2] > 0
        # Stratified: always 3 T4 patients (P1, P2, P5) and 4 non-T4 ones drawn (counted by their first
        # row), so both classes are in every resample.
        assert counts[1] + counts[2] + counts[6] == 3 and counts[0] + counts[4] + counts[5] + counts[9] == 4
    assert 0 < seen_p2 < 300  # P2 is sometimes in, sometimes out: the check above was not vacuous
    # A patient's rows can sit anywhere in the table: clusters, not neighbouring rows.
    shuffled = ["A", "B", "A", "C"]
    for index in cluster_bootstrap_indices(shuffled, [0, 1, 0, 1], n_bootstrap=50, seed=0):
        counts = np.bincount(index, minlength=4)
        assert counts[0] == counts[2]


def test_patient_clusters_widen_the_interval_of_duplicated_scans():
    """Scans duplicated within patients carry no new information: the patient bootstrap's AUC interval
    stays as wide as with one scan per patient, the scan bootstrap's narrows (it counts them twice)."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(30, int), np.ones(30, int)]
    probability = np.clip(0.5 + 0.15 * (labels - 0.5) + rng.normal(0, 0.2, 60), 0, 1)
    single = pd.DataFrame({"case": [f"c{i}" for i in range(60)], "label": labels, "probability": probability})
    single = single.assign(patient=single["case"])
    double = pd.concat([single, single.assign(case=single["case"] + "b")], ignore_index=True)
    width = lambda found: found["auc"]["ci_high"] - found["auc"]["ci_low"]  # noqa: E731
    one = width(report.classification_intervals(single, 400, 7))
    by_patient = width(report.classification_intervals(double, 400, 7))
    by_scan = width(report.classification_intervals(double.assign(patient=double["case"]), 400, 7))
    assert by_patient == pytest.approx(one, rel=0.25)
    assert by_scan < 0.85 * by_patient


@pytest.fixture()
def segment_outputs(tmp_path):
    """Three folds of per-case segmentation metrics (hnct.metrics.segmentation) and their metrics.json."""
    from hnct.metrics import segmentation as segm

    rng = np.random.default_rng(11)
    metric_files, per_case_files, folds_rows = [], [], []
    shape = (4, 12, 12)
    for fold in range(3):
        rows = []
        for i in range(8):
            case = f"S{fold}-{i}"
            truth = np.zeros(shape, bool)
            if i % 4:  # every fourth case has no GTVn
                truth[1:3, 3:7, 3:7] = True
            pred = np.zeros(shape, bool)
            if i != 1:  # case 1 of each fold: the prediction is empty
                shift = rng.integers(0, 3)
                pred[1:3, 3 + shift:7 + shift, 3:7] = True
            rows.append({"case": case, "fold": fold, "model": "snet", **segm.case_metrics(pred, truth, (2.0, 1.0, 1.0))})
            folds_rows.append({"case": case, "patient": f"p{fold}-{i // 2}", "collection": "A", "label": int(truth.any()),
                               "fold": fold})
        out = tmp_path / "results" / "evaluate" / "segment" / "snet" / f"fold{fold}"
        out.mkdir(parents=True)
        pd.DataFrame(rows).to_csv(out / "per_case.csv", index=False)
        write_json(out / "metrics.json", {"task": "segment", "model": "snet", "fold": fold,
                                          **segm.aggregate_cases(rows)})
        metric_files.append(str(out / "metrics.json"))
        per_case_files.append(str(out / "per_case.csv"))
    folds = tmp_path / "results" / "folds" / "segment" / "folds.tsv"
    folds.parent.mkdir(parents=True)
    pd.DataFrame(folds_rows).to_csv(folds, sep="\t", index=False)
    return tmp_path, metric_files, per_case_files, str(folds)


def test_segmentation_gets_pooled_patient_level_intervals(segment_outputs):
    from hnct.metrics import segmentation as segm

    root, metrics, per_case, folds = segment_outputs
    out = root / "report"
    report.write_tables(metrics, [], out, PUBLISHED, n_bootstrap=200, seed=7, folds_files=[folds],
                        per_case_files=per_case)
    summary = pd.read_csv(out / "metrics_summary.csv").set_index("metric")
    assert set(summary.index) == set(report.SEGMENT_COLUMNS) | set(report.DETECTION_COLUMNS)
    expected = segm.summarise_cases(pd.concat([pd.read_csv(f) for f in per_case], ignore_index=True))
    for metric, row in summary.iterrows():
        assert row["pooled"] == pytest.approx(expected[metric], abs=1e-9, nan_ok=True), metric  # CSV: 10 digits
        assert row["n_patients"] == 12 and row["n_cases"] == 24
        by_fold = [segm.summarise_cases(pd.read_csv(f))[metric] for f in per_case]
        assert row["mean"] == pytest.approx(np.mean(by_fold), abs=1e-9), metric
    assert summary.loc["n_hd95_not_finite", "pooled"] == 3  # one empty prediction of a GTVn case per fold
    assert summary.loc["case_sensitivity", "pooled"] < 1
    assert np.isfinite(summary.loc["dice", "ci_low"]) and summary.loc["dice", "ci_low"] < summary.loc["dice", "ci_high"]
    assert assert_every_interval_contains_its_value(out) > 0
    text = (out / "metrics_summary.md").read_text()
    assert "detection" in text and "HD95 median (mm) (pooled)" in text


def test_figures_are_written_as_png_and_svg(fold_outputs):
    root, _, predictions, histories, _ = fold_outputs
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
