"""The cohort table: one row per case (one CT scan), read once by the workflow.

Columns (TSV, header required):

``case``          hnct's case ID, unique, used in every file name (letters, digits, ``-``, ``_``, ``.``).
``patient``       the DICOM PatientID. Folds group by it: one patient never spans two folds.
``collection``    the TCIA collection (or the demo's "collection").
``dicom_dir``     where the case's DICOM lies, relative to ``dicom_root`` (a patient or series
                  folder in the NBIA Data Retriever layout; may be empty for ``source: tcia``).
``series_uid``    the CT SeriesInstanceUID to use (optional; empty = choose by rule, see convert).
``t_stage``       clinical T-stage as written (``T1``..``T4``, ``T4a``; optional).
``label_t4``      1 = T4, 0 = not T4, empty = unknown (classification target).
``node_positive`` 1/0/empty: any lymph node labelled (segmentation stratification).
``split``         ``test`` for a fixed held-out test case, else empty (LaryngealCT keeps one).
``ct_file``       the case's CT as one volume file (NRRD, NIfTI, MHA), relative to ``dicom_root``
                  (optional; ``source: local`` only; convert then reads it instead of DICOM:
                  :mod:`hnct.volume_ct`). ``python -m hnct.fetch index --layout`` writes it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

REQUIRED_COLUMNS = ("case", "patient", "collection")
OPTIONAL_COLUMNS = ("dicom_dir", "series_uid", "t_stage", "label_t4", "node_positive", "split", "ct_file")
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class CohortError(ValueError):
    """The cohort table itself is unusable (not one case: the whole run)."""


def tcia_patient_id(laryngealct_id: str) -> str:
    """Map a LaryngealCT case ID to the TCIA PatientID.

    LaryngealCT writes ``_`` where TCIA writes ``-``: ``RADCURE_0724`` -> ``RADCURE-0724``,
    ``HNSCC_01_0165`` -> ``HNSCC-01-0165``, ``HN_CHUS_071`` -> ``HN-CHUS-071``,
    ``QIN_HEADNECK_02_2440`` -> ``QIN-HEADNECK-02-2440``, ``HN_018`` -> ``HN-018``;
    HEAD-NECK-RADIOMICS-HN1 IDs (``HN1524``) have no separator and stay as they are.
    """
    return laryngealct_id.strip().replace("_", "-")


def t4_label(t_stage: str | float | None) -> float:
    """1.0 for T4/T4a/T4b, 0.0 for Tis/T0-T3 (and TX is unknown: NaN)."""
    if t_stage is None or (isinstance(t_stage, float) and pd.isna(t_stage)):
        return float("nan")
    text = str(t_stage).strip().upper()
    if not text or text in {"TX", "NA", "NAN"}:
        return float("nan")
    if not text.startswith("T"):
        text = "T" + text
    if text.startswith("T4"):
        return 1.0
    if re.match(r"^T(IS|[0-3])", text):
        return 0.0
    return float("nan")


def read_cohort(path: str | Path) -> pd.DataFrame:
    """Read and check a cohort table; every problem is reported with the row it is on."""
    path = Path(path)
    if not path.exists():
        raise CohortError(f"cohort table {path} does not exist")
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment="#")
    return check_cohort(table, source=str(path))


def check_cohort(table: pd.DataFrame, source: str = "cohort table") -> pd.DataFrame:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise CohortError(f"{source}: missing column(s) {', '.join(missing)}")
    table = table.copy()
    for column in OPTIONAL_COLUMNS:
        if column not in table.columns:
            table[column] = ""
    table = table.fillna("")
    for column in table.columns:
        table[column] = table[column].astype(str).str.strip()
    bad = table.loc[~table["case"].str.match(CASE_ID_PATTERN), "case"]
    if len(bad):
        raise CohortError(f"{source}: case IDs must be letters, digits, '.', '-', '_': {list(bad)[:5]}")
    dup = table.loc[table["case"].duplicated(), "case"]
    if len(dup):
        raise CohortError(f"{source}: duplicate case IDs {sorted(set(dup))[:5]}")
    empty_patient = table.loc[table["patient"] == "", "case"]
    if len(empty_patient):
        raise CohortError(f"{source}: rows without a patient: {list(empty_patient)[:5]}")
    if (table["label_t4"] == "").all() and (table["t_stage"] != "").any():
        table["label_t4"] = [
            "" if pd.isna(v) else str(int(v)) for v in (t4_label(s) for s in table["t_stage"])
        ]
    return table.set_index("case", drop=False)


def write_cohort(table: pd.DataFrame, path: str | Path) -> None:
    from hnct.common import atomic_path

    columns = list(REQUIRED_COLUMNS) + [c for c in OPTIONAL_COLUMNS] + [
        c for c in table.columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS
    ]
    table = check_cohort(table)
    with atomic_path(path) as tmp:
        table.reset_index(drop=True)[columns].to_csv(tmp, sep="\t", index=False)
