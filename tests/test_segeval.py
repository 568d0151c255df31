"""hnct.segeval end to end on hand-made crop NRRDs, slice NPZs and probability NPZs (CONTRACTS formats)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from hnct.evaluate import main as evaluate_main
from hnct.metrics import segmentation as segm
from hnct.segeval import main as segeval_main

REPO = Path(__file__).resolve().parents[1]
SHAPE = (6, 10, 12)  # z, y, x
SPACING = (0.8, 0.9, 2.0)  # x, y, z mm (anisotropic on purpose)
ORIGIN = (-40.5, 12.25, -310.0)
DIRECTION = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # y axis flipped: origin must not be recomputed
LABELS = {"1": "Larynx", "2": "GTVp", "3": "GTVn"}


def write_image(array: np.ndarray, path: Path) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path), useCompression=False)
    return image


def make_case(root: Path, case: str, label: np.ndarray, prob: np.ndarray | None) -> dict:
    """Crop NRRD + label NRRD + slices sidecar + slice NPZs + val_probs NPZ for one case."""
    crops, slices_dir = root / "results" / "crops", root / "results" / "slices" / case
    crops.mkdir(parents=True, exist_ok=True)
    slices_dir.mkdir(parents=True, exist_ok=True)
    hu = np.full(SHAPE, -100, dtype=np.int16)
    image = write_image(hu, crops / f"{case}.nrrd")
    write_image(label.astype(np.uint8), crops / f"{case}_label.nrrd")
    rows = []
    for k in range(SHAPE[0]):
        origin = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, k)), dtype=np.float64)
        npz = slices_dir / f"{case}_{k:04d}.npz"
        np.savez(npz, image=hu[k], mask=label[k].astype(np.uint8), spacing=np.asarray(SPACING[:2]),
                 origin=origin, direction=np.asarray(DIRECTION), slice_index=np.int64(k),
                 z_mm=np.float64(origin[2]), window=np.array([40.0, 400.0]))
        rows.append({"case": case, "slice": k, "npz": str(npz.relative_to(root)),
                     "positive": int((label[k] == 3).any()), "split": "val"})
    sidecar = {"case": case, "stage": "slices", "status": "ok", "structure": "GTVn", "labels": LABELS,
               "source_volume": str((crops / f"{case}.nrrd").relative_to(root)),
               "source_label": str((crops / f"{case}_label.nrrd").relative_to(root)),
               "n_slices": SHAPE[0]}
    (root / "results" / "slices" / f"{case}.json").write_text(json.dumps(sidecar))
    probs_dir = root / "results" / "train" / "segment" / "snet" / "fold0" / "val_probs"
    probs_dir.mkdir(parents=True, exist_ok=True)
    prob_path = probs_dir / f"{case}.npz"
    if prob is not None:
        np.savez(prob_path, prob=prob.astype(np.float16), slice=np.arange(SHAPE[0]))
    return {"rows": rows, "prob_npz": str(prob_path.relative_to(root))}


@pytest.fixture()
def fold_dir(tmp_path, monkeypatch):
    """Five val cases: shifted prediction, both empty, prediction empty, missing probabilities, and a
    prediction where the reference has no GTVn (a false positive on a structure-negative case)."""
    monkeypatch.chdir(tmp_path)  # paths in the tables are relative to the working dir, as in the workflow
    label = np.zeros(SHAPE, np.uint8)
    label[0:2, 0:3, 0:3] = 1                 # Larynx: must not count as truth
    label[2:5, 3:7, 4:8] = 3                 # GTVn: 3 x 4 x 4 = 48 voxels
    prob_shift = np.zeros(SHAPE, np.float32)
    prob_shift[2:5, 3:7, 5:9] = 0.9          # shifted one voxel (0.8 mm) in x: overlap 36
    prob_shift[0, 9, 0] = 0.4                # below threshold: ignored
    cases = {
        "A": make_case(tmp_path, "A", label, prob_shift),
        "B": make_case(tmp_path, "B", np.where(label == 1, 1, 0).astype(np.uint8), np.zeros(SHAPE)),
        "C": make_case(tmp_path, "C", label, np.full(SHAPE, 0.2)),
        "D": make_case(tmp_path, "D", label, None),
        "E": make_case(tmp_path, "E", np.where(label == 1, 1, 0).astype(np.uint8), prob_shift),
    }
    fold_slices = tmp_path / "results" / "folds" / "segment" / "fold0_slices.tsv"
    fold_slices.parent.mkdir(parents=True)
    train_row = dict(cases["A"]["rows"][0], case="T", split="train")
    pd.DataFrame([r for c in cases.values() for r in c["rows"]] + [train_row]).to_csv(
        fold_slices, sep="\t", index=False)
    preds = pd.DataFrame([{"case": case, "slice": r["slice"], "prob_npz": c["prob_npz"], "fold": 0}
                          for case, c in cases.items() for r in c["rows"]])
    predictions = tmp_path / "results" / "train" / "segment" / "snet" / "fold0" / "val_predictions.csv"
    preds.to_csv(predictions, index=False)
    out = Path("results/evaluate/segment/snet/fold0")
    argv = ["--predictions", str(predictions.relative_to(tmp_path)),
            "--fold-slices", str(fold_slices.relative_to(tmp_path)),
            "--out-metrics", str(out / "metrics.json"), "--out-per-case", str(out / "per_case.csv"),
            "--masks-dir", str(out / "masks"), "--slices-dir", "results/slices", "--model", "snet", "--fold", "0",
            "--nsd-tolerance-mm", "1.0", "--threshold", "0.5", "--detection-iou", "0.5"]
    return tmp_path, out, argv


def test_end_to_end_metrics_masks_and_geometry(fold_dir):
    root, out, argv = fold_dir
    assert segeval_main(argv) == 0
    per_case = pd.read_csv(out / "per_case.csv").set_index("case")
    assert list(per_case.index) == ["A", "B", "C", "E"]
    a = per_case.loc["A"]
    assert a["dice"] == pytest.approx(2 * 36 / 96) and a["iou"] == pytest.approx(36 / 60)
    # Rigid 1-voxel shift along x (0.8 mm): HD95 0.8 mm, every surface point within the 1 mm tolerance.
    assert a["hd95_mm"] == pytest.approx(0.8) and a["nsd"] == pytest.approx(1.0)
    # One component each, IoU 36/60 >= 0.5: matched.
    assert (a["tp"], a["fp"], a["fn"], a["n_true"]) == (1, 0, 0, 1) and a["detected"]
    assert a["truth_volume_mm3"] == pytest.approx(48 * 0.8 * 0.9 * 2.0)
    assert per_case.loc["B", "empty_status"] == "both_empty" and np.isnan(per_case.loc["B", "dice"])
    c = per_case.loc["C"]
    assert c["empty_status"] == "pred_empty" and c["dice"] == 0 and c["fn"] == 1 and not c["detected"]
    assert np.isnan(c["hd95_mm"]) and c["nsd"] == 0  # no finite distance, no stand-in
    e = per_case.loc["E"]
    assert e["empty_status"] == "truth_empty" and e["false_positive"] and e["fp"] == 1
    assert np.isnan(e["dice"]) and np.isnan(e["hd95_mm"]) and np.isnan(e["nsd"])

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_cases"] == 4 and metrics["n_both_empty"] == 1 and metrics["n_pred_empty"] == 1
    assert metrics["n_truth_empty"] == 1 and metrics["n_reference_present"] == 2
    # Metrics Reloaded: Dice over the two cases with GTVn (A 0.75, C 0); E's prediction is detection only.
    headline = metrics["summary"]
    assert headline["dice"] == pytest.approx((0.75 + 0) / 2) and metrics["dice"]["n"] == 2
    assert metrics["dice"]["mean"] == pytest.approx(headline["dice"])
    assert headline["hd95_median_mm"] == pytest.approx(0.8) and headline["n_hd95_not_finite"] == 1
    assert headline["case_sensitivity"] == pytest.approx(0.5)        # A detected, C missed
    assert headline["fp_rate_negative"] == pytest.approx(0.5)        # E of the negatives B and E
    assert headline["lesion_sensitivity"] == pytest.approx(0.5) and headline["lesion_precision"] == pytest.approx(0.5)
    assert metrics["detection_iou"] == 0.5
    assert metrics["empty_mask_policy"] == segm.EMPTY_MASK_POLICY
    assert metrics["structure"] == "GTVn" and metrics["nsd_tolerance_mm"] == 1.0
    assert [e["case"] for e in metrics["excluded_cases"]] == ["D"]
    assert "probability NPZ not found" in metrics["excluded_cases"][0]["reason"]
    assert metrics["lesions"]["fn"] == 1 and metrics["lesions"]["fp"] == 1
    # Pooled per-slice Dice, both ways: A has 3 labelled slices at 0.75 and 3 empty/empty slices (1.0);
    # B has 6 empty/empty slices; C has 3 missed labelled slices (0) and 3 empty/empty ones; E has 3
    # false-positive slices (0) and 3 empty/empty ones.
    pooled = metrics["pooled_slices"]
    assert pooled["n_slices"] == 24 and pooled["n_labelled_slices"] == 6
    assert pooled["snet_slice_dice"] == pytest.approx((3 * 0.75 + 3 + 6 + 3 + 3) / 24)
    assert pooled["labelled_slice_dice"] == pytest.approx(3 * 0.75 / 6)

    # The predicted NRRD lies exactly on the crop: same size, origin, spacing, direction; uint8 0/1.
    crop = sitk.ReadImage(str(root / "results" / "crops" / "A.nrrd"))
    mask = sitk.ReadImage(str(out / "masks" / "A.nrrd"))
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert mask.GetSize() == crop.GetSize()
    assert mask.GetOrigin() == crop.GetOrigin() and mask.GetSpacing() == crop.GetSpacing()
    assert mask.GetDirection() == crop.GetDirection()
    array = sitk.GetArrayFromImage(mask)
    expected = np.zeros(SHAPE, np.uint8)
    expected[2:5, 3:7, 5:9] = 1
    np.testing.assert_array_equal(array, expected)
    # A voxel of the mask maps to the same LPS point as the same voxel of the CT.
    assert mask.TransformIndexToPhysicalPoint((5, 3, 2)) == crop.TransformIndexToPhysicalPoint((5, 3, 2))
    assert not list((out / "masks").glob(".*tmp*"))


def test_cli_module_and_evaluate_forwarding(fold_dir):
    root, out, argv = fold_dir
    env = dict(os.environ, PYTHONPATH=str(REPO / "workflow"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "hnct.segeval", *argv], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "case D: probability NPZ not found" in done.stderr
    first = json.loads((out / "metrics.json").read_text())
    (out / "metrics.json").unlink()
    assert evaluate_main(["--task", "segment", *argv]) == 0
    second = json.loads((out / "metrics.json").read_text())
    assert second["dice"] == first["dice"]


def test_bad_prediction_shape_is_excluded_with_the_file(fold_dir):
    root, out, argv = fold_dir
    bad = root / "results" / "train" / "segment" / "snet" / "fold0" / "val_probs" / "A.npz"
    np.savez(bad, prob=np.zeros((6, 8, 8), np.float16), slice=np.arange(6))
    assert segeval_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    reasons = {e["case"]: (e["file"], e["reason"]) for e in metrics["excluded_cases"]}
    assert "A" in reasons and reasons["A"][0].endswith("A.npz") and "(y, x)" in reasons["A"][1]


def test_missing_columns_fail_clearly(fold_dir, capfd):
    root, out, argv = fold_dir
    pd.DataFrame({"case": ["A"]}).to_csv(root / "bad.csv", index=False)
    argv = list(argv)
    argv[argv.index("--predictions") + 1] = "bad.csv"
    assert segeval_main(argv) == 1
    err = capfd.readouterr().err
    assert "missing columns" in err and "bad.csv" in err
