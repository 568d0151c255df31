"""Segmentation metrics for binary masks after Metrics Reloaded (Maier-Hein et al., Nat. Methods 2024).

All functions take boolean (or 0/1) arrays of one structure and the voxel ``spacing`` in mm **in the
array's axis order** (for a SimpleITK array ``(z, y, x)`` pass ``spacing[::-1]`` of the image).

Segmentation quality (over cases whose **reference holds the structure**)
--------------------------------------------------------------------------
* **Dice** = 2|P∩T| / (|P| + |T|); **IoU** = |P∩T| / |P∪T| (0 when the prediction is empty).
* **HD95** and **NSD** come from MONAI through :func:`surface_distances` (the only place they are
  computed): ``compute_hausdorff_distance(percentile=95, directed=False, spacing=...)`` = max of the
  two directed 95th percentiles of surface distances, and ``compute_surface_dice(class_thresholds=
  [tolerance_mm], spacing=...)`` (surface voxels, a distance <= the tolerance counts). Surface
  voxels are a mask minus its face-connected erosion, outside the array is background.
* A case whose prediction is empty has **no finite HD95**: it is never given a stand-in distance
  (no image diagonal), never enters a mean; the summary gives the **median** HD95 over cases with
  both masks present and the number of reference-present cases without a finite distance
  (``n_hd95_not_finite``). Its NSD is 0 (no predicted surface lies near the reference).

Detection (reported separately)
-------------------------------
* Components: connected components of P and T (full connectivity: 26 in 3D, 8 in 2D).
* **Matching**: a predicted and a true component match when their IoU (as sets of voxels) is
  ``>= iou_threshold`` (``evaluate.detection_iou``); pairs are matched one to one, best IoU first
  (``scipy.optimize.linear_sum_assignment``), so one voxel of overlap is not a detection.
  ``tp`` = matched pairs, ``fp`` = unmatched predicted components, ``fn`` = unmatched true ones.
* **Per-case sensitivity**: reference-present cases with at least one matched component / all
  reference-present cases. **False-positive rate**: structure-negative cases (empty reference) whose
  prediction is not empty / all structure-negative cases. Lesion-wise sensitivity = Σtp / Σn_true,
  precision = Σtp / Σn_pred.
* A case with both masks empty is a true negative for detection and is in no segmentation mean.

S-Net's per-slice Dice (``snet_slice_dice``) scores every axial slice (axis 0), an empty/empty slice
scoring 1 as S-Net's published code does, averaged over all slices; ``labelled_slice_dice``
averages over slices whose truth is not empty only. The first rewards the many empty slices and is
not comparable to a 3D Dice.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

# The summary of per-case rows lives apart (no MONAI import): the report's environment reads it too.
from hnct.metrics.segmentation_summary import (SUMMARY_METRICS, case_arrays, finite_values,  # noqa: F401
                                               summarise_arrays, summarise_cases)

EMPTY_MASK_POLICY = (
    "Metrics Reloaded: Dice, IoU and NSD are averaged over cases whose reference holds the structure "
    "(an empty prediction scores Dice 0, IoU 0, NSD 0); HD95 (MONAI, max of the two directed 95th "
    "percentiles) is summarised as the median over cases with both masks present, and a "
    "reference-present case with an empty prediction has no finite HD95: it is counted in "
    "n_hd95_not_finite, never given a stand-in distance. Cases with an empty reference enter only the "
    "detection metrics (false-positive rate); both empty: a true negative. Components match at "
    "IoU >= the detection threshold, one to one."
)
# The per-case statuses (reference = truth).
STATUSES = ("both_present", "pred_empty", "truth_empty", "both_empty")

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


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient; NaN when both masks are empty (Metrics Reloaded: no reference, no score)."""
    pred, truth = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return float("nan")
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard); NaN when both masks are empty (Metrics Reloaded: no reference, no score)."""
    pred, truth = _as_bool(pred, "pred"), _as_bool(truth, "truth")
    union = int(np.logical_or(pred, truth).sum())
    if union == 0:
        return float("nan")
    return int(np.logical_and(pred, truth).sum()) / union


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float] | None,
                      tolerance_mm: float) -> dict[str, float | None]:
    """HD95 (mm) and NSD at ``tolerance_mm`` of one structure, from MONAI; the one place both are computed.

    ``spacing_mm`` in the arrays' axis order. ``{"hd95": float | None, "nsd": float | None}``: both
    present: MONAI's ``compute_hausdorff_distance(percentile=95, directed=False)`` and
    ``compute_surface_dice(class_thresholds=[tolerance_mm])``; reference present, prediction empty:
    HD95 None (no finite distance), NSD 0.0; reference empty: both None (detection only).
    """
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred, ref, spacing = _check_pair(pred, ref, spacing_mm)
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    if not ref.any():
        return {"hd95": None, "nsd": None}
    if not pred.any():
        return {"hd95": None, "nsd": 0.0}
    y_pred = torch.from_numpy(np.ascontiguousarray(pred)[None, None])
    y = torch.from_numpy(np.ascontiguousarray(ref)[None, None])
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about its own internal use of a deprecated get_mask_edges argument.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, directed=False,
                                        spacing=list(spacing))
        surface_dice = compute_surface_dice(y_pred, y, class_thresholds=[float(tolerance_mm)],
                                            include_background=True, spacing=list(spacing))
    return {"hd95": float(hd.reshape(-1)[0]), "nsd": float(surface_dice.reshape(-1)[0])}


def match_components(pred: np.ndarray, truth: np.ndarray, iou_threshold: float) -> dict[str, int]:
    """Component-wise detection counts, matching components by IoU >= ``iou_threshold`` one to one.

    ``n_pred``, ``n_true`` (connected components, full connectivity), ``tp`` (matched pairs),
    ``fp`` = n_pred - tp, ``fn`` = n_true - tp.
    """
    pred, truth, _ = _check_pair(pred, truth, None)
    if not 0 < iou_threshold <= 1:
        raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
    structure = ndimage.generate_binary_structure(pred.ndim, pred.ndim)
    pred_labels, n_pred = ndimage.label(pred, structure=structure)
    true_labels, n_true = ndimage.label(truth, structure=structure)
    tp = 0
    if n_pred and n_true:
        both = pred & truth
        # Voxel counts of every (predicted, true) pair that overlaps, and of every component.
        overlap = np.zeros((n_pred + 1, n_true + 1), dtype=np.int64)
        np.add.at(overlap, (pred_labels[both], true_labels[both]), 1)
        overlap = overlap[1:, 1:]
        pred_size = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)[1:]
        true_size = np.bincount(true_labels.ravel(), minlength=n_true + 1)[1:]
        pair_iou = overlap / (pred_size[:, None] + true_size[None, :] - overlap)
        rows, cols = linear_sum_assignment(pair_iou, maximize=True)
        tp = int(np.sum(pair_iou[rows, cols] >= iou_threshold))
    return {"n_pred": int(n_pred), "n_true": int(n_true), "tp": tp, "fp": int(n_pred) - tp, "fn": int(n_true) - tp}


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
                 tolerance_mm: float = 2.0, iou_threshold: float = 0.1) -> dict[str, Any]:
    """All metrics of one case and structure, with its empty-mask status (see the module docstring).

    ``spacing`` in mm in the arrays' axis order; slices for the per-slice Dice run along axis 0.
    None marks a metric that this case does not have (HD95 of an empty prediction, anything
    segmentation-wise of an empty reference).
    """
    pred, truth, spacing = _check_pair(pred, truth, spacing)
    pred_empty, truth_empty = not pred.any(), not truth.any()
    status = ("both_empty" if pred_empty and truth_empty else "pred_empty" if pred_empty
              else "truth_empty" if truth_empty else "both_present")
    distances = surface_distances(pred, truth, spacing, tolerance_mm)
    detection = match_components(pred, truth, iou_threshold)
    voxel_mm3 = float(np.prod(spacing))
    result: dict[str, Any] = {
        "empty_status": status,
        "dice": None if truth_empty else dice(pred, truth),
        "iou": None if truth_empty else iou(pred, truth),
        "hd95_mm": distances["hd95"],
        "nsd": distances["nsd"],
        "nsd_tolerance_mm": float(tolerance_mm),
        "detected": None if truth_empty else bool(detection["tp"] > 0),
        "false_positive": bool(truth_empty and not pred_empty),
        "detection_iou": float(iou_threshold),
        "pred_volume_mm3": float(pred.sum()) * voxel_mm3,
        "truth_volume_mm3": float(truth.sum()) * voxel_mm3,
        "n_slices": int(pred.shape[0]),
        "n_labelled_slices": int(truth.reshape(truth.shape[0], -1).any(axis=1).sum()),
        "snet_slice_dice": snet_slice_dice(pred, truth),
        "labelled_slice_dice": labelled_slice_dice(pred, truth),
    }
    result.update(detection)
    return result


def aggregate_cases(per_case: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One fold's summary: counts, the distribution of each per-case metric (``dice``: mean, median,
    std, n over the cases that have it) and the headline numbers under ``summary``
    (``summarise_cases``: what the report's per-fold columns show)."""
    statuses = [c["empty_status"] for c in per_case]
    summary: dict[str, Any] = {
        "n_cases": len(per_case),
        "n_reference_present": statuses.count("both_present") + statuses.count("pred_empty"),
        "n_reference_absent": statuses.count("truth_empty") + statuses.count("both_empty"),
        **{f"n_{status}": statuses.count(status) for status in STATUSES},
        "empty_mask_policy": EMPTY_MASK_POLICY,
    }
    for key in ("dice", "iou", "hd95_mm", "nsd", "snet_slice_dice", "labelled_slice_dice"):
        values = finite_values(c[key] for c in per_case)
        summary[key] = ({"mean": float(values.mean()), "median": float(np.median(values)),
                         "std": float(values.std(ddof=0)), "n": int(values.size)} if values.size
                        else {"mean": None, "median": None, "std": None, "n": 0})
    summary["summary"] = summarise_cases(per_case)
    summary["lesions"] = {k: int(sum(c[k] for c in per_case)) for k in ("n_pred", "n_true", "tp", "fp", "fn")}
    return summary
