"""Per-case outputs Snakemake can see, on a tiny demo run of the preprocessing only (no training).

One run (7 demo cases: 5 usable, one without a CT, one with a missing slice) to the slices
sidecars, under umask 022 (too few cases for folds, so no exclusions.tsv here: test_workflow.py
checks it on the full demo), then:

- every file under results/ is readable by group and others, every folder enterable;
- each case's NRRDs / NPZs lie in its declared folder, which its sidecar names; an excluded case
  has an empty folder and an excluded sidecar, and the run goes on;
- options a stage does not use in the current mode are not its params (crop.table with
  crop.method: mask reruns nothing; a used option does rerun);
- a job that died before its sidecar (data files written, no sidecar) is not taken for complete;
- `snakemake --delete-all-output` removes every NRRD and NPZ, and a rerun rebuilds them all, the same.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from hnct.demo import plan_cohort

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TINY = {"demo": {"n_patients": 4}, "folds": {"n_folds": 2}}  # the schema's smallest demo
STAGES = ("volumes", "crops", "slices")
MARKER = ".snakemake_timestamp"  # Snakemake's own file in each directory() output


def tiny_cases() -> list[str]:
    demo = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["demo"]
    return list(plan_cohort(**{**demo, **TINY["demo"]})["case"])


class Run:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.config = workdir / "tiny.yaml"
        self.config.write_text(yaml.safe_dump(TINY))
        self.cases = tiny_cases()
        self.targets = [f"results/slices/{case}.json" for case in self.cases]

    def snakemake(self, *args: str, extra_config: Path | None = None, timeout: int = 600) -> str:
        configs = [str(REPO / "config" / "config.yaml"), str(self.config)]
        if extra_config is not None:
            configs.append(str(extra_config))
        env = dict(os.environ, PYTHONPATH=str(REPO / "workflow"),
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
        proc = subprocess.run(
            [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
             "--directory", str(self.workdir), "--cores", "2", *self.targets,
             "--configfile", *configs, *args],  # --configfile and --quiet take every word after them
            cwd=self.workdir, env=env, capture_output=True, text=True, timeout=timeout,
            preexec_fn=lambda: os.umask(0o022),  # what a shared cluster account typically has
        )
        assert proc.returncode == 0, f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc.stdout + proc.stderr

    def planned_rules(self, extra_config: Path | None = None) -> list[str]:
        """The rule of every job `snakemake -n` would run (empty: nothing to do)."""
        out = self.snakemake("--dry-run", "--quiet", "rules", extra_config=extra_config)
        if "Nothing to be done" in out:
            return []
        stats = out.split("Job stats:")[1].split("\n\n")[0]
        return sorted(rule for rule, _ in re.findall(r"^(\w+)\s+(\d+)$", stats, re.M) if rule != "total")

    def data_files(self) -> dict[str, Path]:
        results = self.workdir / "results"
        return {str(p.relative_to(self.workdir)): p for p in sorted(results.rglob("*"))
                if p.suffix in (".nrrd", ".npz")}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = Run(tmp_path_factory.mktemp("outputs"))
    run.snakemake(timeout=900)
    return run


def sidecar(run: Run, stage: str, case: str) -> dict:
    return yaml.safe_load((run.workdir / "results" / stage / f"{case}.json").read_text())


def test_every_result_is_readable_by_group_and_others(run):
    results = run.workdir / "results"
    files = [p for p in results.rglob("*") if p.is_file()]
    assert len(files) > 100
    unreadable = [f"{p} {oct(p.stat().st_mode & 0o777)}" for p in files if p.stat().st_mode & 0o044 != 0o044]
    assert not unreadable, unreadable[:10]
    closed = [str(p) for p in [results, *results.rglob("*")] if p.is_dir() and p.stat().st_mode & 0o055 != 0o055]
    assert not closed, closed[:10]


def test_each_cases_data_lie_in_its_declared_folder(run):
    statuses = set()
    for case in run.cases:
        for stage in STAGES:
            folder = run.workdir / "results" / stage / case
            record = sidecar(run, stage, case)
            assert folder.is_dir(), folder
            contents = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
            statuses.add(record["status"])
            if record["status"] == "excluded":
                assert contents == [], (case, stage, contents)
                assert record["reason"] and record["excluded_at"] == "convert", record
                continue
            named = [record[key] for key in ("volume", "label", "index") if record.get(key)]
            if stage == "slices":
                named += list(pd.read_csv(run.workdir / record["index"], sep="\t")["npz"])
            else:
                assert {Path(p).name for p in named} == {"volume.nrrd", "label.nrrd"}, record
            for path in named:
                assert Path(path).parent == Path("results", stage, case), path
                assert (run.workdir / path).is_file(), path
    assert statuses == {"ok", "excluded"}


def test_an_option_the_stage_does_not_use_reruns_nothing(run, tmp_path):
    # The demo crops by mask: the crop table is unused. (Its labels come from the RTSTRUCTs and, since
    # issue 13, a mask folder beside some cases: convert.mask_dir is used, the TCIA manifest is not.)
    unused = tmp_path / "unused.yaml"
    unused.write_text(yaml.safe_dump({"crop": {"table": "boxes.tsv", "table_format": "bbox3d"},
                                      "tcia": {"manifest": "/elsewhere/basket.tcia"}}))
    assert run.planned_rules(unused) == []
    # A structure name pattern reaches convert: it reruns the conversions.
    names = tmp_path / "names.yaml"
    names.write_text(yaml.safe_dump({"convert": {"structure_names": {"SpinalCord": ["spinal[ _-]?cord", "sc"]}}}))
    assert "convert_series" in run.planned_rules(names)
    # ... while an option the mask crop uses reruns the crops and what follows them.
    used = tmp_path / "used.yaml"
    used.write_text(yaml.safe_dump({"crop": {"margin_mm": 9.0}}))
    planned = run.planned_rules(used)
    assert "crop_larynx" in planned and "export_slices" in planned and "convert_series" not in planned


def test_a_job_that_died_before_its_sidecar_is_run_again(run, tmp_path):
    """A crop job killed after its NRRDs, before its sidecar: what it leaves is no finished crop.

    Snakemake deletes a failed job's outputs itself; this is the worse case of a job killed
    with Snakemake (its files stay): the case's crop folder is full, its sidecar missing, and
    the slices of the case were never made.
    """
    case = next(c for c in run.cases if sidecar(run, "crops", c)["status"] == "ok")
    results = run.workdir / "results"
    kept = tmp_path / "kept"
    kept.mkdir()
    shutil.copy2(results / "crops" / f"{case}.json", kept / "crop.json")  # copy2: mtimes kept
    shutil.copy2(results / "slices" / f"{case}.json", kept / "slices.json")
    shutil.copytree(results / "slices" / case, kept / case)
    (results / "crops" / f"{case}.json").unlink()
    (results / "slices" / f"{case}.json").unlink()
    shutil.rmtree(results / "slices" / case)
    try:
        assert (results / "crops" / case / "volume.nrrd").exists()
        assert run.planned_rules() == ["crop_larynx", "export_slices"]
    finally:
        # back as they were (same bytes and mtimes): the run is complete again
        shutil.copy2(kept / "crop.json", results / "crops" / f"{case}.json")
        shutil.copy2(kept / "slices.json", results / "slices" / f"{case}.json")
        shutil.copytree(kept / case, results / "slices" / case)
    assert run.planned_rules() == []


def test_delete_all_output_then_rerun_rebuilds_every_nrrd_and_npz(run):
    # Last: it rebuilds the run.
    before = run.data_files()
    assert any(p.endswith(".nrrd") for p in before) and any(p.endswith(".npz") for p in before)
    nrrd = {name: hashlib.sha256(p.read_bytes()).hexdigest() for name, p in before.items() if name.endswith(".nrrd")}
    npz = {}
    for name, p in before.items():
        if name.endswith(".npz"):
            with np.load(p) as arrays:
                npz[name] = {key: arrays[key].copy() for key in arrays.files}
    run.snakemake("--delete-all-output")
    assert run.data_files() == {}
    for stage in STAGES:
        assert not any((run.workdir / "results" / stage / case).exists() for case in run.cases), stage
    run.snakemake(timeout=900)
    after = run.data_files()
    assert sorted(after) == sorted(before)
    for name, digest in nrrd.items():
        assert hashlib.sha256(after[name].read_bytes()).hexdigest() == digest, name
    for name, arrays in npz.items():
        with np.load(after[name]) as again:
            assert sorted(again.files) == sorted(arrays), name
            for key, value in arrays.items():
                assert np.array_equal(again[key], value), (name, key)
    assert run.planned_rules() == []
