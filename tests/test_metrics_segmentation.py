"""hnct.metrics.segmentation: hand-made masks, brute-force distances and MONAI through the function the
evaluation calls (case_metrics -> surface_distances), empty cases one by one, IoU component matching,
the Metrics Reloaded summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hnct.metrics import segmentation as segm

torch.set_num_threads(1)


def cube(shape, start, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size))] = True
    return mask


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels by looking at the 6 face neighbours directly (outside the array = background)."""
    padded = np.pad(mask, 1)
    surface = np.zeros_like(mask)
    for idx in zip(*np.nonzero(mask)):
        p = tuple(i + 1 for i in idx)
        for axis in range(mask.ndim):
            for step in (-1, 1):
                q = list(p)
                q[axis] += step
                if not padded[tuple(q)]:
                    surface[idx] = True
    return surface


def brute_directed(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """All surface-point pairs: min physical distance from each surface point of a to b's surface."""
    pa = np.argwhere(brute_surface(a)) * np.asarray(spacing)
    pb = np.argwhere(brute_surface(b)) * np.asarray(spacing)
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def test_dice_iou_of_offset_cubes_known_values():
    shape = (12, 12, 12)
    a = cube(shape, (2, 2, 2), (4, 4, 4))  # 64 voxels
    b = cube(shape, (2, 2, 4), (4, 4, 4))  # shifted 2 voxels in x: overlap 4*4*2 = 32
    assert segm.dice(a, b) == pytest.approx(2 * 32 / 128)
    assert segm.iou(a, b) == pytest.approx(32 / 96)
    assert segm.dice(a, a) == 1.0 and segm.iou(a, a) == 1.0


def hd95_nsd(pred, truth, spacing, tolerance=2.0):
    """HD95 and NSD the way segeval gets them: through case_metrics."""
    metrics = segm.case_metrics(pred, truth, spacing, tolerance_mm=tolerance)
    return metrics["hd95_mm"], metrics["nsd"]


def monai_hd95_nsd(pred, truth, spacing, tolerance=2.0):
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    t = torch.from_numpy(truth[None, None].astype(np.float32))
    hd = compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=list(spacing))
    nsd = compute_surface_dice(p, t, class_thresholds=[tolerance], include_background=True, spacing=list(spacing))
    return float(hd), float(nsd)


def test_hd95_of_shifted_cube_is_the_shift_in_mm_with_anisotropic_spacing():
    shape = (10, 10, 14)
    a = cube(shape, (2, 2, 2), (4, 4, 4))
    b = cube(shape, (2, 2, 5), (4, 4, 4))  # 3 voxels along x (last axis)
    # Every surface point has its twin 3 voxels along x: the max directed distance is 3 * 0.7 = 2.1 mm,
    # and the faces shifted rigidly make > 5 % of points sit at exactly that distance.
    assert hd95_nsd(a, b, (3.0, 0.5, 0.7))[0] == pytest.approx(2.1)
    # With spacing 1 in x only the shift distance matters: the spacing is taken in axis order.
    assert hd95_nsd(a, b, (3.0, 0.5, 1.0))[0] == pytest.approx(3.0)
    assert hd95_nsd(a, a, (3.0, 0.5, 0.7)) == (0.0, 1.0)


def test_nsd_tolerance_edges():
    shape = (8, 8, 12)
    a = cube(shape, (2, 2, 2), (4, 4, 4))
    b = cube(shape, (2, 2, 4), (4, 4, 4))  # shift 2 voxels = 2 mm
    assert segm.surface_distances(a, b, (1, 1, 1), 2.0)["nsd"] == pytest.approx(1.0)
    assert segm.surface_distances(a, b, (1, 1, 1), 1.99)["nsd"] < 1.0
    assert segm.surface_distances(a, a, (1, 1, 1), 0.0)["nsd"] == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_and_nsd_equal_brute_force_all_pairs(seed):
    """The 95th percentile, the max over both directions and the spacing's axis order, checked
    against every surface-point pair: a percentile of 90, a directed HD or reversed spacing fails."""
    rng = np.random.default_rng(seed)
    shape = (6, 9, 8)
    spacing = (2.5, 0.8, 1.3)
    a = rng.random(shape) > 0.6
    b = rng.random(shape) > 0.7
    fwd, bwd = brute_directed(a, b, spacing), brute_directed(b, a, spacing)
    hd, nsd = hd95_nsd(a, b, spacing, tolerance=1.5)
    assert hd == pytest.approx(max(np.percentile(fwd, 95), np.percentile(bwd, 95)), abs=1e-6)
    assert hd != pytest.approx(max(np.percentile(fwd, 90), np.percentile(bwd, 90)), abs=1e-6)
    expected_nsd = ((fwd <= 1.5).sum() + (bwd <= 1.5).sum()) / (fwd.size + bwd.size)
    assert nsd == pytest.approx(expected_nsd, abs=1e-6)  # MONAI counts in float32


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_hd95_and_nsd_equal_monai_to_a_micrometre_on_random_and_hand_made_masks(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    shape = (10, 16, 14)
    spacing = (3.0, 0.7, 0.9)
    blob_a = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.52
    blob_b = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.52
    pairs = [(blob_a, blob_b), (rng.random(shape) > 0.8, rng.random(shape) > 0.7),
             (cube(shape, (1, 2, 3), (5, 6, 4)), cube(shape, (2, 4, 3), (6, 5, 7)))]
    for pred, truth in pairs:
        assert pred.any() and truth.any()
        ours = hd95_nsd(pred, truth, spacing)
        reference = monai_hd95_nsd(pred, truth, spacing)
        assert ours[0] == pytest.approx(reference[0], abs=1e-6) and ours[1] == pytest.approx(reference[1], abs=1e-6)


def test_empty_cases_one_by_one():
    shape = (4, 5, 6)
    spacing = (2.0, 1.0, 0.5)
    empty = np.zeros(shape, bool)
    full = cube(shape, (1, 1, 1), (2, 2, 2))
    both = segm.case_metrics(empty, empty, spacing)
    assert both["empty_status"] == "both_empty"
    assert all(both[k] is None for k in ("dice", "iou", "hd95_mm", "nsd", "detected"))
    assert both["false_positive"] is False
    # Reference present, prediction empty: Dice/IoU/NSD 0, no finite HD95 (never a stand-in distance).
    missed = segm.case_metrics(empty, full, spacing)
    assert missed["empty_status"] == "pred_empty"
    assert (missed["dice"], missed["iou"], missed["nsd"]) == (0.0, 0.0, 0.0)
    assert missed["hd95_mm"] is None and missed["detected"] is False and missed["false_positive"] is False
    # Reference empty, prediction not: detection only (a false positive), no segmentation score.
    spurious = segm.case_metrics(full, empty, spacing)
    assert spurious["empty_status"] == "truth_empty"
    assert all(spurious[k] is None for k in ("dice", "iou", "hd95_mm", "nsd", "detected"))
    assert spurious["false_positive"] is True and spurious["fp"] == 1
    hit = segm.case_metrics(full, full, spacing)
    summary = segm.aggregate_cases([both, missed, spurious, hit])
    assert (summary["n_both_empty"], summary["n_pred_empty"], summary["n_truth_empty"],
            summary["n_both_present"]) == (1, 1, 1, 1)
    assert summary["n_reference_present"] == 2 and summary["n_reference_absent"] == 2
    headline = summary["summary"]
    assert headline["dice"] == pytest.approx(0.5) and headline["nsd"] == pytest.approx(0.5)
    assert headline["hd95_median_mm"] == 0.0 and headline["n_hd95_not_finite"] == 1
    assert headline["case_sensitivity"] == pytest.approx(0.5)
    assert headline["fp_rate_negative"] == pytest.approx(0.5)
    # The per-metric distributions: Dice over the two reference-present cases, HD95 finite ones only.
    assert summary["dice"]["n"] == 2 and summary["dice"]["mean"] == pytest.approx(0.5)
    assert summary["hd95_mm"] == {"mean": 0.0, "median": 0.0, "std": 0.0, "n": 1}
    assert "never given a stand-in distance" in summary["empty_mask_policy"]


def test_hd95_median_over_both_present_cases_only():
    shape = (10, 10, 14)
    a = cube(shape, (2, 2, 2), (4, 4, 4))
    rows = [segm.case_metrics(cube(shape, (2, 2, 2 + k), (4, 4, 4)), a, (1, 1, 1)) for k in (0, 1, 3)]
    rows.append(segm.case_metrics(np.zeros(shape, bool), a, (1, 1, 1)))
    summary = segm.summarise_cases(rows)
    assert summary["hd95_median_mm"] == pytest.approx(1.0) and summary["n_hd95_not_finite"] == 1


def test_components_match_by_iou_not_one_voxel():
    shape = (10, 10, 10)
    truth = cube(shape, (1, 1, 1), (2, 2, 2)) | cube(shape, (6, 6, 6), (3, 3, 3))
    # Two predicted voxels touching only by a corner: one component (26-connectivity) that touches
    # the first true cube by one voxel: IoU 1/9.
    pred = np.zeros(shape, bool)
    pred[2, 2, 2] = pred[3, 3, 3] = True
    pred[8, 0, 0] = True                          # a false positive far away
    pred |= cube(shape, (6, 6, 6), (3, 3, 2))     # IoU 18/27 with the second cube
    assert segm.match_components(pred, truth, 0.5) == {"n_pred": 3, "n_true": 2, "tp": 1, "fp": 2, "fn": 1}
    assert segm.match_components(pred, truth, 0.1) == {"n_pred": 3, "n_true": 2, "tp": 2, "fp": 1, "fn": 0}
    assert segm.match_components(pred, truth, 1 / 9)["tp"] == 2   # ">=": the boundary counts
    metrics = segm.case_metrics(pred, truth, (1, 1, 1), iou_threshold=0.5)
    assert metrics["detected"] is True and metrics["detection_iou"] == 0.5
    one_voxel = np.zeros(shape, bool)
    one_voxel[1, 1, 1] = True
    assert segm.case_metrics(one_voxel, truth, (1, 1, 1), iou_threshold=0.5)["detected"] is False


def test_component_matching_is_one_to_one():
    shape = (4, 12, 12)
    truth = cube(shape, (1, 1, 1), (2, 4, 4)) | cube(shape, (1, 1, 6), (2, 4, 4))
    bridge = cube(shape, (1, 1, 1), (2, 4, 9))  # one predicted component over both true ones
    assert segm.match_components(bridge, truth, 0.3) == {"n_pred": 1, "n_true": 2, "tp": 1, "fp": 0, "fn": 1}


def test_snet_slice_dice_both_ways():
    shape = (4, 6, 6)
    truth = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    truth[1, 1:3, 1:3] = True           # slice 1: 4 voxels
    pred[1, 1:3, 1:2] = True            # 2 voxels inside: Dice 2*2/6
    truth[2, 0, 0] = True               # slice 2: missed, Dice 0
    pred[3, 5, 5] = True                # slice 3: false positive on an empty slice, Dice 0
    # slice 0: empty/empty, Dice 1 under S-Net's convention
    assert segm.snet_slice_dice(pred, truth) == pytest.approx((1 + 4 / 6 + 0 + 0) / 4)
    assert segm.labelled_slice_dice(pred, truth) == pytest.approx((4 / 6 + 0) / 2)
    assert math.isnan(segm.labelled_slice_dice(pred, np.zeros(shape, bool)))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        segm.case_metrics(np.zeros((3, 3)), np.zeros((3, 4)), (1, 1))
    with pytest.raises(ValueError, match="spacing"):
        segm.surface_distances(np.ones((3, 3)), np.ones((3, 3)), (1.0,), 2.0)
    with pytest.raises(ValueError, match="iou_threshold"):
        segm.match_components(np.ones((3, 3)), np.ones((3, 3)), 0.0)
