"""roi_table: the ROI names (and mask files) that matched no structure, as one names x cases table.

``results/report/unmatched_rois.tsv``: one row per name that :mod:`hnct.convert` could not match to
any of ``convert.structures`` in at least one case (an RTSTRUCT ROI name, a SEG segment label, a
mask file; each volume sidecar's ``unmatched_rois``), columns ``roi_name``, ``n_cases`` and one
column per converted case (1 where that case had the name, 0 where not); rows sorted by
``n_cases`` (most first), then name. Excluded cases have no column (they are in exclusions.tsv). A
name that appears here is a candidate for ``convert.structure_names``: it was not used, and the
table says so instead of dropping it silently. The header is always written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Iterable

from hnct.common import atomic_path, is_ok, read_sidecar, setup_logging

log = logging.getLogger("hnct.roi_table")


def unmatched_table(sidecars: Iterable[str | Path]):
    """The names x cases table of unmatched ROI names (module docstring) as a DataFrame."""
    import pandas as pd

    by_case = {}
    for path in sidecars:
        sidecar = read_sidecar(path)
        if is_ok(sidecar):
            by_case[str(sidecar["case"])] = set(sidecar.get("unmatched_rois") or [])
    cases = sorted(by_case)
    names = sorted(set().union(*by_case.values())) if by_case else []
    table = pd.DataFrame({case: [int(name in by_case[case]) for name in names] for case in cases}, index=names,
                         dtype=int)
    table.insert(0, "n_cases", table.sum(axis=1) if cases else 0)
    table.index.name = "roi_name"
    table = table.reset_index().sort_values(["n_cases", "roi_name"], ascending=[False, True], kind="stable")
    return table.reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnct roi_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecars", nargs="*", default=[], help="volume sidecars (results/volumes/{case}.json)")
    parser.add_argument("--out", required=True, help="output TSV")
    parser.add_argument("--log", default=None)
    args = parser.parse_args(argv)
    setup_logging(args.log)
    table = unmatched_table(args.sidecars)
    with atomic_path(args.out, suffix=".tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    log.info("%d unmatched ROI name(s) over %d case(s) -> %s", len(table), len(table.columns) - 2, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
