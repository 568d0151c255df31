"""hnct.metrics.segmentation: hand-made masks, brute force distances, MONAI cross-checks, empty cases."""

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


def test_hd95_of_shifted_cube_is_the_shift_in_mm_with_anisotropic_spacing():
    shape = (10, 10, 14)
    a = cube(shape, (2, 2, 2), (4, 4, 4))
    b = cube(shape, (2, 2, 5), (4, 4, 4))  # 3 voxels along x (last axis)
    spacing = (3.0, 0.5, 0.7)  # z, y, x mm
    # Every surface point has its twin 3 voxels along x: the max directed distance is 3 * 0.7 = 2.1 mm,
    # and the faces shifted rigidly make > 5 % of points sit at exactly that distance.
    assert segm.hd95(a, b, spacing) == pytest.approx(2.1)
    # With spacing 1 in x only the shift distance matters.
    assert segm.hd95(a, b, (3.0, 0.5, 1.0)) == pytest.approx(3.0)
    assert segm.hd95(a, a, spacing) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_surface_distances_match_brute_force_all_pairs(seed):
    rng = np.random.default_rng(seed)
    shape = (6, 9, 8)
    spacing = (2.5, 0.8, 1.3)
    a = rng.random(shape) > 0.6
    b = rng.random(shape) > 0.7
    ours = np.sort(segm.directed_surface_distances(a, b, spacing))
    brute = np.sort(brute_directed(a, b, spacing))
    np.testing.assert_allclose(ours, brute, atol=1e-9)
    fwd, bwd = brute_directed(a, b, spacing), brute_directed(b, a, spacing)
    assert segm.hd95(a, b, spacing) == pytest.approx(max(np.percentile(fwd, 95), np.percentile(bwd, 95)))
    tol = 1.5
    expected_nsd = ((fwd <= tol).sum() + (bwd <= tol).sum()) / (fwd.size + bwd.size)
    assert segm.nsd(a, b, tol, spacing) == pytest.approx(expected_nsd)


@pytest.mark.parametrize("seed", [3, 4])
def test_hd95_and_nsd_match_monai_with_spacing(seed):
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(seed)
    shape = (10, 16, 14)
    spacing = (3.0, 0.7, 0.9)
    # Blobby masks (smoothed noise) rather than salt-and-pepper, placed away from the border.
    from scipy import ndimage

    a = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.52
    b = ndimage.gaussian_filter(rng.random(shape), 1.5) > 0.52
    a[0], a[-1], b[0], b[-1] = False, False, False, False
    assert a.any() and b.any()
    pred = torch.from_numpy(a[None, None].astype(np.float32))
    truth = torch.from_numpy(b[None, None].astype(np.float32))
    monai_hd = float(compute_hausdorff_distance(pred, truth, include_background=True, percentile=95,
                                                spacing=list(spacing)))
    assert segm.hd95(a, b, spacing) == pytest.approx(monai_hd, rel=1e-6)
    monai_nsd = float(compute_surface_dice(pred, truth, class_thresholds=[2.0], include_background=True,
                                           spacing=list(spacing)))
    assert segm.nsd(a, b, 2.0, spacing) == pytest.approx(monai_nsd, rel=1e-6)


def test_nsd_tolerance_edges():
    shape = (8, 8, 12)
    a = cube(shape, (2, 2, 2), (4, 4, 4))
    b = cube(shape, (2, 2, 4), (4, 4, 4))  # shift 2 voxels = 2 mm
    assert segm.nsd(a, b, 2.0, (1, 1, 1)) == pytest.approx(1.0)
    assert segm.nsd(a, b, 1.99, (1, 1, 1)) < 1.0
    assert segm.nsd(a, a, 0.0, (1, 1, 1)) == 1.0


def test_empty_mask_policy():
    shape = (4, 5, 6)
    spacing = (2.0, 1.0, 0.5)
    empty = np.zeros(shape, bool)
    full = cube(shape, (1, 1, 1), (2, 2, 2))
    both = segm.case_metrics(empty, empty, spacing)
    assert both["empty_status"] == "both_empty"
    assert all(math.isnan(both[k]) for k in ("dice", "iou", "hd95_mm", "nsd"))
    diagonal = math.sqrt(8.0 ** 2 + 5.0 ** 2 + 3.0 ** 2)
    for pred, truth, status in ((empty, full, "pred_empty"), (full, empty, "truth_empty")):
        one = segm.case_metrics(pred, truth, spacing)
        assert one["empty_status"] == status
        assert (one["dice"], one["iou"], one["nsd"]) == (0.0, 0.0, 0.0)
        assert one["hd95_mm"] == pytest.approx(diagonal)
    summary = segm.aggregate_cases([both, segm.case_metrics(empty, full, spacing),
                                    segm.case_metrics(full, full, spacing)])
    assert summary["n_both_empty"] == 1 and summary["n_pred_empty"] == 1
    assert summary["dice"]["n"] == 2 and summary["dice"]["mean"] == pytest.approx(0.5)
    assert "both prediction and truth empty" in summary["empty_mask_policy"]


def test_lesion_detection_26_connectivity_and_counts():
    shape = (10, 10, 10)
    truth = cube(shape, (1, 1, 1), (2, 2, 2)) | cube(shape, (6, 6, 6), (2, 2, 2))
    # Two predicted voxels touching only by a corner: one component under 26-connectivity.
    pred = np.zeros(shape, bool)
    pred[2, 2, 2] = pred[3, 3, 3] = True
    pred[8, 0, 0] = True  # a false positive far away
    counts = segm.lesion_detection(pred, truth)
    assert counts == {"n_pred": 2, "n_true": 2, "tp": 1, "fp": 1, "fn": 1, "n_true_detected": 1}
    summary = segm.aggregate_cases([segm.case_metrics(pred, truth, (1, 1, 1)),
                                    segm.case_metrics(truth, truth, (1, 1, 1))])
    assert summary["lesions"]["fp_per_scan"] == pytest.approx(0.5)
    assert summary["lesions"]["sensitivity"] == pytest.approx(3 / 4)


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
        segm.hd95(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="spacing"):
        segm.hd95(np.ones((3, 3)), np.ones((3, 3)), spacing=(1.0,))
