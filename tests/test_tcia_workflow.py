"""source: tcia end to end: the whole DAG fetches a synthetic cohort from a loopback NBIA server.

Issue 7's acceptance: with ``cohort.source: tcia`` and ``tcia.api_url`` pointed at the NBIA v4
server of tests/nbia_server.py (real HTTP on 127.0.0.1), ``snakemake`` fetches the cohort and the
rest of the DAG (convert, crop, slices, folds, train, evaluate, report) runs unchanged.

The served cohort is hnct.demo's synthetic DICOM (small: 8 patients, one scanned twice, two with a
localizer, one CT with a missing slice, one patient with an MR only), written in the NBIA Data
Retriever layout. The same folder, read as ``source: local``, is the reference: every fetched case
must convert to the identical volume and label map (voxels and geometry).

The fault run copies the finished run, deletes two cases' downloads, makes the server refuse one
(HTTP 400) and corrupt the other (a wrong MD5, every time), and reruns to the folds: only those two
cases are requested again, both are excluded with their reason, and the folds are rebuilt without them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from conftest import REPO, run_snakemake
from hnct import demo
from nbia_server import ALWAYS, NBIAServer

pytestmark = [pytest.mark.workflow, pytest.mark.slow]

N_PATIENTS, SEED = 8, 1729
TABLE_COLUMNS = ["case", "patient", "collection", "dicom_dir", "series_uid", "t_stage", "label_t4",
                 "node_positive", "split"]
# The smallest run the schema allows that still trains, evaluates and reports both tasks.
SMALL = {
    "folds": {"n_folds": 2},
    "tasks": ["classify", "segment"],
    "models": {"classify": ["cnn3d"], "segment": ["unet"]},
    # labels from the DICOM alone: the NBIA server serves DICOM series, not the demo's HaN-Seg-style
    # mask folders beside them, so the local run must not read them either
    "convert": {"mask_dir": "", "annotation_table": ""},
    # one epoch on a fold's 3 training cases: nothing to select on (an inner split needs more patients)
    "train": {"selection": "fixed", "classify": {"epochs": 1, "input_shape": [16, 16, 16], "cnn3d_channels": [4]},
              "segment": {"epochs": 1, "input_size": 32, "unet_features": [4, 4, 4, 4, 4, 4]}},
    "report": {"bootstrap": 20, "dpi": 50},
    "resources": {"train_threads": 1},
}


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def write_config(workdir: Path, overrides: dict) -> Path:
    """config/config.yaml with ``overrides`` merged in, written where the run reads it."""
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    path = workdir / "test-config.yaml"
    path.write_text(yaml.safe_dump(deep_merge(base, overrides), sort_keys=False))
    return path


def read_tsv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def tree_md5(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """The server's DICOM (Data Retriever layout), the demo's plan, and the cohort table of the run."""
    root = tmp_path_factory.mktemp("nbia")
    plan = demo.plan_cohort(n_patients=N_PATIENTS, seed=SEED, t4_fraction=0.35, broken_cases=True,
                            two_scan_patients=1)
    for _, row in plan.iterrows():
        demo.write_case(row, root / "dicom", root / "cases" / f"{row['case']}.json")
    # What a user writes for source tcia: the patient, its collection, the labels; a CT series UID
    # only where one patient has two scans (else fetch takes the patient's CT series).
    table = plan[TABLE_COLUMNS].copy()
    two_scans = plan["patient"].duplicated(keep=False)
    table.loc[two_scans, "series_uid"] = plan.loc[two_scans, "ct_series_uid"]
    table_path = root / "cohort.tsv"
    table.to_csv(table_path, sep="\t", index=False)
    assert two_scans.sum() == 2 and (plan["localizer_series_uid"] != "").sum() == 2
    assert set(plan["demo_kind"]) == {"ct", "gap", "no_ct"}
    return {"root": root / "dicom", "plan": plan.set_index("case", drop=False), "table": table_path}


@pytest.fixture(scope="module")
def server(served):
    """One loopback NBIA server for the module: a rerun sees the same tcia.api_url (the same params)."""
    nbia = NBIAServer(served["root"]).start()
    yield nbia
    nbia.stop()


def tcia_config(workdir: Path, served: dict, server: NBIAServer) -> Path:
    return write_config(workdir, {
        **SMALL,
        "cohort": {"source": "tcia", "table": str(served["table"]), "dicom_root": "data/tcia"},
        "tcia": {"api_url": server.api_url, "timeout_s": 30, "retries": 1, "backoff_s": 0.01, "attempts": 2},
    })


@pytest.fixture(scope="module")
def tcia_run(served, server, tmp_path_factory) -> dict:
    """`snakemake --cores 2` with source tcia against the loopback server, to the final outputs."""
    workdir = tmp_path_factory.mktemp("tcia-run")
    config = tcia_config(workdir, served, server)
    started = time.monotonic()
    run_snakemake(workdir, "--cores", "2", configfile=config, timeout=900)
    seconds = time.monotonic() - started
    requests = dict(server.requests)
    dry = run_snakemake(workdir, "-n", configfile=config)
    print(f"source tcia, whole DAG: {seconds:.1f} s")
    return {"workdir": workdir, "config": config, "requests": requests, "dry_run": dry.stdout + dry.stderr,
            "requests_after_dry_run": dict(server.requests)}


@pytest.fixture(scope="module")
def local_run(served, tmp_path_factory) -> Path:
    """The same DICOM folder converted as source local (the reference for the fetched cases)."""
    workdir = tmp_path_factory.mktemp("local-run")
    config = write_config(workdir, {
        **SMALL, "cohort": {"source": "local", "table": str(served["table"]), "dicom_root": str(served["root"])},
    })
    targets = [f"results/volumes/{case}.json" for case in served["plan"]["case"]]
    run_snakemake(workdir, "--cores", "2", *targets, configfile=config, timeout=600)
    return workdir


def test_every_case_is_fetched_in_the_data_retriever_layout(served, tcia_run):
    """Each case's series lie where the Data Retriever puts them, byte for byte the served files."""
    workdir, plan = tcia_run["workdir"], served["plan"]
    fetched_root = workdir / "data" / "tcia"
    for case, row in plan.iterrows():
        sidecar = json.loads((workdir / "results" / "fetch" / f"{case}.json").read_text())
        if row["demo_kind"] == "no_ct":  # an MR only: no CT series to fetch, excluded by fetch
            assert sidecar["status"] == "excluded", sidecar
            assert "no CT series" in sidecar["reason"], sidecar["reason"]
            assert not (fetched_root / row["collection"] / row["patient"]).exists()
            continue
        assert sidecar["status"] == "ok", sidecar
        # The served series the case needs: its CT (with the patient's localizer when the row names
        # no series, since fetch then takes every CT) and the RTSTRUCT of its study.
        expected = {row["ct_series_uid"], row["rtstruct_series_uid"]}
        if row["localizer_series_uid"] and not row["series_uid"]:
            expected.add(row["localizer_series_uid"])
        assert {s["series_uid"] for s in sidecar["series"]} == expected, case
        planned = {s["uid"]: s for s in demo._series_of(row)}
        for series in sidecar["series"]:
            # Collection/PatientID/<date>-NA-<study description>-<5 UID digits>/<number>-<description>-<5 digits>
            assert series["folder"] == planned[series["series_uid"]]["folder"], (case, series["folder"])
            got = tree_md5(fetched_root / series["folder"])
            want = tree_md5(served["root"] / series["folder"])
            # The Data Retriever keeps the zip's LICENSE and md5hashes.csv beside the DICOM files.
            assert set(got) == set(want) | {"LICENSE", "md5hashes.csv"}, (case, series["folder"])
            assert {name: got[name] for name in want} == want, (case, series["folder"])
            listed = pd.read_csv(fetched_root / series["folder"] / "md5hashes.csv", dtype=str)
            assert dict(zip(listed["Filename"], listed["MD5Hash"])) == want, (case, series["folder"])
            assert series["n_files"] == len(planned[series["series_uid"]]["files"])
    # Nothing but the Data Retriever tree: no temporary files left behind.
    tmp = fetched_root / ".hnct-tmp"
    assert not tmp.exists() or not any(p.is_file() for p in tmp.rglob("*"))
    # Every served series of a fetched case was downloaded exactly once.
    image_requests = {uid: n for (endpoint, uid), n in tcia_run["requests"].items() if endpoint == "getImage"}
    assert image_requests and set(image_requests.values()) == {1}, image_requests


def test_fetched_cases_convert_to_the_same_volumes_as_the_local_folder(served, tcia_run, local_run):
    """Voxel for voxel and in geometry, fetched DICOM converts as the same DICOM read locally."""
    workdir = tcia_run["workdir"]
    compared = 0
    for case, row in served["plan"].iterrows():
        fetched = json.loads((workdir / "results" / "volumes" / f"{case}.json").read_text())
        local = json.loads((local_run / "results" / "volumes" / f"{case}.json").read_text())
        if row["demo_kind"] == "no_ct":
            assert fetched["status"] == "excluded" and fetched["excluded_at"] == "fetch"
            assert local["status"] == "excluded" and local["excluded_at"] == "convert"
            continue
        assert fetched["status"] == local["status"], (case, fetched.get("reason"), local.get("reason"))
        if row["demo_kind"] == "gap":  # the missing slice: excluded by convert, the same reason both ways
            assert fetched["excluded_at"] == local["excluded_at"] == "convert"
            assert fetched["reason"] == local["reason"]
            continue
        assert fetched["series_uid"] == local["series_uid"] == row["ct_series_uid"]
        for key in ("volume", "label"):
            a = sitk.ReadImage(str(workdir / fetched[key]))
            b = sitk.ReadImage(str(local_run / local[key]))
            assert a.GetPixelID() == b.GetPixelID() and a.GetSize() == b.GetSize(), (case, key)
            assert a.GetOrigin() == b.GetOrigin() and a.GetSpacing() == b.GetSpacing(), (case, key)
            assert a.GetDirection() == b.GetDirection(), (case, key)
            assert np.array_equal(sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)), (case, key)
        compared += 1
    assert compared == N_PATIENTS + 1  # the two-scan patient gives two cases


def test_the_rest_of_the_dag_ran_unchanged(served, tcia_run):
    workdir, plan = tcia_run["workdir"], served["plan"]
    exclusions = read_tsv(workdir / "results" / "exclusions.tsv")
    by_case = {row.case: row for row in exclusions.itertuples()}
    no_ct = plan.index[plan["demo_kind"] == "no_ct"][0]
    gap = plan.index[plan["demo_kind"] == "gap"][0]
    assert by_case[no_ct].stage == "fetch" and "no CT series" in by_case[no_ct].reason
    assert by_case[gap].stage == "convert" and len(by_case[gap].reason) > 10
    usable = set(plan.index) - {no_ct, gap}
    for task in ("classify", "segment"):
        folds = read_tsv(workdir / "results" / "folds" / task / "folds.tsv")
        assert set(folds["case"]) == usable, task
        # Folds group by patient: the two scans of one patient share a fold.
        assert folds.groupby("patient")["fold"].nunique().max() == 1
    for task, model in (("classify", "cnn3d"), ("segment", "unet")):
        for fold in range(2):
            assert (workdir / "results" / "train" / task / model / f"fold{fold}" / "best.pt").stat().st_size > 0
            metrics = json.loads((workdir / "results" / "evaluate" / task / model / f"fold{fold}" / "metrics.json").read_text())
            assert metrics["task"] == task and int(metrics["fold"]) == fold
    for name in ("metrics_summary.csv", "cohort.png", "crop_qa.png", "roc_pr.png", "training_curves.png",
                 "segmentation_boxplots.png"):
        assert (workdir / "results" / "report" / name).stat().st_size > 0, name
    # After a complete run nothing is fetched or converted again, and planning asks the server nothing.
    # (Only the per-case layers: the training layer reruns when its code changes, which in a shared
    # checkout can happen while this test runs.)
    for rule in ("fetch_series", "convert_series", "crop_larynx", "export_slices"):
        assert f"rule {rule}:" not in tcia_run["dry_run"], tcia_run["dry_run"][-3000:]
    assert tcia_run["requests_after_dry_run"] == tcia_run["requests"]


def test_a_refused_and_a_corrupt_case_are_excluded_and_only_they_are_fetched_again(served, server, tcia_run,
                                                                                  tmp_path):
    """Rerun after losing two cases' downloads, with one refused (400) and one always failing its MD5.

    The two are chosen so that the folds still hold both classes of both tasks without them.
    """
    plan = served["plan"]
    workdir = tmp_path / "rerun"
    shutil.copytree(tcia_run["workdir"], workdir, symlinks=True)  # copy2: mtimes kept
    refused, corrupt = "DEMO-GAMMA-001", "DEMO-ALPHA-003"
    assert set(plan.loc[[refused, corrupt], "demo_kind"]) == {"ct"}
    assert set(plan.loc[[refused, corrupt], "localizer_series_uid"]) == {""}
    # As a run killed while fetching them leaves it: their downloads and every output of theirs gone.
    for case in (refused, corrupt):
        row = plan.loc[case]
        shutil.rmtree(workdir / "data" / "tcia" / row["collection"] / row["patient"])
        outputs = sorted((workdir / "results").rglob(f"{case}.*")) + sorted((workdir / "results").rglob(case))
        assert workdir / "results" / "fetch" / f"{case}.json" in outputs
        for path in outputs:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    # ... and nothing that gathers every case yet (a missing intermediate alone reruns nothing).
    (workdir / "results" / "exclusions.tsv").unlink()
    shutil.rmtree(workdir / "results" / "folds")
    refused_ct, corrupt_ct = plan.loc[refused, "ct_series_uid"], plan.loc[corrupt, "ct_series_uid"]
    server.requests.clear()
    server.restricted.add(refused_ct)
    server.wrong_md5[corrupt_ct] = ALWAYS
    try:
        started = time.monotonic()
        run_snakemake(workdir, "--cores", "2", "results/exclusions.tsv", "results/folds/classify/folds.tsv",
                      "results/folds/segment/folds.tsv", configfile=tcia_config(workdir, served, server),
                      timeout=600)
        print(f"fault rerun to the folds: {time.monotonic() - started:.1f} s")
    finally:
        server.restricted.clear()
        server.wrong_md5.clear()
    # Only the two lost cases went back to the server, and each stopped at its CT (listed first).
    images = {uid: n for (endpoint, uid), n in server.requests.items() if endpoint == "getImage"}
    assert images == {refused_ct: 1, corrupt_ct: 2}, images  # a 400 is never retried; MD5: tcia.attempts
    listed = {key for (endpoint, key) in server.requests if endpoint == "getSeries"}
    assert listed == {plan.loc[refused, "patient"], plan.loc[corrupt, "patient"]}, listed
    exclusions = read_tsv(workdir / "results" / "exclusions.tsv")
    by_case = {row.case: row for row in exclusions.itertuples()}
    assert by_case[refused].stage == "fetch" and "HTTP 400" in by_case[refused].reason, by_case[refused]
    assert by_case[refused].file == refused_ct
    assert by_case[corrupt].stage == "fetch" and "MD5" in by_case[corrupt].reason.upper(), by_case[corrupt]
    assert by_case[corrupt].file == corrupt_ct
    for task in ("classify", "segment"):
        folds = read_tsv(workdir / "results" / "folds" / task / "folds.tsv")
        assert not {refused, corrupt} & set(folds["case"]), task
        assert len(folds) == N_PATIENTS + 1 - 2  # the 9 usable cases, less the two the server broke
