"""Smoke tests of benchmarks/: each script runs on a tiny input and writes valid JSON.

Nothing here is timed or compares speeds: performance is measured by the scripts themselves
(see benchmarks/README.md), never asserted in unit tests.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "workflow"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_preprocess_tiny_cohort_writes_json(tmp_path):
    out = tmp_path / "preprocess.json"
    proc = _run("preprocess.py", "--small", "--cases", "1", "--repeat", "1", "--workdir", str(tmp_path / "work"),
                "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["machine"]["nproc"] >= 1 and len(result["machine"]["loadavg_start"]) == 3
    (case,) = result["cases"]
    expected = {"floor_pydicom", "floor_sitk", "convert", "crop", "slices", "naive_crop", "naive_slices",
                "slices_volume", "naive_slices_volume"}
    assert expected <= set(case["stages"])
    for stage, measured in case["stages"].items():
        assert "error" not in measured, (stage, measured.get("error"))
        assert measured["seconds"] > 0 and measured["peak_rss_mb"] > 10, stage
    # The generated series really went through the stages: the crop holds the larynx box, the slice
    # export wrote one file set per slice of it, the naive reference wrote the same number.
    crop = json.loads((tmp_path / "work" / "results" / "crops" / f"{case['case']}.json").read_text())
    assert crop["status"] == "ok" and crop["box_source"] == "mask"
    assert case["stages"]["slices"]["n_slices"] == crop["size"][2] == case["stages"]["naive_slices"]["n_slices"]
    ratios = result["summary"]["ratios"]
    assert ratios["naive_crop_over_hnct_crop"] > 0 and math.isfinite(ratios["naive_slices_over_hnct_slices"])
    assert set(result["summary"]["targets"]) >= {"naive_over_hnct_crop_ge_5", "peak_mb_lt_2048_largest_case"}


def test_generated_series_reads_back_with_its_geometry(tmp_path):
    """The phantom is a real CT series: SimpleITK reads it in LPS with the spacing it was written with."""
    import SimpleITK as sitk

    preprocess = _load("preprocess")
    preprocess.ROWS = preprocess.COLS = 48
    spec = {"case": "BENCH-T01", "n_slices": 30, "pixel_mm": 5.0, "slice_mm": 3.0}
    case = preprocess.write_case(tmp_path, spec, seed=1)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / case["ct_dir"])))
    image = reader.Execute()
    assert image.GetSize() == (48, 48, 30)
    assert image.GetSpacing() == pytest.approx((5.0, 5.0, 3.0))
    array = sitk.GetArrayViewFromImage(image)
    assert array.min() == -1000 or array.min() == -1024  # air, HU after the rescale
    label = sitk.ReadImage(str(tmp_path / case["mask"]))
    assert label.GetOrigin() == pytest.approx(image.GetOrigin())
    assert sitk.GetArrayViewFromImage(label).sum() > 0
    import pydicom

    rt = pydicom.dcmread(tmp_path / case["rtstruct"])
    assert rt.StructureSetROISequence[0].ROIName == "Larynx"
    assert len(rt.ROIContourSequence[0].ContourSequence) == int((sitk.GetArrayViewFromImage(label).sum(axis=(1, 2)) > 0).sum())


DRY_RUN_WITH_GROUPS = """\
Building DAG of jobs...
Job stats:
job              count
-------------  -------
convert_series       4
crop_larynx          4
all                  1
total                9

[Wed Nov 25 02:27:09 2026] Group job preprocess (jobs in lexicogr. order):

    [Wed Nov 25 02:27:09 2026]
    rule convert_series:
        jobid: 3
    [Wed Nov 25 02:27:09 2026]
    rule crop_larynx:
        jobid: 4

[Wed Nov 25 02:27:09 2026] Group job preprocess (jobs in lexicogr. order):

    rule convert_series:
    rule crop_larynx:
    rule convert_series:
    rule crop_larynx:
    rule convert_series:
    rule crop_larynx:

[Wed Nov 25 02:27:09 2026]
localrule all:
    jobid: 0
Job stats:
job              count
-------------  -------
convert_series       4
crop_larynx          4
all                  1
total                9
"""


def test_dag_scale_parsers_count_group_jobs():
    dag_scale = _load("dag_scale")
    assert dag_scale.parse_job_stats(DRY_RUN_WITH_GROUPS) == {
        "convert_series": 4, "crop_larynx": 4, "all": 1, "total": 9}
    parsed = dag_scale.parse_submissions(DRY_RUN_WITH_GROUPS)
    assert [sum(g["rules"].values()) for g in parsed["groups"]] == [2, 6]
    assert dict(parsed["local"]) == {"all": 1} and not parsed["ungrouped"]
    settings = {"groups": {"convert_series": "preprocess", "crop_larynx": "preprocess"},
                "group_components": {"preprocess": 25}}
    computed = dag_scale.submissions_from_profile(settings, {"convert_series": 100, "crop_larynx": 100,
                                                             "export_slices": 100}, 100)
    assert computed["grouped_submissions"] == 4 and computed["ungrouped_jobs"] == 100


def test_dag_scale_small_cohort_writes_json(tmp_path):
    out = tmp_path / "dag.json"
    # The profile's dry run is left out (a second DAG build); its parser is tested above.
    proc = _run("dag_scale.py", "--cases", "30", "--no-profile-run", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    stats = result["dryrun"]["job_stats"]
    assert stats["convert_series"] == 30 and stats["crop_larynx"] == 30
    assert result["dryrun"]["wall_s"] > 0 and result["dryrun"]["peak_rss_mb"] > 10
    assert "preprocessing_submissions_le_cases_over_25" in result["targets"]
    if "computed_from_profile" in result["slurm"]:
        assert result["slurm"]["preprocessing_submissions"] >= 1


def test_train_throughput_tiny_writes_json(tmp_path):
    out = tmp_path / "train.json"
    proc = _run("train_throughput.py", "--tiny", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for mode in ("pipeline", "preloaded"):
        assert result["results"][mode]["samples_per_s"] > 0
    assert result["device"] in {"cpu", "cuda"}


def test_convert_vs_dcm2niix_tiny_series_writes_json(tmp_path):
    out = tmp_path / "convert_vs_dcm2niix.json"
    proc = _run("convert_vs_dcm2niix.py", "--small", "--repeat", "1", "--workdir", str(tmp_path / "work"),
                "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (pair,) = result["pairs"]
    assert pair["series"] == "generated-64x64x20" and pair["n_files"] == 20
    assert set(pair["runs"]) == {"hnct", "dcm2niix", "imports"} and all(len(r) == 1 for r in pair["runs"].values())
    assert pair["ratio_hnct_over_dcm2niix"] > 0 and math.isfinite(pair["ratio_hnct_over_dcm2niix"])
    assert pair["ratio_imports_over_dcm2niix"] > 0 and math.isfinite(pair["ratio_imports_over_dcm2niix"])
    assert result["machine"]["versions"]["dcm2niix"] == "1.0.20260724"
    # Both tools really converted the series: hnct's sidecar is ok, dcm2niix wrote its NIfTI.
    sidecar = json.loads((tmp_path / "work" / "out-generated-64x64x20" / "generated-64x64x20.json").read_text())
    assert sidecar["status"] == "ok" and sidecar["size"] == [64, 64, 20]
    assert list((tmp_path / "work" / "out-generated-64x64x20").glob("*_dcm2niix.nii"))
