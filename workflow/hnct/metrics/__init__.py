"""Evaluation metrics: :mod:`hnct.metrics.classification` (T4 vs non-T4) and
:mod:`hnct.metrics.segmentation` (masks). Plain functions on numpy arrays, cross-checked against
scikit-learn (classification) in the tests."""

from __future__ import annotations

import math
from typing import Any


def json_safe(value: Any) -> Any:
    """NaN -> None (strict JSON ``null``), recursively through dicts, lists and tuples: how every
    metrics file (evaluate, segeval) writes an undefined metric."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
