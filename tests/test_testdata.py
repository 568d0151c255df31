"""testdata: the test data cache, filled from a local copy or from loopback servers (NBIA and plain files)."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hnct.testdata import (
    COLUMNS,
    Item,
    Sources,
    TestdataError,
    check_file,
    fetch,
    read_manifest,
    verify,
)
from hnct.testdata import main as cli
from nbia_server import NBIAServer, send_half_and_drop, write_test_series

REPO = Path(__file__).resolve().parents[1]
COMMIT = "d68253ef3b173f43067b6f9db83788bc25cf50cd"
CT_UID, RT_UID = "1.2.826.0.1.3680043.8.498.70001", "1.2.826.0.1.3680043.8.498.70002"
STUDY_UID = "1.2.826.0.1.3680043.8.498.77777"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(path: Path, items: list[Item]) -> Path:
    rows = ["\t".join(COLUMNS)] + [f"{i.path}\t{i.size}\t{i.sha256}\t{i.source}" for i in items]
    path.write_text("\n".join(rows) + "\n")
    return path


class FileServer:
    """``http.server`` on 127.0.0.1 serving ``root``; counts GETs per path; ``drop`` paths get half
    their body, then the connection closes (an interrupted download)."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: dict[str, int] = {}
        self.drop: set[str] = set()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                return

            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests[self.path] = server.requests.get(self.path, 0) + 1
                if self.path in server.drop:
                    return send_half_and_drop(self, (server.root / self.path.lstrip("/")).read_bytes())
                super().do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def raw_files(tmp_path):
    """Two files of a repository at COMMIT, served as a raw-file host serves them; their manifest rows."""
    served = tmp_path / "raw"
    files = {"tests/data/failing/a/IM-1.dcm": b"DICM" * 3000, "LICENSE": b"MIT licence text\n"}
    items = []
    for upstream, data in files.items():
        path = served / "icometrix" / "dicom2nifti" / COMMIT / upstream
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        items.append(Item(f"testdata/real/d2n/{Path(upstream).name}", len(data), sha256(data),
                          f"github:icometrix/dicom2nifti/{COMMIT}/{upstream}"))
    server = FileServer(served)
    yield server, items
    server.stop()


def sources_for(raw_url: str, nbia_url: str = "http://127.0.0.1:9/nbia-api/services/v4/", repo: Path = REPO) -> Sources:
    return Sources(nbia_url=nbia_url, timeout_s=5.0, raw_url=raw_url, repo=repo, attempts=2, backoff_s=0.01)


def no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob(".*") if p.is_file()]


def test_the_manifest_pins_a_public_source_for_every_file():
    items = read_manifest()
    assert len({i.path for i in items}) == len(items)
    kinds = {i.kind for i in items}
    assert kinds == {"nbia", "github", "hnct"}
    for item in items:
        if item.kind == "github":
            assert re.fullmatch(r"[\w.-]+/[\w.-]+/[0-9a-f]{40}/.+", item.locator), item
        elif item.kind == "nbia":
            assert item.locator.count("/") == 2 and item.path.startswith("testdata/real/nsclc-radiomics-LUNG1-001/")
        else:  # a derived file kept in this repository: it is here and verifies
            check_file(REPO / item.locator, item, item.locator)
    lung1_ct = [i for i in items if i.path.endswith(".dcm") and "/image/" in i.path]
    assert len(lung1_ct) == 134 and len({i.source for i in lung1_ct}) == 1


def test_verify_says_which_files_fail_and_how_to_get_the_data(tmp_path):
    data = b"0123456789"
    items = [Item("testdata/real/x/a.dcm", 10, sha256(data), "hnct:none"),
             Item("testdata/real/x/b.dcm", 10, sha256(data), "hnct:none")]
    with pytest.raises(TestdataError, match=r"does not exist: run `make testdata`.*or set HNCT_TESTDATA"):
        verify(tmp_path / "nowhere", items)
    (tmp_path / "testdata" / "real" / "x").mkdir(parents=True)
    (tmp_path / "testdata" / "real" / "x" / "a.dcm").write_bytes(b"9123456789")
    with pytest.raises(TestdataError) as err:
        verify(tmp_path, items)
    message = str(err.value)
    assert f"testdata/real/x/a.dcm: SHA-256 mismatch: expected {sha256(data)}, found {sha256(b'9123456789')}" in message
    assert "testdata/real/x/b.dcm: missing" in message and "make testdata" in message


def test_a_local_copy_is_used_without_any_download(raw_files, tmp_path):
    server, items = raw_files
    copy = tmp_path / "shared"
    for item in items:
        upstream = item.locator.split("/", 3)[3]
        (copy / item.path).parent.mkdir(parents=True, exist_ok=True)
        (copy / item.path).write_bytes((server.root / "icometrix" / "dicom2nifti" / COMMIT / upstream).read_bytes())
    root = tmp_path / "cache"
    assert fetch(root, items, copy_from=copy, sources=sources_for(server.url)) == {"copied": 2}
    assert verify(root, items) == root and server.requests == {}
    assert fetch(root, items, copy_from=copy, sources=sources_for(server.url)) == {"kept": 2}
    # A changed file in the local copy is not trusted: that one file is downloaded instead.
    (root / items[0].path).unlink()
    (copy / items[0].path).write_bytes(b"changed")
    assert fetch(root, items, copy_from=copy, sources=sources_for(server.url)) == {"kept": 1, "github": 1}
    assert sum(server.requests.values()) == 1
    verify(root, items)


def test_files_are_downloaded_at_the_pinned_commit_and_checked(raw_files, tmp_path):
    server, items = raw_files
    root = tmp_path / "cache"
    manifest = write_manifest(tmp_path / "manifest.tsv", items)
    assert cli(["fetch", "--root", str(root), "--manifest", str(manifest), "--no-copy",
                          "--raw-url", server.url]) == 0
    assert sorted(server.requests) == sorted(f"/{i.locator}" for i in items)
    assert cli(["verify", "--root", str(root), "--manifest", str(manifest)]) == 0
    assert (root / items[0].path).read_bytes() == b"DICM" * 3000 and no_temporaries(root)


def test_a_checksum_mismatch_names_the_file_and_both_sums_and_leaves_nothing(raw_files, tmp_path, capsys):
    server, items = raw_files
    served = server.root / "icometrix" / "dicom2nifti" / COMMIT / "LICENSE"
    served.write_bytes(b"another licence\n")
    root = tmp_path / "cache"
    with pytest.raises(TestdataError) as err:
        fetch(root, items, sources=sources_for(server.url))
    license_item = items[1]
    assert (f"{license_item.path}: SHA-256 mismatch (from {server.url}/{license_item.locator}): expected "
            f"{license_item.sha256}, found {sha256(b'another licence' + bytes([10]))}") in str(err.value)
    assert not (root / license_item.path).exists() and no_temporaries(root)
    verify(root, items[:1])  # the good file of the same run is in place
    manifest = write_manifest(tmp_path / "manifest.tsv", items)
    assert cli(["verify", "--root", str(root), "--manifest", str(manifest)]) == 1
    assert f"{license_item.path}: missing" in capsys.readouterr().err


def test_an_interrupted_download_is_never_taken_for_complete(raw_files, tmp_path):
    server, items = raw_files
    dicom = items[0]
    root = tmp_path / "cache"
    server.drop.add(f"/{dicom.locator}")
    with pytest.raises(TestdataError, match=re.escape(f"{dicom.path}: {server.url}/{dicom.locator}: download failed")):
        fetch(root, items, sources=sources_for(server.url))
    assert not (root / dicom.path).exists() and no_temporaries(root)
    # What a killed run leaves: a temporary file beside the final name, and a truncated final file.
    final = root / dicom.path
    (final.parent / f".{final.name}.x1y2.tmp").write_bytes(b"DICM")
    final.write_bytes(b"DICM" * 10)
    server.drop.clear()
    requests_before = dict(server.requests)
    assert fetch(root, items, sources=sources_for(server.url)) == {"kept": 1, "github": 1}
    assert server.requests[f"/{dicom.locator}"] == requests_before[f"/{dicom.locator}"] + 1
    assert server.requests[f"/{items[1].locator}"] == requests_before[f"/{items[1].locator}"]  # kept, not fetched
    verify(root, items)
    assert no_temporaries(root)


@pytest.fixture
def nbia(tmp_path):
    """A loopback NBIA server with one patient's CT (3 slices) and RTSTRUCT; manifest rows for them."""
    served = tmp_path / "served"
    write_test_series(served, "NSCLC-TEST", "LUNG-T1", STUDY_UID, CT_UID, "CT", n_files=3)
    write_test_series(served, "NSCLC-TEST", "LUNG-T1", STUDY_UID, RT_UID, "RTSTRUCT", series_number=900)
    server = NBIAServer(served).start()
    base = "testdata/real/lung-t1/LUNG-T1"
    items = []
    for uid, folder in ((CT_UID, "image"), (RT_UID, "mask_rtstruct")):
        for k, path in enumerate(server.files[uid], 1):  # getImage names them 1-1.dcm .. in this order
            data = path.read_bytes()
            items.append(Item(f"{base}/{folder}/1-{k}.dcm", len(data), sha256(data),
                              f"nbia:NSCLC-TEST/LUNG-T1/{uid}"))
    license_text = b"Creative Commons Attribution 4.0 International License (test server)\n"
    items.append(Item("testdata/real/lung-t1/LICENSE", len(license_text), sha256(license_text),
                      f"nbia:NSCLC-TEST/LUNG-T1/{CT_UID}"))
    yield server, items
    server.stop()


def test_tcia_series_come_through_hnct_nbia_client(nbia, tmp_path):
    server, items = nbia
    root = tmp_path / "cache"
    sources = sources_for("http://127.0.0.1:9", nbia_url=server.api_url)
    assert fetch(root, items, sources=sources) == {"nbia": 5}
    verify(root, items)
    assert server.requests[("getImage", CT_UID)] == 1 and server.requests[("getImage", RT_UID)] == 1
    assert not (root / ".hnct-download").exists() and no_temporaries(root)
    # Resume: one slice lost; only its series is asked for again.
    (root / items[1].path).unlink()
    assert fetch(root, items, sources=sources) == {"kept": 4, "nbia": 1}
    assert server.requests[("getImage", CT_UID)] == 2 and server.requests[("getImage", RT_UID)] == 1
    verify(root, items)


def test_a_tcia_file_that_differs_from_the_manifest_is_refused(nbia, tmp_path):
    server, items = nbia
    wrong = Item(items[0].path, items[0].size, "0" * 64, items[0].source)
    root = tmp_path / "cache"
    with pytest.raises(TestdataError) as err:
        fetch(root, [wrong, *items[1:]], sources=sources_for("http://127.0.0.1:9", nbia_url=server.api_url))
    assert f"{wrong.path}: SHA-256 mismatch (from NBIA series {CT_UID}" in str(err.value)
    assert f"expected {'0' * 64}, found {items[0].sha256}" in str(err.value)
    assert not (root / wrong.path).exists()
    verify(root, items[1:])


def test_an_unreachable_nbia_api_is_an_error_naming_the_series(nbia, tmp_path):
    server, items = nbia
    url = server.api_url
    server.stop()
    with pytest.raises(TestdataError, match=f"NBIA series {re.escape(CT_UID)} .*no answer"):
        fetch(tmp_path / "cache", items, sources=sources_for("http://127.0.0.1:9", nbia_url=url))


def test_tests_that_need_the_data_fail_saying_how_to_get_it(tmp_path):
    """With HNCT_TESTDATA at an empty folder the fixture fails, even though ../shared may exist."""
    env = dict(os.environ, HNCT_TESTDATA=str(tmp_path / "empty"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
         str(REPO / "tests" / "test_laryngealct.py"), "-k", "bbox3d_has_every_case"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert f"test data folder {tmp_path / 'empty'} does not exist: run `make testdata`" in proc.stdout
    assert "1 error" in proc.stdout


def test_an_unreachable_file_host_is_tried_once_not_for_every_file(raw_files, tmp_path):
    server, items = raw_files
    url = server.url
    server.stop()
    with pytest.raises(TestdataError) as err:
        fetch(tmp_path / "cache", items, sources=sources_for(url))
    assert f"{items[0].path}: {url}/{items[0].locator}: download failed (ConnectionError" in str(err.value)
    assert f"{items[1].path}: not tried, {url} cannot be reached" in str(err.value)
    assert "set HNCT_TESTDATA" in str(err.value)
