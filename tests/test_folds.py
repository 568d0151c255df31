"""hnct.folds: leakage-free, stratified, reproducible folds written from real cohort/sidecar/index files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hnct.cohort import write_cohort
from hnct.common import excluded_sidecar, ok_sidecar, write_json
from hnct.folds import FoldError, main, split_folds, supported_folds, write_fold_slices

SLICES_PER_CASE = 4


def build_cohort(root: Path, n_patients: int = 92, two_scan: int = 8, positive_patients=(0, 13, 26, 39, 52, 65, 78),
                 node_positive_every: int = 3, excluded_upstream=("X1", "X2"), unlabelled=("U1", "U2"),
                 test_cases=()) -> dict:
    """A cohort like LaryngealCT's in miniature, as the workflow leaves it on disk.

    ``n_patients`` patients, the first ``two_scan`` scanned twice (100 cases by default); T4 =
    the patients in ``positive_patients`` (7 patients, 8 cases: 8 %); node-positive = every
    ``node_positive_every``-th patient. Plus cases excluded upstream (convert) and cases without
    a T-stage. Writes ``cohort.tsv``, ``slices/{case}.json`` and ``slices/{case}.tsv``.
    """
    rows = []
    for p in range(n_patients):
        patient = f"PAT-{p:03d}"
        for scan in range(2 if p < two_scan else 1):
            case = f"{patient}_s{scan}"
            rows.append({"case": case, "patient": patient, "collection": f"COLL{p % 3}",
                         "label_t4": "1" if p in positive_patients else "0",
                         "node": int(p % node_positive_every == 0),
                         "split": "test" if case in test_cases else ""})
    for case in excluded_upstream:
        rows.append({"case": case, "patient": f"PAT-{case}", "collection": "COLL0", "label_t4": "1", "node": 1, "split": ""})
    for case in unlabelled:
        rows.append({"case": case, "patient": f"PAT-{case}", "collection": "COLL1", "label_t4": "", "node": 0, "split": ""})
    table = pd.DataFrame(rows)
    cohort_tsv = root / "cohort.tsv"
    (root / "slices").mkdir(parents=True, exist_ok=True)
    write_cohort(table.drop(columns="node"), cohort_tsv)
    sidecars = []
    for row in rows:
        case = row["case"]
        sidecar_path = root / "slices" / f"{case}.json"
        if case in excluded_upstream:
            write_json(sidecar_path, excluded_sidecar(case, "slices", f"dicom/{case}", "missing slice at z = 12.5 mm",
                                                      excluded_at="convert"))
        else:
            index_path = root / "slices" / f"{case}.tsv"
            index = pd.DataFrame({
                "case": case, "slice": range(SLICES_PER_CASE), "z_mm": np.arange(SLICES_PER_CASE) * 1.0,
                "npz": [f"results/slices/{case}/{case}_{k:04d}.npz" for k in range(SLICES_PER_CASE)],
                "jpg": "", "overlay": "",
                "n_Larynx": 50, "n_GTVp": 0,
                "n_GTVn": [7 if (row["node"] and k == 2) else 0 for k in range(SLICES_PER_CASE)],
            })
            index["positive"] = (index["n_GTVn"] > 0).astype(int)
            index.to_csv(index_path, sep="\t", index=False)
            write_json(sidecar_path, ok_sidecar(case, "slices", index=str(index_path), n_slices=SLICES_PER_CASE,
                                                labels={"1": "Larynx", "2": "GTVp", "3": "GTVn"}))
        sidecars.append(sidecar_path)
    return {"cohort": cohort_tsv, "sidecars": sidecars, "table": table}


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def check_split(out_dir: Path, data: dict, n_folds: int, task: str = "classify") -> pd.DataFrame:
    """The leakage, coverage and balance properties every split must have."""
    folds = read_tsv(out_dir / "folds.tsv")
    excluded = read_tsv(out_dir / "excluded.tsv")
    assert list(folds.columns) == ["case", "patient", "collection", "label", "fold"]
    assert list(excluded.columns) == ["case", "stage", "file", "reason"]
    # Every usable case in exactly one fold (or test); excluded ones never in a fold.
    assert not folds["case"].duplicated().any()
    assert set(folds["case"]) | set(excluded["case"]) == set(data["table"]["case"])
    assert not set(folds["case"]) & set(excluded["case"])
    # No patient in two folds, nor in a fold and the test set.
    assert (folds.groupby("patient")["fold"].nunique() == 1).all()
    cv = folds[folds["fold"] != "test"]
    assert sorted(cv["fold"].unique()) == [str(k) for k in range(n_folds)]
    # Class ratio per fold within one case of the cohort (cross-validation set) ratio.
    labels = cv["label"].astype(int)
    ratio = labels.mean()
    for fold, group in cv.groupby("fold"):
        positives = group["label"].astype(int).sum()
        assert abs(positives - ratio * len(group)) <= 1.0, (fold, positives, len(group), ratio)
        assert 0 < positives < len(group)
    # splits_final.json agrees with folds.tsv.
    splits = json.loads((out_dir / "splits_final.json").read_text())
    assert len(splits) == n_folds
    for k, split in enumerate(splits):
        assert split["val"] == sorted(cv.loc[cv["fold"] == str(k), "case"])
        assert split["train"] == sorted(cv.loc[cv["fold"] != str(k), "case"])
        assert not set(split["train"]) & set(split["val"])
        test = set(folds.loc[folds["fold"] == "test", "case"])
        assert not test & (set(split["train"]) | set(split["val"]))
    return folds


@pytest.mark.parametrize("seed", [0, 1, 2, 42])
def test_classify_folds_are_leak_free_complete_and_balanced(tmp_path, seed):
    data = build_cohort(tmp_path)
    folds = split_folds(data["cohort"], data["sidecars"], tmp_path / "classify", "classify", n_folds=5, seed=seed)
    check_split(tmp_path / "classify", data, 5)
    assert len(folds) == 100 and folds["label"].astype(int).sum() == 8
    # Both scans of a two-scan patient share a fold.
    assert folds.loc[folds["patient"] == "PAT-000", "fold"].nunique() == 1
    assert (folds["patient"] == "PAT-000").sum() == 2
    excluded = read_tsv(tmp_path / "classify" / "excluded.tsv").set_index("case")
    assert excluded.loc["X1", "stage"] == "convert" and "missing slice" in excluded.loc["X1", "reason"]
    assert excluded.loc["U1", "stage"] == "folds:classify" and excluded.loc["U1", "reason"] == "no T-stage label"


@pytest.mark.slow
def test_larger_cohort_stays_within_one_case(tmp_path):
    """LaryngealCT's size and prevalence (~1,000 scans, 8 % T4, two-scan patients)."""
    positives = tuple(range(0, 950, 12))  # 80 T4 patients of 950
    data = build_cohort(tmp_path, n_patients=950, two_scan=60, positive_patients=positives)
    split_folds(data["cohort"], data["sidecars"], tmp_path / "classify", "classify", n_folds=5, seed=42)
    check_split(tmp_path / "classify", data, 5)


@pytest.mark.parametrize("test_mode", ["fraction", "column"])
def test_test_set_is_taken_first_and_holds_whole_patients(tmp_path, test_mode):
    # Column mode: only one of PAT-001's two scans is marked test; both must end up in test.
    data = build_cohort(tmp_path, n_patients=120, positive_patients=tuple(range(0, 120, 10)),
                        test_cases=("PAT-001_s0", "PAT-013_s0", "PAT-020_s0", "PAT-050_s0"))
    folds = split_folds(data["cohort"], data["sidecars"], tmp_path / "classify", "classify", n_folds=4, seed=3,
                        test=test_mode, test_fraction=0.2)
    check_split(tmp_path / "classify", data, 4)
    test = folds[folds["fold"] == "test"]
    if test_mode == "column":
        assert set(test["case"]) == {"PAT-001_s0", "PAT-001_s1", "PAT-013_s0", "PAT-020_s0", "PAT-050_s0"}
    else:
        patients = folds.groupby("patient")["label"].max().astype(int)
        test_patients = test.groupby("patient")["label"].max().astype(int)
        # round(0.2 * n) patients of each class.
        assert (test_patients == 1).sum() == round(0.2 * (patients == 1).sum())
        assert (test_patients == 0).sum() == round(0.2 * (patients == 0).sum())


def test_same_seed_same_bytes_other_seed_other_split(tmp_path):
    data = build_cohort(tmp_path)
    names = ("folds.tsv", "splits_final.json", "excluded.tsv")
    for run, seed in (("a", 7), ("b", 7), ("c", 8)):
        assert main(["split", "--task", "classify", "--cohort", str(data["cohort"]), "--sidecars",
                     *map(str, data["sidecars"]), "--out-dir", str(tmp_path / run), "--n-folds", "5",
                     "--seed", str(seed), "--test", "fraction"]) == 0
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "folds.tsv").read_bytes() != (tmp_path / "c" / "folds.tsv").read_bytes()
    # Reading the sidecars in another order changes nothing either.
    main(["split", "--task", "classify", "--cohort", str(data["cohort"]), "--sidecars",
          *map(str, reversed(data["sidecars"])), "--out-dir", str(tmp_path / "d"), "--seed", "7", "--test", "fraction"])
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "d" / name).read_bytes(), name


def test_too_few_positives_says_how_many_folds_fit(tmp_path, capfd):
    data = build_cohort(tmp_path, n_patients=30, two_scan=2, positive_patients=(0, 5, 9))
    with pytest.raises(FoldError) as err:
        split_folds(data["cohort"], data["sidecars"], tmp_path / "out", "classify", n_folds=5, seed=1)
    message = str(err.value)
    assert "task classify" in message and "no positive case" in message
    assert "supports at most 3 fold(s)" in message and "folds.n_folds is 5" in message
    assert not (tmp_path / "out" / "folds.tsv").exists()
    # The command line reports it as an error, not a traceback.
    argv = ["split", "--task", "classify", "--cohort", str(data["cohort"]), "--sidecars",
            *map(str, data["sidecars"]), "--out-dir", str(tmp_path / "out"), "--n-folds", "5"]
    assert main(argv) == 1
    assert "supports at most 3 fold(s)" in capfd.readouterr().err
    # Three folds fit.
    assert main(argv[:-1] + ["3"]) == 0
    check_split(tmp_path / "out", data, 3)


def test_supported_folds_counts_patients_not_scans(tmp_path):
    table = pd.DataFrame({"case": ["a1", "a2", "b", "c", "d"], "patient": ["A", "A", "B", "C", "D"],
                          "label": [1, 1, 0, 0, 0]})
    assert supported_folds(table) == 1


def test_segment_folds_follow_the_slice_index_and_list_every_slice(tmp_path):
    data = build_cohort(tmp_path, node_positive_every=3)
    out = tmp_path / "segment"
    split_folds(data["cohort"], data["sidecars"], out, "segment", n_folds=5, seed=5, test="fraction",
                test_fraction=0.2, structure="gtvn")
    folds = check_split(out, data, 5, task="segment")
    # Node-positive from n_GTVn (not from the T-stage); unlabelled T-stage does not matter here.
    truth = data["table"].set_index("case")["node"]
    assert all(int(label) == truth[case] for case, label in zip(folds["case"], folds["label"]))
    assert {"U1", "U2"} <= set(folds["case"])
    written = write_fold_slices(out / "folds.tsv", data["sidecars"], [out / f"fold{k}_slices.tsv" for k in range(5)])
    with pytest.raises(FoldError, match="5 folds, but 4 slice lists"):
        write_fold_slices(out / "folds.tsv", data["sidecars"], written[:4])
    cv = folds[folds["fold"] != "test"]
    for k, path in enumerate(written):
        slices = read_tsv(path)
        assert list(slices.columns) == ["case", "patient", "slice", "npz", "positive", "split"]
        assert len(slices) == SLICES_PER_CASE * len(cv)
        # each slice carries its case's patient (the trainer's inner split groups by it)
        assert (slices["patient"] == slices["case"].map(dict(zip(cv["case"], cv["patient"])))).all()
        val = set(slices.loc[slices["split"] == "val", "case"])
        assert val == set(cv.loc[cv["fold"] == str(k), "case"])
        assert set(slices.loc[slices["split"] == "train", "case"]) == set(cv["case"]) - val
        assert not set(slices["case"]) & set(folds.loc[folds["fold"] == "test", "case"])
        positive_cases = set(slices.loc[slices["positive"] == "1", "case"])
        assert positive_cases == {c for c in cv["case"] if truth[c]}


def test_a_case_without_labels_is_excluded_from_segment(tmp_path):
    data = build_cohort(tmp_path)
    sidecar = json.loads(data["sidecars"][5].read_text())
    sidecar["labels"] = {}
    data["sidecars"][5].write_text(json.dumps(sidecar))
    split_folds(data["cohort"], data["sidecars"], tmp_path / "segment", "segment", n_folds=5, seed=5)
    excluded = read_tsv(tmp_path / "segment" / "excluded.tsv").set_index("case")
    assert excluded.loc[sidecar["case"], "stage"] == "folds:segment"
    assert "no label map" in excluded.loc[sidecar["case"], "reason"]


def test_cohort_subcommand_writes_the_checked_table(tmp_path):
    source = tmp_path / "in.tsv"
    pd.DataFrame({"case": ["B-1", "A-1"], "patient": ["B", "A"], "collection": ["X", "X"],
                  "t_stage": ["T4a", "T2"]}).to_csv(source, sep="\t", index=False)
    assert main(["cohort", "--out", str(tmp_path / "cohort.tsv"), "--source", "local", "--table", str(source)]) == 0
    table = read_tsv(tmp_path / "cohort.tsv")
    assert list(table["case"]) == ["B-1", "A-1"] and list(table["label_t4"]) == ["1", "0"]
    assert main(["cohort", "--out", str(tmp_path / "c2.tsv"), "--source", "local", "--table", ""]) == 1


def test_a_task_without_any_usable_case_says_why(tmp_path):
    data = build_cohort(tmp_path, n_patients=6, two_scan=0, positive_patients=(0, 1), excluded_upstream=(),
                        unlabelled=())
    for path in data["sidecars"]:
        sidecar = json.loads(path.read_text())
        sidecar["labels"] = {}
        path.write_text(json.dumps(sidecar))
    with pytest.raises(FoldError, match=r"task segment: all 6 cases are excluded, e.g. 'no label map"):
        split_folds(data["cohort"], data["sidecars"], tmp_path / "segment", "segment", n_folds=2, seed=0)


def test_inner_split_holds_out_whole_patients_of_both_classes_reproducibly():
    """hnct.folds.inner_split: the trainer's inner validation (model selection) inside one outer
    training fold: grouped by patient, stratified, seeded; a clear error when it cannot be made."""
    from hnct.folds import inner_split

    rows = []
    for p in range(30):
        for scan in range(2 if p % 5 == 0 else 1):
            rows.append({"case": f"P{p:02d}_s{scan}", "patient": f"P{p:02d}", "label": int(p % 3 == 0)})
    table = pd.DataFrame(rows)
    inner = inner_split(table, 5, seed=3, where="fold 0")
    np.testing.assert_array_equal(inner, inner_split(table, 5, seed=3, where="fold 0"))  # seeded
    assert not np.array_equal(inner, inner_split(table, 5, seed=4, where="fold 0"))
    patients_in, patients_out = set(table.loc[inner, "patient"]), set(table.loc[~inner, "patient"])
    assert not patients_in & patients_out  # a two-scan patient is on one side
    assert len(patients_in) == 6  # 1/5 of 30 patients
    assert set(table.loc[inner, "label"]) == {0, 1} == set(table.loc[~inner, "label"])
    assert abs(table.loc[inner, "label"].mean() - table["label"].mean()) < 0.15  # stratified
    # one class only (segmentation with no node-negative training case) still splits
    assert inner_split(table.assign(label=1), 5, seed=3).any()
    with pytest.raises(FoldError, match="fold 2: 4 training patient.*train.inner_folds = 5"):
        inner_split(table[table["patient"].isin(["P00", "P01", "P02", "P03"])], 5, seed=0, where="fold 2")
    one_positive = table[table["patient"].isin(["P00", "P01", "P02", "P04", "P05"])].iloc[1:]
    with pytest.raises(FoldError, match="fold 1: no inner split .*1 label-1"):
        inner_split(one_positive, 2, seed=0, where="fold 1")
    # segment requires node-positive cases on both sides only: a lone node-negative patient may train
    lone_negative = one_positive.assign(label=1 - one_positive["label"])
    inner = inner_split(lone_negative, 2, seed=0, required_labels=(1,))
    assert set(lone_negative.loc[inner, "label"]) >= {1} and set(lone_negative.loc[~inner, "label"]) >= {1}
