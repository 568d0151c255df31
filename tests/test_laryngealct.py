"""laryngealct: parsing the published annotation files (samples in ../shared/laryngealct), the
cohort table, and the checked annotation download (served from 127.0.0.1)."""

from __future__ import annotations

import functools
import hashlib
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hnct.cohort import read_cohort
from hnct.laryngealct import (
    COLLECTIONS,
    AnnotationError,
    build_cohort,
    collection_of,
    download_annotations,
    main as laryngealct_main,
    parse_bbox3d,
    parse_img_list,
    read_test_split,
)

REPO = Path(__file__).resolve().parents[1]
COMMIT = "ed3a908888960076c1fbcfb823957910f653b56a"


def test_collections_follow_the_id_patterns():
    assert collection_of("RADCURE-0724") == "RADCURE"
    assert collection_of("HNSCC-01-0165") == "HNSCC"
    assert collection_of("QIN-HEADNECK-02-2440") == "QIN-HEADNECK"
    assert collection_of("HN-CHUS-071") == "Head-Neck-PET-CT"
    assert collection_of("HN1524") == "HEAD-NECK-RADIOMICS-HN1"
    assert collection_of("HN-018") == "Head-Neck-3DCT-RT"
    with pytest.raises(AnnotationError, match="none of the six"):
        collection_of("LUNG1-001")


def test_bbox3d_has_every_case_of_the_six_collections(laryngealct_dir):
    boxes = parse_bbox3d(laryngealct_dir / "bbox3d.txt")
    assert len(boxes) == 1029
    assert boxes["collection"].value_counts().to_dict() == {
        "RADCURE": 867, "HEAD-NECK-RADIOMICS-HN1": 49, "QIN-HEADNECK": 46, "Head-Neck-PET-CT": 44,
        "HNSCC": 19, "Head-Neck-3DCT-RT": 4}
    first = boxes.iloc[0]
    assert (first["case_id"], first["patient"]) == ("RADCURE_0724", "RADCURE-0724")
    assert [first[k] for k in ("x", "y", "z", "size_x", "size_y", "size_z")] == [223, 174, 41, 71, 67, 39]


def test_bbox3d_errors_name_the_line(tmp_path):
    bad = tmp_path / "bbox3d.txt"
    bad.write_text("RADCURE_0724,223,174,41,71,67,39\nRADCURE_3393,226,162,60,73\n")
    with pytest.raises(AnnotationError, match="bbox3d.txt:2: expected case_id and 6 integers"):
        parse_bbox3d(bad)


def test_img_list_dedupes_two_manifests_and_keeps_the_uid_digits(laryngealct_dir):
    excerpt = laryngealct_dir / "img_list_nonRADCURE_excerpt.txt"
    listed = parse_img_list(excerpt, laryngealct_dir / "img_list.sample.txt")
    raw_lines = [ln for ln in excerpt.read_text().splitlines() if ln and not ln.startswith("#")]
    assert len(raw_lines) == 82
    # 44 Head-Neck-PET-CT + 19 HNSCC patients (each HNSCC line twice: two manifests) + 2 RADCURE samples
    assert len(listed) == 65
    hnscc = listed.set_index("patient").loc["HNSCC-01-0011"]
    assert hnscc["n_listed"] == 4  # twice in the excerpt, twice more in the sample
    assert hnscc["series_uid_suffix"] == "88887" and hnscc["series_number"] == "10.000000"
    pet = listed.set_index("patient").loc["HN-HGJ-001"]
    assert pet["series_description"] == "PET AC 21" and pet["series_uid_suffix"] == "83537"
    assert pet["study_folder"] == "08-27-1885-NA-PET OTHER-93368"


def test_img_list_refuses_two_different_series_for_one_patient(tmp_path):
    two = tmp_path / "img_list.txt"
    two.write_text("RADCURE-0006,RADCURE/m/RADCURE/RADCURE-0006/01-08-2006-NA-X-46105/2.000000-A-69565\n"
                   "RADCURE-0006,RADCURE/m/RADCURE/RADCURE-0006/01-08-2006-NA-X-46105/3.000000-B-11111\n")
    with pytest.raises(AnnotationError, match="two different series for"):
        parse_img_list(two)


def test_committed_cohort_is_what_build_cohort_makes(laryngealct_dir, tmp_path):
    out = tmp_path / "cohort.tsv"
    assert laryngealct_main([
        "build-cohort", "--bbox3d", str(laryngealct_dir / "bbox3d.txt"),
        "--img-list", str(laryngealct_dir / "img_list_nonRADCURE_excerpt.txt"),
        "--img-list", str(laryngealct_dir / "img_list.sample.txt"),
        "--test-split", str(laryngealct_dir / "test_split_206_reconstructed.csv"), "--out", str(out),
    ]) == 0
    assert out.read_bytes() == (REPO / "config" / "laryngealct_cohort.tsv").read_bytes()
    cohort = read_cohort(out)
    assert len(cohort) == 1029 and set(cohort["collection"]) == set(COLLECTIONS)
    test = cohort[cohort["split"] == "test"]
    assert len(test) == 206 and (test["label_t4"] == "1").sum() == 17
    assert (cohort.loc[cohort["split"] != "test", "label_t4"] == "").all()
    assert cohort.loc["HN-035", "collection"] == "Head-Neck-3DCT-RT"
    assert cohort.loc["HN-CHUS-001", "dicom_dir"] == "Head-Neck-PET-CT/HN-CHUS-001"
    assert cohort.loc["HN-CHUS-001", "series_uid_suffix"] == "19984"
    assert cohort.loc["RADCURE-0724", "case_id"] == "RADCURE_0724"


def test_test_split_patients_must_be_in_bbox3d(laryngealct_dir, tmp_path):
    boxes = parse_bbox3d(laryngealct_dir / "bbox3d.txt")
    split = tmp_path / "split.csv"
    split.write_text("TCIA_ID,Label_T4\nRADCURE-9999,1\n")
    with pytest.raises(AnnotationError, match="not in bbox3d"):
        build_cohort(boxes, None, read_test_split(split))


@pytest.fixture
def file_server(tmp_path):
    """Serve a copy of the annotation files as <root>/<commit>/data/annotations/... on 127.0.0.1."""
    root = tmp_path / "served"
    (root / COMMIT / "data" / "annotations").mkdir(parents=True)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_annotation_download_checks_the_pinned_sha256(file_server, laryngealct_dir, tmp_path):
    root, base_url = file_server
    data = (laryngealct_dir / "bbox3d.txt").read_bytes()
    (root / COMMIT / "data" / "annotations" / "bbox3d.txt").write_bytes(data)
    pinned = "7b9d82d15571e72e9df3afe6b3ffe5caed3f41be313863bc203ec52cd78dd90f"
    assert hashlib.sha256(data).hexdigest() == pinned  # the value config/laryngealct.yaml pins
    files = {"bbox3d": {"path": "data/annotations/bbox3d.txt", "sha256": pinned}}
    got = download_annotations(base_url, COMMIT, files, tmp_path / "annotations")
    assert got["bbox3d"].read_bytes() == data
    # A changed file on the server never replaces the checked one under the final name.
    (root / COMMIT / "data" / "annotations" / "bbox3d.txt").write_bytes(data + b"RADCURE_0001,1,2,3,4,5,6\n")
    other = tmp_path / "other"
    with pytest.raises(AnnotationError, match="is not the pinned"):
        download_annotations(base_url, COMMIT, files, other)
    assert not (other / "bbox3d.txt").exists() and not list(other.glob(".bbox3d*"))
    # An unpinned file is refused before any download.
    with pytest.raises(AnnotationError, match="no SHA-256 for img_list"):
        download_annotations(base_url, COMMIT, {"img_list": {"path": "data/annotations/img_list.txt",
                                                             "sha256": ""}}, other)
    with pytest.raises(AnnotationError, match="full 40-digit commit"):
        download_annotations(base_url, "ed3a908", files, other)


@pytest.mark.slow
@pytest.mark.workflow
def test_laryngealct_dag_builds_offline_from_the_committed_table(tmp_path):
    """`snakemake -n --configfile config/laryngealct.yaml` up to the folds (every per-case stage):
    1,029 fetch jobs and the crop table's download, no network needed."""
    import re
    import subprocess
    import sys

    snakefile = (REPO / "Snakefile").read_text()
    missing = [inc for inc in re.findall(r"^include:\s*[\"']([^\"']+)[\"']", snakefile, re.M)
               if not (REPO / inc).exists()]
    if missing:
        pytest.skip(f"the Snakefile does not parse yet: missing {missing}")
    (tmp_path / "config").symlink_to(REPO / "config")  # cohort.table is relative to the working dir
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "results/folds/classify/folds.tsv", "--snakefile", str(REPO / "Snakefile"),
         "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "laryngealct.yaml"), "-n",
         "--quiet", "rules"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, re.M))
    assert counts.get("fetch_series") == "1029" and counts.get("download_annotation") == "1"
    assert counts.get("crop_larynx") == "1029"
