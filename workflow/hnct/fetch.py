"""fetch: download a case's series from TCIA (NBIA v4 API) into the NBIA Data Retriever layout.

For one cohort row (collection, patient, optional ``series_uid``) :func:`fetch_case` lists the
patient's series (``getSeries``), keeps the CT (the row's ``series_uid`` when given, else every CT
series) and, when labels are wanted, the RTSTRUCT/SEG series of the same study, and downloads each
series zip (:mod:`hnct.tcia`: timeouts, retries with backoff on connection errors and 5xx).

Every series is placed atomically and verified:

1. the zip is streamed to ``<dicom_root>/.hnct-tmp/<case>/`` (same filesystem as the layout);
2. it is unzipped to a temporary folder there; the zip's CRCs are checked, every ``.dcm`` must be
   listed in ``md5hashes.csv`` and match its MD5, the file count must match ``getSeries``'
   ``ImageCount`` and the DICOM header's SeriesInstanceUID must be the one asked for;
3. only then is the folder renamed into place:
   ``<Collection>/<PatientID>/<MM-DD-YYYY>-NA-<StudyDescription>-<last 5 of StudyUID>/
   <SeriesNumber as 1.000000>-<SeriesDescription>-<last 5 of SeriesUID>/1-001.dcm ..`` (names read
   from the DICOM header, as the Data Retriever writes them), with ``LICENSE`` and
   ``md5hashes.csv`` beside the files, as in the zip.

A dropped connection, a truncated zip or an MD5 mismatch is retried ``attempts`` times (waiting
``backoff_s * 2**n``). Resume: a series whose folder is in place and whose files all match its
``md5hashes.csv`` is not downloaded again; a folder that does not verify (partial copy, a file
changed) is downloaded again and replaced. Leftover temporary files of a killed run are removed.

Errors a person must act on (patient not found, a series not accessible (HTTP 400), a collection
that needs permission, disk full, a series that arrives broken (dropped, truncated, 5xx, MD5
mismatch) on every attempt) raise :class:`InputError` naming the case and the series; the stage
writes an excluded sidecar and the run goes on (delete the sidecar, or ``--forcerun fetch_series``,
to try such a case again). An API that cannot be reached at all (``getSeries`` fails after every
retry) is not the case's fault: the job fails without a sidecar (:class:`TciaUnavailable`), so the
next run tries again.

The sidecar ``results/fetch/{case}.json`` lists every series (UID, modality, folder relative to
``dicom_root``, files, bytes, MD5s, whether it was downloaded this time) and ``dicom_dir`` =
``<Collection>/<PatientID>`` relative to ``dicom_root`` (what convert reads, as the cohort table's
``dicom_dir`` says).

Other sources: ``python -m hnct.fetch index --root DIR --out cohort.tsv`` builds a cohort table from
any folder of DICOM by reading headers (not folder names), one case per CT study (``--per series``:
per CT series), and lists every series and file it leaves out, with the reason, in
``cohort.skipped.tsv`` beside it (:func:`index_folder`); with ``--layout hanseg`` (``segrap``, or a
pattern) a release of CT volume files, one case per CT file (:func:`hnct.volume_ct.index_release`);
``python -m hnct.fetch manifest-cohort``
builds one from a ``.tcia`` manifest (each series' PatientID from ``getSeriesMetaData``).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import logging
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pandas as pd
import pydicom
import requests
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from hnct.cohort import check_cohort, write_cohort
from hnct.common import InputError, atomic_path, progress, run_case_stage, setup_logging
from hnct.tcia import NBIAClient, NBIAError, read_token

log = logging.getLogger("hnct.fetch")

STAGE = "fetch"
MD5_TABLE = "md5hashes.csv"
TMP_DIR = ".hnct-tmp"
LABEL_MODALITIES = ("RTSTRUCT", "SEG")
# Characters the Data Retriever cannot put in a folder name.
_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f]')


class TciaUnavailable(RuntimeError):
    """The API itself cannot be reached (or keeps failing): not the case's fault, so no exclusion.

    The job fails with this message and a later run (or Snakemake's ``retries``) tries again.
    """


class SeriesFailure(Exception):
    """One download attempt failed in a way worth retrying (dropped body, bad zip, MD5 mismatch)."""


# ------------------------------------------------------------------------------ layout names

def _clean(text: str) -> str:
    text = _UNSAFE.sub("_", str(text or "")).strip()
    return text or "NA"


def study_folder_name(study_date: str, study_description: str, study_uid: str) -> str:
    """``MM-DD-YYYY-NA-<StudyDescription>-<last 5 of StudyUID>`` (StudyDate as YYYYMMDD in DICOM)."""
    date = str(study_date or "")
    shown = f"{date[4:6]}-{date[6:8]}-{date[:4]}" if len(date) >= 8 and date[:8].isdigit() else "NA"
    return f"{shown}-NA-{_clean(study_description)}-{study_uid[-5:]}"


def series_folder_name(series_number: Any, series_description: str, series_uid: str) -> str:
    """``<SeriesNumber as 1.000000>-<SeriesDescription>-<last 5 of SeriesUID>``."""
    try:
        number = f"{float(series_number):.6f}"
    except (TypeError, ValueError):
        number = "NA"
    return f"{number}-{_clean(series_description)}-{series_uid[-5:]}"


# ------------------------------------------------------------------------------ verification

def md5_of(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_md5_table(path: Path) -> dict[str, str]:
    """``md5hashes.csv`` (``Filename,MD5Hash``) as {file name: lower-case MD5}."""
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(table.columns[:2]) != ["Filename", "MD5Hash"]:
        raise ValueError(f"{path.name}: columns {list(table.columns)}, expected Filename,MD5Hash")
    return {Path(name).name: md5.strip().lower() for name, md5 in zip(table["Filename"], table["MD5Hash"])}


def verify_series_folder(folder: Path, series_uid: str, expected_count: int | None = None) -> dict[str, Any]:
    """Check a series folder against its ``md5hashes.csv``; returns {files: {name: md5}, bytes}.

    Raises :class:`SeriesFailure` saying what is wrong (no MD5 table, a file missing, unlisted or
    changed, the wrong count, or DICOM of another series).
    """
    table_path = folder / MD5_TABLE
    if not table_path.exists():
        raise SeriesFailure(f"no {MD5_TABLE} in {folder.name}")
    try:
        expected = read_md5_table(table_path)
    except (ValueError, pd.errors.ParserError) as err:
        raise SeriesFailure(f"unreadable {MD5_TABLE}: {err}") from err
    dicom_files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".dcm")
    unlisted = sorted(set(dicom_files) - set(expected))
    missing = sorted(set(expected) - set(dicom_files))
    if missing:
        raise SeriesFailure(f"{len(missing)} file(s) missing, e.g. {missing[0]}")
    if unlisted:
        raise SeriesFailure(f"{len(unlisted)} file(s) not in {MD5_TABLE}, e.g. {unlisted[0]}")
    if not dicom_files:
        raise SeriesFailure("no DICOM files")
    if expected_count is not None and expected_count > 0 and len(dicom_files) != expected_count:
        raise SeriesFailure(f"{len(dicom_files)} files, getSeries says ImageCount {expected_count}")
    files, total = {}, 0
    for name in dicom_files:
        path = folder / name
        actual = md5_of(path)
        if actual != expected[name]:
            raise SeriesFailure(f"MD5 mismatch for {name}: {actual} != {expected[name]} ({MD5_TABLE})")
        files[name] = actual
        total += path.stat().st_size
    header = pydicom.dcmread(folder / dicom_files[0], stop_before_pixels=True, force=True)
    if str(header.get("SeriesInstanceUID", "")) != series_uid:
        raise SeriesFailure(f"{dicom_files[0]} belongs to series {header.get('SeriesInstanceUID', '?')}")
    return {"files": files, "bytes": total}


def find_series_folder(patient_dir: Path, series_uid: str) -> Path | None:
    """The series' folder under a patient folder (name ends with the UID's last 5), if one exists."""
    if not patient_dir.is_dir():
        return None
    for candidate in sorted(patient_dir.glob(f"*/*-{series_uid[-5:]}")):
        if not candidate.is_dir():
            continue
        first = next((p for p in sorted(candidate.iterdir()) if p.suffix.lower() == ".dcm"), None)
        if first is None:
            return candidate  # an empty/partial folder of this series: the caller re-downloads
        uid = pydicom.dcmread(first, stop_before_pixels=True, force=True).get("SeriesInstanceUID", "")
        if str(uid) == series_uid:
            return candidate
    return None


# ------------------------------------------------------------------------------ downloading

def _header_names(folder: Path) -> tuple[str, str]:
    """(study folder, series folder) names from the first DICOM file's header."""
    first = min(p for p in folder.iterdir() if p.suffix.lower() == ".dcm")
    ds = pydicom.dcmread(first, stop_before_pixels=True, force=True)
    study = study_folder_name(str(ds.get("StudyDate", "")), str(ds.get("StudyDescription", "")),
                              str(ds.get("StudyInstanceUID", "")))
    series = series_folder_name(ds.get("SeriesNumber", None), str(ds.get("SeriesDescription", "")),
                                str(ds.get("SeriesInstanceUID", "")))
    return study, series


def _download_once(client: NBIAClient, series_uid: str, work_dir: Path,
                   expected_count: int | None) -> tuple[Path, dict[str, Any]]:
    """One attempt: zip to ``work_dir``, unzip to a temp folder, verify; returns the folder and its check."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    zip_path = work_dir / "series.zip"
    try:
        client.download_series_zip(series_uid, zip_path)
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError,
            requests.exceptions.Timeout) as err:
        raise SeriesFailure(f"connection dropped during the download ({type(err).__name__})") from err
    extract_dir = work_dir / "series"
    try:
        with zipfile.ZipFile(zip_path) as archive:
            bad = archive.testzip()
            if bad is not None:
                raise SeriesFailure(f"corrupt zip entry {bad}")
            for member in archive.infolist():
                name = Path(member.filename).name  # flat: never trust paths inside the zip
                if member.is_dir() or not name:
                    continue
                extract_dir.mkdir(exist_ok=True)
                with archive.open(member) as src, open(extract_dir / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, EOFError) as err:
        raise SeriesFailure(f"truncated or corrupt zip ({err})") from err
    finally:
        zip_path.unlink(missing_ok=True)
    if not extract_dir.exists():
        raise SeriesFailure("empty zip")
    return extract_dir, verify_series_folder(extract_dir, series_uid, expected_count)


def _place(folder: Path, final: Path, series_uid: str, count: int | None) -> dict[str, Any] | None:
    """Rename the verified ``folder`` to ``final``; returns None, or the check of a verified folder that
    is already there (then ``folder`` is dropped). An unverified one there is replaced."""
    for _ in range(3):
        if final.exists():
            try:
                return verify_series_folder(final, series_uid, count)
            except SeriesFailure:
                shutil.rmtree(final, ignore_errors=True)
        try:
            folder.rename(final)
            return None
        except OSError as err:  # final appeared between the check and the rename: look again
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise RuntimeError(f"could not place {final}: it keeps reappearing")


def fetch_series(client: NBIAClient, case: str, series: dict[str, Any], patient_dir: Path, tmp_root: Path,
                 attempts: int = 3, backoff_s: float = 1.0) -> dict[str, Any]:
    """Make one series present and verified under ``patient_dir``; returns its manifest entry.

    Raises :class:`InputError` (case + series) when it cannot: not accessible, needs permission,
    the server or network failing after every retry, MD5/zip failures after ``attempts``, disk full.
    """
    uid = series["SeriesInstanceUID"]
    count = int(float(series["ImageCount"])) if series.get("ImageCount") not in (None, "") else None
    where = f"series {uid} ({series.get('Modality', '?')})"
    existing = find_series_folder(patient_dir, uid)
    if existing is not None:
        try:
            checked = verify_series_folder(existing, uid, count)
            log.info("case %s: %s already complete in %s: not downloaded again", case, where, existing.name)
            return {**checked, "folder": existing, "downloaded": False, "attempts": 0}
        except SeriesFailure as err:
            log.warning("case %s: %s in %s is incomplete (%s): downloading again", case, where, existing, err)
    work_dir = tmp_root / uid
    last_error = ""
    try:
        for attempt in range(1, attempts + 1):
            try:
                folder, checked = _download_once(client, uid, work_dir, count)
            except SeriesFailure as err:
                last_error = str(err)
                log.warning("case %s: %s attempt %d/%d failed: %s", case, where, attempt, attempts, err)
                if attempt < attempts:
                    time.sleep(backoff_s * 2 ** (attempt - 1))
                continue
            except NBIAError as err:
                if err.kind == "not_accessible":
                    raise InputError(case, uid, f"{where} is not accessible (HTTP 400): restricted or "
                                                "withdrawn; a token (tcia.token_file) may be needed") from err
                if err.kind == "permission":
                    raise InputError(case, uid, f"{where}: the collection needs permission "
                                                f"(HTTP {err.status}); set tcia.token_file") from err
                last_error = str(err)
                log.warning("case %s: %s attempt %d/%d failed: %s", case, where, attempt, attempts, err)
                if attempt < attempts:
                    time.sleep(backoff_s * 2 ** (attempt - 1))
                continue
            study_name, series_name = _header_names(folder)
            final = patient_dir / study_name / series_name
            final.parent.mkdir(parents=True, exist_ok=True)
            if existing is not None and existing.exists() and existing != final:
                shutil.rmtree(existing)  # the unverified folder found above: replaced, never merged
            placed = _place(folder, final, uid, count)
            if placed is not None:  # another job (a second scan of the patient) placed it meanwhile
                log.info("case %s: %s was placed by another job meanwhile: %s", case, where, final.name)
                return {**placed, "folder": final, "downloaded": False, "attempts": attempt}
            log.info("case %s: %s: %d files, %.1f MB verified -> %s", case, where, len(checked["files"]),
                     checked["bytes"] / 1e6, final.relative_to(patient_dir))
            return {**checked, "folder": final, "downloaded": True, "attempts": attempt}
        raise InputError(case, uid, f"{where}: download failed after {attempts} attempts: {last_error}")
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InputError(case, uid, f"{where}: disk full writing under {patient_dir} ({err.strerror})") from err
        raise
    finally:
        if work_dir.exists():
            shutil.rmtree(work_dir, ignore_errors=True)


def resolve_series_suffix(case: str, listing: list[dict[str, Any]], uid_suffix: str,
                          image_modalities: tuple[str, ...] = ("CT",)) -> str:
    """The SeriesInstanceUID among ``listing`` that ends with ``uid_suffix`` (the last 5 digits a Data
    Retriever folder name keeps), which must be an image series (CT); else :class:`InputError`."""
    matches = [s for s in listing if str(s.get("SeriesInstanceUID", "")).endswith(uid_suffix)]
    if not matches:
        raise InputError(case, uid_suffix, f"no series of the patient's {len(listing)} has a UID ending in "
                                           f"{uid_suffix} (the annotated series folder): unresolvable")
    images = [s for s in matches if s.get("Modality") in image_modalities]
    if not images:
        found = ", ".join(f"{s['SeriesInstanceUID']} ({s.get('Modality', '?')})" for s in matches)
        raise InputError(case, uid_suffix, f"the annotated series ...{uid_suffix} is not "
                                           f"{'/'.join(image_modalities)}: {found}")
    if len(images) > 1:
        raise InputError(case, uid_suffix, f"{len(images)} {'/'.join(image_modalities)} series end in "
                                           f"{uid_suffix}: ambiguous, set series_uid in the cohort table")
    return images[0]["SeriesInstanceUID"]


def select_series(case: str, listing: list[dict[str, Any]], series_uid: str = "",
                  modalities: tuple[str, ...] = ("CT", "RTSTRUCT", "SEG"), labels: bool = True) -> list[dict]:
    """The series to download: the row's CT (or every CT) plus, with ``labels``, label series of its study."""
    image_modalities = [m for m in modalities if m not in LABEL_MODALITIES]
    label_modalities = [m for m in modalities if m in LABEL_MODALITIES] if labels else []
    if series_uid:
        chosen = [s for s in listing if s.get("SeriesInstanceUID") == series_uid]
        if not chosen:
            raise InputError(case, series_uid, f"series {series_uid} is not among the patient's "
                                               f"{len(listing)} series")
        modality = chosen[0].get("Modality", "?")
        if modality not in image_modalities:
            raise InputError(case, series_uid, f"series {series_uid} is {modality}, not "
                                               f"{'/'.join(image_modalities)}")
    else:
        chosen = [s for s in listing if s.get("Modality") in image_modalities]
        if not chosen:
            found = sorted({s.get("Modality", "?") for s in listing})
            raise InputError(case, "", f"no {'/'.join(image_modalities)} series among the patient's "
                                       f"{len(listing)} series (modalities: {', '.join(found)})")
    studies = {s.get("StudyInstanceUID") for s in chosen}
    chosen += [s for s in listing
               if s.get("Modality") in label_modalities and s.get("StudyInstanceUID") in studies]
    return chosen


def _entry(dicom_root: Path, series: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's record of one series (folder relative to ``dicom_root``)."""
    return {
        "series_uid": series["SeriesInstanceUID"],
        "study_uid": series.get("StudyInstanceUID", ""),
        "modality": series.get("Modality", ""),
        "series_description": series.get("SeriesDescription", ""),
        "folder": str(got["folder"].relative_to(dicom_root)),
        "n_files": len(got["files"]),
        "bytes": got["bytes"],
        "md5": got["files"],
        "downloaded": got["downloaded"],
        "attempts": got["attempts"],
    }


def fetch_case(case: str, collection: str, patient: str, dicom_root: str | Path, client: NBIAClient,
               series_uid: str = "", modalities: tuple[str, ...] = ("CT", "RTSTRUCT", "SEG"),
               labels: bool = True, attempts: int = 3, backoff_s: float = 1.0,
               series_uid_suffix: str = "", manifest_uids: set[str] | None = None) -> dict[str, Any]:
    """Fetch one case; returns the ok sidecar's fields (raises :class:`InputError` for exclusions).

    ``series_uid`` picks the CT; else ``series_uid_suffix`` (last digits of its UID, as LaryngealCT's
    img_list.txt gives them) resolves it among the patient's series; else every CT is fetched.
    ``manifest_uids`` (source manifest) limits the download to the series a ``.tcia`` file lists.
    """
    dicom_root = Path(dicom_root)
    patient_dir = dicom_root / collection / patient
    try:
        listing = client.get_series(collection=collection, patient_id=patient)
    except NBIAError as err:
        if err.kind == "permission":
            raise InputError(case, "", f"collection {collection} needs permission (HTTP {err.status}): "
                                       "set tcia.token_file or tcia.token_env") from err
        if err.kind == "not_accessible":
            raise InputError(case, "", f"getSeries for {collection}/{patient} refused (HTTP 400): "
                                       "restricted collection or a bad query") from err
        raise TciaUnavailable(f"case {case}: getSeries for {collection}/{patient} failed: {err}") from err
    if not listing:
        raise InputError(case, "", f"patient {patient} not found in collection {collection} "
                                   "(getSeries returned no series)")
    if not series_uid and series_uid_suffix:
        image_modalities = tuple(m for m in modalities if m not in LABEL_MODALITIES)
        series_uid = resolve_series_suffix(case, listing, series_uid_suffix, image_modalities)
        log.info("case %s: series ...%s resolved to %s", case, series_uid_suffix, series_uid)
    wanted = select_series(case, listing, series_uid, tuple(modalities), labels)
    if manifest_uids is not None:  # source manifest: only what the manifest lists
        outside = [s["SeriesInstanceUID"] for s in wanted if s["SeriesInstanceUID"] not in manifest_uids]
        if series_uid and series_uid in outside:
            raise InputError(case, series_uid, f"series {series_uid} is not listed in the manifest")
        wanted = [s for s in wanted if s["SeriesInstanceUID"] in manifest_uids]
        if not wanted:
            raise InputError(case, "", f"none of patient {patient}'s series is listed in the manifest")
    tmp_root = dicom_root / TMP_DIR / case
    entries = []
    try:
        for series in progress(wanted, every=1, what=f"case {case} series"):
            got = fetch_series(client, case, series, patient_dir, tmp_root, attempts, backoff_s)
            entries.append(_entry(dicom_root, series, got))
    finally:  # a failed or interrupted case leaves no temporary files behind
        shutil.rmtree(tmp_root, ignore_errors=True)
    images = [e["series_uid"] for e in entries if e["modality"] not in LABEL_MODALITIES]
    return {
        "collection": collection, "patient_id": patient, "api_url": client.api_url,
        "dicom_root": str(dicom_root), "dicom_dir": f"{collection}/{patient}",
        # The CT convert should read: the row's, or the only image series fetched ("" = convert chooses).
        "series_uid": series_uid or (images[0] if len(images) == 1 else ""),
        "series": entries, "n_series": len(entries),
        "n_files": sum(e["n_files"] for e in entries), "bytes": sum(e["bytes"] for e in entries),
        "n_downloaded": sum(e["downloaded"] for e in entries),
    }


# ------------------------------------------------------------------------------ other sources

INDEX_PER = ("study", "series")
SKIPPED_COLUMNS = ["path", "series_uid", "study_uid", "patient", "modality", "what", "n_files", "reason"]


def skipped_table_path(cohort_path: str | Path) -> Path:
    """Where ``index`` writes its skipped table: ``cohort.tsv`` -> ``cohort.skipped.tsv`` beside it."""
    cohort_path = Path(cohort_path)
    stem = cohort_path.name[: -len(cohort_path.suffix)] if cohort_path.suffix else cohort_path.name
    return cohort_path.with_name(f"{stem}.skipped.tsv")


def _sop_class_name(first_file: str) -> str:
    """The SOP class of a series' first file as its DICOM name ("CT Image Storage"), header only."""
    ds = pydicom.dcmread(first_file, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    uid = ds.get("SOPClassUID")
    return UID(str(uid)).name if uid else ""


def not_a_case_reason(series: pd.Series, sop_class: str) -> str:
    """Why an indexed series cannot be a case ('' when it can: an acquired CT image series).

    Label objects are read by convert from their study's folder; localizers, secondary captures
    (the "Exam Summary" pages of a CD export), dose reports and other derived images are never
    volumes a model should learn from.
    """
    modality, image_type = series["modality"], series["image_type"]
    if modality in LABEL_MODALITIES:
        return f"label object ({modality}): convert reads it from its study's folder, not a case"
    if "Secondary Capture" in sop_class:
        return f"secondary capture ({sop_class}), not an acquired CT"
    if "Dose" in sop_class:
        return f"dose object ({sop_class}), not a CT image"
    if modality != "CT":
        return f"modality {modality or '(none)'}, not CT"
    if series["localizer"]:
        return f"localizer/scout (ImageType {image_type})"
    if any(t.split("\\")[0] == "DERIVED" for t in image_type.split(" | ")):
        return f"derived image (ImageType {image_type}), not an acquired CT"
    if not series["patient_id"]:
        return ("CT without PatientID: folds keep a patient's scans together, so a case needs one "
                "(set PatientID, or add the case to the table by hand)")
    return ""


def _header_only_reason(path: str, reason: str) -> str:
    """A readable file that the index left out: say what it is (a DICOM CT without SeriesInstanceUID
    is valid DICOM, never 'unreadable'), else keep dicomio's reason."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["Modality", "SOPClassUID", "SeriesInstanceUID"])
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError):
        return reason
    if not str(ds.get("SeriesInstanceUID", "") or "") and (ds.get("SOPClassUID") or ds.get("Modality")):
        what = str(ds.get("Modality", "") or "") or UID(str(ds.SOPClassUID)).name
        return f"valid DICOM ({what}) without a SeriesInstanceUID: no series UID to name in the cohort table"
    return reason


def _dicom_dir(files: list[Path]) -> Path:
    """The folder a case's ``dicom_dir`` names: the common folder of the study's files; when that is
    a single series folder below the root, the folder above it (the study folder in the Data
    Retriever layout, where the RTSTRUCT also lies)."""
    parents = {f.parent for f in files}
    common = Path(os.path.commonpath([str(p) for p in parents]) or ".")
    return common.parent if len(parents) == 1 and common.parent != Path(".") else common


def index_folder(root: str | Path, collection: str = "", per: str = "study") -> tuple[pd.DataFrame, pd.DataFrame]:
    """A cohort table from any folder of DICOM, by headers; returns (cohort, skipped).

    Headers only (:func:`hnct.dicomio.index_series`, ``stop_before_pixels``; folder and file names
    are not trusted). With ``per="study"`` (default) one case per CT study, its series chosen by
    :func:`hnct.dicomio.choose_ct_series` (the rule convert uses) and the study's other CT series
    listed in ``other_series`` (``;``-separated); with ``per="series"`` one case per CT series.
    Localizers, secondary captures, dose reports, derived images, non-CT and label series never
    become cases. ``skipped`` lists every series and file that is not a case, with the reason
    (columns :data:`SKIPPED_COLUMNS`, paths relative to ``root``).

    ``dicom_dir`` is relative to ``root`` (see :func:`_dicom_dir`); ``collection`` is the first
    folder level under ``root`` unless given. A patient with several cases gets ``<PatientID>-01``,
    ``-02`` ... in (StudyInstanceUID, SeriesNumber, SeriesInstanceUID) order.
    """
    from hnct import dicomio  # SimpleITK comes with it; imported here so `fetch case` starts fast

    if per not in INDEX_PER:
        raise ValueError(f"per must be one of {INDEX_PER}, not {per!r}")
    root = Path(root)
    index = dicomio.index_series(root)
    skipped: list[dict[str, Any]] = []
    for path, reason in index.attrs.get("unreadable", []):
        skipped.append({"path": str(Path(path).relative_to(root)), "what": "file", "n_files": 1,
                        "reason": _header_only_reason(path, reason)})
    if index.empty:
        raise ValueError(f"no DICOM series under {root} ({len(skipped)} files skipped, e.g. "
                         f"{skipped[0]['path']}: {skipped[0]['reason']})" if skipped else f"no files under {root}")

    def skip(series: pd.Series, what: str, reason: str) -> None:
        folders = sorted({str(Path(f).parent.relative_to(root)) for f in series["files"]})
        skipped.append({"path": ";".join(folders), "series_uid": series["series_uid"],
                        "study_uid": series["study_uid"], "patient": series["patient_id"],
                        "modality": series["modality"], "what": what, "n_files": int(series["n_files"]),
                        "reason": reason})

    candidates = []
    for position, series in index.iterrows():
        what = f"series {series['series_number'] or '?'} {series['series_description']!r}"
        reason = not_a_case_reason(series, _sop_class_name(series["files"][0]))
        if reason:
            skip(series, what, reason)
        else:
            candidates.append(position)
    ct = index.loc[candidates]
    rows = []
    groups = ct.groupby(["patient_id", "study_uid"] if per == "study" else ["series_uid"], sort=True)
    for _, group in groups:
        chosen, choice = dicomio.choose_ct_series(group["patient_id"].iloc[0], root, group)
        others = group[group["series_uid"] != chosen["series_uid"]]
        for _, other in others.iterrows():
            skip(other, f"series {other['series_number'] or '?'} {other['series_description']!r}",
                 f"another CT series of study {chosen['study_uid']}: the case uses {chosen['series_uid']} "
                 f"({choice['rule']})")
        study = index[(index["patient_id"] == chosen["patient_id"]) & (index["study_uid"] == chosen["study_uid"])]
        files = [Path(f).relative_to(root) for fs in study["files"] for f in fs]
        first = Path(chosen["files"][0]).relative_to(root)
        try:
            number = float(chosen["series_number"] or 0)
        except ValueError:
            number = 0.0
        rows.append({
            "patient": chosen["patient_id"], "study_uid": chosen["study_uid"], "series_uid": chosen["series_uid"],
            "series_number": number,
            "collection": collection or (first.parts[0] if len(first.parts) > 1 else root.name),
            "dicom_dir": str(_dicom_dir(files if per == "study" else [Path(f).relative_to(root)
                                                                      for f in chosen["files"]])),
            "other_series": ";".join(sorted(others["series_uid"])),
        })
    skipped_table = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS).fillna("")
    if not rows:
        raise ValueError(f"no CT image series under {root}: {len(skipped_table)} series/files skipped ("
                         + "; ".join(sorted(set(skipped_table["reason"])))[:500] + ")")
    table = pd.DataFrame(rows).sort_values(["patient", "study_uid", "series_number", "series_uid"])
    counts = table.groupby("patient")["series_uid"].transform("count")
    order = table.groupby("patient").cumcount() + 1
    table["case"] = [re.sub(r"[^A-Za-z0-9._-]", "_", p if n == 1 else f"{p}-{k:02d}")
                     for p, n, k in zip(table["patient"], counts, order)]
    cohort = check_cohort(table[["case", "patient", "collection", "dicom_dir", "series_uid", "other_series"]]
                          .reset_index(drop=True), source=f"index of {root}")
    return cohort, skipped_table


def write_index(root: str | Path, out: str | Path, collection: str = "", per: str = "study", layout: str = "",
                patients: str | Path = "") -> str:
    """``index`` as a command: writes the cohort table and its skipped table beside it (both atomic);
    returns what it did in a line (cases, skipped series, skipped files, where the reasons are).

    With ``layout`` (a :data:`hnct.volume_ct.CT_LAYOUTS` preset or a pattern with ``{case}``) the
    root is a release of CT volume files (HaN-Seg's ``set_1/``, SegRap's training folder): one case
    per CT file (:func:`hnct.volume_ct.index_release`), patients from the ``patients`` TSV (case,
    patient) where given, else patient = case."""
    if layout:
        from hnct import volume_ct

        mapping = volume_ct.read_patient_map(patients) if patients else None
        cohort, skipped = volume_ct.index_release(root, layout, collection, mapping)
        what, groups = f"one per CT file of layout {layout}", "folders"
    else:
        if patients:
            raise ValueError("--patients maps cases of a release (--layout); a DICOM index reads PatientID")
        cohort, skipped = index_folder(root, collection, per)
        what, groups = f"one per CT {per}", "series"
    skipped_path = skipped_table_path(out)
    with atomic_path(skipped_path) as tmp:
        skipped.to_csv(tmp, sep="\t", index=False)
    write_cohort(cohort, out)
    n_files = int((skipped["what"] == "file").sum())
    return (f"{len(cohort)} cases ({what}) -> {out}; skipped {len(skipped) - n_files} {groups} and "
            f"{n_files} files, each with its reason in {skipped_path}")


def manifest_cohort(manifest_path: str | Path, client: NBIAClient) -> pd.DataFrame:
    """A cohort table from a ``.tcia`` manifest: one case per CT series, PatientIDs from the API."""
    from hnct.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    rows = []
    for uid in progress(manifest.series_uids, every=50, what="manifest series"):
        meta = client.get_series_metadata(uid)
        if not meta:
            log.warning("manifest series %s: unknown to the API (skipped)", uid)
            continue
        if meta.get("Modality") != "CT":
            continue
        rows.append({"patient": meta.get("Subject ID", ""), "collection": meta.get("Collection", ""),
                     "series_uid": uid})
    if not rows:
        raise ValueError(f"{manifest_path}: no CT series among {len(manifest.series_uids)} listed")
    table = pd.DataFrame(rows)
    counts = table.groupby("patient")["series_uid"].transform("count")
    order = table.groupby("patient").cumcount() + 1
    table["case"] = [p if n == 1 else f"{p}-{k:02d}" for p, n, k in zip(table["patient"], counts, order)]
    table["dicom_dir"] = table["collection"] + "/" + table["patient"]
    return check_cohort(table, source=str(manifest_path))


# ------------------------------------------------------------------------------ CLI

def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-url", required=True, help="NBIA v4 base URL (config tcia.api_url)")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--retries", type=int, default=4, help="HTTP-level retries (connection, 5xx)")
    parser.add_argument("--backoff-s", type=float, default=2.0)
    parser.add_argument("--token-file", default="")
    parser.add_argument("--token-env", default="")


def _client(args) -> NBIAClient:
    return NBIAClient(args.api_url, timeout_s=args.timeout_s, retries=args.retries, backoff_s=args.backoff_s,
                      token=read_token(args.token_file, args.token_env))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnct fetch", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_case = sub.add_parser("case", help="fetch one case's series and write its sidecar")
    p_case.add_argument("--case", required=True)
    p_case.add_argument("--collection", required=True)
    p_case.add_argument("--patient", required=True)
    p_case.add_argument("--series-uid", default="")
    p_case.add_argument("--series-uid-suffix", default="",
                        help="last digits of the CT's UID (LaryngealCT img_list.txt), used when --series-uid is empty")
    p_case.add_argument("--dicom-root", required=True)
    p_case.add_argument("--sidecar", required=True)
    p_case.add_argument("--modalities", nargs="+", default=["CT", "RTSTRUCT", "SEG"])
    p_case.add_argument("--labels", action=argparse.BooleanOptionalAction, default=True,
                        help="also fetch RTSTRUCT/SEG series of the CT's study")
    p_case.add_argument("--manifest", default="", help="a .tcia manifest: fetch only the series it lists")
    p_case.add_argument("--attempts", type=int, default=3, help="download attempts per series (zip/MD5 level)")
    p_case.add_argument("--code", default="", help="code version (ignored; makes Snakemake rerun on change)")
    _client_args(p_case)
    p_index = sub.add_parser("index", help="cohort table from any folder of DICOM (reads headers)")
    p_index.add_argument("--root", required=True)
    p_index.add_argument("--out", required=True)
    p_index.add_argument("--collection", default="")
    p_index.add_argument("--per", choices=INDEX_PER, default="study",
                         help="one case per CT study (its series chosen as convert does) or per CT series")
    p_index.add_argument("--layout", default="",
                         help="a release of CT volume files: hanseg, segrap, segrap_contrast or a pattern with "
                              "{case} (e.g. '{case}/ct.nii.gz'); one case per CT file, no DICOM read")
    p_index.add_argument("--patients", default="", help="with --layout: TSV case, patient (default patient = case)")
    p_man = sub.add_parser("manifest-cohort", help="cohort table from a .tcia manifest (asks the API)")
    p_man.add_argument("--manifest", required=True)
    p_man.add_argument("--out", required=True)
    _client_args(p_man)
    for p in (p_case, p_index, p_man):
        p.add_argument("--log", default=None)
    args = parser.parse_args(argv)
    setup_logging(args.log)

    if args.command == "case":
        client = _client(args)
        manifest_uids = None
        if args.manifest:
            from hnct.manifest import read_manifest

            manifest_uids = set(read_manifest(args.manifest).series_uids)

        def work() -> dict[str, Any]:
            return fetch_case(args.case, args.collection, args.patient, args.dicom_root, client,
                              series_uid=args.series_uid, modalities=tuple(args.modalities),
                              labels=args.labels, attempts=args.attempts, backoff_s=args.backoff_s,
                              series_uid_suffix=args.series_uid_suffix, manifest_uids=manifest_uids)

        try:
            sidecar = run_case_stage(args.case, STAGE, args.sidecar, work)
        except TciaUnavailable as err:
            log.error("%s; nothing written, run again later", err)
            return 1
        log.info("case %s: %s", args.case, sidecar["status"])
        return 0
    if args.command == "index":
        try:
            done = write_index(args.root, args.out, args.collection, args.per, args.layout, args.patients)
        except ValueError as err:  # nothing to index: say what was found, write nothing
            log.error("index of %s: %s", args.root, err)
            return 1
        log.info("%s", done)
        print(done)
        return 0
    table = manifest_cohort(args.manifest, _client(args))
    write_cohort(table, args.out)
    log.info("wrote %s: %d cases", args.out, len(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
