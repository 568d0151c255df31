"""exclusions: every case the workflow could not use, with its stage, file and reason.

``results/exclusions.tsv`` (columns ``case, stage, file, reason``; header always present, rows
sorted by case then stage) gathers

* one row per case whose per-case sidecar (``results/slices/{case}.json``) is ``excluded``, with
  the stage that excluded it (``excluded_at``: ``convert``, ``crop``, ...), and
* the rows of each task's ``results/folds/{task}/excluded.tsv`` (cases a task cannot use, e.g. no
  T-stage label), whose stage names the task (``folds:classify``). A folds table repeats the
  upstream exclusions with their original stage; those duplicates are written once.

The report's cohort table counts these cases; nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Iterable

import pandas as pd

from hnct.common import atomic_path, is_ok, read_sidecar, setup_logging

log = logging.getLogger("hnct.exclusions")

COLUMNS = ["case", "stage", "file", "reason"]


def sidecar_exclusions(sidecars: Iterable[str | Path]) -> pd.DataFrame:
    """One row per excluded per-case sidecar, keeping the stage that excluded the case."""
    rows = []
    for path in sidecars:
        sidecar = read_sidecar(path)
        if is_ok(sidecar):
            continue
        rows.append({
            "case": str(sidecar["case"]),
            "stage": str(sidecar.get("excluded_at") or sidecar.get("stage") or ""),
            "file": str(sidecar.get("file") or ""),
            "reason": str(sidecar.get("reason") or "excluded (no reason recorded)"),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def fold_exclusions(tables: Iterable[str | Path]) -> pd.DataFrame:
    """The rows of every ``results/folds/{task}/excluded.tsv``; a bare ``folds`` stage gets its task."""
    frames = []
    for path in tables:
        path = Path(path)
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(COLUMNS)})")
        task = path.parent.name
        table = table[COLUMNS].copy()
        table.loc[table["stage"] == "folds", "stage"] = f"folds:{task}"
        frames.append(table)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def collect(sidecars: Iterable[str | Path], fold_excluded_tables: Iterable[str | Path],
            out_tsv: str | Path) -> pd.DataFrame:
    """Write ``exclusions.tsv`` from the per-case sidecars and the folds' excluded tables."""
    table = pd.concat([sidecar_exclusions(sidecars), fold_exclusions(fold_excluded_tables)], ignore_index=True)
    table = table.astype(str).drop_duplicates().sort_values(COLUMNS).reset_index(drop=True)
    with atomic_path(out_tsv, suffix=".tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False, lineterminator="\n")
    for stage, count in table["stage"].value_counts().sort_index().items():
        log.info("excluded at %s: %d case(s)", stage, count)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnct exclusions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecars", nargs="*", default=[], help="per-case sidecars (results/slices/*.json)")
    parser.add_argument("--fold-excluded", nargs="*", default=[], help="results/folds/{task}/excluded.tsv")
    parser.add_argument("--out", required=True, help="results/exclusions.tsv")
    parser.add_argument("--log", help="log file (also logged to stderr)")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    collect(args.sidecars, args.fold_excluded, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
