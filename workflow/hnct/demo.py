"""demo: a synthetic head-and-neck CT cohort written as real DICOM, the workflow's embedded default.

:func:`plan_cohort` decides every case from ``seed`` alone (collection, PatientID, T-stage, nodes,
geometry, UIDs) without generating a pixel or touching a file, so Snakemake can call it at every
parse. :func:`case_files` lists the exact files a case gets; :func:`write_case` writes them:

* a CT series (CT Image Storage, Explicit VR Little Endian, int16 stored values, RescaleIntercept
  -1024 so HU = stored - 1024), axial, identity direction, LPS mm, in-plane spacing 0.4-1.0 mm,
  slice thickness 1-3 mm, per-patient origin offsets; InstanceNumber 1 is the most superior slice;
* an RTSTRUCT (GTVp = tumour, GTVn = lymph nodes (node-positive cases only), Larynx = the
  laryngeal region from the cricoid's lower edge to the epiglottis tip, used for the crop box);
* for some patients a CT localizer (ImageType ``ORIGINAL\\PRIMARY\\LOCALIZER``) beside the CT;

laid out as the NBIA Data Retriever writes downloads (``<Collection>/<PatientID>/
<MM-DD-YYYY>-NA-<StudyDescription>-<last 5 of StudyUID>/<SeriesNumber>.000000-<SeriesDescription>-
<last 5 of SeriesUID>/1-01.dcm``, files numbered from 1 and zero-padded to the width of the count).
In the workflow each case's folder (the plan's ``dicom_dir``: the patient folder, or the study
folder of a patient with two scans) is one declared ``directory()`` output of rule ``demo_case``.

Phantom (HU): air -1000, subcutaneous fat -100, soft tissue 40, vertebra 650 (marrow 250),
laryngeal cartilage (thyroid shield, cricoid ring) 240-300 with ossified patches 450-700 (per
patient: shield and cricoid thickness, airway radius, share of ossification), hyoid 550, airway
lumen -1000, tumour 110 (contrast-enhancing), lymph nodes 30 inside lateral fat pads (-90),
Gaussian noise sigma 10 HU. The label has no shortcut: every T-stage draws the tumour's size, HU,
angle and height alike, and its cartilage alike; the stage decides only where along the radius from
the airway axis the tumour lies (T2: from the airway wall to short of the thyroid shield; T3: from
the airway wall into its inner cortex; T4: of a T3's size but centred on the shield's outer surface,
40-60 % of it outside the cartilage in the neck, and the shield destroyed (lysis) over the tumour's
angular span plus 25 degrees either side at its height: a visible gap in the bright ring). The
shield volume a tumour (or a T4's lysis) replaces is added to the cricoid ring, so cartilage voxel
counts do not depend on the stage either; the tumour's side alternates within each stage (plan
column ``tumour_side``), so every stage is seen on both sides alike
(tests/test_shortcut.py checks HU-band counts, tumour volume and crop size). Collections hold the
same T4 share up to rounding.

Broken patients (``broken_cases``): ``gap`` (one CT slice in the middle missing; its RTSTRUCT
still references the lost slice, as a real lost file leaves it) and ``no_ct`` (only an MR series,
no usable CT, no RTSTRUCT). Kinds are in the plan column ``demo_kind`` (ct, gap, no_ct).
The plan's ``series_uid`` column is left empty: the converter chooses the CT by its rule.

UIDs are ``2.25.<name-based UUID>`` of (seed, case, role), so files are byte-identical for a seed.
Each case's JSON manifest holds the planted truth (LPS mm): larynx centre, tumour ellipsoid,
thyroid shield and cricoid geometry, cartilage box, node ellipsoids, T-stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RTStructureSetStorage,
)

from hnct import demo_oar
from hnct.common import atomic_path, progress, setup_logging, write_json

if TYPE_CHECKING:  # annotations only
    import pandas as pd

log = logging.getLogger("hnct.demo")

DEFAULT_ROOT = "results/demo/dicom"
STUDY_COMPONENT_SOP_CLASS = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (RT references)

# Region codes of the phantom, painted in this order (later wins; OSSIFIED within CARTILAGE), and
# their HU (cartilage and ossified cartilage: per patient, see region_hu()).
AIR, FAT, SOFT, FAT_PAD, BONE, MARROW, AIRWAY, CARTILAGE, HYOID, TUMOUR, NODE, OSSIFIED = range(12)
REGION_HU = np.array([-1000, -100, 40, -90, 650, 250, -1000, 270, 550, 110, 30, 550], dtype=np.float32)
# MR (the no-CT broken patient): arbitrary T2-like magnitudes per region.
REGION_MR = np.array([0, 900, 350, 880, 150, 600, 0, 120, 150, 700, 650, 150], dtype=np.float32)
NOISE_HU = 10.0

# Laryngeal framework, mm relative to the larynx centre (airway axis, z = larynx_z); ranges are
# drawn per patient (uniform), alike for every T-stage.
AIRWAY_RADIUS_RANGE = (6.0, 8.5)
AIRWAY_RADIUS = AIRWAY_RADIUS_RANGE[1]  # the widest: hnct.demo_oar's fallback when an anatomy has no cartilage entry
SHIELD_INNER, SHIELD_THICKNESS_RANGE, SHIELD_HALF_ANGLE_DEG = 14.0, (1.8, 3.0), 75.0
SHIELD_Z = (-8.0, 16.0)
CRICOID_INNER, CRICOID_THICKNESS_RANGE, CRICOID_Z = 11.0, (2.8, 3.8), (-16.0, -9.0)
CARTILAGE_MATRIX_HU, CARTILAGE_OSSIFIED_HU, OSSIFICATION_LEVEL = (240.0, 300.0), (450.0, 700.0), (-0.6, 0.6)
# Primary tumour, every stage alike: volume, z semi-axis / tangential semi-axis, angle from
# anterior (either side), height of its centre above the larynx centre.
TUMOUR_VOLUME_MM3, TUMOUR_ELONGATION = (600.0, 1000.0), (1.1, 1.3)
TUMOUR_ANGLE_DEG, TUMOUR_Z_OFFSET_MM = (20.0, 50.0), (2.0, 5.0)
# T4: the thyroid shield is destroyed (lysis) over the tumour's angular span plus this margin (deg)
# either side, over its height; the lost cartilage goes to the cricoid like the tumour-replaced part.
LYSIS_MARGIN_DEG = 25.0
HYOID_INNER, HYOID_OUTER, HYOID_Z = 19.0, 22.0, (18.0, 21.0)
LARYNX_RADIUS, LARYNX_Z = 20.0, (-16.0, 24.0)  # epiglottis tip at +24, cricoid lower edge at -16
NECK_SEMI = (50.0, 45.0)  # LR, AP semi-axes of the skin ellipse, mm
FAT_THICKNESS = 5.0
AIRWAY_ANTERIOR_OF_NECK = 15.0  # airway axis lies this far anterior of the neck centre, mm

COLLECTIONS = {
    # name: scanner style (mimics TCIA collections: vendor, kernel, thicknesses, descriptions)
    "DEMO-ALPHA": {"manufacturer": "GE MEDICAL SYSTEMS", "model": "LightSpeed RT16", "kernel": "STANDARD",
                   "thickness": [2.0, 2.5], "study_desc": "RT SIMULATION", "series_desc": "Neck 2.0 CE"},
    "DEMO-BETA": {"manufacturer": "SIEMENS", "model": "SOMATOM Definition AS", "kernel": "B31f",
                  "thickness": [3.0, 2.0], "study_desc": "CT NECK W CONTRAST", "series_desc": "CT IMAGES"},
    "DEMO-GAMMA": {"manufacturer": "Philips", "model": "Brilliance Big Bore", "kernel": "B",
                   "thickness": [1.5, 2.0, 1.0], "study_desc": "HEAD NECK PLANNING", "series_desc": ""},
}
SUBSITES = ["Glottis", "Supraglottis", "Subglottis"]

METADATA_COLUMNS = [
    "Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID",
    "Study UID", "Study Description", "Study Date", "Series Description", "Manufacturer",
    "Modality", "SOP Class Name", "SOP Class UID", "Number of Images", "File Size",
    "File Location", "Download Timestamp",
]
CLINICAL_COLUMNS = [
    "TCIA_ID", "Case_ID", "Collection", "T_stage", "N_stage", "Label_T4", "Subsite", "Age", "Sex",
    "x", "y", "z", "size_x", "size_y", "size_z",
]
DOWNLOAD_TIMESTAMP = "2026-01-01 00:00:00.000"  # fixed: the cohort tables are byte-reproducible


# ----------------------------------------------------------------------------------- planning

# Namespace of hnct's name-based UUIDs (uuid5 of "hnct.demo" in the URL namespace).
UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "hnct.demo")


def _uid(seed: Any, *parts: Any) -> str:
    """A valid DICOM UID ``2.25.<UUID as integer>`` (PS3.5 B.2) from the seed and ``parts`` only.

    A name-based UUID (v5), so the same seed and parts always give the same UID; pydicom's
    ``generate_uid(prefix=None)`` would draw a random UUID4 and ignore its entropy sources.
    """
    return f"2.25.{uuid.uuid5(UUID_NAMESPACE, ':'.join(map(str, (seed, *parts)))).int}"


def _int_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "little")


def plan_cohort(n_patients: int = 24, seed: int = 1729, t4_fraction: float = 0.35,
                broken_cases: bool = True, two_scan_patients: int = 1) -> pd.DataFrame:
    """Plan the synthetic cohort: one row per case in the cohort-table format (:mod:`hnct.cohort`).

    Cheap and deterministic (no pixels, no I/O). ``n_patients`` usable patients are spread over
    three collections; ``round(t4_fraction * n_patients)`` of them are T4, spread so that every
    collection holds the same T4 share of its scans up to rounding (:func:`_plan_stages`), the others
    T2 or T3; about one in five is node-negative; the first ``two_scan_patients`` patients of
    DEMO-BETA get a second scan (two cases, one PatientID, ``dicom_dir`` = each study folder);
    ``broken_cases`` adds two patients (``demo_kind`` gap and no_ct). Extra columns carry the plan
    (geometry in mm, UIDs, seeds).
    """
    rng = np.random.default_rng([seed, 0])
    names = list(COLLECTIONS)
    n_t4 = int(round(t4_fraction * n_patients))
    collection_of = [names[index % len(names)] for index in range(n_patients)]
    two_scan = [index for index in range(n_patients) if collection_of[index] == "DEMO-BETA"][:two_scan_patients]
    stages = _plan_stages(rng, collection_of, two_scan, n_t4)
    # Tumour side (patient left = +x, right) alternates within each stage: every stage has both sides
    # about equally often, so neither side nor a side-specific pattern stands in for T4.
    side_of = {}
    for stage in ("T2", "T3", "T4"):
        for k, index in enumerate(i for i in range(n_patients) if stages[i] == stage):
            side_of[index] = ("left", "right")[k % 2]
    n_negative = max(1, int(round(0.2 * n_patients)))
    node_pos = np.ones(n_patients, dtype=int)
    node_pos[rng.choice(n_patients, n_negative, replace=False)] = 0
    kinds = ["ct"] * n_patients + (["gap", "no_ct"] if broken_cases else [])
    # Localizer beside the CT for two normal patients (the converter must pick the axial CT).
    localizer = set(rng.choice(n_patients, min(2, n_patients), replace=False).tolist())
    rows: list[dict[str, Any]] = []
    counters = {name: 0 for name in names}
    two_scan_left = two_scan_patients
    for index, kind in enumerate(kinds):
        collection = names[index % len(names)]
        counters[collection] += 1
        patient = f"{collection}-{counters[collection]:03d}"
        prng = np.random.default_rng([seed, 1, index])
        if index < n_patients:
            t_stage, node_positive = stages[index], int(node_pos[index])
        else:
            t_stage, node_positive = ["T2", "T4"][index - n_patients], 1
        n_scans = 1
        if kind == "ct" and collection == "DEMO-BETA" and two_scan_left > 0:
            n_scans, two_scan_left = 2, two_scan_left - 1
        patient_fields = {
            "patient": patient, "collection": collection, "t_stage": t_stage,
            "label_t4": str(int(t_stage == "T4")), "node_positive": str(node_positive),
            "demo_kind": kind, "anatomy_seed": str(_int_seed(seed, patient, "anatomy")),
            "tumour_side": side_of.get(index, "left"),
            "n_nodes": str(int(prng.integers(1, 4)) if node_positive else 0),
            "subsite": SUBSITES[int(prng.integers(0, len(SUBSITES)))],
            "age": str(int(prng.integers(42, 84))), "sex": "M" if prng.random() < 0.8 else "F",
        }
        for scan in range(n_scans):
            case = patient if n_scans == 1 else f"{patient}-{scan + 1:02d}"
            row = dict(case=case, split="", series_uid="", **patient_fields)
            row.update(_plan_scan(seed, case, collection, kind,
                                  with_localizer=(index in localizer and scan == 0)))
            row["dicom_dir"] = (f"{collection}/{patient}" if n_scans == 1
                                else f"{collection}/{patient}/{row['study_folder']}")
            rows.append(row)
    import pandas as pd

    from hnct.cohort import check_cohort

    return check_cohort(pd.DataFrame(rows), source=f"demo plan (seed {seed})")


def _plan_stages(rng: np.random.Generator, collection_of: list[str], two_scan: list[int],
                 n_t4: int) -> list[str]:
    """T-stage of each usable patient: ``n_t4`` T4, the rest alternately T2 and T3 (shuffled).

    The T4 patients go one at a time to the collection whose share of T4 scans stays lowest after
    taking it (a two-scan patient counts twice and is taken only when its collection has no
    single-scan patient left), so collection predicts the label no better than rounding allows.
    """
    n_patients = len(collection_of)
    weight = [2 if index in two_scan else 1 for index in range(n_patients)]
    scans = {c: sum(w for w, cc in zip(weight, collection_of) if cc == c) for c in dict.fromkeys(collection_of)}
    t4_scans = dict.fromkeys(scans, 0)
    free = {c: [i for i in range(n_patients) if collection_of[i] == c] for c in scans}
    is_t4 = [False] * n_patients
    for _ in range(n_t4):
        options = []
        for c, candidates in free.items():
            singles = [i for i in candidates if weight[i] == 1]
            pool = singles or candidates
            if pool:
                options.append(((t4_scans[c] + weight[pool[0]]) / scans[c], c, pool))
        _, c, pool = min(options, key=lambda option: option[:2])
        chosen = int(pool[int(rng.integers(0, len(pool)))])
        is_t4[chosen] = True
        t4_scans[c] += weight[chosen]
        free[c].remove(chosen)
    others = [f"T{2 + i % 2}" for i in range(n_patients - n_t4)]
    rng.shuffle(others)
    stages, rest = [], iter(others)
    for index in range(n_patients):
        stages.append("T4" if is_t4[index] else next(rest))
    return stages


def _plan_scan(seed: int, case: str, collection: str, kind: str, with_localizer: bool) -> dict[str, str]:
    """Geometry, UIDs and folder names of one scan (all values as strings, as the cohort keeps them)."""
    style = COLLECTIONS[collection]
    rng = np.random.default_rng(_int_seed(seed, case, "scan"))
    spacing = round(float(rng.uniform(0.4, 1.0)), 3)
    fov = float(rng.uniform(140.0, 165.0))
    rows = int(np.clip(round(fov / spacing / 2) * 2, 200, 400))
    thickness = float(style["thickness"][int(rng.integers(0, len(style["thickness"])))])
    z_extent = float(rng.uniform(86.0, 96.0))
    n_slices = int(np.clip(math.ceil(z_extent / thickness) + 1, 40, 140))
    width = rows * spacing
    origin_x = round(-(rows - 1) * spacing / 2 + float(rng.uniform(-20, 20)), 3)
    origin_y = round(-(rows - 1) * spacing / 2 + float(rng.uniform(-20, 20)) + 10.0, 3)
    origin_z = round(float(rng.uniform(-350.0, 50.0)), 3)
    centre_x = origin_x + (rows - 1) * spacing / 2
    centre_y = origin_y + (rows - 1) * spacing / 2
    neck_x = round(centre_x + float(rng.uniform(-8, 8)), 3)
    neck_y = round(centre_y + float(rng.uniform(-8, 8)), 3)
    larynx_z = round(origin_z + (n_slices - 1) * thickness / 2 + float(rng.uniform(-10, 10)), 3)
    year, month, day = int(rng.integers(2003, 2020)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    study_uid = _uid(seed, case, "study")
    main_uid = _uid(seed, case, "series", "ct" if kind != "no_ct" else "mr")
    plan = {
        "study_uid": study_uid, "frame_uid": _uid(seed, case, "frame"),
        "study_date": f"{year:04d}{month:02d}{day:02d}", "study_desc": style["study_desc"],
        "manufacturer": style["manufacturer"], "model": style["model"], "kernel": style["kernel"],
        "ct_series_uid": main_uid, "ct_series_number": "2", "ct_series_desc": style["series_desc"],
        "rtstruct_series_uid": _uid(seed, case, "series", "rtstruct") if kind != "no_ct" else "",
        "localizer_series_uid": _uid(seed, case, "series", "localizer") if with_localizer else "",
        "rows": str(rows), "cols": str(rows), "pixel_spacing": str(spacing),
        "slice_thickness": str(thickness), "n_slices": str(n_slices),
        "origin_x": str(origin_x), "origin_y": str(origin_y), "origin_z": str(origin_z),
        "neck_x": str(neck_x), "neck_y": str(neck_y), "larynx_z": str(larynx_z),
        "missing_slice": str(n_slices // 2) if kind == "gap" else "",
        "pixel_seed": str(_int_seed(seed, case, "pixels")), "fov_mm": str(round(width, 3)),
    }
    if kind == "no_ct":  # an axial MR of the neck: 5 mm slices, fixed 256 matrix
        plan.update(rows="256", cols="256", pixel_spacing="0.7", slice_thickness="5.0", n_slices="24",
                    ct_series_number="3", ct_series_desc="T2 AX NECK")
    plan["study_folder"] = f"{month:02d}-{day:02d}-{year:04d}-NA-{style['study_desc']}-{study_uid[-5:]}"
    return plan


# ------------------------------------------------------------------------------- file layout

def _series_folder(number: str | int, description: str, uid: str) -> str:
    return f"{float(number):.6f}-{description or 'NA'}-{uid[-5:]}"


def _file_names(count: int) -> list[str]:
    width = len(str(count))
    return [f"1-{i:0{width}d}.dcm" for i in range(1, count + 1)]


def _series_of(row: pd.Series) -> list[dict[str, Any]]:
    """Every series a case gets: key, modality, UID, folder (relative to the DICOM root), file names."""
    study = f"{row['collection']}/{row['patient']}/{row['study_folder']}"
    kind = row["demo_kind"]
    series = []
    if row["localizer_series_uid"]:
        series.append({"key": "localizer", "modality": "CT", "sop_class": CTImageStorage,
                       "sop_class_name": "CT Image Storage", "number": 1, "description": "Topogram",
                       "uid": row["localizer_series_uid"], "n_files": 2})
    n_slices = int(row["n_slices"])
    if kind == "no_ct":
        series.append({"key": "mr", "modality": "MR", "sop_class": MRImageStorage,
                       "sop_class_name": "MR Image Storage", "number": int(row["ct_series_number"]),
                       "description": row["ct_series_desc"], "uid": row["ct_series_uid"], "n_files": n_slices})
    else:
        series.append({"key": "ct", "modality": "CT", "sop_class": CTImageStorage,
                       "sop_class_name": "CT Image Storage", "number": int(row["ct_series_number"]),
                       "description": row["ct_series_desc"], "uid": row["ct_series_uid"],
                       "n_files": n_slices - (1 if row["missing_slice"] else 0)})
        series.append({"key": "rtstruct", "modality": "RTSTRUCT", "sop_class": RTStructureSetStorage,
                       "sop_class_name": "RT Structure Set Storage", "number": 900,
                       "description": "RTSTRUCT", "uid": row["rtstruct_series_uid"], "n_files": 1})
    for s in series:
        s["folder"] = f"{study}/{_series_folder(s['number'], s['description'], s['uid'])}"
        s["files"] = _file_names(s["n_files"])
    return series


def dicom_root_param(wildcards, output) -> str:
    """Snakemake ``params`` function: the DICOM root, read off a rule's outputs (no hard-coded prefix).

    ``metadata.csv`` lies in the root; a case's folder (output ``dicom``) is
    ``<root>/<wildcards.case_dir>`` (the case's ``dicom_dir``, one or more folder levels).
    """
    if "metadata" in output.keys():
        return str(Path(output.metadata).parent)
    return str(Path(output.dicom).parents[len(Path(wildcards.case_dir).parts) - 1])


def case_files(row: pd.Series) -> list[str]:
    """The exact DICOM files :func:`write_case` writes for ``row``, relative to the DICOM root (the
    organs-at-risk mask folder some cases get besides: :func:`hnct.demo_oar.mask_files`)."""
    return [f"{s['folder']}/{name}" for s in _series_of(row) for name in s["files"]]


# ----------------------------------------------------------------------------------- anatomy

def anatomy(row: pd.Series) -> dict[str, Any]:
    """The planted structures of a case in LPS mm (recomputed from the row; same for both scans).

    Larynx centre = (larynx_x, larynx_y, larynx_z) on the airway axis. Every patient gets its own
    airway radius and cartilage (thyroid shield thickness, cricoid thickness, matrix and ossified HU,
    ossified share), drawn alike for every T-stage. Tumour: an ellipsoid with axes along the radius
    from the airway axis, the tangent and z (``semi_axes`` in that order, ``angle_deg_from_anterior``
    its direction); T2 and T3 grow from the airway wall (inner edge 0.5-1.5 mm inside the lumen), T4
    is centred on the thyroid shield's outer surface; its volume, angle and height are drawn alike for
    every T-stage, only where along the radius it lies differs (:func:`_tumour_radial_extent`), the tangent and z axes keeping the drawn volume. A T4 also destroys
    the shield over its angular span plus ``LYSIS_MARGIN_DEG`` at its height (``cartilage["lysis"]``).
    The thyroid cartilage the tumour or the lysis replaces is given back to the cricoid ring (its outer radius grows), so the
    cartilage volume does not depend on the stage. Nodes: ellipsoids (axis-aligned).
    """
    rng = np.random.default_rng(int(row["anatomy_seed"]))
    neck_x, neck_y, larynx_z = float(row["neck_x"]), float(row["neck_y"]), float(row["larynx_z"])
    larynx_x = neck_x + float(rng.uniform(-3, 3))
    larynx_y = neck_y - AIRWAY_ANTERIOR_OF_NECK
    side = 1.0 if row["tumour_side"] == "left" else -1.0  # patient left is +x
    cartilage = {
        "airway_radius_mm": float(rng.uniform(*AIRWAY_RADIUS_RANGE)),
        "shield_inner_mm": SHIELD_INNER,
        "shield_outer_mm": SHIELD_INNER + float(rng.uniform(*SHIELD_THICKNESS_RANGE)),
        "cricoid_inner_mm": CRICOID_INNER,
        "cricoid_thickness_mm": float(rng.uniform(*CRICOID_THICKNESS_RANGE)),
        "matrix_hu": float(rng.uniform(*CARTILAGE_MATRIX_HU)),
        "ossified_hu": float(rng.uniform(*CARTILAGE_OSSIFIED_HU)),
        # ossified where a smooth pattern of angle and height exceeds this level (-1: all, 1: none)
        "ossification_level": float(rng.uniform(*OSSIFICATION_LEVEL)),
        "ossification_phase": [float(v) for v in rng.uniform(0, 2 * math.pi, size=2)],
    }
    # Same volume, angle and height for every stage; the stage decides only how far out it reaches.
    volume = float(rng.uniform(*TUMOUR_VOLUME_MM3))
    elongation = float(rng.uniform(*TUMOUR_ELONGATION))
    angle = math.radians(float(rng.uniform(*TUMOUR_ANGLE_DEG))) * side
    centre_z = larynx_z + float(rng.uniform(*TUMOUR_Z_OFFSET_MM))
    inner_extent, outer_extent = _tumour_radial_extent(
        row["t_stage"], cartilage, float(rng.uniform(0.5, 1.5)), float(rng.random()))
    radial = (outer_extent - inner_extent) / 2
    tangential = math.sqrt(volume / (4 / 3 * math.pi * radial * elongation))
    radius = inner_extent + radial
    tumour = {"centre": [larynx_x + radius * math.sin(angle), larynx_y - radius * math.cos(angle), centre_z],
              "semi_axes": [radial, tangential, tangential * elongation], "volume_mm3": volume,
              "inner_extent_mm": inner_extent, "outer_extent_mm": outer_extent,
              "angle_deg_from_anterior": math.degrees(angle)}
    if row["t_stage"] == "T4":  # the shield is destroyed where the tumour passes through it
        span = math.degrees(tangential / cartilage["shield_outer_mm"]) + LYSIS_MARGIN_DEG
        cartilage["lysis"] = {"angle_deg": math.degrees(angle), "half_angle_deg": span,
                              "dz": [centre_z - larynx_z - tangential * elongation,
                                     centre_z - larynx_z + tangential * elongation]}
    replaced = _shield_volume_replaced(tumour, cartilage, [larynx_x, larynx_y, larynx_z])
    cartilage["shield_replaced_mm3"] = replaced
    height = CRICOID_Z[1] - CRICOID_Z[0]
    inner, thickness = cartilage["cricoid_inner_mm"], cartilage["cricoid_thickness_mm"]
    cartilage["cricoid_outer_mm"] = math.sqrt((inner + thickness) ** 2 + replaced / (math.pi * height))
    nodes = []
    for i in range(int(row["n_nodes"])):
        node_side = 1.0 if i % 2 == 0 else -1.0
        if i == 0 and rng.random() < 0.5:
            node_side = -1.0
        semi_axis = float(rng.uniform(2.5, 5.0))
        nodes.append({
            "centre": [larynx_x + node_side * float(rng.uniform(21.0, 23.0)),
                       larynx_y + float(rng.uniform(6.0, 10.0)),
                       larynx_z + float(rng.uniform(-12.0, 14.0)) + 0.0 * i],
            "semi_axes": [semi_axis, semi_axis * float(rng.uniform(0.8, 1.0)), semi_axis * 1.2],
        })
    return {
        "neck_centre": [neck_x, neck_y], "neck_semi_axes": list(NECK_SEMI),
        "larynx_centre": [larynx_x, larynx_y, larynx_z],
        "cartilage": cartilage, "tumour": tumour, "nodes": nodes,
    }


def _tumour_radial_extent(t_stage: str, cartilage: dict[str, Any], wall_gap: float, u: float) -> tuple[float, float]:
    """Distances (mm) of the tumour's innermost and outermost points from the airway axis.

    ``wall_gap`` uniform in [0.5, 1.5), ``u`` uniform in [0, 1). T2 and T3 grow from the airway wall
    (inner edge ``wall_gap`` inside the lumen) outwards: T2 to 0.5-2 mm short of the shield's inner
    surface, T3 into its inner cortex (0.3 mm past the inner surface to 1 mm short of the outer one).
    T4 (through the cartilage into the neck): the radial size a T3 of the same draws would have,
    centred within 0.5 mm of the shield's outer surface, so 40-60 % of the tumour lies outside the
    cartilage and the shield beside the breach is gone over its whole thickness: the breach is a
    large, visible part of the tumour, not a rim a few voxels wide.
    """
    inner, outer = cartilage["shield_inner_mm"], cartilage["shield_outer_mm"]
    wall = cartilage["airway_radius_mm"] - wall_gap
    into_cortex = inner + 0.3 + (outer - inner - 1.3) * u
    if t_stage == "T4":
        radial = (into_cortex - wall) / 2
        centre = outer + wall_gap - 1.0
        return centre - radial, centre + radial
    if t_stage == "T3":
        return wall, into_cortex
    return wall, inner - 0.5 - 1.5 * u


def _shield_mask(cartilage: dict[str, Any], dz, r, theta, lysis: bool = True) -> np.ndarray:
    """Thyroid shield: a shell of the patient's radii, |angle from anterior| <= 75 deg, SHIELD_Z; with
    ``lysis``, without the destroyed sector of a T4 (``cartilage["lysis"]``: angle, half-width, dz)."""
    shield = ((dz >= SHIELD_Z[0]) & (dz <= SHIELD_Z[1]) & (r >= cartilage["shield_inner_mm"])
              & (r <= cartilage["shield_outer_mm"]) & (np.abs(theta) <= SHIELD_HALF_ANGLE_DEG))
    gone = cartilage.get("lysis") if lysis else None
    if gone:
        shield &= ~((np.abs(theta - gone["angle_deg"]) <= gone["half_angle_deg"])
                    & (dz >= gone["dz"][0]) & (dz <= gone["dz"][1]))
    return shield


def _in_tumour(tumour: dict[str, Any], X, Y, Z) -> np.ndarray:
    """Points (LPS mm arrays) inside the tumour ellipsoid (axes: radial, tangential, z)."""
    angle = math.radians(tumour["angle_deg_from_anterior"])
    dx, dy, dz = X - tumour["centre"][0], Y - tumour["centre"][1], Z - tumour["centre"][2]
    radial = dx * math.sin(angle) - dy * math.cos(angle)  # outward: anterior is -y
    tangential = dx * math.cos(angle) + dy * math.sin(angle)
    a, b, c = tumour["semi_axes"]
    return (radial / a) ** 2 + (tangential / b) ** 2 + (dz / c) ** 2 <= 1


def tumour_half_extent(tumour: dict[str, Any]) -> list[float]:
    """Half-widths (mm) of the tumour's axis-aligned bounding box (x, y, z)."""
    angle = math.radians(tumour["angle_deg_from_anterior"])
    a, b, c = tumour["semi_axes"]
    return [math.hypot(a * math.sin(angle), b * math.cos(angle)),
            math.hypot(a * math.cos(angle), b * math.sin(angle)), c]


def _shield_volume_replaced(tumour: dict[str, Any], cartilage: dict[str, Any], centre) -> float:
    """Volume (mm3) of the intact thyroid shield that the tumour or a T4's lysis replaces (0.25 mm grid
    over the shield's box, at the tumour's height)."""
    step, outer = 0.25, cartilage["shield_outer_mm"]
    z_lo = max(tumour["centre"][2] - tumour["semi_axes"][2], centre[2] + SHIELD_Z[0])
    z_hi = min(tumour["centre"][2] + tumour["semi_axes"][2], centre[2] + SHIELD_Z[1])
    if "lysis" in cartilage:
        z_lo = min(z_lo, centre[2] + max(cartilage["lysis"]["dz"][0], SHIELD_Z[0]))
        z_hi = max(z_hi, centre[2] + min(cartilage["lysis"]["dz"][1], SHIELD_Z[1]))
    if z_hi < z_lo:
        return 0.0
    X, Y, Z = np.meshgrid(np.arange(centre[0] - outer, centre[0] + outer + step, step),
                          np.arange(centre[1] - outer, centre[1] + outer / 2, step),
                          np.arange(z_lo, z_hi + step, step), indexing="ij")
    dx, dy = X - centre[0], Y - centre[1]
    r, theta, dz = np.hypot(dx, dy), np.degrees(np.arctan2(dx, -dy)), Z - centre[2]
    intact = _shield_mask(cartilage, dz, r, theta, lysis=False)
    left = _shield_mask(cartilage, dz, r, theta) & ~_in_tumour(tumour, X, Y, Z)
    return float((intact & ~left).sum() * step ** 3)


def _region_slice(anat: dict[str, Any], z: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Region codes (uint8, rows = y, cols = x) of the axial plane at ``z`` (LPS mm)."""
    X, Y = np.meshgrid(xs, ys)
    nx, ny = anat["neck_centre"]
    a, b = anat["neck_semi_axes"]
    cx, cy, cz = anat["larynx_centre"]
    dz = z - cz
    region = np.zeros(X.shape, dtype=np.uint8)
    region[((X - nx) / a) ** 2 + ((Y - ny) / b) ** 2 <= 1] = FAT
    region[((X - nx) / (a - FAT_THICKNESS)) ** 2 + ((Y - ny) / (b - FAT_THICKNESS)) ** 2 <= 1] = SOFT
    for side in (-1, 1):  # lateral fat pads that hold the nodes
        region[((X - cx - side * 22.0) / 8.0) ** 2 + ((Y - cy - 8.0) / 9.0) ** 2 <= 1] = FAT_PAD
    vx, vy = nx, ny + 18.0  # vertebral body and posterior arch
    rv = np.hypot(X - vx, Y - vy)
    region[rv <= 12.0] = BONE
    region[rv <= 10.0] = MARROW
    ra = np.hypot(X - vx, Y - (ny + 35.0))
    region[(ra >= 6.0) & (ra <= 9.0) & (Y > ny + 33.0)] = BONE
    dx, dy = X - cx, Y - cy
    r = np.hypot(dx, dy)
    theta = np.degrees(np.arctan2(dx, -dy))  # 0 = anterior, + = patient left
    cartilage = anat["cartilage"]
    region[r <= cartilage["airway_radius_mm"]] = AIRWAY
    ring = _shield_mask(cartilage, dz, r, theta)
    if CRICOID_Z[0] <= dz <= CRICOID_Z[1]:
        ring |= (r >= cartilage["cricoid_inner_mm"]) & (r <= cartilage["cricoid_outer_mm"])
    # Partial ossification: smooth patches over angle and height, the patient's share of them.
    phase = cartilage["ossification_phase"]
    pattern = np.sin(np.radians(3.0 * theta) + phase[0]) * np.cos(0.35 * dz + phase[1])
    region[ring] = CARTILAGE
    region[ring & (pattern > cartilage["ossification_level"])] = OSSIFIED
    if HYOID_Z[0] <= dz <= HYOID_Z[1]:
        region[(r >= HYOID_INNER) & (r <= HYOID_OUTER) & (np.abs(theta) <= 80.0)] = HYOID
    region[_tumour_mask(anat, z, X, Y)] = TUMOUR
    for node in anat["nodes"]:
        region[_ellipsoid(node["centre"], node["semi_axes"], z, X, Y)] = NODE
    return region


def _ellipsoid(centre, semi_axes, z, X, Y) -> np.ndarray:
    t = ((z - centre[2]) / semi_axes[2]) ** 2
    if t > 1:
        return np.zeros(X.shape, dtype=bool)
    return ((X - centre[0]) / semi_axes[0]) ** 2 + ((Y - centre[1]) / semi_axes[1]) ** 2 <= 1 - t


def _tumour_mask(anat, z, X, Y) -> np.ndarray:
    tumour = anat["tumour"]
    if abs(z - tumour["centre"][2]) > tumour["semi_axes"][2]:
        return np.zeros(X.shape, dtype=bool)
    return _in_tumour(tumour, X, Y, z)


def region_hu(anat: dict[str, Any]) -> np.ndarray:
    """HU of each region code for this patient (its own cartilage matrix and ossified HU)."""
    table = REGION_HU.copy()
    table[CARTILAGE] = anat["cartilage"]["matrix_hu"]
    table[OSSIFIED] = anat["cartilage"]["ossified_hu"]
    return table


def _larynx_mask(anat, z, X, Y) -> np.ndarray:
    cx, cy, cz = anat["larynx_centre"]
    if not LARYNX_Z[0] <= z - cz <= LARYNX_Z[1]:
        return np.zeros(X.shape, dtype=bool)
    return np.hypot(X - cx, Y - cy) <= LARYNX_RADIUS


def phantom_crop(row: pd.Series, margin_mm: float = 8.0, spacing_mm: float = 1.0) -> dict[str, np.ndarray]:
    """The case's laryngeal crop straight from the phantom, without DICOM, convert or resampling.

    The box is the workflow's default crop (the Larynx region's bounding box plus ``margin_mm``),
    sampled at ``spacing_mm`` voxel centres; noise as in the CT (seeded by the case's pixel seed).
    Returns ``hu`` (int16, (z, y, x), z ascending = inferior first as in LPS) and ``tumour`` (bool,
    the GTVp). For tests and tuning harnesses that need many crops in seconds.
    """
    anat = anatomy(row)
    cx, cy, cz = anat["larynx_centre"]
    half = LARYNX_RADIUS + margin_mm
    xs = np.arange(cx - half, cx + half + 1e-6, spacing_mm)
    ys = np.arange(cy - half, cy + half + 1e-6, spacing_mm)
    zs = np.arange(cz + LARYNX_Z[0] - margin_mm, cz + LARYNX_Z[1] + margin_mm + 1e-6, spacing_mm)
    X, Y = np.meshgrid(xs, ys)
    table = region_hu(anat)
    noise = np.random.default_rng(int(row["pixel_seed"]))
    hu = np.empty((len(zs), len(ys), len(xs)), dtype=np.int16)
    tumour = np.zeros(hu.shape, dtype=bool)
    for k, z in enumerate(zs):
        region = _region_slice(anat, z, xs, ys)
        hu[k] = np.clip(np.rint(table[region] + noise.normal(0, NOISE_HU, region.shape)), -1024, 3071)
        tumour[k] = _tumour_mask(anat, z, X, Y)
    return {"hu": hu, "tumour": tumour}


# ------------------------------------------------------------------------------------ writing

def _geometry(row: pd.Series) -> dict[str, Any]:
    rows, cols = int(row["rows"]), int(row["cols"])
    spacing, thickness = float(row["pixel_spacing"]), float(row["slice_thickness"])
    origin = [float(row["origin_x"]), float(row["origin_y"]), float(row["origin_z"])]
    n_slices = int(row["n_slices"])
    return {
        "rows": rows, "cols": cols, "pixel_spacing": spacing, "slice_thickness": thickness,
        "n_slices": n_slices, "origin": origin, "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1],
        "size": [cols, rows, n_slices], "spacing": [spacing, spacing, thickness],
        "xs": origin[0] + spacing * np.arange(cols), "ys": origin[1] + spacing * np.arange(rows),
        "zs": [round(origin[2] + k * thickness, 3) for k in range(n_slices)],
    }


def _common_dataset(row: pd.Series, series: dict[str, Any], sop_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = series["sop_class"]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "HNCT_DEMO"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = series["sop_class"]
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = row["study_date"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = ""
    ds.Modality = series["modality"]
    ds.Manufacturer = row["manufacturer"]
    ds.ManufacturerModelName = row["model"]
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = row["study_desc"]
    ds.SeriesDescription = series["description"]
    ds.PatientName = row["patient"]
    ds.PatientID = row["patient"]
    ds.PatientBirthDate = ""
    ds.PatientSex = row["sex"]
    ds.PatientAge = f"{int(row['age']):03d}Y"
    ds.BodyPartExamined = "NECK"
    ds.StudyInstanceUID = row["study_uid"]
    ds.SeriesInstanceUID = series["uid"]
    ds.StudyID = "1"
    ds.SeriesNumber = series["number"]
    return ds


def _image_dataset(row, series, sop_uid, pixels: np.ndarray, signed: bool) -> Dataset:
    ds = _common_dataset(row, series, sop_uid)
    ds.FrameOfReferenceUID = row["frame_uid"]
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.add_new(0x7FE00010, "OW", pixels.astype("<i2" if signed else "<u2").tobytes())
    return ds


def _write_dataset(ds: Dataset, path: Path) -> None:
    with atomic_path(path, suffix=".dcm") as tmp:
        pydicom.dcmwrite(tmp, ds, enforce_file_format=True)


def _ct_slice_uids(row: pd.Series) -> list[str]:
    """SOPInstanceUIDs of every planned CT slice in position order (inferior first), missing one too."""
    return [_uid(row["ct_series_uid"], "slice", k) for k in range(int(row["n_slices"]))]


def write_case(row: pd.Series, dicom_root: str | Path, manifest_path: str | Path) -> dict[str, Any]:
    """Write one case's DICOM under ``dicom_root`` and its JSON manifest (files, UIDs, geometry, truth)."""
    dicom_root = Path(dicom_root)
    case = row["case"]
    geo = _geometry(row)
    anat = anatomy(row)
    series = _series_of(row)
    by_key = {s["key"]: s for s in series}
    written: list[str] = []
    noise_rng = np.random.default_rng(int(row["pixel_seed"]))
    zs = geo["zs"]
    n = geo["n_slices"]
    missing = int(row["missing_slice"]) if row["missing_slice"] else None

    if "localizer" in by_key:
        written += _write_localizer(row, by_key["localizer"], anat, geo, dicom_root)

    contours: dict[str, list[tuple[int, np.ndarray]]] = {"GTVp": [], "GTVn": [], "Larynx": []}
    if row["demo_kind"] == "no_ct":
        s = by_key["mr"]
        for k, name in enumerate(s["files"]):
            region = _region_slice(anat, zs[k], geo["xs"], geo["ys"])
            img = REGION_MR[region] + noise_rng.normal(0, 15.0, region.shape).astype(np.float32)
            pixels = np.clip(np.rint(img), 0, 4095)
            ds = _image_dataset(row, s, _uid(s["uid"], "slice", k), pixels, signed=False)
            _mr_attributes(ds)
            _set_plane(ds, geo, zs[k], instance=n - k)
            _write_dataset(ds, dicom_root / s["folder"] / name)
            written.append(f"{s['folder']}/{name}")
    else:
        s = by_key["ct"]
        hu_table = region_hu(anat)
        slice_uids = _ct_slice_uids(row)
        X, Y = np.meshgrid(geo["xs"], geo["ys"])
        present = [k for k in range(n) if k != missing]
        # InstanceNumber 1 = most superior slice (scanner order); file 1-001 = instance 1.
        present_desc = sorted(present, reverse=True)
        oar, oar_rng = demo_oar.Phantom(anat, X, Y), np.random.default_rng([int(row["pixel_seed"]), 13])
        for name, k in zip(s["files"], present_desc):
            region = _region_slice(anat, zs[k], geo["xs"], geo["ys"])
            hu = hu_table[region] + noise_rng.normal(0, NOISE_HU, region.shape).astype(np.float32)
            oar.paint_hu(hu, region, zs[k], oar_rng)  # organs at risk (hnct.demo_oar)
            stored = np.clip(np.rint(hu), -1024, 3071) + 1024
            ds = _image_dataset(row, s, slice_uids[k], stored, signed=True)
            _ct_attributes(ds, row)
            _set_plane(ds, geo, zs[k], instance=n - k)
            _write_dataset(ds, dicom_root / s["folder"] / name)
            written.append(f"{s['folder']}/{name}")
        for k in range(n):  # contours on every planned plane, the missing one too (as a lost file leaves it)
            z = zs[k]
            contours["GTVp"] += [(k, c) for c in _mask_contours(_tumour_mask(anat, z, X, Y), geo, z)]
            node_mask = np.zeros(X.shape, dtype=bool)
            for node in anat["nodes"]:
                node_mask |= _ellipsoid(node["centre"], node["semi_axes"], z, X, Y)
            contours["GTVn"] += [(k, c) for c in _mask_contours(node_mask, geo, z)]
            contours["Larynx"] += [(k, c) for c in _mask_contours(_larynx_mask(anat, z, X, Y), geo, z)]
        demo_oar.add_oars(row, oar, geo, dicom_root, contours)
        rt = by_key["rtstruct"]
        ds = _rtstruct_dataset(row, rt, s, slice_uids, contours)
        _write_dataset(ds, dicom_root / rt["folder"] / rt["files"][0])
        written.append(f"{rt['folder']}/{rt['files'][0]}")

    expected = case_files(row)
    if written != expected:  # a bug, not bad input: the declared outputs must match
        raise RuntimeError(f"case {case}: wrote {len(written)} files, planned {len(expected)}")
    manifest = _manifest(row, geo, anat, series, written, contours)
    manifest["organs_at_risk"] = demo_oar.truth(row)
    write_json(manifest_path, manifest)
    return manifest


def _set_plane(ds: Dataset, geo: dict[str, Any], z: float, instance: int) -> None:
    ds.ImagePositionPatient = [round(geo["origin"][0], 3), round(geo["origin"][1], 3), z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [geo["pixel_spacing"], geo["pixel_spacing"]]
    ds.SliceThickness = geo["slice_thickness"]
    ds.SpacingBetweenSlices = geo["slice_thickness"]
    ds.SliceLocation = z
    ds.InstanceNumber = instance


def _ct_attributes(ds: Dataset, row: pd.Series) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ConvolutionKernel = row["kernel"]
    ds.KVP = 120
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 40
    ds.WindowWidth = 400


def _mr_attributes(ds: Dataset) -> None:
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 4000
    ds.EchoTime = 90
    ds.EchoTrainLength = 16
    ds.MagneticFieldStrength = 1.5


def _write_localizer(row, series, anat, geo, dicom_root: Path) -> list[str]:
    """Two projection scouts (AP = coronal plane, lateral = sagittal plane) covering 240 mm of z."""
    nx, ny = anat["neck_centre"]
    a, b = anat["neck_semi_axes"]
    size, spacing = 256, 0.9375
    z_top = geo["zs"][-1] + 70.0
    zs = z_top - spacing * np.arange(size)
    written = []
    for i, (name, plane) in enumerate(zip(series["files"], ("AP", "LAT"))):
        u0 = (nx if plane == "AP" else ny) - (size - 1) * spacing / 2
        us = u0 + spacing * np.arange(size)
        # Chord length (mm) through the neck ellipse along the beam: a projection, not anatomy.
        if plane == "AP":
            chord = 2 * b * np.sqrt(np.clip(1 - ((us - nx) / a) ** 2, 0, None))
        else:
            chord = 2 * a * np.sqrt(np.clip(1 - ((us - ny) / b) ** 2, 0, None))
        image = np.tile(np.clip(chord * 12.0, 0, 3000), (size, 1)).astype(np.float32)
        ds = _image_dataset(row, series, _uid(series["uid"], "scout", i), np.rint(image), signed=True)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ConvolutionKernel = row["kernel"]
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        row_dir = [1, 0, 0] if plane == "AP" else [0, 1, 0]
        ds.ImageOrientationPatient = row_dir + [0, 0, -1]
        ds.ImagePositionPatient = [round(u0, 3), round(ny, 3), round(z_top, 3)] if plane == "AP" \
            else [round(nx, 3), round(u0, 3), round(z_top, 3)]
        ds.PixelSpacing = [spacing, spacing]
        ds.InstanceNumber = i + 1
        _write_dataset(ds, dicom_root / series["folder"] / name)
        written.append(f"{series['folder']}/{name}")
    return written


def simplify_polygon(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a chain of points (K x 2; a closed contour repeats its first
    point last): the kept points, in order, such that every dropped point lies within ``tolerance`` of
    the kept chain. The distance of a point to a segment is the perpendicular one where the point
    projects inside the segment, else that to the nearer end (a zero-length segment, the closed
    chain's first step: the distance to that point). First and last point are always kept."""
    points = np.asarray(points, dtype=float)
    if tolerance <= 0 or len(points) < 3:
        return points
    keep = np.zeros(len(points), dtype=bool)
    keep[[0, -1]] = True
    pending = [(0, len(points) - 1)]
    while pending:
        start, end = pending.pop()
        if end - start < 2:
            continue
        a, b, inner = points[start], points[end], points[start + 1:end]
        direction = b - a
        from_a, from_b = inner - a, inner - b
        inside = (from_a @ direction > 0) & (-(from_b @ direction) > 0)
        distance = np.minimum(np.hypot(*from_a.T), np.hypot(*from_b.T))
        length = math.hypot(*direction)
        if length > 0:
            cross = np.abs(direction[0] * from_a[:, 1] - direction[1] * from_a[:, 0]) / length
            distance = np.where(inside, cross, distance)
        far = int(np.argmax(distance))
        if distance[far] > tolerance:
            split = start + 1 + far
            keep[split] = True
            pending += [(split, end), (start, split)]
    return points[keep]


def _mask_contours(mask: np.ndarray, geo: dict[str, Any], z: float) -> list[np.ndarray]:
    """Closed polygons (N x 3, LPS mm) of a slice mask's boundaries at the 0.5 level."""
    # find_contours alone: skimage.measure's approximate_polygon imports scipy.signal and scipy.stats,
    # 1-2 s of each demo_case job's ~4 s on 2 busy cores (51 jobs); simplify_polygon() does its work.
    from skimage.measure import find_contours

    if not mask.any():
        return []
    padded = np.pad(mask.astype(np.float32), 1)
    polygons = []
    for contour in find_contours(padded, 0.5):
        contour = simplify_polygon(contour - 1.0, tolerance=0.2)[:-1]  # drop closing point
        if len(contour) < 3:
            continue
        x = geo["origin"][0] + contour[:, 1] * geo["pixel_spacing"]
        y = geo["origin"][1] + contour[:, 0] * geo["pixel_spacing"]
        polygons.append(np.column_stack([x, y, np.full(len(x), z)]))
    return polygons


def _rtstruct_dataset(row, rt, ct, slice_uids, contours) -> Dataset:
    ds = _common_dataset(row, rt, _uid(rt["uid"], "instance"))
    ds.InstanceNumber = 1
    ds.StructureSetLabel = "hnct demo"
    ds.StructureSetName = "GTV and larynx"
    ds.StructureSetDate = row["study_date"]
    ds.StructureSetTime = "100000"

    def image_ref(uid: str) -> Dataset:
        ref = Dataset()
        ref.ReferencedSOPClassUID = CTImageStorage
        ref.ReferencedSOPInstanceUID = uid
        return ref

    rt_series = Dataset()
    rt_series.SeriesInstanceUID = ct["uid"]
    rt_series.ContourImageSequence = Sequence([image_ref(uid) for uid in slice_uids])
    rt_study = Dataset()
    rt_study.ReferencedSOPClassUID = STUDY_COMPONENT_SOP_CLASS
    rt_study.ReferencedSOPInstanceUID = row["study_uid"]
    rt_study.RTReferencedSeriesSequence = Sequence([rt_series])
    frame = Dataset()
    frame.FrameOfReferenceUID = row["frame_uid"]
    frame.RTReferencedStudySequence = Sequence([rt_study])
    ds.ReferencedFrameOfReferenceSequence = Sequence([frame])

    rois = [("GTVp", "GTV", [255, 0, 0]), ("GTVn", "GTV", [0, 0, 255]), ("Larynx", "ORGAN", [0, 255, 0])]
    rois += [(name, "ORGAN", [255, 255, 0]) for name in contours if name not in ("GTVp", "GTVn", "Larynx")]
    roi_seq, contour_seq, obs_seq = [], [], []
    number = 0
    for name, interpreted, colour in rois:
        if not contours[name]:
            continue  # GTVn is absent for node-negative cases
        number += 1
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = row["frame_uid"]
        roi.ROIName = name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi_seq.append(roi)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = colour
        items = []
        for k, polygon in contours[name]:
            item = Dataset()
            item.ContourImageSequence = Sequence([image_ref(slice_uids[k])])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(polygon)
            item.ContourData = [round(float(v), 3) for v in polygon.ravel()]
            items.append(item)
        roi_contour.ContourSequence = Sequence(items)
        contour_seq.append(roi_contour)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = interpreted
        obs.ROIInterpreter = ""
        obs_seq.append(obs)
    ds.StructureSetROISequence = Sequence(roi_seq)
    ds.ROIContourSequence = Sequence(contour_seq)
    ds.RTROIObservationsSequence = Sequence(obs_seq)
    return ds


def _manifest(row, geo, anat, series, written, contours) -> dict[str, Any]:
    cx, cy, cz = anat["larynx_centre"]
    cartilage = anat["cartilage"]
    shield_inner, shield_outer = cartilage["shield_inner_mm"], cartilage["shield_outer_mm"]
    # Boxes (LPS mm) of the thyroid shield (|angle from anterior| <= 75 deg) and of the whole
    # cartilage framework (shield + cricoid ring).
    half = math.radians(SHIELD_HALF_ANGLE_DEG)
    shield_box = {"min": [cx - shield_outer * math.sin(half), cy - shield_outer, cz + SHIELD_Z[0]],
                  "max": [cx + shield_outer * math.sin(half), cy - shield_inner * math.cos(half),
                          cz + SHIELD_Z[1]]}
    cartilage_box = {"min": [min(shield_box["min"][0], cx - cartilage["cricoid_outer_mm"]),
                             cy - shield_outer, cz + CRICOID_Z[0]],
                     "max": [max(shield_box["max"][0], cx + cartilage["cricoid_outer_mm"]),
                             cy + cartilage["cricoid_outer_mm"], cz + SHIELD_Z[1]]}
    tumour = anat["tumour"]
    return {
        "case": row["case"], "patient": row["patient"], "collection": row["collection"],
        "demo_kind": row["demo_kind"], "files": written,
        "series": [{k: v for k, v in s.items() if k != "files"} | {"files": s["files"]} for s in series],
        "uids": {"study": row["study_uid"], "frame_of_reference": row["frame_uid"],
                 "ct_series": row["ct_series_uid"], "rtstruct_series": row["rtstruct_series_uid"],
                 "localizer_series": row["localizer_series_uid"]},
        "geometry": {k: v for k, v in geo.items() if k not in ("xs", "ys")}
        | {"missing_slice": int(row["missing_slice"]) if row["missing_slice"] else None},
        "truth": {
            "t_stage": row["t_stage"], "label_t4": int(row["label_t4"]),
            "node_positive": int(row["node_positive"]),
            "larynx_centre_lps": [cx, cy, cz],
            "larynx_roi": {"radius_mm": LARYNX_RADIUS, "z_min": cz + LARYNX_Z[0], "z_max": cz + LARYNX_Z[1]},
            "tumour": {"centre_lps": tumour["centre"], "semi_axes_mm": tumour["semi_axes"],
                       "outer_extent_mm": tumour["outer_extent_mm"],
                       "axes": "radial, tangential, z", "volume_mm3": tumour["volume_mm3"],
                       "inner_extent_mm": tumour["inner_extent_mm"],
                       "angle_deg_from_anterior": tumour["angle_deg_from_anterior"],
                       "breaks_cartilage": row["t_stage"] == "T4"},
            "airway_radius_mm": cartilage["airway_radius_mm"],
            "thyroid_shield": {"inner_radius_mm": shield_inner, "outer_radius_mm": shield_outer,
                               "half_angle_deg": SHIELD_HALF_ANGLE_DEG,
                               "z_min": cz + SHIELD_Z[0], "z_max": cz + SHIELD_Z[1], "box_lps": shield_box,
                               "replaced_by_tumour_or_lysis_mm3": cartilage["shield_replaced_mm3"],
                               "lysis": _lysis_truth(cartilage, cz)},
            "cricoid": {"inner_radius_mm": cartilage["cricoid_inner_mm"],
                        "outer_radius_mm": cartilage["cricoid_outer_mm"],
                        "z_min": cz + CRICOID_Z[0], "z_max": cz + CRICOID_Z[1]},
            "cartilage_box_lps": cartilage_box,
            "nodes": [{"centre_lps": nd["centre"], "semi_axes_mm": nd["semi_axes"]} for nd in anat["nodes"]],
            "n_contours": {name: len(items) for name, items in contours.items()},
            "hu": {"air": -1000, "fat": -100, "soft_tissue": 40, "cartilage": cartilage["matrix_hu"],
                   "ossified_cartilage": cartilage["ossified_hu"], "bone": 650,
                   "tumour": float(REGION_HU[TUMOUR]), "node": 30, "noise_sigma": NOISE_HU},
        },
    }


# ---------------------------------------------------------------------------- cohort tables

def _lysis_truth(cartilage: dict[str, Any], cz: float) -> dict[str, float] | None:
    """The destroyed shield sector of a T4 (angle from anterior, half-width, LPS z range), else None."""
    gone = cartilage.get("lysis")
    if not gone:
        return None
    return {"angle_deg_from_anterior": gone["angle_deg"], "half_angle_deg": gone["half_angle_deg"],
            "z_min": cz + gone["dz"][0], "z_max": cz + gone["dz"][1]}


def write_cohort_tables(cohort: pd.DataFrame, dicom_root: str | Path, metadata_csv: str | Path,
                        clinical_tsv: str | Path) -> None:
    """Write the Data Retriever ``metadata.csv`` (CRLF, one row per series) and the clinical table.

    Clinical columns follow the LaryngealCT metadata spreadsheet: TCIA_ID (patient), Case_ID,
    Collection, T_stage, N_stage, Label_T4, Subsite, Age, Sex, and the crop parameters in the
    ``bbox3d.txt`` form (x, y, z, size_x, size_y, size_z: integer voxels of the ORIGINAL scan grid,
    x = column, y = row, z = slice index in position order from the most inferior slice) of the
    Larynx region. Both are written per case in cohort order (deterministic).
    """
    import pandas as pd

    dicom_root = Path(dicom_root)
    metadata_rows, clinical_rows = [], []
    for _, row in cohort.iterrows():
        study_date = row["study_date"]
        for s in _series_of(row):
            folder = dicom_root / s["folder"]
            size = sum((folder / name).stat().st_size for name in s["files"] if (folder / name).exists())
            metadata_rows.append({
                "Series UID": s["uid"], "Collection": row["collection"], "3rd Party Analysis": "NO",
                "Data Description URI": "", "Subject ID": row["patient"], "Study UID": row["study_uid"],
                "Study Description": row["study_desc"],
                "Study Date": f"{study_date[4:6]}-{study_date[6:8]}-{study_date[:4]}",
                "Series Description": s["description"], "Manufacturer": row["manufacturer"],
                "Modality": s["modality"], "SOP Class Name": s["sop_class_name"],
                "SOP Class UID": s["sop_class"], "Number of Images": s["n_files"], "File Size": size,
                "File Location": "./" + s["folder"], "Download Timestamp": DOWNLOAD_TIMESTAMP,
            })
        box = crop_parameters(row)
        clinical_rows.append({
            "TCIA_ID": row["patient"], "Case_ID": row["case"], "Collection": row["collection"],
            "T_stage": row["t_stage"], "N_stage": "N1" if row["node_positive"] == "1" else "N0",
            "Label_T4": row["label_t4"], "Subsite": row["subsite"], "Age": row["age"], "Sex": row["sex"],
            **box,
        })
    with atomic_path(metadata_csv) as tmp:
        pd.DataFrame(metadata_rows, columns=METADATA_COLUMNS).to_csv(tmp, index=False, lineterminator="\r\n")
    with atomic_path(clinical_tsv) as tmp:
        pd.DataFrame(clinical_rows, columns=CLINICAL_COLUMNS).to_csv(tmp, sep="\t", index=False)


def crop_parameters(row: pd.Series) -> dict[str, int]:
    """The Larynx region's box as LaryngealCT ``bbox3d`` voxels of this scan's grid (see above)."""
    geo = _geometry(row)
    cx, cy, cz = anatomy(row)["larynx_centre"]
    sp, th = geo["pixel_spacing"], geo["slice_thickness"]
    ox, oy, oz = geo["origin"]
    x0 = math.floor((cx - LARYNX_RADIUS - ox) / sp)
    x1 = math.ceil((cx + LARYNX_RADIUS - ox) / sp)
    y0 = math.floor((cy - LARYNX_RADIUS - oy) / sp)
    y1 = math.ceil((cy + LARYNX_RADIUS - oy) / sp)
    z0 = math.floor((cz + LARYNX_Z[0] - oz) / th)
    z1 = math.ceil((cz + LARYNX_Z[1] - oz) / th)
    return {"x": x0, "y": y0, "z": z0, "size_x": x1 - x0 + 1, "size_y": y1 - y0 + 1, "size_z": z1 - z0 + 1}


# ------------------------------------------------------------------------------------------ CLI

def _boolean(text: str) -> bool:
    if text.strip().lower() in {"true", "1", "yes"}:
        return True
    if text.strip().lower() in {"false", "0", "no"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _plan_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n-patients", type=int, default=24)
    parser.add_argument("--seed", type=int, default=1729)
    parser.add_argument("--t4-fraction", type=float, default=0.35)
    parser.add_argument("--broken-cases", type=_boolean, default=True, help="true/false")
    parser.add_argument("--two-scan-patients", type=int, default=1)


def _cohort_from_args(args) -> pd.DataFrame:
    return plan_cohort(n_patients=args.n_patients, seed=args.seed, t4_fraction=args.t4_fraction,
                       broken_cases=args.broken_cases, two_scan_patients=args.two_scan_patients)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnct demo", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_case = sub.add_parser("case", help="write one case's DICOM and manifest")
    p_case.add_argument("--case", required=True)
    p_case.add_argument("--out-root", default=DEFAULT_ROOT, help="DICOM root folder")
    p_case.add_argument("--manifest", required=True, help="JSON manifest path")
    p_case.add_argument("--plan-json", default="", help="the case's plan row as JSON (else re-planned)")
    p_cohort = sub.add_parser("cohort", help="write metadata.csv and the clinical table")
    p_cohort.add_argument("--out-root", default=DEFAULT_ROOT)
    p_cohort.add_argument("--metadata-csv", required=True)
    p_cohort.add_argument("--clinical-tsv", required=True)
    p_all = sub.add_parser("all", help="write the whole cohort (DICOM, manifests, tables)")
    p_all.add_argument("--out-root", default=DEFAULT_ROOT)
    p_all.add_argument("--manifest-dir", default="", help="default: <out-root>/../cases")
    for p in (p_case, p_cohort, p_all):
        _plan_args(p)
        p.add_argument("--log", default=None)
    args = parser.parse_args(argv)
    setup_logging(args.log)

    if args.command == "case":
        if args.plan_json:
            # the plan row as a dict: a case job reads its row by name only, and never imports pandas
            # (hnct.cohort, the tables): about 0.3-0.5 s of each of the demo's 51 demo_case jobs
            row = json.loads(args.plan_json)
            if row.get("case") != args.case:
                parser.error(f"--plan-json is for case {row.get('case')!r}, not {args.case!r}")
        else:
            cohort = _cohort_from_args(args)
            if args.case not in cohort.index:
                parser.error(f"case {args.case!r} is not in the demo plan (seed {args.seed})")
            row = cohort.loc[args.case]
        manifest = write_case(row, args.out_root, args.manifest)
        log.info("case %s (%s): %d files", args.case, row["demo_kind"], len(manifest["files"]))
        return 0

    cohort = _cohort_from_args(args)
    root = Path(args.out_root)
    if args.command == "all":
        manifest_dir = Path(args.manifest_dir) if args.manifest_dir else root.parent / "cases"
        start = time.perf_counter()
        for case in progress(list(cohort.index), every=1, what="demo cases"):
            write_case(cohort.loc[case], root, manifest_dir / f"{case}.json")
        log.info("wrote %d cases in %.1f s", len(cohort), time.perf_counter() - start)
        metadata_csv, clinical_tsv = root / "metadata.csv", root.parent / "clinical.tsv"
    else:
        metadata_csv, clinical_tsv = args.metadata_csv, args.clinical_tsv
    write_cohort_tables(cohort, root, metadata_csv, clinical_tsv)
    log.info("wrote %s and %s", metadata_csv, clinical_tsv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
