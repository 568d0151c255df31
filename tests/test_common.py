import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import hnct.common
from hnct.common import (
    InputError,
    atomic_path,
    fresh_dir,
    is_ok,
    read_sidecar,
    run_case_stage,
    software_versions,
    write_json,
)


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "volume.nrrd"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_atomic_path_keeps_suffix_and_moves(tmp_path):
    target = tmp_path / "crop.nrrd"
    with atomic_path(target) as tmp:
        assert tmp.name.endswith(".nrrd")
        tmp.write_text("data")
    assert target.read_text() == "data"


def test_run_case_stage_ok_and_excluded(tmp_path):
    ok = run_case_stage("C1", "convert", tmp_path / "ok.json", lambda: {"size": [1, 2, 3]})
    assert is_ok(ok) and read_sidecar(tmp_path / "ok.json")["size"] == [1, 2, 3]

    def bad():
        raise InputError("C2", "/data/C2/1-003.dcm", "missing slice between z=3.0 and z=9.0")

    sidecar = run_case_stage("C2", "convert", tmp_path / "bad.json", bad)
    assert sidecar["status"] == "excluded"
    assert sidecar["file"] == "/data/C2/1-003.dcm"
    assert "missing slice" in sidecar["reason"]
    assert sidecar["excluded_at"] == "convert"

    # Downstream: the exclusion is carried on with its original stage, without running the work.
    called = []
    down = run_case_stage("C2", "crop", tmp_path / "crop.json", lambda: called.append(1) or {},
                          upstream=tmp_path / "bad.json")
    assert not called
    assert down["stage"] == "crop" and down["excluded_at"] == "convert"
    assert down["reason"] == sidecar["reason"]


def test_input_error_for_another_case_is_a_bug(tmp_path):
    def wrong_case():
        raise InputError("OTHER", "", "reason")

    with pytest.raises(InputError):
        run_case_stage("C1", "convert", tmp_path / "x.json", wrong_case)
    assert not (tmp_path / "x.json").exists()


def test_sidecar_json_is_stable(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [1.5]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": [1.5], "b": 1}
    # stable = the same bytes whatever the insertion order: keys sorted, 2-space indent, newline
    write_json(tmp_path / "b.json", {"a": [1.5], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert (tmp_path / "a.json").read_text() == '{\n  "a": [\n    1.5\n  ],\n  "b": 1\n}\n'
    assert "torch" in software_versions() and "pydicom" in software_versions()


def test_software_versions_are_the_installed_distributions(tmp_path, monkeypatch):
    """The dist-info folder names give what importlib.metadata gives, for every tracked package; a
    package the scan cannot name (an egg-info, here a hand-made one) still comes from importlib.metadata,
    and the first distribution on sys.path wins, as for an import."""
    from importlib import metadata

    from hnct.common import TRACKED_PACKAGES, _distribution_key

    versions = software_versions()
    for name in TRACKED_PACKAGES:
        try:
            expected = metadata.version(name)
        except metadata.PackageNotFoundError:
            assert name not in versions
            continue
        assert versions[name] == expected, name
    assert _distribution_key("scikit-learn") == _distribution_key("Scikit__Learn") == "scikit_learn"
    assert _distribution_key("python-gdcm") == "python_gdcm" and _distribution_key("SimpleITK") == "simpleitk"

    shadow = tmp_path / "shadow"
    (shadow / "numpy-0.0.1.dist-info").mkdir(parents=True)
    (shadow / "numpy-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 0.0.1\n")
    (shadow / "pynrrd.egg-info").mkdir()
    (shadow / "pynrrd.egg-info" / "PKG-INFO").write_text("Metadata-Version: 1.1\nName: pynrrd\nVersion: 9.9.9\n")
    monkeypatch.syspath_prepend(str(shadow))
    shadowed = software_versions()
    assert shadowed["numpy"] == metadata.version("numpy") == "0.0.1"
    assert shadowed["pynrrd"] == metadata.version("pynrrd")


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                       (0o077, 0o600, 0o700)])
def test_written_files_and_folders_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    """mkstemp makes 0600 files: results must get what open() would give (others read them)."""
    old = os.umask(umask)
    try:
        write_json(tmp_path / "sub" / "a.json", {"a": 1})
        with atomic_path(tmp_path / "sub" / "b.nrrd") as tmp:
            tmp.unlink()  # a writer that replaces the file instead of writing into it
            tmp.write_bytes(b"x")
        fresh_dir(tmp_path / "case")
    finally:
        os.umask(old)
    for name in ("a.json", "b.nrrd"):
        assert stat.S_IMODE((tmp_path / "sub" / name).stat().st_mode) == file_mode, name
    assert stat.S_IMODE((tmp_path / "sub").stat().st_mode) == dir_mode
    assert stat.S_IMODE((tmp_path / "case").stat().st_mode) == dir_mode


KILLED_STAGE = """
import os, signal, sys
from pathlib import Path
from hnct.common import atomic_path, run_case_stage

out, sidecar = Path(sys.argv[1]), Path(sys.argv[2])

def work():
    with atomic_path(out / "volume.nrrd") as tmp:
        tmp.write_bytes(b"complete volume")
    with atomic_path(out / "label.nrrd") as tmp:
        tmp.write_bytes(b"half a label")
        os.kill(os.getpid(), signal.SIGKILL)  # SLURM's kill at the time limit, mid-write
    return {}

run_case_stage("C1", "convert", sidecar, work, out_dir=out)
"""


def test_a_job_killed_mid_write_leaves_no_sidecar_and_no_final_half_file(tmp_path):
    out, sidecar = tmp_path / "volumes" / "C1", tmp_path / "volumes" / "C1.json"
    # The previous run's complete outputs: a rerun must never take them for this run's.
    run_case_stage("C1", "convert", sidecar, lambda: {"size": [1, 2, 3]}, out_dir=out)
    (out / "label.nrrd").write_bytes(b"previous run")
    package_dir = Path(hnct.common.__file__).resolve().parents[1]  # this checkout's hnct
    proc = subprocess.run([sys.executable, "-c", KILLED_STAGE, str(out), str(sidecar)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(package_dir)))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # No sidecar (old or new): Snakemake sees a missing output and runs the job again.
    assert not sidecar.exists()
    # The file being written never got its final name; the folder holds only this run's files.
    assert not (out / "label.nrrd").exists()
    assert (out / "volume.nrrd").read_bytes() == b"complete volume"


def test_case_folder_is_emptied_first_and_empty_for_an_excluded_case(tmp_path):
    out = tmp_path / "crops" / "C2"
    out.mkdir(parents=True)
    (out / "old.nrrd").write_bytes(b"earlier run")

    def bad():
        (out / "partial.nrrd").write_bytes(b"written before the stage found the problem")
        raise InputError("C2", "/data/C2", "no labelled voxel")

    sidecar = run_case_stage("C2", "crop", tmp_path / "crops" / "C2.json", bad, out_dir=out)
    assert sidecar["status"] == "excluded"
    assert out.is_dir() and list(out.iterdir()) == []


def test_a_folder_not_named_after_the_case_is_never_emptied(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "other_case.nrrd").write_bytes(b"keep")
    with pytest.raises(ValueError, match="not the case's own folder"):
        run_case_stage("C1", "crop", tmp_path / "C1.json", lambda: {}, out_dir=tmp_path / "results")
    assert (tmp_path / "results" / "other_case.nrrd").read_bytes() == b"keep"
