"""fetch index: a folder of your own DICOM (a scanner's CD export) becomes a cohort table by headers.

The folder is generated with pydicom: two studies of one patient, each with a localizer, an "Exam
Summary" secondary capture and two axial CT series, an RTSTRUCT, a dose report, a CT series
without SeriesInstanceUID (an anonymised export) and a text file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

from hnct.fetch import index_folder, main as fetch_main, skipped_table_path


def write_series(folder: Path, patient: str, study_uid: str, series_uid: str | None, n_files: int,
                 series_number: int, description: str, image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                 sop_class: str = CTImageStorage, modality: str = "CT", frame_uid: str = "") -> list[str]:
    """Write ``n_files`` small DICOM instances; ``series_uid=None`` leaves SeriesInstanceUID out."""
    folder.mkdir(parents=True, exist_ok=True)
    sop_uids = []
    for k in range(n_files):
        sop_uid = generate_uid(entropy_srcs=[study_uid, description, str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
        ds.PatientID = ds.PatientName = patient
        ds.StudyInstanceUID, ds.StudyDate = study_uid, "20240102"
        if series_uid is not None:
            ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber, ds.SeriesDescription, ds.Modality = series_number, description, modality
        ds.InstanceNumber = k + 1
        if modality == "CT":
            ds.ImageType = list(image_type)
            ds.FrameOfReferenceUID = frame_uid or generate_uid(entropy_srcs=[study_uid, "frame"])
            ds.Rows = ds.Columns = 4
            ds.PixelSpacing = [0.5, 0.5]
            ds.ImagePositionPatient = [0.0, 0.0, -2.0 * k]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
            ds.PixelData = np.full((4, 4), 1000 + k, dtype=np.int16).tobytes()
        pydicom.dcmwrite(folder / f"IM{k + 1:04d}.dcm", ds, enforce_file_format=True)
        sop_uids.append(sop_uid)
    return sop_uids


PATIENT = "PAT-A"
NO_PATIENT_ID = generate_uid(entropy_srcs=["series without PatientID"])
STUDIES = [generate_uid(entropy_srcs=["study", str(s)]) for s in (1, 2)]
SERIES = {(s, name): generate_uid(entropy_srcs=[STUDIES[s], name])
          for s in (0, 1) for name in ("scout", "soft", "bone", "summary", "rtstruct", "dose")}


@pytest.fixture(scope="module")
def cd_export(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cd")
    for s, study_uid in enumerate(STUDIES):
        study = root / "EXPORT" / PATIENT / f"STUDY{s + 1}"
        uid = {name: SERIES[(s, name)] for name in ("scout", "soft", "bone", "summary", "rtstruct", "dose")}
        write_series(study / "SCOUT", PATIENT, study_uid, uid["scout"], 2, 1, "Topogram",
                     image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
        write_series(study / "SOFT", PATIENT, study_uid, uid["soft"], 5, 2, "Neck 3.0 soft")
        write_series(study / "BONE", PATIENT, study_uid, uid["bone"], 3, 3, "Neck 3.0 bone")
        # Study 1's summary is caught by its SOP class alone, study 2's by its ImageType alone.
        if s == 0:
            write_series(study / "SUMMARY", PATIENT, study_uid, uid["summary"], 1, 500, "Exam Summary",
                         image_type=("ORIGINAL", "PRIMARY", "OTHER"), sop_class=SecondaryCaptureImageStorage)
        else:
            write_series(study / "SUMMARY", PATIENT, study_uid, uid["summary"], 1, 500, "Exam Summary",
                         image_type=("DERIVED", "SECONDARY", "SCREEN SAVE"))
    write_series(root / "EXPORT" / PATIENT / "STUDY1" / "RT", PATIENT, STUDIES[0], SERIES[(0, "rtstruct")], 1,
                 900, "RTSTRUCT", sop_class=RTStructureSetStorage, modality="RTSTRUCT")
    write_series(root / "EXPORT" / PATIENT / "STUDY2" / "DOSE", PATIENT, STUDIES[1], SERIES[(1, "dose")], 1,
                 999, "Dose Report", sop_class=XRayRadiationDoseSRStorage, modality="SR")
    write_series(root / "EXPORT" / "ANON" / "CT", "ANON", generate_uid(entropy_srcs=["anon"]), None, 4, 7,
                 "anonymised")
    write_series(root / "EXPORT" / "NOID" / "CT", "", generate_uid(entropy_srcs=["noid"]), NO_PATIENT_ID, 3, 2,
                 "no patient")
    (root / "EXPORT" / "README.TXT").write_text("exported by the scanner's CD writer\n")
    return root


def skipped_reasons(skipped: pd.DataFrame) -> dict[str, str]:
    return dict(zip(skipped["series_uid"], skipped["reason"]))


def check_uidless(cohort: pd.DataFrame, skipped: pd.DataFrame) -> None:
    """The UID-less CT is either a case (grouped by other header facts) or skipped with that reason,
    file by file: never left out without a word."""
    anon_files = skipped[skipped["path"].str.startswith("EXPORT/ANON/CT")]
    if "ANON" in set(cohort["patient"]):
        assert cohort.loc[cohort["patient"] == "ANON", "dicom_dir"].tolist() == ["EXPORT/ANON"]
        assert anon_files.empty
    else:
        assert len(anon_files) == 4
        assert all("without a SeriesInstanceUID" in r and "CT" in r for r in anon_files["reason"])


def test_index_one_case_per_study(cd_export):
    cohort, skipped = index_folder(cd_export)
    study_cases = cohort[cohort["patient"] == PATIENT]
    # Cases of one patient are numbered in StudyInstanceUID order.
    first = 0 if STUDIES[0] < STUDIES[1] else 1
    assert sorted(study_cases["case"]) == [f"{PATIENT}-01", f"{PATIENT}-02"]
    assert study_cases.loc[f"{PATIENT}-01", "dicom_dir"] == f"EXPORT/PAT-A/STUDY{first + 1}"
    by_study = {row.dicom_dir: row for row in study_cases.itertuples()}
    assert sorted(by_study) == ["EXPORT/PAT-A/STUDY1", "EXPORT/PAT-A/STUDY2"]
    for s in (0, 1):
        row = by_study[f"EXPORT/PAT-A/STUDY{s + 1}"]
        # convert's rule: the most slices wins; the study's other CT series is listed beside it.
        assert row.series_uid == SERIES[(s, "soft")]
        assert row.other_series == SERIES[(s, "bone")]
        assert row.collection == "EXPORT"
    reasons = skipped_reasons(skipped)
    for s in (0, 1):
        assert reasons[SERIES[(s, "scout")]].startswith("localizer/scout")
        assert reasons[SERIES[(s, "summary")]].startswith("secondary capture" if s == 0 else "derived image")
        assert reasons[SERIES[(s, "bone")]].startswith(f"another CT series of study {STUDIES[s]}")
        assert SERIES[(s, "bone")] in reasons and SERIES[(s, "soft")] not in reasons
    assert reasons[SERIES[(0, "rtstruct")]].startswith("label object (RTSTRUCT)")
    assert reasons[SERIES[(1, "dose")]].startswith("dose object (X-Ray Radiation Dose SR")
    assert reasons[NO_PATIENT_ID].startswith("CT without PatientID")
    readme = skipped[skipped["path"] == "EXPORT/README.TXT"]
    assert len(readme) == 1 and "not readable as DICOM" in readme["reason"].iloc[0]
    check_uidless(cohort, skipped)
    # Nothing is both a case and skipped; every series under the folder is one or the other. A
    # UID-less series has series_uid '' (as a case, and each skipped file has ''): check_uidless
    # covers it by path.
    assert not (set(cohort["series_uid"]) - {""}) & set(skipped["series_uid"])
    written = {uid for key, uid in SERIES.items() if key not in ((1, "rtstruct"), (0, "dose"))}
    assert written <= set(cohort["series_uid"]) | set(skipped["series_uid"])


def test_index_one_case_per_series(cd_export):
    cohort, skipped = index_folder(cd_export, per="series")
    study_cases = cohort[cohort["patient"] == PATIENT]
    assert set(study_cases["series_uid"]) == {SERIES[(s, n)] for s in (0, 1) for n in ("soft", "bone")}
    assert (study_cases["other_series"] == "").all()
    assert list(study_cases["case"]) == [f"{PATIENT}-{k:02d}" for k in range(1, 5)]
    # A series folder: dicom_dir is the study folder above it (where the RTSTRUCT lies).
    assert set(study_cases["dicom_dir"]) == {"EXPORT/PAT-A/STUDY1", "EXPORT/PAT-A/STUDY2"}
    reasons = skipped_reasons(skipped)
    assert not any(r.startswith("another CT series") for r in reasons.values())
    assert reasons[SERIES[(1, "summary")]].startswith("derived image")
    check_uidless(cohort, skipped)


def test_index_command_writes_skipped_table_and_says_how_many(cd_export, tmp_path, capsys):
    out = tmp_path / "cohort.tsv"
    assert fetch_main(["index", "--root", str(cd_export), "--out", str(out)]) == 0
    cohort = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False)
    skipped_path = skipped_table_path(out)
    assert skipped_path == tmp_path / "cohort.skipped.tsv"
    skipped = pd.read_csv(skipped_path, sep="\t", dtype=str, keep_default_na=False)
    assert list(skipped.columns) == ["path", "series_uid", "study_uid", "patient", "modality", "what",
                                     "n_files", "reason"]
    assert (skipped["reason"] != "").all()
    printed = capsys.readouterr().out
    n_files = int((skipped["series_uid"] == "").sum())
    assert n_files >= 1 and skipped.loc[skipped["path"] == "EXPORT/README.TXT", "series_uid"].tolist() == [""]
    assert f"{len(cohort)} cases (one per CT study)" in printed
    assert f"skipped {len(skipped) - n_files} series and {n_files} files" in printed
    assert "other_series" in cohort.columns


def test_index_of_a_folder_without_ct_names_what_it_found(tmp_path):
    write_series(tmp_path / "RT", PATIENT, STUDIES[0], SERIES[(0, "rtstruct")], 1, 900, "RTSTRUCT",
                 sop_class=RTStructureSetStorage, modality="RTSTRUCT")
    with pytest.raises(ValueError, match=r"no CT image series .*label object \(RTSTRUCT\)"):
        index_folder(tmp_path)
    assert fetch_main(["index", "--root", str(tmp_path), "--out", str(tmp_path / "cohort.tsv")]) == 1
    assert not (tmp_path / "cohort.tsv").exists() and not (tmp_path / "cohort.skipped.tsv").exists()
