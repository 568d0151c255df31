"""fetch: the NBIA client and the fetch stage against a real HTTP server on 127.0.0.1 (tests/nbia_server.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from hnct.common import read_json
from hnct.fetch import (
    find_series_folder,
    index_folder,
    main as fetch_main,
    manifest_cohort,
    series_folder_name,
    study_folder_name,
)
from hnct.manifest import ManifestError, read_manifest
from hnct.tcia import NBIAClient
from nbia_server import ALWAYS, NBIAServer, write_test_series

REPO = Path(__file__).resolve().parents[1]

STUDY_1, STUDY_2, STUDY_3 = "1.2.826.0.1.3680043.8.498.11111", "1.2.826.0.1.3680043.8.498.22222", "1.2.826.0.1.3680043.8.498.33333"
CT_1, RT_1 = "1.2.826.0.1.3680043.8.498.10001", "1.2.826.0.1.3680043.8.498.10002"
CT_2, RT_2 = "1.2.826.0.1.3680043.8.498.20001", "1.2.826.0.1.3680043.8.498.20002"
CT_3, PT_3 = "1.2.826.0.1.3680043.8.498.30001", "1.2.826.0.1.3680043.8.498.30002"
CT_LOCKED = "1.2.826.0.1.3680043.8.498.40001"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """The server's side: small real DICOM series of four patients in two collections."""
    root = tmp_path_factory.mktemp("served")
    write_test_series(root, "COLL-A", "PAT-001", STUDY_1, CT_1, "CT", n_files=12, description="Neck 2.0 CE")
    write_test_series(root, "COLL-A", "PAT-001", STUDY_1, RT_1, "RTSTRUCT", series_number=900, description="RTSTRUCT")
    write_test_series(root, "COLL-A", "PAT-002", STUDY_2, CT_2, "CT", n_files=4, description="AXIAL/HEAD")
    write_test_series(root, "COLL-A", "PAT-002", STUDY_2, RT_2, "RTSTRUCT", series_number=900, description="")
    write_test_series(root, "COLL-B", "PAT-003", STUDY_3, CT_3, "CT", n_files=2, description="CT IMAGES")
    write_test_series(root, "COLL-B", "PAT-003", STUDY_3, PT_3, "PT", n_files=2, series_number=1, description="PET AC 21")
    write_test_series(root, "COLL-B", "PAT-004", "1.2.826.0.1.3680043.8.498.44444", CT_LOCKED, "CT", n_files=2)
    return root


@pytest.fixture
def server(served):
    nbia = NBIAServer(served, token="s3cret").start()
    yield nbia
    nbia.stop()


def client_for(server: NBIAServer, token: str = "") -> NBIAClient:
    return NBIAClient(server.api_url, timeout_s=5.0, retries=2, backoff_s=0.01, token=token)


def run_fetch(server, tmp_path, case, collection, patient, series_uid="", labels=True, token="") -> dict:
    """The stage's CLI entry, as the rule runs it (in-process)."""
    sidecar = tmp_path / "results" / "fetch" / f"{case}.json"
    argv = ["case", "--case", case, "--collection", collection, "--patient", patient,
            "--series-uid", series_uid, "--dicom-root", str(tmp_path / "dicom"), "--sidecar", str(sidecar),
            "--api-url", server.api_url, "--timeout-s", "5", "--retries", "2", "--backoff-s", "0.01",
            "--attempts", "2", "--labels" if labels else "--no-labels"]
    if token:
        token_file = tmp_path / "token.txt"
        token_file.write_text(token + "\n")
        argv += ["--token-file", str(token_file)]
    assert fetch_main(argv) == 0
    return read_json(sidecar)


def served_bytes(served: Path, series_uid: str) -> list[bytes]:
    """The served series' files in InstanceNumber order (the order getImage numbers them)."""
    paths = sorted(served.rglob(f"{series_uid}/*.dcm"),
                   key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber))
    return [p.read_bytes() for p in paths]


def assert_layout_clean(dicom_root: Path) -> None:
    """No temporary download left, and every series folder in the layout verifies."""
    assert not any((dicom_root / ".hnct-tmp").rglob("*")) if (dicom_root / ".hnct-tmp").exists() else True
    from hnct.fetch import verify_series_folder

    for folder in dicom_root.glob("*/*/*/*"):
        uid = str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
        verify_series_folder(folder, uid)


def test_folder_names_follow_the_data_retriever():
    assert study_folder_name("19971111", "RT SIMULATION", "1.2.3.19590") == "11-11-1997-NA-RT SIMULATION-19590"
    assert series_folder_name("10", "", "1.2.88887") == "10.000000-NA-88887"
    assert series_folder_name(2, "AXIAL/HEAD", "1.2.3.01942") == "2.000000-AXIAL_HEAD-01942"
    assert study_folder_name("", "", "1.2.3.45678") == "NA-NA-NA-45678"


def test_fetch_writes_the_served_files_in_the_data_retriever_layout(server, served, tmp_path):
    one = run_fetch(server, tmp_path, "PAT-001", "COLL-A", "PAT-001")
    two = run_fetch(server, tmp_path, "PAT-002", "COLL-A", "PAT-002", series_uid=CT_2)
    dicom_root = tmp_path / "dicom"
    assert one["status"] == "ok" and two["status"] == "ok"
    assert one["dicom_dir"] == "COLL-A/PAT-001" and one["series_uid"] == CT_1
    assert [s["modality"] for s in one["series"]] == ["CT", "RTSTRUCT"]
    ct = one["series"][0]
    assert ct["folder"] == "COLL-A/PAT-001/04-11-2005-NA-RT SIMULATION-11111/2.000000-Neck 2.0 CE-10001"
    names = sorted(ct["md5"])
    assert names == [f"1-{k:02d}.dcm" for k in range(1, 13)]  # zero-padded to the count, as NBIA names them
    got = [(dicom_root / ct["folder"] / name).read_bytes() for name in names]
    assert got == served_bytes(served, CT_1)
    assert (dicom_root / ct["folder"] / "LICENSE").exists()
    assert ct["bytes"] == sum(len(b) for b in got) and one["n_files"] == 13
    assert "2.000000-AXIAL_HEAD-20001" in two["series"][0]["folder"]
    assert two["series"][1]["folder"].endswith("/900.000000-NA-20002")
    assert_layout_clean(dicom_root)
    assert server.requests[("getImage", CT_1)] == 1


def test_without_labels_only_the_ct_is_fetched_and_pet_is_never_chosen(server, tmp_path):
    sidecar = run_fetch(server, tmp_path, "PAT-003", "COLL-B", "PAT-003", labels=False)
    assert [s["series_uid"] for s in sidecar["series"]] == [CT_3]
    assert server.requests[("getImage", PT_3)] == 0


def test_a_pet_series_given_as_the_ct_is_excluded(server, tmp_path):
    sidecar = run_fetch(server, tmp_path, "PAT-003", "COLL-B", "PAT-003", series_uid=PT_3)
    assert sidecar["status"] == "excluded"
    assert f"series {PT_3} is PT, not CT" in sidecar["reason"]
    assert server.requests[("getImage", PT_3)] == 0


@pytest.mark.parametrize("fault, reason", [
    ("drop", "connection dropped during the download"),
    ("error_500", "HTTP 500"),
    ("truncate", "truncated or corrupt zip"),
    ("wrong_md5", "MD5 mismatch for 1-01.dcm"),
])
def test_a_persistent_fault_excludes_the_case_and_leaves_no_partial_series(server, tmp_path, fault, reason):
    getattr(server, fault)[CT_1] = ALWAYS
    sidecar = run_fetch(server, tmp_path, "PAT-001", "COLL-A", "PAT-001")
    assert sidecar["status"] == "excluded" and sidecar["stage"] == "fetch"
    assert sidecar["file"] == CT_1
    assert reason in sidecar["reason"] and "after 2 attempts" in sidecar["reason"]
    assert f"series {CT_1} (CT)" in sidecar["reason"]
    dicom_root = tmp_path / "dicom"
    assert find_series_folder(dicom_root / "COLL-A" / "PAT-001", CT_1) is None
    assert_layout_clean(dicom_root)


@pytest.mark.parametrize("fault", ["drop", "error_500", "truncate", "wrong_md5"])
def test_a_transient_fault_is_retried(server, served, tmp_path, fault):
    getattr(server, fault)[CT_1] = 1
    sidecar = run_fetch(server, tmp_path, "PAT-001", "COLL-A", "PAT-001")
    assert sidecar["status"] == "ok"
    assert server.requests[("getImage", CT_1)] == 2
    ct = sidecar["series"][0]
    assert [(tmp_path / "dicom" / ct["folder"] / n).read_bytes() for n in sorted(ct["md5"])] == served_bytes(served, CT_1)


def test_a_restricted_series_is_not_accessible(server, tmp_path):
    server.restricted.add(CT_LOCKED)
    sidecar = run_fetch(server, tmp_path, "PAT-004", "COLL-B", "PAT-004")
    assert sidecar["status"] == "excluded"
    assert f"series {CT_LOCKED} (CT) is not accessible (HTTP 400)" in sidecar["reason"]
    assert server.requests[("getImage", CT_LOCKED)] == 1  # a 400 is an answer: never retried
    assert not (tmp_path / "dicom" / "COLL-B" / "PAT-004").exists()


def test_a_collection_that_needs_permission(server, tmp_path):
    server.permission_collections.add("COLL-B")
    refused = run_fetch(server, tmp_path, "PAT-003", "COLL-B", "PAT-003")
    assert refused["status"] == "excluded"
    assert "collection COLL-B needs permission (HTTP 401)" in refused["reason"]
    allowed = run_fetch(server, tmp_path, "PAT-003", "COLL-B", "PAT-003", token="s3cret")
    assert allowed["status"] == "ok"


def test_no_results_is_patient_not_found(server, tmp_path):
    server.empty_patients.add("PAT-001")
    sidecar = run_fetch(server, tmp_path, "PAT-001", "COLL-A", "PAT-001")
    assert sidecar["status"] == "excluded"
    assert sidecar["reason"] == "patient PAT-001 not found in collection COLL-A (getSeries returned no series)"
    unknown = run_fetch(server, tmp_path, "PAT-999", "COLL-A", "PAT-999")
    assert "patient PAT-999 not found" in unknown["reason"]


def test_client_reads_the_empty_body_as_no_results(server):
    client = client_for(server)
    assert client.get_series(collection="COLL-A", patient_id="NOBODY") == []
    assert [s["SeriesInstanceUID"] for s in client.get_series(collection="COLL-B", patient_id="PAT-003", modality="PT")] == [PT_3]
    size = client.get_series_size(CT_1)
    assert size["ObjectCount"] == 12 and size["TotalSizeInBytes"] > 0
    assert client.get_series_size("1.2.3.4") == {}


def test_rerun_after_a_partial_folder_downloads_only_that_series(server, tmp_path):
    first = run_fetch(server, tmp_path, "PAT-001", "COLL-A", "PAT-001")
    dicom_root = tmp_path / "dicom"
    ct_folder = dicom_root / first["series"][0]["folder"]
    (ct_folder / "1-07.dcm").unlink()  # a partial copy (as an interrupted hand copy leaves it)
    second = run_fetch(server, tmp_path, "PAT-001", "COLL-A", "PAT-001")
    assert second["status"] == "ok"
    assert [s["downloaded"] for s in second["series"]] == [True, False]
    assert server.requests[("getImage", CT_1)] == 2 and server.requests[("getImage", RT_1)] == 1
    assert (ct_folder / "1-07.dcm").exists()
    # A changed file is caught by its MD5 and replaced too.
    (ct_folder / "1-03.dcm").write_bytes(b"not the served file")
    third = run_fetch(server, tmp_path, "PAT-001", "COLL-A", "PAT-001")
    assert third["n_downloaded"] == 1 and server.requests[("getImage", CT_1)] == 3
    # A complete, verified case is not downloaded again at all.
    fourth = run_fetch(server, tmp_path, "PAT-001", "COLL-A", "PAT-001")
    assert fourth["n_downloaded"] == 0 and server.requests[("getImage", CT_1)] == 3
    assert_layout_clean(dicom_root)


def test_a_killed_fetch_reruns_only_what_was_missing(server, served, tmp_path):
    """Kill the CLI (SIGKILL) while it waits on the RTSTRUCT; the rerun downloads only the RTSTRUCT."""
    server.stall[RT_1] = 30.0
    dicom_root = tmp_path / "dicom"
    sidecar = tmp_path / "results" / "fetch" / "PAT-001.json"
    cmd = [sys.executable, "-m", "hnct.fetch", "case", "--case", "PAT-001", "--collection", "COLL-A",
           "--patient", "PAT-001", "--dicom-root", str(dicom_root), "--sidecar", str(sidecar),
           "--api-url", server.api_url, "--timeout-s", "60", "--retries", "0", "--backoff-s", "0.01"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "workflow"))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while server.requests[("getImage", RT_1)] == 0:
            assert proc.poll() is None, "fetch ended before the RTSTRUCT request"
            assert time.monotonic() < deadline, "the RTSTRUCT was never requested"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not sidecar.exists()
    assert find_series_folder(dicom_root / "COLL-A" / "PAT-001", RT_1) is None
    assert find_series_folder(dicom_root / "COLL-A" / "PAT-001", CT_1) is not None
    server.stall.clear()
    rerun = run_fetch(server, tmp_path, "PAT-001", "COLL-A", "PAT-001")
    assert rerun["status"] == "ok"
    assert [s["downloaded"] for s in rerun["series"]] == [False, True]
    assert server.requests[("getImage", CT_1)] == 1 and server.requests[("getImage", RT_1)] == 2
    assert not any((dicom_root / ".hnct-tmp").rglob("*.zip"))
    assert_layout_clean(dicom_root)


def test_a_full_disk_is_an_exclusion_naming_the_series(server, tmp_path):
    """ENOSPC from the filesystem (RLIMIT-free): a read-only-sized tmpfs is not available, so the
    download destination is /dev/full, which fails every write with ENOSPC as a full disk does."""
    if not Path("/dev/full").exists():
        pytest.skip("/dev/full is not available")
    from hnct.common import InputError
    from hnct import fetch as fetch_module

    client = client_for(server)
    original = client.download_series_zip

    def to_dev_full(series_uid, destination, chunk_bytes=1 << 20):
        return original(series_uid, "/dev/full", chunk_bytes)

    client.download_series_zip = to_dev_full  # the real download, written to a device that is always full
    with pytest.raises(InputError) as err:
        fetch_module.fetch_case("PAT-003", "COLL-B", "PAT-003", tmp_path / "dicom", client, labels=False,
                                attempts=1)
    assert err.value.file == CT_3 and "disk full" in err.value.reason


def test_index_reads_headers_not_folder_names(server, served, tmp_path):
    run_fetch(server, tmp_path, "PAT-001", "COLL-A", "PAT-001")
    run_fetch(server, tmp_path, "PAT-003", "COLL-B", "PAT-003")
    table, _ = index_folder(tmp_path / "dicom")
    assert list(table["case"]) == ["PAT-001", "PAT-003"]
    assert list(table["series_uid"]) == [CT_1, CT_3]
    assert table.loc["PAT-001", "dicom_dir"] == "COLL-A/PAT-001/04-11-2005-NA-RT SIMULATION-11111"
    # Any folder of DICOM: the served tree is named by UID, not in the Data Retriever layout.
    raw, skipped = index_folder(served)
    assert set(raw["series_uid"]) == {CT_1, CT_2, CT_3, CT_LOCKED}
    assert set(skipped["series_uid"]) == {RT_1, RT_2, PT_3}
    out = tmp_path / "cohort.tsv"
    assert fetch_main(["index", "--root", str(served), "--out", str(out)]) == 0
    assert out.read_text().splitlines()[0].startswith("case\tpatient\tcollection\tdicom_dir\tseries_uid")


def test_manifest_parsing_and_cohort(server, tmp_path):
    manifest = tmp_path / "basket.tcia"
    manifest.write_text(
        "downloadServerUrl=http://127.0.0.1/nbia-download/servlet/DownloadServlet\n"
        "includeAnnotation=true\nnoOfrRetry=4\ndatabasketId=manifest-1.tcia\nmanifestVersion=3.0\n"
        f"ListOfSeriesToDownload=\n{CT_1}\n{RT_1}\n{CT_3}\n{CT_3}\n\n"
    )
    parsed = read_manifest(manifest)
    assert parsed.header["manifestVersion"] == "3.0" and parsed.header["noOfrRetry"] == "4"
    assert parsed.series_uids == [CT_1, RT_1, CT_3]
    table = manifest_cohort(manifest, client_for(server))
    assert list(table["case"]) == ["PAT-001", "PAT-003"]
    assert list(table["dicom_dir"]) == ["COLL-A/PAT-001", "COLL-B/PAT-003"]
    bad = tmp_path / "bad.tcia"
    bad.write_text("manifestVersion=3.0\nListOfSeriesToDownload=\nnot-a-uid\n")
    with pytest.raises(ManifestError, match="bad.tcia:3: not a SeriesInstanceUID"):
        read_manifest(bad)


def test_the_annotated_series_is_resolved_by_its_uid_digits(server, tmp_path):
    """LaryngealCT's img_list gives a folder's last 5 UID digits: resolved among getSeries, CT only."""
    sidecar = tmp_path / "results" / "fetch" / "PAT-003.json"
    base = ["case", "--case", "PAT-003", "--collection", "COLL-B", "--patient", "PAT-003",
            "--dicom-root", str(tmp_path / "dicom"), "--sidecar", str(sidecar), "--api-url", server.api_url,
            "--retries", "0", "--backoff-s", "0.01", "--no-labels"]
    assert fetch_main(base + ["--series-uid-suffix", CT_3[-5:]]) == 0
    assert read_json(sidecar)["series_uid"] == CT_3
    # A "PET AC" folder in img_list that is really a PET series: excluded, not fetched.
    assert fetch_main(base + ["--series-uid-suffix", PT_3[-5:]]) == 0
    pet = read_json(sidecar)
    assert pet["status"] == "excluded" and f"...{PT_3[-5:]} is not CT: {PT_3} (PT)" in pet["reason"]
    assert fetch_main(base + ["--series-uid-suffix", "99999"]) == 0
    assert "no series of the patient's 2 has a UID ending in 99999" in read_json(sidecar)["reason"]
    assert server.requests[("getImage", PT_3)] == 0


def test_source_manifest_fetches_only_the_listed_series(server, tmp_path):
    manifest = tmp_path / "basket.tcia"
    manifest.write_text(f"manifestVersion=3.0\nListOfSeriesToDownload=\n{CT_1}\n")
    sidecar = tmp_path / "results" / "fetch" / "PAT-001.json"
    assert fetch_main(["case", "--case", "PAT-001", "--collection", "COLL-A", "--patient", "PAT-001",
                       "--series-uid", CT_1, "--dicom-root", str(tmp_path / "dicom"), "--sidecar", str(sidecar),
                       "--api-url", server.api_url, "--manifest", str(manifest)]) == 0
    assert [s["series_uid"] for s in read_json(sidecar)["series"]] == [CT_1]  # RTSTRUCT not listed
    assert server.requests[("getImage", RT_1)] == 0


def test_an_unreachable_api_fails_the_job_without_excluding_the_case(tmp_path):
    """Nothing listens on the port: no sidecar (so a later run tries again), exit status 1."""
    import socket

    with socket.socket() as sock:  # a free port on 127.0.0.1, closed again: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sidecar = tmp_path / "results" / "fetch" / "PAT-001.json"
    status = fetch_main(["case", "--case", "PAT-001", "--collection", "COLL-A", "--patient", "PAT-001",
                         "--dicom-root", str(tmp_path / "dicom"), "--sidecar", str(sidecar),
                         "--api-url", f"http://127.0.0.1:{port}/nbia-api/services/v4/",
                         "--retries", "1", "--backoff-s", "0.01"])
    assert status == 1 and not sidecar.exists()


def test_placing_a_series_another_job_placed_meanwhile_keeps_the_verified_one(server, tmp_path):
    from hnct.fetch import _place

    first = run_fetch(server, tmp_path / "a", "PAT-002", "COLL-A", "PAT-002", labels=False)
    second = run_fetch(server, tmp_path / "b", "PAT-002", "COLL-A", "PAT-002", labels=False)
    final = tmp_path / "a" / "dicom" / first["series"][0]["folder"]
    ours = tmp_path / "b" / "dicom" / second["series"][0]["folder"]
    before = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    assert _place(ours, final, CT_2, 4)["files"] == first["series"][0]["md5"]
    assert {p.name: p.stat().st_mtime_ns for p in final.iterdir()} == before  # untouched
    (final / "1-2.dcm").unlink()  # an unverified folder in the way is replaced
    assert _place(ours, final, CT_2, 4) is None
    assert (final / "1-2.dcm").exists() and not ours.exists()
