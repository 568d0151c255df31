"""hnct.exclusions: one table of every case a stage or a task could not use, with stage, file and reason."""

from __future__ import annotations

import pandas as pd

from hnct.common import excluded_sidecar, ok_sidecar, upstream_exclusion, write_json
from hnct.exclusions import collect, main


def read_tsv(path):
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def test_collect_keeps_the_original_stage_and_names_the_task(tmp_path):
    slices = tmp_path / "results" / "slices"
    # Excluded at convert, then passed on by crop and slices (as run_case_stage does).
    at_convert = excluded_sidecar("B-2", "convert", "dicom/B-2", "non-CT series only (MR)", excluded_at="convert")
    write_json(slices / "B-2.json", upstream_exclusion("B-2", "slices", upstream_exclusion("B-2", "crop", at_convert)))
    write_json(slices / "A-1.json", excluded_sidecar("A-1", "slices", "results/crops/A-1.nrrd", "empty crop", excluded_at="slices"))
    write_json(slices / "C-3.json", ok_sidecar("C-3", "slices", index="results/slices/C-3.tsv"))
    write_json(slices / "D-4.json", ok_sidecar("D-4", "slices", index="results/slices/D-4.tsv"))
    classify = tmp_path / "results" / "folds" / "classify" / "excluded.tsv"
    segment = tmp_path / "results" / "folds" / "segment" / "excluded.tsv"
    classify.parent.mkdir(parents=True)
    segment.parent.mkdir(parents=True)
    # The folds tables repeat the upstream exclusions (same stage, file, reason) and add their own.
    pd.DataFrame([
        {"case": "B-2", "stage": "convert", "file": "dicom/B-2", "reason": "non-CT series only (MR)"},
        {"case": "A-1", "stage": "slices", "file": "results/crops/A-1.nrrd", "reason": "empty crop"},
        {"case": "D-4", "stage": "folds:classify", "file": "results/cohort.tsv", "reason": "no T-stage label"},
    ]).to_csv(classify, sep="\t", index=False)
    pd.DataFrame([{"case": "C-3", "stage": "folds", "file": "results/slices/C-3.json",
                   "reason": "no label map: segmentation needs labelled structures"}]).to_csv(segment, sep="\t", index=False)
    out = tmp_path / "results" / "exclusions.tsv"
    sidecars = sorted(slices.glob("*.json"), reverse=True)
    assert main(["--sidecars", *map(str, sidecars), "--fold-excluded", str(classify), str(segment), "--out", str(out)]) == 0
    table = read_tsv(out)
    assert list(table.columns) == ["case", "stage", "file", "reason"]
    assert table.values.tolist() == [
        ["A-1", "slices", "results/crops/A-1.nrrd", "empty crop"],
        ["B-2", "convert", "dicom/B-2", "non-CT series only (MR)"],
        ["C-3", "folds:segment", "results/slices/C-3.json", "no label map: segmentation needs labelled structures"],
        ["D-4", "folds:classify", "results/cohort.tsv", "no T-stage label"],
    ]
    # Same inputs in another order: the same bytes.
    again = tmp_path / "again.tsv"
    collect(sorted(sidecars), [segment, classify], again)
    assert again.read_bytes() == out.read_bytes()


def test_nothing_excluded_still_writes_the_header(tmp_path):
    write_json(tmp_path / "ok.json", ok_sidecar("ok", "slices"))
    empty = tmp_path / "classify" / "excluded.tsv"
    empty.parent.mkdir()
    empty.write_text("case\tstage\tfile\treason\n")
    out = tmp_path / "exclusions.tsv"
    collect([tmp_path / "ok.json"], [empty], out)
    assert out.read_text() == "case\tstage\tfile\treason\n"
