"""The Metrics Reloaded summary of per-case segmentation rows (hnct.metrics.segmentation defines the
per-case metrics): what segeval writes per fold under ``summary`` and the report pools over folds
and resamples for its intervals. numpy and pandas only, so the report's environment needs no MONAI.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd


# The headline numbers of a set of cases (one fold, or every fold pooled), by name.
SUMMARY_METRICS = ("dice", "iou", "nsd", "hd95_median_mm", "n_hd95_not_finite", "case_sensitivity",
                   "fp_rate_negative", "lesion_sensitivity", "lesion_precision", "snet_slice_dice")


def finite_values(values: Iterable[Any]) -> np.ndarray:
    arr = _numbers(values)
    return arr[np.isfinite(arr)]


def _numbers(values: Iterable[Any]) -> np.ndarray:
    """float64 array, None/empty -> NaN."""
    return pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").to_numpy(np.float64)


def _mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def case_arrays(cases: pd.DataFrame | Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-case rows (``case_metrics`` dicts or per_case.csv) as numpy columns, for ``summarise_arrays``."""
    table = pd.DataFrame(list(cases)) if not isinstance(cases, pd.DataFrame) else cases
    status = table["empty_status"].astype(str).to_numpy() if len(table) else np.zeros(0, dtype=str)
    arrays = {key: _numbers(table[key]) if len(table) else np.zeros(0)
              for key in ("dice", "iou", "nsd", "hd95_mm", "n_true", "n_pred", "tp", "snet_slice_dice")}
    arrays["present"] = np.isin(status, ("both_present", "pred_empty"))
    arrays["both_present"] = status == "both_present"
    arrays["pred_empty"] = status == "pred_empty"
    return arrays


def summarise_arrays(arrays: dict[str, np.ndarray], index: np.ndarray | None = None) -> dict[str, float]:
    """``summarise_cases`` on the rows ``index`` (all rows when None; repeats allowed: a bootstrap)."""
    a = arrays if index is None else {key: value[index] for key, value in arrays.items()}
    if a["present"].size == 0:
        return {name: float("nan") for name in SUMMARY_METRICS}
    present, negative = a["present"], ~a["present"]
    hd95 = a["hd95_mm"][a["both_present"]]
    hd95 = hd95[np.isfinite(hd95)]
    n_true, n_pred, tp = float(a["n_true"].sum()), float(a["n_pred"].sum()), float(a["tp"].sum())
    return {
        "dice": _mean(a["dice"][present]),
        "iou": _mean(a["iou"][present]),
        "nsd": _mean(a["nsd"][present]),
        "hd95_median_mm": float(np.median(hd95)) if hd95.size else float("nan"),
        "n_hd95_not_finite": float(a["pred_empty"].sum()),
        "case_sensitivity": float((a["tp"][present] > 0).mean()) if present.any() else float("nan"),
        "fp_rate_negative": float((a["n_pred"][negative] > 0).mean()) if negative.any() else float("nan"),
        "lesion_sensitivity": tp / n_true if n_true else float("nan"),
        "lesion_precision": tp / n_pred if n_pred else float("nan"),
        "snet_slice_dice": _mean(a["snet_slice_dice"]),
    }


def summarise_cases(cases: pd.DataFrame | Sequence[dict[str, Any]]) -> dict[str, float]:
    """The headline summary (``SUMMARY_METRICS``) of per-case rows (``case_metrics`` dicts or per_case.csv).

    Segmentation means over reference-present cases; HD95 as the median over both-present cases
    and the count without a finite HD95; detection per case and per component. NaN where a
    metric has no case to average over (no reference-present case, no structure-negative case).
    """
    return summarise_arrays(case_arrays(cases))
