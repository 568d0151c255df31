"""laryngealct: the LaryngealCT cohort (1,029 CT scans from six TCIA collections, T4 vs non-T4).

The dataset publishes its cohort as annotation files in its GitHub repository, not as images:

* ``data/annotations/bbox3d.txt``: ``case_id,x,y,z,size_x,size_y,size_z`` (voxel boxes; every case);
* ``data/annotations/img_list.txt``: ``case_id,<series folder as the NBIA Data Retriever wrote it>``
  (``Collection/manifest-*/Collection/PatientID/<study folder>/<series folder>``); some patients
  appear twice (the same series from two manifests), some folders are "PET AC .." series;
* ``data/annotations/LaryngealCT_metadata.xlsx``: clinical labels (no published code reads it, so its
  columns are unknown: hnct does not read it);
* ``data/annotations/train_split_T4.xlsx`` / ``test_split_T4.xlsx``: the fixed 823/206 split with the
  T4 label, columns ``TCIA_ID`` and ``Label_T4`` as the dataset's own training scripts read them
  (:func:`read_train_split`, openpyxl through ``pandas.read_excel``). The 206 test cases' labels
  come from ``test_split_206_reconstructed.csv`` (:func:`read_test_split`).

:func:`download_annotations` fetches them at a pinned commit and checks each file's SHA-256 (a
checksum is required: a file without one in the config is refused). LaryngealCT IDs use ``_``
where TCIA uses ``-`` (:func:`hnct.cohort.tcia_patient_id`). A Data Retriever folder name ends with
the last five digits of the SeriesInstanceUID: :func:`parse_img_list` keeps them
(``series_uid_suffix``) and the fetch stage resolves them among the patient's series
(``getSeries``), requiring Modality CT; a case that cannot be resolved is excluded with that reason.

Build the committed cohort table (offline)::

    python -m hnct.laryngealct build-cohort --bbox3d ../shared/laryngealct/bbox3d.txt \\
        --img-list ../shared/laryngealct/img_list_nonRADCURE_excerpt.txt \\
        --img-list ../shared/laryngealct/img_list.sample.txt \\
        --test-split ../shared/laryngealct/test_split_206_reconstructed.csv \\
        --out config/laryngealct_cohort.tsv

``--train-split train_split_T4.xlsx`` adds the training cases' labels. With the full
``img_list.txt`` (``download`` first), every case gets its series suffix.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import requests

from hnct.cohort import check_cohort, tcia_patient_id, write_cohort
from hnct.common import atomic_path, setup_logging

log = logging.getLogger("hnct.laryngealct")

# The six collections and how LaryngealCT's case IDs (after ``_`` -> ``-``) name their patients.
COLLECTION_PATTERNS = (
    ("RADCURE", re.compile(r"^RADCURE-\d+$")),
    ("HNSCC", re.compile(r"^HNSCC-\d+-\d+$")),
    ("QIN-HEADNECK", re.compile(r"^QIN-HEADNECK-\d+-\d+$")),
    ("Head-Neck-PET-CT", re.compile(r"^HN-(CHUS|CHUM|HGJ|HMR)-\d+$")),
    ("HEAD-NECK-RADIOMICS-HN1", re.compile(r"^HN1\d+$")),
    ("Head-Neck-3DCT-RT", re.compile(r"^HN-0\d+$")),
)
COLLECTIONS = tuple(name for name, _ in COLLECTION_PATTERNS)
BBOX_COLUMNS = ("case_id", "x", "y", "z", "size_x", "size_y", "size_z")


class AnnotationError(ValueError):
    """An annotation file is missing, unpinned, fails its checksum or cannot be parsed."""


def collection_of(patient_id: str) -> str:
    """The TCIA collection of a LaryngealCT patient (TCIA-style ID, ``-`` separators)."""
    for name, pattern in COLLECTION_PATTERNS:
        if pattern.match(patient_id):
            return name
    raise AnnotationError(f"patient {patient_id!r} matches none of the six LaryngealCT collections")


# ------------------------------------------------------------------------------ download

def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def annotation_url(base_url: str, commit: str, path: str) -> str:
    """``{base_url}/{commit}/{path}``: the one place a raw-file URL is built."""
    return f"{base_url.rstrip('/')}/{commit}/{path.lstrip('/')}"


def download_annotations(base_url: str, commit: str, files: dict[str, dict[str, str]], out_dir: str | Path,
                         timeout_s: float = 60.0) -> dict[str, Path]:
    """Download each annotation file at ``commit`` into ``out_dir`` and check its SHA-256.

    ``files`` maps a name to ``{"path": <path in the repository>, "sha256": <hex>}`` and optionally
    ``"commit"`` (that file's own commit, else ``commit``). A file already
    present with the right checksum is kept; a checksum left empty is an error (pin it first);
    a mismatch leaves nothing under the final name.
    """
    out_dir = Path(out_dir)
    got: dict[str, Path] = {}
    for name, spec in files.items():
        file_commit = str(spec.get("commit") or commit)
        if not re.fullmatch(r"[0-9a-f]{40}", file_commit):
            raise AnnotationError(f"the commit of {name} (laryngealct.commit or its own commit) must be a full "
                                  f"40-digit commit SHA, got {file_commit!r}")
        expected = str(spec.get("sha256", "")).lower()
        target = out_dir / Path(spec["path"]).name
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise AnnotationError(f"no SHA-256 for {name} ({spec['path']}) in laryngealct.annotations: "
                                  "download it once by hand at the pinned commit, check it, and fill in "
                                  "its sha256 (an unchecked file is never used)")
        if target.exists() and sha256_of(target) == expected:
            log.info("%s: present, checksum ok", target)
            got[name] = target
            continue
        url = annotation_url(base_url, file_commit, spec["path"])
        log.info("downloading %s", url)
        with atomic_path(target) as tmp:
            with requests.get(url, timeout=(min(timeout_s, 30.0), timeout_s), stream=True) as response:
                if response.status_code != 200:
                    raise AnnotationError(f"{url}: HTTP {response.status_code}")
                with open(tmp, "wb") as out:
                    for chunk in response.iter_content(1 << 16):
                        out.write(chunk)
            actual = sha256_of(tmp)
            if actual != expected:
                raise AnnotationError(f"{url}: SHA-256 {actual} is not the pinned {expected}")
        got[name] = target
    return got


# ------------------------------------------------------------------------------ parsing

def parse_bbox3d(path: str | Path) -> pd.DataFrame:
    """``bbox3d.txt`` as a table: LaryngealCT ``case_id``, TCIA ``patient``, collection, the box (voxels).

    The one reader of the file (the cohort table and ``crop.table_format: bbox3d`` both use it).
    Every line must be a case ID of one of the six collections and six integers, the three sizes
    positive, each case ID once; an error names the file and the line.
    """
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 7 or not all(re.fullmatch(r"-?\d+", p) for p in parts[1:]):
            raise AnnotationError(f"{path}:{number}: expected case_id and 6 integers, got {line[:60]!r}")
        box = {k: int(v) for k, v in zip(BBOX_COLUMNS[1:], parts[1:])}
        if min(box["size_x"], box["size_y"], box["size_z"]) <= 0:
            raise AnnotationError(f"{path}:{number}: box sizes must be positive, got {line[:60]!r}")
        patient = tcia_patient_id(parts[0])
        try:
            collection = collection_of(patient)
        except AnnotationError as err:
            raise AnnotationError(f"{path}:{number}: {err}") from None
        rows.append({"case_id": parts[0], "patient": patient, "collection": collection, **box})
    table = pd.DataFrame(rows, columns=["case_id", "patient", "collection", *BBOX_COLUMNS[1:]])
    dup = table.loc[table["case_id"].duplicated(), "case_id"]
    if len(dup):
        raise AnnotationError(f"{path}: duplicate case IDs {sorted(set(dup))[:5]}")
    return table


def parse_img_list(*paths: str | Path) -> pd.DataFrame:
    """``img_list.txt`` lines (``#`` comments skipped), one row per patient after removing duplicates.

    Columns: ``patient`` (TCIA ID), ``collection``, ``study_folder``, ``series_folder``,
    ``series_uid_suffix`` (the folder's last 5 characters = last 5 digits of the SeriesInstanceUID),
    ``series_number``, ``series_description``, ``n_listed`` (how many lines named the series).
    The same series listed from two manifests is one row; two DIFFERENT series for one patient
    is an error (the cohort would not say which scan was annotated).
    """
    rows: list[dict[str, Any]] = []
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            case_id, sep, folder = line.partition(",")
            parts = folder.strip().split("/")
            if not sep or len(parts) < 3:
                raise AnnotationError(f"{path}:{number}: expected case_id,<series folder>, got {line[:70]!r}")
            series_folder, study_folder = parts[-1], parts[-2]
            suffix = series_folder[-5:]
            if not suffix.isdigit():
                raise AnnotationError(f"{path}:{number}: series folder {series_folder!r} does not end in "
                                      "5 UID digits")
            number_text, _, rest = series_folder.partition("-")
            patient = tcia_patient_id(case_id)
            rows.append({
                "patient": patient, "collection": parts[0], "study_folder": study_folder,
                "series_folder": series_folder, "series_uid_suffix": suffix,
                "series_number": number_text, "series_description": rest[:-6],
                "source": f"{Path(path).name}:{number}",
            })
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    counts = table.groupby(["patient", "series_folder"])["source"].transform("count")
    table = table.assign(n_listed=counts).drop_duplicates(["patient", "series_folder"]).reset_index(drop=True)
    conflicts = table.loc[table["patient"].duplicated(), "patient"]
    if len(conflicts):
        raise AnnotationError(f"img_list names two different series for {sorted(set(conflicts))[:5]}")
    return table


def read_test_split(path: str | Path) -> pd.DataFrame:
    """The 206-case test split CSV (``TCIA_ID, Label_T4, Binary_TisT1T2_vs_T3T4, collection``)."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"TCIA_ID", "Label_T4"} - set(table.columns)
    if missing:
        raise AnnotationError(f"{path}: missing column(s) {sorted(missing)}")
    bad = table.loc[~table["Label_T4"].isin(["0", "1"]), "TCIA_ID"]
    if len(bad):
        raise AnnotationError(f"{path}: Label_T4 must be 0/1 (rows {list(bad)[:5]})")
    table["patient"] = table["TCIA_ID"].map(tcia_patient_id)
    return table


# The split spreadsheets' columns as the dataset's own training scripts read them
# (classification/T4_classification/*/code: ``pd.read_excel(TRAIN_SPLIT)``, ``df["TCIA_ID"]``,
# ``LABEL_COL = "Label_T4"``; IDs are TCIA-style, the scripts map ``-`` to ``_`` for file names).
SPLIT_ID_COLUMN = "TCIA_ID"
SPLIT_LABEL_COLUMN = "Label_T4"


def _label_text(value: Any) -> str | None:
    """A spreadsheet cell as ``"0"``/``"1"``, ``""`` for an empty cell, None for anything else."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and float(value) in (0.0, 1.0):
        return str(int(value))
    text = str(value).strip()
    if text in ("", "0", "1"):
        return text
    if text in ("0.0", "1.0"):
        return text[0]
    return None


def read_train_split(path: str | Path) -> pd.DataFrame:
    """``train_split_T4.xlsx``: one row per training patient, ``TCIA_ID`` and ``Label_T4`` (0/1).

    Returns ``TCIA_ID``, ``patient`` (TCIA ID) and ``Label_T4`` as text (``""`` where the cell is
    empty: the dataset's scripts drop such rows; here the case stays, unlabelled). Errors name the
    file and the column or rows at fault.
    """
    path = Path(path)
    if not path.exists():
        raise AnnotationError(f"{path}: train split spreadsheet does not exist")
    try:
        table = pd.read_excel(path, sheet_name=0, dtype=object, engine="openpyxl")
    except Exception as err:  # openpyxl raises zipfile/XML/KeyError variants for a broken file
        raise AnnotationError(f"{path}: not a readable .xlsx spreadsheet ({type(err).__name__}: {err})") from err
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in (SPLIT_ID_COLUMN, SPLIT_LABEL_COLUMN) if c not in table.columns]
    if missing:
        raise AnnotationError(f"{path}: missing column(s) {missing} (found {list(table.columns)})")
    table = table.dropna(how="all").reset_index(drop=True)
    ids = table[SPLIT_ID_COLUMN].map(lambda v: "" if v is None or (isinstance(v, float) and pd.isna(v))
                                     else str(v).strip())
    rows = [i + 2 for i in ids.index[ids == ""]]  # spreadsheet rows: 1 is the header
    if rows:
        raise AnnotationError(f"{path}: column {SPLIT_ID_COLUMN} is empty on row(s) {rows[:5]}")
    labels = table[SPLIT_LABEL_COLUMN].map(_label_text)
    bad = [f"row {i + 2} ({ids[i]}: {table[SPLIT_LABEL_COLUMN][i]!r})" for i in labels.index[labels.isna()]]
    if bad:
        raise AnnotationError(f"{path}: column {SPLIT_LABEL_COLUMN} must be 0, 1 or empty: {bad[:5]}")
    out = pd.DataFrame({SPLIT_ID_COLUMN: ids, "patient": ids.map(tcia_patient_id), SPLIT_LABEL_COLUMN: labels})
    dup = sorted(set(out.loc[out["patient"].duplicated(), "patient"]))
    if dup:
        raise AnnotationError(f"{path}: patient(s) listed twice in {SPLIT_ID_COLUMN}: {dup[:5]}")
    return out


def build_cohort(bbox3d: pd.DataFrame, img_list: pd.DataFrame | None = None,
                 test_split: pd.DataFrame | None = None,
                 train_split: pd.DataFrame | None = None) -> pd.DataFrame:
    """The cohort table: one case per bbox3d line, named as TCIA names the patient.

    ``dicom_dir`` = ``<Collection>/<PatientID>`` (what fetch writes under ``dicom_root``);
    ``series_uid_suffix`` from img_list where it lists the patient (else empty: fetch takes every
    CT of the patient and convert chooses); ``label_t4`` and ``split = test`` from the test split;
    ``label_t4`` of the training cases from the train split (``split`` stays empty); a patient in
    both splits, or in a split but not in bbox3d, is an error. ``case_id`` keeps LaryngealCT's own
    ID (the crop table's key).
    """
    table = pd.DataFrame({
        "case": bbox3d["patient"], "patient": bbox3d["patient"], "collection": bbox3d["collection"],
        "dicom_dir": bbox3d["collection"] + "/" + bbox3d["patient"], "series_uid": "",
        "t_stage": "", "label_t4": "", "node_positive": "", "split": "",
        "case_id": bbox3d["case_id"], "series_uid_suffix": "", "series_folder": "",
    })
    table = table.set_index("case", drop=False)
    if img_list is not None and not img_list.empty:
        listed = img_list.set_index("patient")
        unknown = sorted(set(listed.index) - set(table.index))
        if unknown:
            log.warning("img_list names %d patient(s) without a bbox3d line (ignored): %s", len(unknown), unknown[:5])
        known = listed.index.intersection(table.index)
        wrong = [p for p in known if listed.loc[p, "collection"] != table.loc[p, "collection"]]
        if wrong:
            raise AnnotationError(f"img_list puts {wrong[:5]} in another collection than their IDs say")
        table.loc[known, "series_uid_suffix"] = listed.loc[known, "series_uid_suffix"].to_numpy()
        table.loc[known, "series_folder"] = listed.loc[known, "series_folder"].to_numpy()
    if test_split is not None:
        split = test_split.set_index("patient")
        unknown = sorted(set(split.index) - set(table.index))
        if unknown:
            raise AnnotationError(f"test split names {len(unknown)} patient(s) not in bbox3d: {unknown[:5]}")
        table.loc[split.index, "label_t4"] = split["Label_T4"].to_numpy()
        table.loc[split.index, "split"] = "test"
    if train_split is not None:
        train = train_split.set_index("patient")
        unknown = sorted(set(train.index) - set(table.index))
        if unknown:
            raise AnnotationError(f"train split names {len(unknown)} patient(s) not in bbox3d: {unknown[:5]}")
        both = sorted(set(train.index) & set(table.index[table["split"] == "test"]))
        if both:
            raise AnnotationError(f"{len(both)} patient(s) are in both the train and the test split: {both[:5]}")
        table.loc[train.index, "label_t4"] = train[SPLIT_LABEL_COLUMN].to_numpy()
    return check_cohort(table.reset_index(drop=True), source="LaryngealCT annotations")


# ------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnct laryngealct", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_build = sub.add_parser("build-cohort", help="the cohort table from the annotation files (offline)")
    p_build.add_argument("--bbox3d", required=True)
    p_build.add_argument("--img-list", action="append", default=[], help="img_list.txt (repeatable)")
    p_build.add_argument("--test-split", default="")
    p_build.add_argument("--train-split", default="", help="train_split_T4.xlsx (TCIA_ID, Label_T4)")
    p_build.add_argument("--out", required=True)
    p_file = sub.add_parser("download-file", help="download one annotation file at a commit, checked")
    p_file.add_argument("--base-url", required=True)
    p_file.add_argument("--commit", required=True)
    p_file.add_argument("--path", required=True, help="path in the repository")
    p_file.add_argument("--sha256", required=True)
    p_file.add_argument("--out", required=True)
    p_dl = sub.add_parser("download", help="download the annotation files at the pinned commit, checked")
    p_dl.add_argument("--configfile", required=True, help="a config with a laryngealct: section")
    p_dl.add_argument("--out-dir", required=True)
    for p in (p_build, p_file, p_dl):
        p.add_argument("--log", default=None)
    args = parser.parse_args(argv)
    setup_logging(args.log)
    try:
        if args.command == "download-file":
            out = Path(args.out)
            got = download_annotations(args.base_url, args.commit, {out.name: {"path": args.path, "sha256": args.sha256}},
                                       out.parent)
            if got[out.name] != out:
                raise AnnotationError(f"--out must be named as the repository file ({Path(args.path).name})")
            return 0
        if args.command == "download":
            import yaml

            section = (yaml.safe_load(Path(args.configfile).read_text()) or {}).get("laryngealct", {})
            files = {name: spec for name, spec in section.get("annotations", {}).items()}
            got = download_annotations(section["base_url"], section["commit"], files, args.out_dir)
            for name, path in got.items():
                log.info("%s -> %s", name, path)
            return 0
        bbox = parse_bbox3d(args.bbox3d)
        img_list = parse_img_list(*args.img_list) if args.img_list else None
        split = read_test_split(args.test_split) if args.test_split else None
        train = read_train_split(args.train_split) if args.train_split else None
        table = build_cohort(bbox, img_list, split, train)
    except AnnotationError as err:
        log.error("%s", err)
        return 2
    write_cohort(table, args.out)
    counts = table["collection"].value_counts().to_dict()
    log.info("wrote %s: %d cases %s; %d with an img_list series, %d test, %d labelled", args.out, len(table),
             counts, int((table["series_uid_suffix"] != "").sum()), int((table["split"] == "test").sum()),
             int((table["label_t4"] != "").sum()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
