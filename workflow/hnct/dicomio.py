"""The one place hnct reads DICOM: index a folder, choose the CT series, read it, build label maps.

Coordinates are DICOM patient coordinates, LPS millimetres, throughout; SimpleITK images carry
origin (LPS mm of voxel (0,0,0)), spacing (mm, x = column, y = row, z = slice) and a direction
matrix whose columns are the row direction, the column direction and the slice normal taken
from ImageOrientationPatient.

Indexing (:func:`index_series`) reads headers only and trusts no folder or file names: every
file under the folder is tried, files that are not DICOM are listed in ``df.attrs["unreadable"]``.

Choosing the CT series (:func:`choose_ct_series`), the rule recorded as ``series_choice``:

1. A series UID given by the cohort table wins; it must exist under the folder and be CT.
2. Otherwise candidates are the series with Modality CT that are not localizers (scouts):
   ImageType contains LOCALIZER, or the series has fewer than 2 slices while another CT series
   has more.
3. Among them, prefer series with a consistent header geometry (one ImageOrientationPatient,
   one PixelSpacing, one Rows x Columns), then the most slices, then the smallest
   SeriesInstanceUID (a deterministic tie break).

Reading the CT (:func:`read_ct`) sorts slices by their position along the slice normal
(never by file name or InstanceNumber) and refuses, with an :class:`~hnct.common.InputError`,
series that are not one regular volume: fewer than 2 slices, slices sharing a position,
mixed orientations / pixel spacings / matrix sizes, gaps or spacing spread beyond
``max_spacing_spread``, and gantry tilt beyond ``max_tilt_deg`` (the angle between the
slice normal and the direction the slices are stacked in). Tilted series are EXCLUDED, not
resampled. An oblique series whose slices are stacked along their own normal is a regular
volume and is read with its oblique direction matrix. Pixels are decoded by pydicom (which checks
the pixel data length, unlike SimpleITK's series reader), rescaled to HU, rounded and clipped to
int16; the image geometry is set from the validated headers.

Label maps (uint8, value = index in ``structures`` + 1, later structures painted over earlier):

* :func:`rtstruct_label_map`: closed planar RTSTRUCT contours rasterised slice by slice
  (pixel centres inside the polygon, :func:`fill_polygon`; nested contours of one ROI on one slice combine by XOR,
  so holes stay empty). The RTSTRUCT must reference the chosen CT: every referenced SOP
  instance must be in the series (FrameOfReferenceUID is used only when an RTSTRUCT lists no
  instances). ROI names match structures case-insensitively, then ignoring punctuation and
  spaces (``GTV-1`` = ``gtv_1`` = ``GTV 1``).
* :func:`mask_folder_label_map`: ``<mask_dir>/<case>/<structure>.nrrd|.nii.gz|.nii`` masks
  (non-zero = inside), resampled with nearest neighbour onto the CT grid when their geometry
  differs.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale

from hnct.common import InputError, progress

log = logging.getLogger("hnct.dicomio")

# Header fields the index reads (pixel data is never read while indexing).
INDEX_TAGS = [
    "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
    "Modality", "SeriesDescription", "SeriesNumber", "ImageType", "FrameOfReferenceUID",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
    "Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "SliceThickness",
    "InstanceNumber", "NumberOfFrames",
]

INT16_MIN, INT16_MAX = -32768, 32767
# Positions closer than this (mm along the normal) are "the same position".
SAME_POSITION_MM = 1e-3
# Header geometry tolerance: direction cosines and pixel spacing (mm).
COSINE_TOL = 1e-4
SPACING_TOL_MM = 1e-4
MASK_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".nhdr", ".mha")


# ----------------------------------------------------------------------------- indexing


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _floats(value: Any) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


# The empty file Snakemake puts in each directory() output (the demo's case folders) to carry its mtime.
SNAKEMAKE_MARKER = ".snakemake_timestamp"


def _iter_files(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if name != SNAKEMAKE_MARKER:
                yield Path(root) / name


def index_series(folder: str | os.PathLike) -> pd.DataFrame:
    """One row per SeriesInstanceUID found under ``folder`` (any layout), from headers only.

    Columns: ``patient_id, study_uid, series_uid, modality, series_description,
    series_number, image_type, n_files, files (sorted paths), frame_of_reference_uid,
    orientation (the distinct ImageOrientationPatient tuples), pixel_spacing (distinct
    [row, col] mm), matrix (distinct (rows, cols)), consistent_geometry, localizer,
    manufacturer, model, kernel, instances`` (per file: file, sop_uid, position (LPS mm),
    orientation, pixel_spacing, rows, cols). Files that are not readable DICOM are listed in
    ``df.attrs["unreadable"]`` as ``(path, reason)`` and otherwise ignored.
    """
    folder = Path(folder)
    unreadable: list[tuple[str, str]] = []
    by_series: dict[str, list[dict[str, Any]]] = {}
    paths = list(_iter_files(folder)) if folder.is_dir() else []
    for path in progress(paths, every=200, what=f"indexing {folder}"):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=INDEX_TAGS)
        except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError, KeyError) as err:
            unreadable.append((str(path), f"not readable as DICOM: {type(err).__name__}: {err}"))
            continue
        series_uid = _text(ds.get("SeriesInstanceUID"))
        if not series_uid:
            unreadable.append((str(path), "no SeriesInstanceUID (not a DICOM image or object)"))
            continue
        by_series.setdefault(series_uid, []).append({
            "file": str(path),
            "sop_uid": _text(ds.get("SOPInstanceUID")),
            "patient_id": _text(ds.get("PatientID")),
            "study_uid": _text(ds.get("StudyInstanceUID")),
            "modality": _text(ds.get("Modality")).upper(),
            "series_description": _text(ds.get("SeriesDescription")),
            "series_number": _text(ds.get("SeriesNumber")),
            "image_type": _text(ds.get("ImageType")).upper(),
            "frame_of_reference_uid": _text(ds.get("FrameOfReferenceUID")),
            "position": _floats(ds.get("ImagePositionPatient")),
            "orientation": _floats(ds.get("ImageOrientationPatient")),
            "pixel_spacing": _floats(ds.get("PixelSpacing")),
            "rows": int(ds.get("Rows") or 0),
            "cols": int(ds.get("Columns") or 0),
            "manufacturer": _text(ds.get("Manufacturer")),
            "model": _text(ds.get("ManufacturerModelName")),
            "kernel": _text(ds.get("ConvolutionKernel")),
            "instance_number": _text(ds.get("InstanceNumber")),
        })
    rows = []
    for series_uid, instances in sorted(by_series.items()):
        instances.sort(key=lambda inst: inst["file"])
        first = instances[0]
        orientations = sorted({tuple(round(c, 4) for c in i["orientation"]) for i in instances if i["orientation"]})
        spacings = sorted({tuple(round(c, 5) for c in i["pixel_spacing"]) for i in instances if i["pixel_spacing"]})
        matrices = sorted({(i["rows"], i["cols"]) for i in instances})
        image_types = sorted({i["image_type"] for i in instances if i["image_type"]})
        rows.append({
            "patient_id": first["patient_id"],
            "study_uid": first["study_uid"],
            "series_uid": series_uid,
            "modality": first["modality"],
            "series_description": first["series_description"],
            "series_number": first["series_number"],
            "image_type": " | ".join(image_types),
            "n_files": len(instances),
            "files": [i["file"] for i in instances],
            "frame_of_reference_uid": first["frame_of_reference_uid"],
            "orientation": orientations,
            "pixel_spacing": spacings,
            "matrix": matrices,
            "consistent_geometry": len(orientations) == 1 and len(spacings) == 1 and len(matrices) == 1
            and all(i["position"] is not None for i in instances),
            "localizer": any("LOCALIZER" in t or "SCOUT" in t or "TOPOGRAM" in t for t in image_types),
            "manufacturer": first["manufacturer"],
            "model": first["model"],
            "kernel": first["kernel"],
            "instances": instances,
        })
    columns = ["patient_id", "study_uid", "series_uid", "modality", "series_description", "series_number",
               "image_type", "n_files", "files", "frame_of_reference_uid", "orientation", "pixel_spacing",
               "matrix", "consistent_geometry", "localizer", "manufacturer", "model", "kernel", "instances"]
    df = pd.DataFrame(rows, columns=columns)
    df.attrs["unreadable"] = unreadable
    return df


# ----------------------------------------------------------------------------- series choice


def choose_ct_series(case: str, folder: str | os.PathLike, index: pd.DataFrame,
                     series_uid: str = "") -> tuple[pd.Series, dict[str, Any]]:
    """Choose the CT series by the rule in the module docstring; returns (row, series_choice)."""
    if index.empty:
        n_bad = len(index.attrs.get("unreadable", []))
        extra = f" ({n_bad} unreadable files)" if n_bad else ""
        raise InputError(case, folder, f"no DICOM files under {folder}{extra}")
    candidates = [
        {"series_uid": r.series_uid, "modality": r.modality, "n_files": int(r.n_files),
         "series_description": r.series_description, "localizer": bool(r.localizer),
         "consistent_geometry": bool(r.consistent_geometry)}
        for r in index.itertuples()
    ]
    choice: dict[str, Any] = {"candidates": candidates, "requested_series_uid": series_uid or ""}
    if series_uid:
        hit = index[index["series_uid"] == series_uid]
        if hit.empty:
            found = ", ".join(f"{c['series_uid']} ({c['modality']}, {c['n_files']} files)" for c in candidates)
            raise InputError(case, folder, f"requested series {series_uid} not found under {folder}; found: {found}")
        row = hit.iloc[0]
        if row["modality"] != "CT":
            raise InputError(case, row["files"][0], f"requested series {series_uid} is {row['modality']}, not CT")
        choice["rule"] = "series_uid given by the cohort table"
        choice["series_uid"] = series_uid
        return row, choice
    ct = index[index["modality"] == "CT"]
    if ct.empty:
        found = ", ".join(sorted(f"{m} ({n} series)" for m, n in index["modality"].value_counts().items()))
        raise InputError(case, folder, f"no CT series under {folder}; found modalities: {found}")
    not_localizer = ct[~ct["localizer"]]
    if not_localizer.empty:
        raise InputError(case, folder, f"only localizer/scout CT series under {folder} "
                         f"({', '.join(ct['series_uid'])})")
    volumes = not_localizer[not_localizer["n_files"] >= 2]
    pool = volumes if not volumes.empty else not_localizer
    ranked = sorted(pool.itertuples(), key=lambda r: (not r.consistent_geometry, -int(r.n_files), r.series_uid))
    best = ranked[0]
    reasons = ["modality CT", "not a localizer (ImageType LOCALIZER/SCOUT or a lone slice)"]
    if len(ranked) > 1:
        reasons.append("consistent geometry, then most slices, then smallest SeriesInstanceUID")
    choice["rule"] = "; ".join(reasons)
    choice["series_uid"] = best.series_uid
    return index.loc[best.Index], choice


# ----------------------------------------------------------------------------- reading the CT


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def slice_geometry(case: str, series: pd.Series, max_tilt_deg: float = 0.5,
                   max_spacing_spread: float = 0.01) -> dict[str, Any]:
    """Sort the series' slices along the normal and check they form one regular volume.

    Returns ``files`` (sorted), ``sop_uids``, ``origin`` (LPS mm of the first sorted slice),
    ``spacing`` [x, y, z] mm, ``direction`` (9, row-major, columns = row dir, column dir,
    normal), ``size`` [x, y, z] and ``slice_positions`` (the check summary). Raises
    InputError naming the file(s) for anything that is not a regular volume.
    """
    instances = list(series["instances"])
    uid = series["series_uid"]
    if len(instances) < 2:
        raise InputError(case, instances[0]["file"] if instances else "",
                         f"too few slices: series {uid} has {len(instances)} slice (need at least 2 for a volume)")
    for inst in instances:
        if inst["position"] is None or inst["orientation"] is None or inst["pixel_spacing"] is None:
            raise InputError(case, inst["file"], f"slice of series {uid} lacks ImagePositionPatient, "
                             "ImageOrientationPatient or PixelSpacing")
    iop0 = np.array(instances[0]["orientation"])
    ps0 = np.array(instances[0]["pixel_spacing"])
    for inst in instances[1:]:
        if not np.allclose(inst["orientation"], iop0, atol=COSINE_TOL):
            raise InputError(case, inst["file"], f"mixed orientations in series {uid}: {inst['orientation']} "
                             f"vs {tuple(iop0)} in {instances[0]['file']}")
        if not np.allclose(inst["pixel_spacing"], ps0, atol=SPACING_TOL_MM):
            raise InputError(case, inst["file"], f"mixed pixel spacings in series {uid}: {inst['pixel_spacing']} "
                             f"vs {tuple(ps0)} mm in {instances[0]['file']}")
        if (inst["rows"], inst["cols"]) != (instances[0]["rows"], instances[0]["cols"]):
            raise InputError(case, inst["file"], f"mixed matrix sizes in series {uid}: "
                             f"{inst['rows']}x{inst['cols']} vs {instances[0]['rows']}x{instances[0]['cols']}")
    row_dir, col_dir = _unit(iop0[:3]), _unit(iop0[3:])
    normal = _unit(np.cross(row_dir, col_dir))
    positions = np.array([inst["position"] for inst in instances])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    instances = [instances[i] for i in order]
    positions, along = positions[order], along[order]
    files = [inst["file"] for inst in instances]

    steps = np.diff(along)
    if np.any(steps < SAME_POSITION_MM):
        _, group_of, group_sizes = np.unique(np.round(along / SAME_POSITION_MM), return_inverse=True,
                                             return_counts=True)
        sharing = group_sizes[group_of] > 1
        raise InputError(case, files[int(np.argmax(sharing))], f"not a volume: {int(sharing.sum())} of "
                         f"{len(files)} slices of series {uid} share a position")
    # Gantry tilt: the slices are stacked along a direction that is not their plane normal.
    stack_dir = _unit(positions[-1] - positions[0])
    tilt_deg = math.degrees(math.acos(min(1.0, abs(float(stack_dir @ normal)))))
    off_axis = np.linalg.norm(np.cross(positions - positions[0], normal), axis=1)
    if tilt_deg > max_tilt_deg:
        raise InputError(case, files[0], f"gantry tilt: slices of series {uid} are stacked at {tilt_deg:.2f} deg to "
                         f"their plane normal (max_tilt_deg {max_tilt_deg}); tilted series are excluded, not resampled")
    spacing_z = float(np.median(steps))
    spread = float((steps.max() - steps.min()) / steps.min())
    if spread > max_spacing_spread:
        gaps = [i for i, s in enumerate(steps) if s >= 1.5 * steps.min()]
        if gaps:
            i = gaps[0]
            raise InputError(
                case, f"{files[i]}, {files[i + 1]}",
                f"missing slice(s) between z={along[i]:.2f} and z={along[i + 1]:.2f} mm in series {uid}: "
                f"step {steps[i]:.2f} mm where the smallest step is {steps.min():.2f} mm "
                f"({len(gaps)} gap(s); files {Path(files[i]).name} and {Path(files[i + 1]).name})")
        raise InputError(case, files[int(np.argmax(steps))],
                         f"uneven slice spacing in series {uid}: steps {steps.min():.3f}..{steps.max():.3f} mm "
                         f"(spread {spread:.1%} > max_spacing_spread {max_spacing_spread:.1%})")
    direction = np.column_stack([row_dir, col_dir, normal])
    return {
        "files": files,
        "sop_uids": [inst["sop_uid"] for inst in instances],
        "origin": positions[0].tolist(),
        # PixelSpacing is [between rows (y), between columns (x)].
        "spacing": [float(ps0[1]), float(ps0[0]), spacing_z],
        "direction": direction.flatten().tolist(),
        "size": [int(instances[0]["cols"]), int(instances[0]["rows"]), len(files)],
        "slice_positions": {
            "check": "ok",
            "n_slices": len(files),
            "first_mm": float(along[0]),
            "last_mm": float(along[-1]),
            "spacing_mm": spacing_z,
            "min_step_mm": float(steps.min()),
            "max_step_mm": float(steps.max()),
            "spacing_spread": spread,
            "tilt_deg": tilt_deg,
            "max_off_axis_mm": float(off_axis.max()),
            "sorted_by": "ImagePositionPatient along the slice normal",
        },
    }


def _read_pixels_hu(case: str, files: Sequence[str]) -> tuple[np.ndarray, int]:
    """HU (modality rescale applied, rounded, clipped to int16) as int16 (z, y, x), slices in the
    given order, and the number of voxels that had to be clipped.

    pydicom decodes each slice because it checks the pixel data against the header (SimpleITK's
    series reader silently accepts truncated pixel data); a transfer syntax pydicom has no
    decoder for is handed to SimpleITK/GDCM for that file. The usual CT rescale (slope 1, an
    integer intercept) is applied in integers straight into the preallocated int16 volume: no
    float copy of the whole scan (the decode floor is then the cost of reading the series).
    """
    volume: np.ndarray | None = None
    n_clipped = 0
    for index, file in enumerate(progress(files, every=100, what="decoding slices")):
        try:
            ds = pydicom.dcmread(file)
            try:
                stored = ds.pixel_array
            except (NotImplementedError, RuntimeError):
                syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
                if syntax is None or not syntax.is_compressed:
                    raise
                hu = np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(file), sitk.sitkFloat32))[0])
            else:
                slope = float(ds.get("RescaleSlope", 1) or 1)
                intercept = float(ds.get("RescaleIntercept", 0) or 0)
                if slope == 1.0 and intercept.is_integer() and "ModalityLUTSequence" not in ds:
                    hu = stored.astype(np.int32) + int(intercept)
                else:
                    hu = np.rint(apply_rescale(stored, ds))
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001 - any decoder failure is this file's bad input
            raise InputError(case, file, f"cannot decode pixel data: {type(err).__name__}: "
                             f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None
        if hu.ndim != 2:
            raise InputError(case, file, f"expected one 2-D frame per file, got pixel data of shape {hu.shape}")
        if volume is None:
            volume = np.empty((len(files), *hu.shape), dtype=np.int16)
        elif hu.shape != volume.shape[1:]:
            raise InputError(case, file, f"slices differ in pixel matrix size: {hu.shape} vs {volume.shape[1:]}")
        outside = (hu < INT16_MIN) | (hu > INT16_MAX)
        if outside.any():
            n_clipped += int(np.count_nonzero(outside))
            hu = np.clip(hu, INT16_MIN, INT16_MAX)
        volume[index] = hu
    if volume is None:
        raise InputError(case, "", "no slices to decode")
    return volume, n_clipped


def read_ct(case: str, series: pd.Series, max_tilt_deg: float = 0.5,
            max_spacing_spread: float = 0.01) -> tuple[sitk.Image, dict[str, Any]]:
    """The CT series as an int16 HU SimpleITK image (LPS geometry from the headers) + geometry info."""
    geometry = slice_geometry(case, series, max_tilt_deg, max_spacing_spread)
    hu, n_clipped = _read_pixels_hu(case, geometry["files"])
    expected = tuple(reversed(geometry["size"]))
    if hu.shape != expected:
        raise InputError(case, geometry["files"][0], f"pixel data shape {hu.shape} does not match headers {expected}")
    image = sitk.GetImageFromArray(hu)
    # Geometry from our own validated header read, not from the reader's guess.
    image.SetOrigin(geometry["origin"])
    image.SetSpacing(geometry["spacing"])
    image.SetDirection(geometry["direction"])
    geometry["hu_clipped_voxels"] = n_clipped
    return image, geometry


# ----------------------------------------------------------------------------- labels


def normalise_name(name: str) -> str:
    """ROI name for tolerant matching: lower case, punctuation and spaces removed."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def match_structures(structures: Sequence[str], roi_names: Sequence[str]) -> dict[str, dict[str, str]]:
    """structure -> {"roi": ROI name, "how": exact|case-insensitive|normalised} for the ones found."""
    matched: dict[str, dict[str, str]] = {}
    for structure in structures:
        for how, key in (("exact", lambda s: s), ("case-insensitive", str.lower), ("normalised", normalise_name)):
            hits = [roi for roi in roi_names if key(roi) == key(structure)]
            if hits:
                matched[structure] = {"roi": sorted(hits)[0], "how": how}
                break
    return matched


def _rtstruct_references(ds: pydicom.Dataset) -> tuple[set[str], set[str], set[str]]:
    """(referenced SOP instance UIDs, referenced series UIDs, referenced frames of reference)."""
    sops: set[str] = set()
    series: set[str] = set()
    frames: set[str] = set()
    for fr in ds.get("ReferencedFrameOfReferenceSequence", []):
        if fr.get("FrameOfReferenceUID"):
            frames.add(str(fr.FrameOfReferenceUID))
        for study in fr.get("RTReferencedStudySequence", []):
            for se in study.get("RTReferencedSeriesSequence", []):
                if se.get("SeriesInstanceUID"):
                    series.add(str(se.SeriesInstanceUID))
                sops.update(str(ci.ReferencedSOPInstanceUID) for ci in se.get("ContourImageSequence", []))
    for roi in ds.get("StructureSetROISequence", []):
        if roi.get("ReferencedFrameOfReferenceUID"):
            frames.add(str(roi.ReferencedFrameOfReferenceUID))
    for rc in ds.get("ROIContourSequence", []):
        for contour in rc.get("ContourSequence", []):
            sops.update(str(ci.ReferencedSOPInstanceUID) for ci in contour.get("ContourImageSequence", []))
    return sops, series, frames


def check_rtstruct_reference(case: str, file: str, ds: pydicom.Dataset, series: pd.Series,
                             sop_uids: Iterable[str]) -> dict[str, Any]:
    """Raise InputError unless the RTSTRUCT refers to the chosen CT series; returns how it matched."""
    sops, ref_series, frames = _rtstruct_references(ds)
    uid = series["series_uid"]
    if sops:
        missing = sops - set(sop_uids)
        if missing:
            raise InputError(case, file, f"RTSTRUCT {file} references SOP instances not in series {uid} "
                             f"({len(missing)} of {len(sops)} unresolved, e.g. {sorted(missing)[0]})")
        note = {"by": "referenced SOP instances", "n_referenced": len(sops)}
        ct_frame = series["frame_of_reference_uid"]
        if frames and ct_frame and ct_frame not in frames:
            note["warning"] = f"FrameOfReferenceUID {sorted(frames)} differs from the CT's {ct_frame}"
        return note
    if not frames and not ref_series:
        raise InputError(case, file, f"RTSTRUCT {file} has nothing to reference (no SOP instances, series or "
                         "frame of reference)")
    if uid in ref_series or (series["frame_of_reference_uid"] and series["frame_of_reference_uid"] in frames):
        return {"by": "series UID" if uid in ref_series else "FrameOfReferenceUID", "n_referenced": 0}
    raise InputError(case, file, f"RTSTRUCT {file} references series {sorted(ref_series)} / frames of reference "
                     f"{sorted(frames)}, not series {uid}")


def fill_polygon(col_x: np.ndarray, row_y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean (rows, cols) mask of the pixel centres inside a closed polygon (even-odd rule).

    ``col_x``/``row_y`` are vertex positions in continuous pixel index units (pixel centres at
    integers). A vectorised scanline fill: every edge is cut with the pixel-centre rows it spans
    (half-open in y, so a vertex on a row is counted once), the crossings of a row are paired in x
    order and the columns between each pair are filled. Same rule as ``skimage.draw.polygon``,
    much faster for the large contours of lungs or bodies.
    """
    n_rows, n_cols = shape
    x0, y0 = np.asarray(col_x, dtype=float), np.asarray(row_y, dtype=float)
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    first_row = np.clip(np.ceil(np.minimum(y0, y1)), 0, n_rows).astype(np.int64)
    stop_row = np.clip(np.ceil(np.maximum(y0, y1)), 0, n_rows).astype(np.int64)
    counts = np.maximum(stop_row - first_row, 0)
    mask = np.zeros(shape, dtype=bool)
    if counts.sum() == 0:
        return mask
    edge = np.repeat(np.arange(len(x0)), counts)
    row = first_row[edge] + np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    x_cross = x0[edge] + (row - y0[edge]) * (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
    order = np.lexsort((x_cross, row))
    row, x_cross = row[order], x_cross[order]
    # Whole rows are kept or clipped, so every row has an even number of crossings.
    start = np.clip(np.ceil(x_cross[0::2]), 0, n_cols).astype(np.int64)
    stop = np.clip(np.floor(x_cross[1::2]) + 1, 0, n_cols).astype(np.int64)
    keep = stop > start
    steps = np.zeros((n_rows, n_cols + 1), dtype=np.int32)
    np.add.at(steps, (row[0::2][keep], start[keep]), 1)
    np.add.at(steps, (row[0::2][keep], stop[keep]), -1)
    return np.cumsum(steps[:, :-1], axis=1) > 0


def _contour_points(contour: pydicom.Dataset) -> np.ndarray:
    """ContourData as (N, 3) LPS mm; parsed from the raw bytes (pydicom's DS objects are slow)."""
    element = contour.get_item("ContourData")
    value = getattr(element, "value", None)
    if isinstance(value, (bytes, bytearray)):
        return np.array(value.decode("ascii").replace("\\", " ").split(), dtype=float).reshape(-1, 3)
    return np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)


def rasterise_rtstruct(case: str, file: str, ds: pydicom.Dataset, reference: sitk.Image,
                       structures: Sequence[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Paint the RTSTRUCT's contours of ``structures`` on the reference grid: uint8 (z, y, x)."""
    roi_names = {str(r.ROINumber): str(r.ROIName) for r in ds.get("StructureSetROISequence", [])}
    matched = match_structures(structures, list(roi_names.values()))
    number_of = {name: number for number, name in roi_names.items()}
    contours_of = {str(rc.ReferencedROINumber): rc.get("ContourSequence", []) for rc in ds.get("ROIContourSequence", [])}
    size = reference.GetSize()
    origin = np.array(reference.GetOrigin())
    spacing = np.array(reference.GetSpacing())
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    to_index = np.linalg.inv(direction * spacing)  # LPS mm offset -> continuous (i, j, k)
    label = np.zeros(tuple(reversed(size)), dtype=np.uint8)
    report: dict[str, Any] = {"matched": matched, "roi_names": sorted(roi_names.values()), "skipped_contours": {}}
    for value, structure in enumerate(structures, start=1):
        if structure not in matched:
            continue
        roi = matched[structure]["roi"]
        per_slice: dict[int, np.ndarray] = {}
        skipped = {"not_closed_planar": 0, "outside_scan": 0}
        for contour in contours_of.get(number_of[roi], []):
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper() != "CLOSED_PLANAR":
                skipped["not_closed_planar"] += 1
                continue
            points = _contour_points(contour)
            ijk = (points - origin) @ to_index.T
            k = ijk[:, 2]
            k_slice = int(round(float(np.mean(k))))
            if np.max(np.abs(k - k_slice)) > 0.5:
                raise InputError(case, file, f"contour of {roi} does not lie on a slice plane of the CT "
                                 f"(slice index {k.min():.2f}..{k.max():.2f}, tolerance half a slice)")
            if not 0 <= k_slice < size[2]:
                skipped["outside_scan"] += 1
                continue
            plane = per_slice.setdefault(k_slice, np.zeros((size[1], size[0]), dtype=bool))
            plane ^= fill_polygon(ijk[:, 0], ijk[:, 1], (size[1], size[0]))  # XOR: a nested contour is a hole
        for k_slice, plane in per_slice.items():
            label[k_slice][plane] = value
        if any(skipped.values()):
            report["skipped_contours"][structure] = skipped
    return label, report


def rtstruct_label_map(case: str, index: pd.DataFrame, series: pd.Series, geometry: dict[str, Any],
                       reference: sitk.Image, structures: Sequence[str]) -> tuple[sitk.Image, dict[str, Any]]:
    """The label map from the RTSTRUCT under the case folder that references the chosen CT.

    Several RTSTRUCTs: the ones whose references do not resolve are ignored (listed in the
    report) as long as one resolves; among those that resolve the one matching the most
    structures wins, then the smallest file path.
    """
    rt_rows = index[index["modality"] == "RTSTRUCT"]
    if rt_rows.empty:
        # No contours at all: an empty label map; convert excludes the case if structures are required.
        image = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
        image.CopyInformation(reference)
        return image, {"file": None, "note": f"no RTSTRUCT beside CT series {series['series_uid']}",
                       "matched": {}, "roi_names": []}
    usable, rejected = [], []
    for files in rt_rows["files"]:
        for file in files:
            try:
                ds = pydicom.dcmread(file)
            except (InvalidDicomError, OSError, ValueError) as err:
                rejected.append(InputError(case, file, f"RTSTRUCT {file} is unreadable: {err}"))
                continue
            try:
                reference_note = check_rtstruct_reference(case, file, ds, series, geometry["sop_uids"])
            except InputError as err:
                rejected.append(err)
                continue
            names = [str(r.ROIName) for r in ds.get("StructureSetROISequence", [])]
            usable.append((-len(match_structures(structures, names)), file, ds, reference_note))
    if not usable:
        raise rejected[0]
    usable.sort(key=lambda u: (u[0], u[1]))
    _, file, ds, reference_note = usable[0]
    label, report = rasterise_rtstruct(case, file, ds, reference, structures)
    report.update({"file": file, "reference": reference_note,
                   "ignored": [{"file": e.file, "reason": e.reason} for e in rejected]})
    image = sitk.GetImageFromArray(label)
    image.CopyInformation(reference)
    return image, report


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-5))


def mask_folder_label_map(case: str, mask_dir: str | os.PathLike, reference: sitk.Image,
                          structures: Sequence[str]) -> tuple[sitk.Image, dict[str, Any]]:
    """Label map from per-structure mask files ``<mask_dir>/<case>/<structure>.nrrd|.nii.gz``."""
    folder = Path(mask_dir) / case
    if not folder.is_dir():
        raise InputError(case, folder, f"mask folder {folder} does not exist (convert.labels is nrrd)")
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        for suffix in MASK_SUFFIXES:
            if path.name.lower().endswith(suffix):
                by_stem.setdefault(path.name[: -len(suffix)], path)
    matched = match_structures(structures, list(by_stem))
    label = np.zeros(tuple(reversed(reference.GetSize())), dtype=np.uint8)
    report: dict[str, Any] = {"folder": str(folder), "matched": {}, "resampled": []}
    for value, structure in enumerate(structures, start=1):
        if structure not in matched:
            continue
        path = by_stem[matched[structure]["roi"]]
        try:
            mask = sitk.ReadImage(str(path))
        except RuntimeError as err:
            raise InputError(case, path, f"cannot read mask: {str(err).strip().splitlines()[-1]}") from None
        if mask.GetDimension() != 3:
            raise InputError(case, path, f"mask is {mask.GetDimension()}-D, expected 3-D")
        mask = sitk.Cast(mask != 0, sitk.sitkUInt8)
        if not _same_grid(mask, reference):
            n_before = int(sitk.GetArrayViewFromImage(mask).sum())
            mask = sitk.Resample(mask, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            if n_before and not sitk.GetArrayViewFromImage(mask).any():
                raise InputError(case, path, "mask does not overlap the CT volume")
            report["resampled"].append(structure)
        label[sitk.GetArrayViewFromImage(mask) > 0] = value
        report["matched"][structure] = {"file": str(path), "how": matched[structure]["how"]}
    image = sitk.GetImageFromArray(label)
    image.CopyInformation(reference)
    return image, report
