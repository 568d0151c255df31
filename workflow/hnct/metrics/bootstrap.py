"""Patient-level (cluster) bootstrap, stratified by class, for every interval in the report.

A patient's scans are not independent observations: LaryngealCT has patients with two scans, and
resampling scans one by one would treat them as two patients and narrow every interval. Here the
unit of resampling is the **patient** (the cluster): each resample draws, with replacement and
within each stratum, as many patients as the stratum holds, and takes **all** rows (scans, cases)
of every drawn patient, as often as the patient was drawn.

The strata are the patients' classes (classification: any scan T4; segmentation: any scan whose
reference holds the structure), so every resample keeps both classes whenever the data have them
and the metrics that need both (AUC, sensitivity, the false-positive rate) stay defined.

The interval is the percentile interval of the resampled statistic (numpy's linear quantiles),
seeded from ``report.seed``; a resample on which a statistic is undefined (NaN) is left out of
that statistic's percentiles, and the number of resamples used is returned beside it.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np


def cluster_strata(clusters: Sequence[Any], row_strata: Sequence[Any]) -> dict[Any, Any]:
    """One stratum per cluster: the largest of its rows' strata (a patient with one T4 scan is T4)."""
    strata: dict[Any, Any] = {}
    for cluster, stratum in zip(clusters, row_strata):
        strata[cluster] = stratum if cluster not in strata else max(strata[cluster], stratum)
    return strata


def cluster_bootstrap_indices(clusters: Sequence[Any], row_strata: Sequence[Any], n_bootstrap: int,
                              seed: int) -> Iterator[np.ndarray]:
    """``n_bootstrap`` arrays of row indices, each one stratified resample of whole clusters.

    ``clusters``: the patient of every row; ``row_strata``: every row's class. The rows of a drawn
    patient appear together (all of them, once per draw), so two scans of one patient are always
    both in a resample or both out of it.
    """
    clusters = list(clusters)
    if len(clusters) != len(row_strata):
        raise ValueError(f"{len(clusters)} clusters for {len(row_strata)} rows")
    rows_of: dict[Any, list[int]] = {}
    for row, cluster in enumerate(clusters):
        rows_of.setdefault(cluster, []).append(row)
    strata = cluster_strata(clusters, row_strata)
    by_stratum: dict[Any, list[np.ndarray]] = {}
    for cluster, rows in rows_of.items():
        by_stratum.setdefault(strata[cluster], []).append(np.asarray(rows, dtype=np.int64))
    groups = [by_stratum[s] for s in sorted(by_stratum)]
    rng = np.random.default_rng(seed)
    for _ in range(n_bootstrap):
        drawn: list[np.ndarray] = []
        for members in groups:
            for pick in rng.integers(0, len(members), size=len(members)):
                drawn.append(members[pick])
        yield np.concatenate(drawn) if drawn else np.zeros(0, dtype=np.int64)


def bootstrap_intervals(statistic: Callable[[np.ndarray], dict[str, float]], clusters: Sequence[Any],
                        row_strata: Sequence[Any], n_bootstrap: int, seed: int,
                        alpha: float = 0.05) -> dict[str, dict[str, float]]:
    """The estimate on all rows and its percentile CI, per statistic name.

    ``statistic(indices)`` returns ``{name: value}`` on the rows ``indices``; the estimate is
    ``statistic(all rows)``. Returns ``{name: {"estimate", "ci_low", "ci_high", "n_resamples"}}``
    (``ci_*`` NaN when no resample gave a finite value, or when ``n_bootstrap`` is 0).
    """
    n_rows = len(clusters)
    estimate = statistic(np.arange(n_rows))
    draws: dict[str, list[float]] = {name: [] for name in estimate}
    for index in cluster_bootstrap_indices(clusters, row_strata, n_bootstrap, seed):
        with np.errstate(all="ignore"):
            values = statistic(index)
        for name, value in values.items():
            if value is not None and np.isfinite(value):
                draws[name].append(float(value))
    out = {}
    for name, point in estimate.items():
        values = draws[name]
        low, high = (np.quantile(values, [alpha / 2, 1 - alpha / 2]) if values else (math.nan, math.nan))
        out[name] = {"estimate": math.nan if point is None else float(point), "ci_low": float(low),
                     "ci_high": float(high), "n_resamples": len(values)}
    return out
