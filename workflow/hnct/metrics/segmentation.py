"""Segmentation metrics for binary masks (numpy/scipy), spacing-aware, distances in physical mm.

All functions take boolean (or 0/1) arrays of one structure and the voxel ``spacing`` in mm **in the
array's axis order** (for a SimpleITK array ``(z, y, x)`` pass ``spacing[::-1]`` of the image).

Definitions
-----------
* **Dice** = 2|P∩T| / (|P| + |T|); **IoU** = |P∩T| / |P∪T|.
* **Surface voxels**: voxels of the mask that are not in its binary erosion (scipy's default,
  face-connected structuring element; outside the array counts as background, so a mask touching
  the border has a surface there). This is MONAI's ``get_mask_edges`` without ``spacing``.
* **Directed surface distances** P→T: for every surface voxel of P, the Euclidean distance (mm) to
  the nearest surface voxel of T, from ``scipy.ndimage.distance_transform_edt(~surface_T,
  sampling=spacing)``.
* **HD95** = max(95th percentile of P→T, 95th percentile of T→P). This is MONAI's
  ``compute_hausdorff_distance(percentile=95, directed=False)``, the reference tested against in
  tests/test_metrics_segmentation.py. medpy's ``hd95`` instead takes the 95th
  percentile of the union of both directed sets; the two agree for symmetric errors and differ
  when one mask is much larger than the other (the union is dominated by the larger surface, so
  medpy can hide a bad directed error of a small structure). The max of directed percentiles does
  not, which is why hnct uses it. Percentiles use numpy's default linear interpolation (as MONAI).
* **NSD** (normalised surface Dice at ``tolerance_mm``) = (#surface voxels of P within tolerance of
  S_T + #surface voxels of T within tolerance of S_P) / (#S_P + #S_T), counting voxels (MONAI's
  ``compute_surface_dice`` with ``use_subvoxels=False``), "within" meaning distance <= tolerance.
* **Lesion-wise detection**: connected components (26-connectivity in 3D, 8 in 2D) of P and T.
  A predicted component overlapping any true component by >= 1 voxel is a TP; a predicted
  component overlapping none is an FP; a true component overlapped by no predicted component is an
  FN. ``n_true_detected`` counts true components with an overlapping prediction (so
  sensitivity = n_true_detected / n_true, precision = tp / n_pred).
* **S-Net per-slice Dice** (``snet_slice_dice``): Dice of every axial slice (axis 0), where an
  empty-prediction / empty-truth slice scores 1 (as S-Net's published code does), averaged over
  all slices; and ``labelled_slice_dice``: the same Dice averaged over slices whose truth is not
  empty only. The first rewards the many empty slices and is not comparable to a 3D Dice.

Empty-mask policy (``EMPTY_MASK_POLICY``, also written into every results file)
------------------------------------------------------------------------------
* Both P and T empty: Dice, IoU, HD95 and NSD are undefined (NaN); the case is **excluded from the
  means/medians** and counted in ``n_both_empty``.
* Exactly one empty: the **worst value** is used: Dice 0, IoU 0, NSD 0 and HD95 = the diagonal of
  the image extent in mm (sqrt(sum((shape * spacing)**2))), the largest distance possible inside the
  image; counted in ``n_pred_empty`` / ``n_truth_empty``.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import ndimage

EMPTY_MASK_POLICY = (
    "both prediction and truth empty: metrics undefined (NaN), case excluded from means/medians and "
    "counted in n_both_empty; exactly one empty: worst value (Dice 0, IoU 0, NSD 0, HD95 = diagonal "
    "of the image extent in mm), counted in n_pred_empty / n_truth_empty. HD95 = max of the two "
    "directed 95th percentiles of surface distances (MONAI convention). Per-slice S-Net Dice scores "
    "an empty/empty slice as 1 and averages over all slices; labelled-slice Dice averages over slices "
    "with non-empty truth only."
)


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim < 1:
        raise ValueError(f"{name} must be an array, got a scalar")
    return arr.astype(bool, copy=False)


def _check_pair(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None):
    pred = _as_bool(pred, "pred")
    truth = _as_bool(truth, "truth")
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    if spacing is None:
        spacing = (1.0,) * pred.ndim
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} values for a {pred.ndim}D mask")
    if any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be positive, got {spacing}")
    return pred, truth, spacing


def image_diagonal_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Diagonal of the image extent (shape * spacing) in mm: the worst-case HD95."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient; NaN when both masks are empty."""
    pred, truth = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard); NaN when both masks are empty."""
    pred, truth = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    union = int(np.logical_or(pred, truth).sum())
    if union == 0:
        return float("nan")
    return int(np.logical_and(pred, truth).sum()) / union


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Boolean array of the mask's surface voxels (mask minus its face-connected erosion)."""
    mask = _as_bool(mask, "mask")
    if not mask.any():
        return np.zeros_like(mask)
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                    border_value=0)
    return mask & ~eroded


def directed_surface_distances(from_mask: np.ndarray, to_mask: np.ndarray,
                               spacing: Sequence[float] | None = None) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``from_mask`` to the nearest surface voxel of ``to_mask``.

    Both masks must be non-empty. ``spacing`` is in mm, in the arrays' axis order.
    """
    from_mask, to_mask, spacing = _check_pair(from_mask, to_mask, spacing)
    if not from_mask.any() or not to_mask.any():
        raise ValueError("directed surface distances need two non-empty masks")
    surface_from = surface_voxels(from_mask)
    surface_to = surface_voxels(to_mask)
    distance_to = ndimage.distance_transform_edt(~surface_to, sampling=spacing)
    return distance_to[surface_from]


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float] | None = None,
         percentile: float = 95.0) -> float:
    """Symmetric percentile Hausdorff distance in mm: max of the two directed percentiles.

    Both empty: NaN. One empty: the image diagonal in mm (worst value, see module docstring).
    """
    pred, truth, spacing = _check_pair(pred, truth, spacing)
    if not pred.any() and not truth.any():
        return float("nan")
    if not pred.any() or not truth.any():
        return image_diagonal_mm(pred.shape, spacing)
    forward = directed_surface_distances(pred, truth, spacing)
    backward = directed_surface_distances(truth, pred, spacing)
    return float(max(np.percentile(forward, percentile), np.percentile(backward, percentile)))


def nsd(pred: np.ndarray, truth: np.ndarray, tolerance_mm: float,
        spacing: Sequence[float] | None = None) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (voxel-counting); NaN both empty, 0 one empty."""
    pred, truth, spacing = _check_pair(pred, truth, spacing)
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    if not pred.any() and not truth.any():
        return float("nan")
    if not pred.any() or not truth.any():
        return 0.0
    forward = directed_surface_distances(pred, truth, spacing)
    backward = directed_surface_distances(truth, pred, spacing)
    within = int((forward <= tolerance_mm).sum()) + int((backward <= tolerance_mm).sum())
    return within / (forward.size + backward.size)


def lesion_detection(pred: np.ndarray, truth: np.ndarray) -> dict[str, int]:
    """Lesion-wise counts from connected components (26-connectivity in 3D, full connectivity in nD).

    Returns ``n_pred``, ``n_true`` (components), ``tp`` (predicted components overlapping a true
    one), ``fp`` (predicted components overlapping none), ``fn`` (true components with no
    overlapping prediction) and ``n_true_detected`` (= n_true - fn).
    """
    pred, truth, _ = _check_pair(pred, truth, None)
    structure = ndimage.generate_binary_structure(pred.ndim, pred.ndim)
    pred_labels, n_pred = ndimage.label(pred, structure=structure)
    true_labels, n_true = ndimage.label(truth, structure=structure)
    overlap = pred & truth
    pred_hit = np.unique(pred_labels[overlap])
    true_hit = np.unique(true_labels[overlap])
    tp = int(np.count_nonzero(pred_hit))
    detected = int(np.count_nonzero(true_hit))
    return {"n_pred": int(n_pred), "n_true": int(n_true), "tp": tp, "fp": int(n_pred) - tp,
            "fn": int(n_true) - detected, "n_true_detected": detected}


def slice_dices(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice of each slice along axis 0, with an empty/empty slice scored 1 (S-Net's convention)."""
    pred, truth, _ = _check_pair(pred, truth, None)
    axes = tuple(range(1, pred.ndim))
    inter = np.logical_and(pred, truth).sum(axis=axes).astype(np.float64)
    total = pred.sum(axis=axes).astype(np.float64) + truth.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(total == 0, 1.0, 2.0 * inter / np.where(total == 0, 1.0, total))
    return values


def snet_slice_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """S-Net's published per-slice Dice: mean over all slices, empty/empty slices scoring 1."""
    values = slice_dices(pred, truth)
    return float(values.mean()) if values.size else float("nan")


def labelled_slice_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-slice Dice over slices whose truth is non-empty (NaN when no slice is labelled)."""
    pred, truth, _ = _check_pair(pred, truth, None)
    values = slice_dices(pred, truth)
    labelled = truth.reshape(truth.shape[0], -1).any(axis=1)
    return float(values[labelled].mean()) if labelled.any() else float("nan")


def case_metrics(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float],
                 tolerance_mm: float = 2.0) -> dict[str, Any]:
    """All metrics of one case and structure, with the empty-mask status (see module docstring).

    ``spacing`` in mm in the arrays' axis order; slices for the per-slice Dice run along axis 0.
    """
    pred, truth, spacing = _check_pair(pred, truth, spacing)
    pred_empty, truth_empty = not pred.any(), not truth.any()
    status = ("both_empty" if pred_empty and truth_empty else "pred_empty" if pred_empty
              else "truth_empty" if truth_empty else "both_present")
    if status == "both_present":
        forward = directed_surface_distances(pred, truth, spacing)
        backward = directed_surface_distances(truth, pred, spacing)
        hd = float(max(np.percentile(forward, 95), np.percentile(backward, 95)))
        within = int((forward <= tolerance_mm).sum()) + int((backward <= tolerance_mm).sum())
        surface_dice = within / (forward.size + backward.size)
    else:
        hd = hd95(pred, truth, spacing)
        surface_dice = nsd(pred, truth, tolerance_mm, spacing)
    voxel_mm3 = float(np.prod(spacing))
    result: dict[str, Any] = {
        "empty_status": status,
        "dice": dice(pred, truth),
        "iou": iou(pred, truth),
        "hd95_mm": hd,
        "nsd": surface_dice,
        "nsd_tolerance_mm": float(tolerance_mm),
        "pred_volume_mm3": float(pred.sum()) * voxel_mm3,
        "truth_volume_mm3": float(truth.sum()) * voxel_mm3,
        "n_slices": int(pred.shape[0]),
        "n_labelled_slices": int(truth.reshape(truth.shape[0], -1).any(axis=1).sum()),
        "snet_slice_dice": snet_slice_dice(pred, truth),
        "labelled_slice_dice": labelled_slice_dice(pred, truth),
    }
    result.update(lesion_detection(pred, truth))
    return result


def _summary(values: Sequence[float]) -> dict[str, float | int | None]:
    arr = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "median": None, "std": None, "n": 0}
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std(ddof=0)),
            "n": int(arr.size)}


def aggregate_cases(per_case: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means/medians over cases (both-empty cases excluded, NaN-free), counts and lesion totals."""
    statuses = [c["empty_status"] for c in per_case]
    summary: dict[str, Any] = {
        "n_cases": len(per_case),
        "n_both_empty": statuses.count("both_empty"),
        "n_pred_empty": statuses.count("pred_empty"),
        "n_truth_empty": statuses.count("truth_empty"),
        "n_both_present": statuses.count("both_present"),
        "empty_mask_policy": EMPTY_MASK_POLICY,
    }
    for key in ("dice", "iou", "hd95_mm", "nsd", "snet_slice_dice", "labelled_slice_dice"):
        summary[key] = _summary([c[key] for c in per_case])
    totals = {k: int(sum(c[k] for c in per_case)) for k in ("n_pred", "n_true", "tp", "fp", "fn",
                                                           "n_true_detected")}
    n = len(per_case)
    totals["fp_per_scan"] = totals["fp"] / n if n else None
    totals["sensitivity"] = totals["n_true_detected"] / totals["n_true"] if totals["n_true"] else None
    totals["precision"] = totals["tp"] / totals["n_pred"] if totals["n_pred"] else None
    summary["lesions"] = totals
    return summary
