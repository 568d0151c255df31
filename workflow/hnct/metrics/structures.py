"""Per-structure, per-case metrics of multi-structure 3D segmentation (task ``oar``).

:func:`case_structure_metrics` is what the evaluation of every case calls: one row per structure with
Dice, HD95 (mm) and NSD (surface Dice at the structure's tolerance, mm), HD95 and NSD from MONAI
(``monai.metrics.compute_hausdorff_distance(percentile=95)``, ``compute_surface_dice``) on the
case's physical spacing. The cases where a metric is undefined are counted, never averaged away:

``scored``          reference and prediction both non-empty: Dice, HD95, NSD
``missed``          reference non-empty, prediction empty: Dice 0, NSD 0, HD95 missing (counted in
                    ``n_hd95_missing``; no infinity, no image-diagonal stand-in)
``false_positive``  reference empty, prediction not: no Dice/HD95/NSD, counted in its own column
``both_empty``      nothing to score: excluded and counted
``not_annotated``   the structure is unknown for this case (sidecar ``annotated: false``): listed,
                    never scored (it is not background)

:func:`summarise` gives per-structure mean, median, IQR, n and those counts (metrics.json).
Arrays are (z, y, x); ``spacing_zyx`` in mm in the same axis order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

STATUSES = ("scored", "missed", "false_positive", "both_empty", "not_annotated")
ROW_COLUMNS = ("structure", "status", "dice", "hd95_mm", "nsd", "nsd_tolerance_mm", "ref_voxels",
               "pred_voxels")


def _one_hot(mask: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(mask, dtype=bool))[None, None]


def monai_hd95(pred: np.ndarray, ref: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) of two non-empty boolean masks (MONAI)."""
    from monai.metrics import compute_hausdorff_distance

    value = compute_hausdorff_distance(_one_hot(pred), _one_hot(ref), include_background=True,
                                       percentile=95, directed=False, spacing=list(map(float, spacing_zyx)))
    return float(value.reshape(-1)[0])


def monai_nsd(pred: np.ndarray, ref: np.ndarray, tolerance_mm: float, spacing_zyx: Sequence[float]) -> float:
    """Normalised surface Dice at ``tolerance_mm`` of two non-empty boolean masks (MONAI)."""
    from monai.metrics import compute_surface_dice

    value = compute_surface_dice(_one_hot(pred), _one_hot(ref), [float(tolerance_mm)], include_background=True,
                                 spacing=list(map(float, spacing_zyx)))
    return float(value.reshape(-1)[0])


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P∩R| / (|P| + |R|); NaN when both are empty."""
    total = int(pred.sum()) + int(ref.sum())
    return 2.0 * int(np.logical_and(pred, ref).sum()) / total if total else math.nan


def tolerance_of(structure: str, tolerances: Mapping[str, float], default_mm: float) -> float:
    """The NSD tolerance (mm) of ``structure``: its entry in ``tolerances`` (names matched
    case-insensitively), else ``default_mm``."""
    by_name = {str(name).lower(): float(mm) for name, mm in tolerances.items()}
    return by_name.get(structure.lower(), float(default_mm))


def structure_row(structure: str, pred: np.ndarray, ref: np.ndarray, annotated: bool,
                  spacing_zyx: Sequence[float], tolerance_mm: float) -> dict[str, Any]:
    """One structure of one case (see the module doc for the statuses)."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"structure {structure}: prediction shape {pred.shape} differs from reference {ref.shape}")
    row = {"structure": structure, "dice": math.nan, "hd95_mm": math.nan, "nsd": math.nan,
           "nsd_tolerance_mm": float(tolerance_mm), "ref_voxels": int(ref.sum()), "pred_voxels": int(pred.sum())}
    if not annotated:
        return {**row, "status": "not_annotated"}
    has_ref, has_pred = row["ref_voxels"] > 0, row["pred_voxels"] > 0
    if not has_ref and not has_pred:
        return {**row, "status": "both_empty"}
    if not has_ref:
        return {**row, "status": "false_positive"}
    if not has_pred:
        return {**row, "status": "missed", "dice": 0.0, "nsd": 0.0}
    return {**row, "status": "scored", "dice": dice(pred, ref), "hd95_mm": monai_hd95(pred, ref, spacing_zyx),
            "nsd": monai_nsd(pred, ref, tolerance_mm, spacing_zyx)}


def case_structure_metrics(pred: np.ndarray, ref: np.ndarray, names: Sequence[str], annotated: Sequence[bool],
                           spacing_zyx: Sequence[float], tolerances: Mapping[str, float],
                           default_tolerance_mm: float) -> list[dict[str, Any]]:
    """Rows of :func:`structure_row` for every channel of (C, z, y, x) ``pred`` and ``ref``."""
    if len(names) != len(annotated) or pred.shape[0] != len(names) or ref.shape[0] != len(names):
        raise ValueError(f"{len(names)} structure names, {len(annotated)} annotated flags, prediction "
                         f"channels {pred.shape[0]}, reference channels {ref.shape[0]}: they must agree")
    return [structure_row(name, pred[c], ref[c], bool(annotated[c]), spacing_zyx,
                          tolerance_of(name, tolerances, default_tolerance_mm))
            for c, name in enumerate(names)]


def _stats(values: np.ndarray) -> dict[str, float | int | None]:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"mean": None, "median": None, "q1": None, "q3": None, "n": 0}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"mean": float(values.mean()), "median": float(median), "q1": float(q1), "q3": float(q3),
            "n": int(values.size)}


def summarise(rows) -> dict[str, Any]:
    """Per structure (in first-seen order): ``dice``, ``hd95_mm``, ``nsd`` statistics over the cases
    that define them, and the counts ``n_<status>`` and ``n_hd95_missing``; plus ``mean_dice``, the
    mean over structures of their mean Dice."""
    import pandas as pd

    table = pd.DataFrame(list(rows) if not isinstance(rows, pd.DataFrame) else rows)
    out: dict[str, Any] = {"structures": {}}
    if table.empty:
        out["mean_dice"] = None
        return out
    for name in dict.fromkeys(table["structure"]):
        part = table[table["structure"] == name]
        entry = {metric: _stats(part[metric].to_numpy(float)) for metric in ("dice", "hd95_mm", "nsd")}
        for status in STATUSES:
            entry[f"n_{status}"] = int((part["status"] == status).sum())
        entry["n_hd95_missing"] = entry["n_missed"]
        out["structures"][str(name)] = entry
    means = [e["dice"]["mean"] for e in out["structures"].values() if e["dice"]["mean"] is not None]
    out["mean_dice"] = float(np.mean(means)) if means else None
    return out
