"""laryngealct: parsing the published annotation files (samples in the test data cache, hnct.testdata), the
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
    read_train_split,
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


def write_split_xlsx(path: Path, header: list[str], rows: list[list]) -> Path:
    """A spreadsheet as the dataset publishes its splits (openpyxl, one sheet, a header row)."""
    from openpyxl import Workbook

    book = Workbook()
    sheet = book.active
    sheet.title = "Sheet1"
    sheet.append(header)
    for row in rows:
        sheet.append(row)
    book.save(path)
    return path


# The columns the dataset's T4 training scripts read from train_split_T4.xlsx (other columns are ignored).
SPLIT_HEADER = ["TCIA_ID", "Label_T4"]


def test_train_split_spreadsheet_labels_the_training_cases(laryngealct_dir, tmp_path):
    """TCIA_ID + Label_T4 (the columns the dataset's training scripts read) -> label_t4, split stays empty."""
    boxes = parse_bbox3d(laryngealct_dir / "bbox3d.txt")
    test = read_test_split(laryngealct_dir / "test_split_206_reconstructed.csv")
    train_patients = [p for p in boxes["patient"] if p not in set(test["patient"])][:5]
    assert len(train_patients) == 5
    rows = [[train_patients[0], 1], [train_patients[1], 0], [train_patients[2], "0"],
            [train_patients[3], None], [train_patients[4], 1.0]]
    xlsx = write_split_xlsx(tmp_path / "train_split_T4.xlsx", SPLIT_HEADER, rows)
    train = read_train_split(xlsx)
    assert list(train["patient"]) == train_patients
    assert list(train["Label_T4"]) == ["1", "0", "0", "", "1"]
    cohort = build_cohort(boxes, None, test, train).set_index("case", drop=False)
    assert list(cohort.loc[train_patients, "label_t4"]) == ["1", "0", "0", "", "1"]
    assert (cohort.loc[train_patients, "split"] == "").all()
    assert (cohort["split"] == "test").sum() == 206  # the test split is untouched
    others = ~cohort.index.isin(train_patients) & (cohort["split"] != "test")
    assert (cohort.loc[others, "label_t4"] == "").all()
    # The CLI takes it too.
    out = tmp_path / "cohort.tsv"
    assert laryngealct_main(["build-cohort", "--bbox3d", str(laryngealct_dir / "bbox3d.txt"),
                             "--test-split", str(laryngealct_dir / "test_split_206_reconstructed.csv"),
                             "--train-split", str(xlsx), "--out", str(out)]) == 0
    assert read_cohort(out).loc[train_patients[0], "label_t4"] == "1"


def test_train_split_errors_name_the_file_and_the_column(laryngealct_dir, tmp_path, capsys):
    no_label = write_split_xlsx(tmp_path / "no_label.xlsx", ["TCIA_ID", "LabelT4"], [["RADCURE-0006", 1]])
    with pytest.raises(AnnotationError, match=r"no_label\.xlsx: missing column\(s\) \['Label_T4'\]"):
        read_train_split(no_label)
    no_id = write_split_xlsx(tmp_path / "no_id.xlsx", ["Case_ID", "Label_T4"], [["RADCURE_0006", 1]])
    with pytest.raises(AnnotationError, match=r"no_id\.xlsx: missing column\(s\) \['TCIA_ID'\]"):
        read_train_split(no_id)
    bad = write_split_xlsx(tmp_path / "bad.xlsx", SPLIT_HEADER, [["RADCURE-0006", "T4"]])
    with pytest.raises(AnnotationError, match=r"bad\.xlsx: column Label_T4 must be 0, 1 or empty: \[\"row 2 \(RADCURE-0006"):
        read_train_split(bad)
    twice = write_split_xlsx(tmp_path / "twice.xlsx", SPLIT_HEADER, [["RADCURE-0006", 1], ["RADCURE_0006", 1]])
    with pytest.raises(AnnotationError, match="twice.xlsx: patient.s. listed twice"):
        read_train_split(twice)
    not_xlsx = tmp_path / "train_split_T4.xlsx"
    not_xlsx.write_text("TCIA_ID,Label_T4\n")
    with pytest.raises(AnnotationError, match="train_split_T4.xlsx: not a readable .xlsx"):
        read_train_split(not_xlsx)
    # A patient in both splits, or one bbox3d lacks, is refused.
    boxes = parse_bbox3d(laryngealct_dir / "bbox3d.txt")
    test = read_test_split(laryngealct_dir / "test_split_206_reconstructed.csv")
    clash = write_split_xlsx(tmp_path / "clash.xlsx", SPLIT_HEADER, [[test["TCIA_ID"][0], 0]])
    with pytest.raises(AnnotationError, match="in both the train and the test split"):
        build_cohort(boxes, None, test, read_train_split(clash))
    stranger = write_split_xlsx(tmp_path / "stranger.xlsx", SPLIT_HEADER, [["RADCURE-9999", 0]])
    with pytest.raises(AnnotationError, match="train split names 1 patient.s. not in bbox3d"):
        build_cohort(boxes, None, test, read_train_split(stranger))
    # The CLI reports it and fails.
    assert laryngealct_main(["build-cohort", "--bbox3d", str(laryngealct_dir / "bbox3d.txt"),
                             "--train-split", str(no_label), "--out", str(tmp_path / "c.tsv")]) == 2
    assert "no_label.xlsx: missing column(s) ['Label_T4']" in capsys.readouterr().err
    assert not (tmp_path / "c.tsv").exists()


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


def test_a_file_with_its_own_commit_is_read_at_that_commit(file_server, tmp_path):
    """laryngealct.annotations.<name>.commit overrides laryngealct.commit for that file only."""
    root, base_url = file_server
    own = "8d3e1b81fbbda60251c7415c57f5a5ff87beb8a0"
    (root / own / "data" / "annotations").mkdir(parents=True)
    data = b"PK-not-really-a-spreadsheet"
    (root / own / "data" / "annotations" / "train_split_T4.xlsx").write_bytes(data)
    spec = {"path": "data/annotations/train_split_T4.xlsx", "sha256": hashlib.sha256(data).hexdigest()}
    got = download_annotations(base_url, COMMIT, {"train_split": {**spec, "commit": own}}, tmp_path / "a")
    assert got["train_split"].read_bytes() == data
    with pytest.raises(AnnotationError, match="HTTP 404"):  # not served at the default commit
        download_annotations(base_url, COMMIT, {"train_split": spec}, tmp_path / "b")
    with pytest.raises(AnnotationError, match="full 40-digit commit"):
        download_annotations(base_url, COMMIT, {"train_split": {**spec, "commit": "8d3e1b8"}}, tmp_path / "c")


@pytest.mark.slow
@pytest.mark.workflow
def test_laryngealct_dag_builds_offline_from_the_committed_table(tmp_path):
    """`snakemake -n --configfile config/laryngealct.yaml` up to the folds (every per-case stage):
    1,029 fetch jobs and the crop table's download, no network needed."""
    import re
    import subprocess
    import sys

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


@pytest.mark.parametrize("line,reason", [
    ("HN_018,216,213,67,90,-60,32", "box sizes must be positive"),
    ("HN_018,216,213,67,0,60,32", "box sizes must be positive"),
    ("LUNG1_001,216,213,67,90,60,32", "none of the six LaryngealCT collections"),
])
def test_bbox3d_refuses_empty_boxes_and_foreign_ids_naming_the_line(tmp_path, line, reason):
    """One parser for bbox3d.txt (the cohort table and crop.table_format bbox3d), the stricter checks of both."""
    bad = tmp_path / "bbox3d.txt"
    bad.write_text(f"RADCURE_0724,223,174,41,71,67,39\n{line}\n")
    with pytest.raises(AnnotationError, match=f"bbox3d.txt:2: .*{reason}"):
        parse_bbox3d(bad)
