"""folds{task}: patient-level, stratified, seeded cross-validation folds (and an optional test set).

Inputs: the cohort table (``results/cohort.tsv``, see :mod:`hnct.cohort`) and the sidecar of the
last per-case stage of every case (``results/slices/{case}.json``, ok or excluded). Outputs in
``results/folds/{task}/``:

``folds.tsv``           ``case, patient, collection, label, fold`` (fold ``0..n-1`` or ``test``),
                        one row per usable case, sorted by case.
``splits_final.json``   nnU-Net's format: a list (one per fold) of ``{"train": [...], "val": [...]}``
                        (sorted case IDs; test cases are in neither).
``excluded.tsv``        ``case, stage, file, reason`` of every case this task cannot use: excluded
                        upstream (original stage kept) or at fold time (stage ``folds:<task>``).
``fold{k}_slices.tsv``  segment only (``slices`` subcommand): ``case, patient, slice, npz, positive,
                        split`` (split ``train``/``val``), every slice of fold k's train and val
                        cases (``patient``: the trainer's inner split, :func:`inner_split`, groups by it).

Task labels: classify = the cohort's ``label_t4`` (empty: excluded, "no T-stage label");
segment = node-positive = any slice of the case's index has ``n_<structure> > 0``.

Splitting: the held-out test set is taken first (``test``: ``none``; ``column``: cohort
``split == "test"``, widened to every scan of a patient with one test scan; ``fraction``: that
fraction of the patients of each class, seeded). The rest goes to scikit-learn's
``StratifiedGroupKFold(n_folds, shuffle=True, random_state=...)`` grouped by patient and
stratified by the task label. Its greedy assignment can leave a fold one or two positives off
the cohort ratio when groups are uneven, so ``N_SHUFFLES`` seeded shuffles (the first one is
``random_state=seed`` itself, the others drawn from ``numpy.random.default_rng(seed)``) are
tried and the one whose worst fold is closest to the cohort's class ratio is kept (ties: the
earliest). Everything is a function of the inputs and the seed: the files are byte-identical
for the same inputs and seed (sorted rows, no timestamps).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from hnct.cohort import CohortError, read_cohort, write_cohort
from hnct.common import atomic_path, is_ok, progress, read_sidecar, setup_logging
from hnct.splits import INNER_REMEDY, FoldError, inner_split  # noqa: F401  (re-exported: the folds' API)
from hnct.tasks import add_plugins_argument, load_plugins

log = logging.getLogger("hnct.folds")

TEST_MODES = ("none", "column", "fraction")
# Seeded StratifiedGroupKFold shuffles tried; the most balanced one is kept (see module doc).
N_SHUFFLES = 32
FOLDS_COLUMNS = ["case", "patient", "collection", "label", "fold"]
EXCLUDED_COLUMNS = ["case", "stage", "file", "reason"]
FOLD_SLICES_COLUMNS = ["case", "patient", "slice", "npz", "positive", "split"]


# ---------------------------------------------------------------------------------------------
# Labels


def _read_sidecars(sidecar_paths: Iterable[str | Path]) -> dict[str, tuple[Path, dict]]:
    sidecars: dict[str, tuple[Path, dict]] = {}
    for path in sidecar_paths:
        sidecar = read_sidecar(path)
        sidecars[str(sidecar["case"])] = (Path(path), sidecar)
    return sidecars


def _excluded_upstream(case: str, sidecar: dict) -> dict:
    return {
        "case": case,
        "stage": str(sidecar.get("excluded_at") or sidecar.get("stage") or "upstream"),
        "file": str(sidecar.get("file", "")),
        "reason": str(sidecar.get("reason") or "excluded upstream"),
    }


def structure_column(index: pd.DataFrame, structure: str) -> str | None:
    wanted = f"n_{structure}".lower()
    matches = [c for c in index.columns if c.lower() == wanted]
    return matches[0] if matches else None


def task_labels(
    cohort: pd.DataFrame,
    task: str,
    sidecar_paths: Iterable[str | Path],
    structure: str = "GTVn",
    cohort_file: str = "results/cohort.tsv",
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Usable cases with their task label (``case, patient, collection, label, split``) and the excluded ones.

    Every cohort case needs a sidecar (the stage the task reads: its registry entry's
    ``fold_sidecars``); a case whose sidecar is ``excluded`` keeps its upstream stage, file and
    reason. The label and the task's own exclusions come from the task's ``case_label`` (classify:
    ``label_t4``; segment: any voxel of ``structure`` in the case's slice index).
    """
    from hnct.tasks import get_task

    try:
        spec = get_task(task)
    except ValueError as error:
        raise FoldError(str(error)) from None
    options = {"structure": structure}
    sidecars = _read_sidecars(sidecar_paths)
    missing = sorted(set(cohort["case"]) - set(sidecars))
    if missing:
        raise FoldError(f"task {task}: no per-case sidecar for {len(missing)} cohort case(s): {missing[:5]}")
    rows, excluded = [], []
    for case in progress(sorted(cohort["case"]), every=200, what=f"{task} labels"):
        row = cohort.loc[case]
        path, sidecar = sidecars[case]
        if not is_ok(sidecar):
            excluded.append(_excluded_upstream(case, sidecar))
            continue
        label, exclusion = spec.case_label(case, row, path, sidecar, cohort_file, options)
        if exclusion is not None:
            excluded.append(exclusion)
            continue
        rows.append({"case": case, "patient": row["patient"], "collection": row["collection"],
                     "label": label, "split": str(row.get("split", ""))})
    labelled = pd.DataFrame(rows, columns=["case", "patient", "collection", "label", "split"])
    return labelled, pd.DataFrame(excluded, columns=EXCLUDED_COLUMNS)


# ---------------------------------------------------------------------------------------------
# Test set and folds


def _patient_labels(table: pd.DataFrame) -> pd.Series:
    """A patient is positive when any of their scans is (stratification of whole patients)."""
    return table.groupby("patient", sort=True)["label"].max()


def select_test(table: pd.DataFrame, mode: str = "none", fraction: float = 0.2, seed: int = 42) -> np.ndarray:
    """Boolean mask of the held-out test cases; always whole patients.

    ``column``: cases with ``split == "test"``; a patient with one test scan has all scans moved
    to test (logged) so no patient is in both. ``fraction``: ``round(fraction * n)`` patients of
    each class (n = that class's patients), drawn with ``numpy.random.default_rng(seed)``.
    """
    if mode not in TEST_MODES:
        raise FoldError(f"folds.test must be one of {', '.join(TEST_MODES)}, not {mode!r}")
    if mode == "none" or table.empty:
        return np.zeros(len(table), dtype=bool)
    if mode == "column":
        test_patients = set(table.loc[table["split"].str.lower() == "test", "patient"])
        if not test_patients:
            log.warning("folds.test is 'column' but no usable case has split == test: no test set")
        widened = table["patient"].isin(test_patients) & (table["split"].str.lower() != "test")
        if widened.any():
            log.warning("test split: %d scan(s) of test patients were not marked test; moved to test: %s",
                        int(widened.sum()), sorted(table.loc[widened, "case"])[:10])
        return table["patient"].isin(test_patients).to_numpy()
    if not 0 < fraction < 1:
        raise FoldError(f"folds.test_fraction must be in (0, 1), not {fraction}")
    rng = np.random.default_rng(seed)
    patients = _patient_labels(table)
    chosen: list[str] = []
    for label in (0, 1):
        pool = np.array(sorted(patients.index[patients == label]), dtype=object)
        n_test = int(round(fraction * len(pool)))
        chosen += list(rng.permutation(pool)[:n_test])
    return table["patient"].isin(set(chosen)).to_numpy()


def supported_folds(table: pd.DataFrame) -> int:
    """The most folds this cohort supports: every fold needs a positive and a negative patient."""
    patients = _patient_labels(table)
    return int(min((patients == 1).sum(), (patients == 0).sum()))


def _balance_score(fold_of: np.ndarray, labels: np.ndarray, n_folds: int) -> tuple[float, int] | None:
    """(worst |positives - ratio * size| over folds, fold-size range); None if a fold lacks a class."""
    ratio = labels.mean()
    worst, sizes = 0.0, []
    for k in range(n_folds):
        inside = fold_of == k
        n, n_pos = int(inside.sum()), int(labels[inside].sum())
        if n_pos == 0 or n_pos == n:
            return None
        worst = max(worst, abs(n_pos - ratio * n))
        sizes.append(n)
    return round(worst, 9), max(sizes) - min(sizes)


def group_folds(table: pd.DataFrame, n_folds: int, seed: int, task: str = "task") -> np.ndarray:
    """Fold number of every row for a task that is not stratified (registry: ``stratified``):
    GroupKFold by patient, shuffled with ``seed``."""
    from sklearn.model_selection import GroupKFold

    groups = table["patient"].to_numpy(str)
    n_patients = len(set(groups))
    if n_patients < n_folds:
        raise FoldError(f"task {task}: {n_patients} usable patient(s) cannot fill {n_folds} folds "
                        "(folds.n_folds); add cases or lower folds.n_folds")
    fold_of = np.full(len(table), -1)
    splitter = GroupKFold(n_splits=n_folds, shuffle=True, random_state=int(seed))
    for k, (_, val_index) in enumerate(splitter.split(np.zeros(len(table)), groups=groups)):
        fold_of[val_index] = k
    return fold_of


def assign_folds(table: pd.DataFrame, n_folds: int, seed: int, task: str = "task") -> np.ndarray:
    """Fold number (0..n_folds-1) of every row: StratifiedGroupKFold by patient, the best of N_SHUFFLES
    (:func:`group_folds` for a task that is not stratified)."""
    if n_folds < 2:
        raise FoldError(f"task {task}: folds.n_folds must be at least 2, not {n_folds}")
    from hnct.tasks import TASKS

    if task in TASKS and not TASKS[task].stratified:
        return group_folds(table, n_folds, seed, task)
    labels = table["label"].to_numpy(int)
    groups = table["patient"].to_numpy(str)
    supported = supported_folds(table)
    n_pos_patients = int((_patient_labels(table) == 1).sum())
    n_neg_patients = int(table["patient"].nunique() - n_pos_patients)
    from hnct.tasks import TASKS

    # what a positive case is called in messages: T4 (classify), node-positive (segment)
    what = TASKS[task].positive_label if task in TASKS else "positive"
    if supported < n_folds:
        lacking = "positive" if n_pos_patients < n_neg_patients else "negative"
        raise FoldError(
            f"task {task}: a fold would get no {lacking} case: the {len(table)} usable cases have "
            f"{n_pos_patients} {what} (positive) and {n_neg_patients} negative patient(s), so the "
            f"cohort supports at most {supported} fold(s) (folds.n_folds is {n_folds})"
            + ("; add cases or lower folds.n_folds" if supported >= 2 else "; add cases of the missing class")
        )
    seeds = [int(seed)] + [int(s) for s in np.random.default_rng(seed).integers(0, 2**31 - 1, N_SHUFFLES - 1)]
    best, best_score = None, None
    placeholder = np.zeros(len(table))
    for candidate in seeds:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=candidate)
        fold_of = np.full(len(table), -1)
        for k, (_, val_index) in enumerate(splitter.split(placeholder, labels, groups)):
            fold_of[val_index] = k
        score = _balance_score(fold_of, labels, n_folds)
        if score is not None and (best_score is None or score < best_score):
            best, best_score = fold_of, score
    if best is None:
        raise FoldError(
            f"task {task}: no split of {len(table)} cases into {n_folds} folds gives every fold a "
            f"positive and a negative case ({n_pos_patients} {what} and {n_neg_patients} negative "
            f"patients; patients with several scans make folds uneven): the cohort supports at most "
            f"{supported} fold(s) in principle; lower folds.n_folds"
        )
    log.info("task %s: %d folds, worst fold %.2f positives off the cohort ratio, fold sizes differ by %d",
             task, n_folds, best_score[0], best_score[1])
    if best_score[0] > 1:
        # Patients with many scans can make this unavoidable; say so rather than hide it.
        log.warning("task %s: a fold is %.2f positive cases off the cohort ratio (more than one case)",
                    task, best_score[0])
    return best


def split_table(labelled: pd.DataFrame, n_folds: int, seed: int, test: str = "none",
                test_fraction: float = 0.2, task: str = "task") -> pd.DataFrame:
    """The folds table (``case, patient, collection, label, fold``) of the usable cases, sorted by case."""
    table = labelled.sort_values("case").reset_index(drop=True)
    is_test = select_test(table, test, test_fraction, seed)
    folds = pd.Series("test", index=table.index, dtype=object)
    rest = table.loc[~is_test].reset_index(drop=True)
    if rest.empty:
        raise FoldError(f"task {task}: no usable case left for the folds")
    fold_of = assign_folds(rest, n_folds, seed, task=task)
    folds.loc[np.flatnonzero(~is_test)] = [str(k) for k in fold_of]
    out = table.assign(fold=folds.to_numpy())
    return out[FOLDS_COLUMNS]


# ---------------------------------------------------------------------------------------------
# Inner validation split (model selection inside one outer training fold)


def nnunet_splits(folds: pd.DataFrame, n_folds: int) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json``: per fold, the other folds' cases train, this fold's validate."""
    in_cv = folds[folds["fold"] != "test"]
    return [
        {"train": sorted(in_cv.loc[in_cv["fold"] != str(k), "case"]),
         "val": sorted(in_cv.loc[in_cv["fold"] == str(k), "case"])}
        for k in range(n_folds)
    ]


# ---------------------------------------------------------------------------------------------
# Writing


def _write_tsv(table: pd.DataFrame, path: str | Path) -> None:
    with atomic_path(path, suffix=".tsv") as tmp:
        table.to_csv(tmp, sep="\t", index=False, lineterminator="\n")


def _write_json_list(payload: list, path: str | Path) -> None:
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")


def split_folds(
    cohort_tsv: str | Path,
    sidecar_paths: Iterable[str | Path],
    out_dir: str | Path,
    task: str,
    n_folds: int = 5,
    seed: int = 42,
    test: str = "none",
    test_fraction: float = 0.2,
    structure: str = "GTVn",
    out_folds: str | Path | None = None,
    out_splits: str | Path | None = None,
    out_excluded: str | Path | None = None,
) -> pd.DataFrame:
    """Write ``folds.tsv``, ``splits_final.json`` and ``excluded.tsv`` of one task into ``out_dir``.

    ``out_folds``, ``out_splits``, ``out_excluded`` name the files elsewhere (the rule passes its outputs).
    """
    out_dir = Path(out_dir)
    out_folds = Path(out_folds or out_dir / "folds.tsv")
    out_splits = Path(out_splits or out_dir / "splits_final.json")
    out_excluded = Path(out_excluded or out_dir / "excluded.tsv")
    cohort = read_cohort(cohort_tsv)
    labelled, excluded = task_labels(cohort, task, sidecar_paths, structure, cohort_file=str(cohort_tsv))
    if labelled.empty:
        reasons = excluded["reason"].value_counts().head(3)
        raise FoldError(f"task {task}: all {len(excluded)} cases are excluded, e.g. "
                        + "; ".join(f"{reason!r} ({count} cases)" for reason, count in reasons.items())
                        + (f": remove {task} from tasks or fix the inputs" if len(excluded) else ""))
    folds = split_table(labelled, n_folds, seed, test, test_fraction, task=task)
    excluded = excluded.sort_values(["case", "stage"]).reset_index(drop=True)
    _write_tsv(excluded, out_excluded)
    _write_json_list(nnunet_splits(folds, n_folds), out_splits)
    _write_tsv(folds, out_folds)
    counts = folds.groupby("fold")["label"].agg(["size", "sum"])
    for fold, (size, positives) in counts.iterrows():
        log.info("task %s fold %s: %d cases, %d positive", task, fold, size, positives)
    log.info("task %s: %d cases in folds, %d excluded", task, len(folds), len(excluded))
    return folds


def write_fold_slices(folds_tsv: str | Path, sidecar_paths: Iterable[str | Path],
                      out_paths: Iterable[str | Path]) -> list[Path]:
    """Fold k's slice list (every slice of its train and val cases) to the k-th of ``out_paths``
    (``results/folds/segment/fold{k}_slices.tsv``; one path per fold)."""
    out_paths = [Path(p) for p in out_paths]
    folds = pd.read_csv(folds_tsv, sep="\t", dtype=str, keep_default_na=False)
    sidecars = _read_sidecars(sidecar_paths)
    in_cv = folds[folds["fold"] != "test"]
    patient_of = dict(zip(in_cv["case"], in_cv["patient"]))
    frames = []
    for case in progress(sorted(in_cv["case"]), every=200, what="slice indexes"):
        if case not in sidecars or not is_ok(sidecars[case][1]):
            raise FoldError(f"{folds_tsv}: case {case} is in a fold but its slices sidecar is missing or excluded")
        index_path = sidecars[case][1]["index"]
        index = pd.read_csv(index_path, sep="\t", dtype={"case": str})
        missing = [c for c in ("case", "slice", "npz", "positive") if c not in index.columns]
        if missing:
            raise FoldError(f"case {case}: slice index {index_path} lacks column(s) {', '.join(missing)}")
        frames.append(index[["case", "slice", "npz", "positive"]].assign(case=case, patient=patient_of[case]))
    slices = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=FOLD_SLICES_COLUMNS[:-1])
    fold_of = dict(zip(in_cv["case"], in_cv["fold"]))
    written = []
    n_folds_in_table = len(set(in_cv["fold"]))
    if len(out_paths) != n_folds_in_table:
        raise FoldError(f"{folds_tsv}: {n_folds_in_table} folds, but {len(out_paths)} slice lists to write")
    for k, path in enumerate(out_paths):
        split = np.where(slices["case"].map(fold_of) == str(k), "val", "train")
        table = slices.assign(split=split)[FOLD_SLICES_COLUMNS].sort_values(["split", "case", "slice"])
        _write_tsv(table, path)
        log.info("fold %d: %d train slices (%d positive), %d val slices", k, int((split == "train").sum()),
                 int(table.loc[table["split"] == "train", "positive"].sum()), int((split == "val").sum()))
        written.append(path)
    return written


def write_cohort_table(out: str | Path, source: str, table: str = "", demo_config: str = "") -> None:
    """``results/cohort.tsv``: the cohort the workflow resolved (the demo's plan, or the checked table)."""
    if source == "demo":
        import hnct.demo

        cohort = hnct.demo.plan_cohort(**json.loads(demo_config or "{}"))
    else:
        if not table:
            raise CohortError(f"cohort.source is {source!r}: cohort.table must name a cohort TSV")
        cohort = read_cohort(table)
    write_cohort(cohort, out)


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnct folds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", help="log file (also logged to stderr)")
    sub = parser.add_subparsers(dest="command", required=True)

    split = sub.add_parser("split", help="folds.tsv, splits_final.json, excluded.tsv of one task")
    split.add_argument("--task", required=True, help="a registered task (hnct.tasks)")
    split.add_argument("--cohort", required=True, help="cohort table TSV (results/cohort.tsv)")
    split.add_argument("--sidecars", nargs="+", required=True, help="per-case sidecars of the slices stage")
    split.add_argument("--out-dir", default=".", help="folder of the three files (default names)")
    split.add_argument("--out-folds", help="folds.tsv (default: OUT_DIR/folds.tsv)")
    split.add_argument("--out-splits", help="splits_final.json (default: OUT_DIR/splits_final.json)")
    split.add_argument("--out-excluded", help="excluded.tsv (default: OUT_DIR/excluded.tsv)")
    split.add_argument("--n-folds", type=int, default=5)
    split.add_argument("--seed", type=int, default=42)
    split.add_argument("--test", choices=TEST_MODES, default="none")
    split.add_argument("--test-fraction", type=float, default=0.2)
    split.add_argument("--structure", default="GTVn",
                       help="segment: structure that makes a case node-positive (train.segment.structure)")
    add_plugins_argument(split)

    slices = sub.add_parser("slices", help="segment: fold{k}_slices.tsv from folds.tsv and the slice indexes")
    slices.add_argument("--folds", required=True, help="results/folds/segment/folds.tsv")
    slices.add_argument("--sidecars", nargs="+", required=True)
    slices.add_argument("--out", nargs="+", required=True, help="fold0_slices.tsv ... one per fold, in fold order")

    cohort = sub.add_parser("cohort", help="write the resolved cohort table")
    cohort.add_argument("--out", required=True)
    cohort.add_argument("--source", required=True, choices=["demo", "local", "tcia", "manifest"])
    cohort.add_argument("--table", default="", help="cohort TSV (sources other than demo)")
    cohort.add_argument("--demo-config", default="", help="JSON of config['demo'] (source demo)")

    args = parser.parse_args(argv)
    setup_logging(args.log)
    try:
        if args.command == "split":
            load_plugins(args.plugins)
            split_folds(args.cohort, args.sidecars, args.out_dir, args.task, n_folds=args.n_folds,
                        seed=args.seed, test=args.test, test_fraction=args.test_fraction,
                        structure=args.structure, out_folds=args.out_folds, out_splits=args.out_splits,
                        out_excluded=args.out_excluded)
        elif args.command == "slices":
            write_fold_slices(args.folds, args.sidecars, args.out)
        else:
            write_cohort_table(args.out, args.source, args.table, args.demo_config)
    except (FoldError, CohortError) as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
