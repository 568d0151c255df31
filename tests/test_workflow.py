"""The demo workflow end to end: the README's first command, in a temporary directory.

One session-scoped run of the embedded default (the synthetic cohort, every stage, every model,
every fold) that the other workflow tests read. Marked ``workflow`` and ``slow``; CI runs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from conftest import REPO, run_snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """Run `snakemake --cores 2` on the default config in a fresh directory, then build the report."""
    workdir = tmp_path_factory.mktemp("demo-run")
    run_snakemake(workdir, "--cores", "2")
    run_snakemake(workdir, "--report", str(workdir / "report.html"))
    return workdir


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def test_lint_is_clean(tmp_path):
    proc = run_snakemake(tmp_path, "--lint", check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Lints for" not in output, output[-4000:]


def test_snakefmt_is_clean():
    files = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]
    proc = subprocess.run([sys.executable, "-m", "snakefmt", "--check", *map(str, files)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dry_run_plans_every_stage(tmp_path):
    proc = run_snakemake(tmp_path, "-n", "--quiet", "rules")
    text = proc.stdout + proc.stderr
    for rule in ("demo_case", "convert_series", "crop_larynx", "export_slices", "split_folds",
                 "train_fold", "evaluate_fold", "aggregate_metrics", "collect_exclusions"):
        assert rule in text, f"{rule} missing from the dry run:\n{text[-3000:]}"


def test_every_case_ends_ok_or_excluded_with_a_reason(demo_run):
    cohort = read_tsv(demo_run / "results" / "cohort.tsv")
    exclusions = read_tsv(demo_run / "results" / "exclusions.tsv")
    assert list(exclusions.columns[:4]) == ["case", "stage", "file", "reason"]
    for case in cohort["case"]:
        sidecar = json.loads((demo_run / "results" / "slices" / f"{case}.json").read_text())
        if sidecar["status"] == "excluded":
            row = exclusions[exclusions["case"] == case]
            assert len(row) >= 1, f"{case} excluded but not in exclusions.tsv"
            assert row["reason"].str.len().min() > 10
        else:
            assert sidecar["status"] == "ok"
    # The demo plants broken patients: they must be excluded, by convert, with a reason.
    broken = exclusions[exclusions["stage"] == "convert"]
    assert len(broken) >= 1, exclusions
    # Excluded cases never reach a fold.
    for task in ("classify", "segment"):
        folds = read_tsv(demo_run / "results" / "folds" / task / "folds.tsv")
        assert not set(folds["case"]) & set(broken["case"])


def test_volumes_match_an_independent_dicom_read(demo_run):
    """NRRD geometry == pydicom positions of the same series (origin, spacing, size)."""
    checked = 0
    # Every header of the demo's DICOM read once, by series (not once per volume: 51 cases x all files).
    by_series: dict[str, list] = {}
    for path in (demo_run / "results" / "demo" / "dicom").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        by_series.setdefault(ds.get("SeriesInstanceUID"), []).append(ds)
    for sidecar_path in sorted((demo_run / "results" / "volumes").glob("*.json")):
        sidecar = json.loads(sidecar_path.read_text())
        if sidecar["status"] != "ok":
            continue
        image = sitk.ReadImage(str(demo_run / sidecar["volume"]))
        assert image.GetPixelID() == sitk.sitkInt16
        files = [demo_run / f for f in sidecar["files"]] if "files" in sidecar else None
        datasets = by_series.get(sidecar["series_uid"], [])
        assert files is None or len(files) == len(datasets)
        z = sorted(float(d.ImagePositionPatient[2]) for d in datasets)
        first = min(datasets, key=lambda d: float(d.ImagePositionPatient[2]))
        np.testing.assert_allclose(image.GetOrigin(), [float(v) for v in first.ImagePositionPatient], atol=1e-3)
        np.testing.assert_allclose(image.GetSpacing()[:2], [float(first.PixelSpacing[1]), float(first.PixelSpacing[0])], atol=1e-6)
        np.testing.assert_allclose(image.GetSpacing()[2], np.median(np.diff(z)), atol=1e-3)
        assert image.GetSize() == (int(first.Columns), int(first.Rows), len(datasets))
        checked += 1
    assert checked >= 10


def test_crops_are_1mm_and_hold_the_planted_larynx(demo_run):
    checked = 0
    cohort = pd.read_csv(demo_run / "results" / "cohort.tsv", sep="\t", dtype=str, keep_default_na=False)
    case_dirs = dict(zip(cohort["case"], cohort["dicom_dir"]))
    for sidecar_path in sorted((demo_run / "results" / "crops").glob("*.json")):
        sidecar = json.loads(sidecar_path.read_text())
        if sidecar["status"] != "ok":
            continue
        crop = sitk.ReadImage(str(demo_run / sidecar["volume"]))
        assert crop.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(demo_run / sidecar["label"])))
        names = {int(k): v for k, v in sidecar["labels"].items()}
        values = {v: k for k, v in names.items()}
        # The demo_case rule writes one manifest per case folder (the cohort's dicom_dir).
        manifest = json.loads((demo_run / "results" / "demo" / "cases"
                               / f"{case_dirs[sidecar['case']]}.json").read_text())
        # The tumour (GTVp) lies wholly inside the crop: its voxels in the crop == its planted voxels.
        assert (label == values["GTVp"]).any(), sidecar["case"]
        planted = manifest["truth"]
        # The planted tumour centre and every corner of the cartilage framework's box lie in the crop.
        box = planted["cartilage_box_lps"]
        points = [planted["tumour"]["centre_lps"]] + [
            [x, y, z] for x in (box["min"][0], box["max"][0]) for y in (box["min"][1], box["max"][1])
            for z in (box["min"][2], box["max"][2])
        ]
        for point in points:
            index = crop.TransformPhysicalPointToContinuousIndex([float(v) for v in point])
            assert all(-0.5 <= i <= s - 0.5 for i, s in zip(index, crop.GetSize())), (sidecar["case"], point, index)
        hu = sitk.GetArrayFromImage(crop)
        assert hu.max() > 200, "cartilage (> 200 HU) must be inside the crop"
        checked += 1
    assert checked >= 10


def test_training_and_evaluation_outputs(demo_run):
    import yaml

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["models"]
    assert set(config) == {"classify", "segment"} and all(config.values()), config
    for task, models in config.items():
        for model in models:
            for fold in range(5):
                train_dir = demo_run / "results" / "train" / task / model / f"fold{fold}"
                for name in ("best.pt", "history.csv", "val_predictions.csv"):
                    assert (train_dir / name).exists(), train_dir / name
                metrics = json.loads((demo_run / "results" / "evaluate" / task / model / f"fold{fold}" / "metrics.json").read_text())
                assert metrics["task"] == task and metrics["model"] == model and int(metrics["fold"]) == fold


def test_report_has_every_figure(demo_run):
    report = (demo_run / "report.html").read_text(errors="replace")
    for figure in ("roc_pr.png", "confusion.png", "calibration.png", "training_curves.png",
                   "segmentation_boxplots.png", "cohort.png", "crop_qa.png", "metrics_summary.csv"):
        assert figure in report, figure
        assert (demo_run / "results" / "report" / figure).stat().st_size > 0


def test_nothing_reruns_after_a_complete_run(demo_run):
    proc = run_snakemake(demo_run, "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]


def _cnn3d_pooled_auc(demo_run: Path, work: Path, shuffle: bool) -> tuple[float, list[float]]:
    """Train the 3D CNN a little longer than the demo config on every fold; pooled and per-fold AUC."""
    import os

    from sklearn.metrics import roc_auc_score

    from hnct.train import train_fold

    folds = pd.read_csv(demo_run / "results" / "folds" / "classify" / "folds.tsv", sep="\t", dtype=str)
    if shuffle:
        # Labels permuted before training: the images no longer explain them.
        folds["label"] = np.random.default_rng(0).permutation(folds["label"].to_numpy())
    work.mkdir(parents=True, exist_ok=True)
    folds_tsv = work / "folds.tsv"
    folds.to_csv(folds_tsv, sep="\t", index=False)
    # selection fixed: the 12th epoch's model predicts its fold (choosing the best of 12 epochs on the
    # reported fold would be the selection bias issue 14 removed).
    cfg = {"seed": 0, "device": "cpu", "num_workers": 0, "checkpoint_every": 100,
           "selection": "fixed", "inner_folds": 5,
           "input_shape": [32, 32, 32], "fit": "resize", "epochs": 12, "batch_size": 4, "lr": 1e-3,
           "weight_decay": 0.0, "optimizer": "adam", "patience": 12, "focal_gamma": 2.0,
           "class_weights": [1.0, 4.0], "weighted_sampler": False, "hu_clip": [-300, 300],
           "augment": False, "cnn3d_channels": [8, 16, 32]}
    sidecars = sorted(str(p.relative_to(demo_run)) for p in (demo_run / "results" / "crops").glob("*.json"))
    cwd = os.getcwd()
    os.chdir(demo_run)  # sidecars name their NRRDs relative to the run directory
    try:
        predictions = []
        for fold in sorted(folds.loc[folds["fold"] != "test", "fold"].unique()):
            out = work / f"fold{fold}"
            train_fold("classify", "cnn3d", int(fold), out, cfg, folds_tsv=folds_tsv, crop_sidecars=sidecars, threads=2)
            predictions.append(pd.read_csv(out / "val_predictions.csv"))
    finally:
        os.chdir(cwd)
    per_fold = [roc_auc_score(p["label"], p["probability"]) for p in predictions if p["label"].nunique() == 2]
    pooled = pd.concat(predictions)
    return roc_auc_score(pooled["label"], pooled["probability"]), per_fold


def test_the_t4_label_is_learned_and_shuffled_labels_are_not(demo_run, tmp_path):
    """Issue 4's acceptance: a little longer training learns T4 (mean fold AUC >= 0.9); permuted labels stay near chance."""
    pooled, per_fold = _cnn3d_pooled_auc(demo_run, tmp_path / "true", shuffle=False)
    assert np.mean(per_fold) >= 0.9, (pooled, per_fold)
    shuffled, shuffled_folds = _cnn3d_pooled_auc(demo_run, tmp_path / "shuffled", shuffle=True)
    assert abs(shuffled - 0.5) < 0.3, (shuffled, shuffled_folds)
    print(f"cnn3d, 12 epochs: mean fold AUC {np.mean(per_fold):.3f} (pooled {pooled:.3f}); "
          f"labels permuted: pooled AUC {shuffled:.3f}")


def test_segmentation_beats_the_all_background_baseline(demo_run):
    """Issue 5's acceptance: validation 3D Dice of the node structure clearly above all-background (Dice 0)."""
    import yaml

    best = {}
    for model in yaml.safe_load((REPO / "config" / "config.yaml").read_text())["models"]["segment"]:
        dice = []
        for fold in range(5):
            metrics = json.loads((demo_run / "results" / "evaluate" / "segment" / model / f"fold{fold}" / "metrics.json").read_text())
            assert metrics["structure"] == "GTVn"
            if metrics["dice"]["mean"] is not None:
                dice.append(metrics["dice"]["mean"])
        best[model] = float(np.mean(dice))
    print(f"mean validation 3D Dice (GTVn): {best}")
    assert max(best.values()) > 0.2, best


def test_every_interval_in_every_report_table_contains_its_value(demo_run):
    """Issue 14: every CI in the demo's tables is printed beside the estimate it belongs to (CSV rows and
    the Markdown/LaTeX cells), and the shortcut checks are there: per collection, image-free baselines."""
    from test_report import assert_every_interval_contains_its_value

    report_dir = demo_run / "results" / "report"
    for name in ("metrics_summary.csv", "metrics_summary.md", "baselines.csv", "metrics_by_group.csv",
                 "shortcuts.md"):
        assert (report_dir / name).stat().st_size > 0, name
    assert assert_every_interval_contains_its_value(report_dir) > 100
    by_group = pd.read_csv(report_dir / "metrics_by_group.csv")
    collections = set(read_tsv(demo_run / "results" / "folds" / "classify" / "folds.tsv")["collection"])
    assert set(by_group.loc[by_group["group_by"] == "collection", "group"]) == collections
    assert {"collection_only", "metadata_only"} <= set(pd.read_csv(report_dir / "baselines.csv")["model"])
