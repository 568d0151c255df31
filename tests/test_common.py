import json

import pytest

from hnct.common import (
    InputError,
    atomic_path,
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
