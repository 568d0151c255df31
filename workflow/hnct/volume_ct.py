"""CT from a volume file: releases that ship each case's CT as one NRRD / NIfTI / MHA file.

HaN-Seg (Podobnik et al. 2023; its Zenodo download ``HaN-Seg.zip``) lays a case out as
``set_1/case_XX/case_XX_IMG_CT.nrrd`` beside ``case_XX_IMG_MR_T1.nrrd`` and one
``case_XX_OAR_<name>.seg.nrrd`` per organ, with ``set_1/OAR_data.csv``; SegRap2023's
``SegRap2023_Training_Set_120cases.zip`` as ``segrap_XXXX/image.nii.gz`` (non-contrast CT),
``image_contrast.nii.gz`` and one ``<Organ>.nii.gz`` per structure (45 OARs, GTVp, GTVnd).
:data:`CT_LAYOUTS` holds both as presets.

:func:`read_ct_file` reads the file with SimpleITK, which gives every format in LPS (ITK converts
NIfTI's RAS and an NRRD whose space is right-anterior-superior), and returns what
:func:`hnct.dicomio.read_ct_array` returns for a DICOM series: an int16 HU (z, y, x) array and its
geometry (``size``, ``spacing``, ``origin``, ``direction``, ``hu_clipped_voxels``), so convert writes
the same CT NRRD and the mask folder's geometry checks apply unchanged. The voxels must already be
HU: integer voxels are taken as they are (clipped to int16, counted as the DICOM path does), float
voxels are rounded when every one lies within ``rounding_tolerance_hu`` of an integer. Bad input is
an :class:`~hnct.common.InputError` naming the case, the file and the reason: a missing or
unreadable file, an image that is not one 3-D scalar volume, non-finite or non-integer voxels, or
no voxel at air's HU (a file holding HU + 1024 or normalised intensities).

:func:`index_release` makes a cohort table of such a release: one case per file matching the
layout's pattern (patient = case unless a mapping says otherwise).
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hnct.common import InputError

# Release layouts: the CT file of a case below the release root, and the collection name the
# index writes unless told another. {case} is the case ID (the case folder's name).
CT_LAYOUTS = {
    "hanseg": {"pattern": "{case}/{case}_IMG_CT.nrrd", "collection": "HaN-Seg"},
    "segrap": {"pattern": "{case}/image.nii.gz", "collection": "SegRap2023"},
    "segrap_contrast": {"pattern": "{case}/image_contrast.nii.gz", "collection": "SegRap2023"},
}
INT16_MIN, INT16_MAX = -32768, 32767
# Every head-and-neck CT holds air (about -1000 HU) around the patient; a file whose darkest voxel
# is brighter than this does not hold HU.
AIR_HU = -500.0
CASE_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*?"


def sha256_of(path: str | os.PathLike) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_ct_file(case: str, path: str | os.PathLike,
                 rounding_tolerance_hu: float) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """(int16 HU (z, y, x) array, geometry, provenance) of a CT volume file (module docstring).

    ``geometry`` has ``size`` [x, y, z], ``spacing`` (mm), ``origin`` (LPS mm of voxel (0, 0, 0)),
    ``direction`` (9, row-major, columns = axes in LPS) and ``hu_clipped_voxels``; provenance has
    ``ct_file``, its ``ct_bytes`` and ``ct_sha256``, the ITK ``ct_format`` and ``ct_pixel_type``.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise InputError(case, path, f"CT file {path} does not exist")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(case, path, f"cannot read CT file {path}: {str(err).strip().splitlines()[-1]}") from None
    size, components = reader.GetSize(), reader.GetNumberOfComponents()
    if len(size) != 3 or components != 1:
        raise InputError(case, path, f"CT file {path} is a {len(size)}-D image of size {list(size)} with "
                         f"{components} component(s) per voxel, expected one 3-D scalar volume")
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(case, path, f"cannot read CT file {path}: {str(err).strip().splitlines()[-1]}") from None
    hu, clipped = _as_int16_hu(case, path, sitk.GetArrayViewFromImage(image), rounding_tolerance_hu)
    geometry = {
        "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
        "hu_clipped_voxels": clipped,
    }
    provenance = {
        "ct_file": str(path),
        "ct_bytes": path.stat().st_size,
        "ct_sha256": sha256_of(path),
        "ct_format": sitk.ImageFileReader.GetImageIOFromFileName(str(path)),
        "ct_pixel_type": image.GetPixelIDTypeAsString(),
    }
    return hu, geometry, provenance


def _as_int16_hu(case: str, path: Path, voxels: np.ndarray, tolerance_hu: float) -> tuple[np.ndarray, int]:
    """The voxels as int16 HU and the number clipped to int16's range, slice by slice (a float CT
    never needs a second volume-sized float temporary)."""
    if voxels.dtype.kind not in "iuf":
        raise InputError(case, path, f"CT file {path} has {voxels.dtype} voxels, expected integer or float HU")
    is_float = voxels.dtype.kind == "f"
    hu = np.empty(voxels.shape, dtype=np.int16)
    clipped, worst, darkest = 0, 0.0, np.inf
    for index, plane in enumerate(voxels):
        if is_float:
            if not np.isfinite(plane).all():
                raise InputError(case, path, f"CT file {path}: non-finite voxels (NaN or inf) in slice {index}")
            rounded = np.rint(plane)
            worst = max(worst, float(np.abs(plane - rounded).max()))
            plane = rounded
        darkest = min(darkest, float(plane.min()))
        outside = (plane < INT16_MIN) | (plane > INT16_MAX)
        clipped += int(np.count_nonzero(outside))
        hu[index] = np.clip(plane, INT16_MIN, INT16_MAX)
    if worst > tolerance_hu:
        raise InputError(case, path, f"CT file {path}: float voxels up to {worst:.4g} HU from an integer "
                         f"(convert.ct_rounding_tolerance_hu {tolerance_hu}): not integer HU (normalised or "
                         "resampled intensities?)")
    if darkest > AIR_HU:
        raise InputError(case, path, f"CT file {path}: darkest voxel {darkest:g}, no voxel at air's HU (below "
                         f"{AIR_HU:g}): the file does not hold HU (HU + 1024, or normalised intensities?)")
    return hu, clipped


# ----------------------------------------------------------------------------- release index


def ct_pattern(layout: str) -> str:
    """A layout preset's CT pattern, or ``layout`` itself when it is a pattern with ``{case}``."""
    pattern = CT_LAYOUTS.get(layout, {}).get("pattern", layout)
    if "{case}" not in pattern or set(re.findall(r"{([^}]*)}", pattern)) != {"case"}:
        raise ValueError(f"CT layout {layout!r}: expected a preset ({sorted(CT_LAYOUTS)}) or a path pattern "
                         "with {case} as its only placeholder")
    return pattern


def _pattern_regex(pattern: str) -> re.Pattern:
    """``{case}`` once captured, then the same text wherever it occurs again."""
    pieces = re.split(r"({case})", pattern)
    regex, seen = "", False
    for piece in pieces:
        if piece == "{case}":
            regex += "(?P=case)" if seen else f"(?P<case>{CASE_ID})"
            seen = True
        else:
            regex += re.escape(piece)
    return re.compile(regex)


def index_release(root: str | os.PathLike, layout: str, collection: str = "",
                  patients: Mapping[str, str] | None = None) -> tuple["pd.DataFrame", "pd.DataFrame"]:
    """(cohort, skipped) of a release folder: one case per CT file matching ``layout`` below ``root``.

    The cohort has ``case`` (from the pattern's ``{case}``: the case folder's name), ``patient``
    (``patients[case]``, else the case), ``collection`` (``collection``, else the preset's),
    ``ct_file`` (relative to ``root``, convert's CT) and an empty ``dicom_dir``. ``skipped`` lists
    every entry of ``root`` that gave no case (a case folder without its CT file, the release's
    tables), with the reason, in :data:`hnct.fetch.SKIPPED_COLUMNS`' columns.
    """
    import pandas as pd

    from hnct.cohort import check_cohort

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"release folder {root} does not exist")
    pattern = ct_pattern(layout)
    regex = _pattern_regex(pattern)
    depth = len(Path(pattern).parts)
    found: dict[str, str] = {}
    for folder, dirs, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        level = len(relative.parts) + 1
        if level >= depth:
            dirs[:] = []  # no deeper than the pattern
        dirs.sort()
        for name in sorted(files):
            hit = regex.fullmatch((relative / name).as_posix())
            if hit:
                found[hit.group("case")] = (relative / name).as_posix()
    used = {Path(file).parts[0] for file in found.values()}
    skipped = [{"path": entry.name, "what": "folder" if entry.is_dir() else "file",
                "n_files": sum(1 for p in entry.rglob("*") if p.is_file()) if entry.is_dir() else 1,
                "reason": f"no CT file matching {pattern} (layout {layout})"}
               for entry in sorted(root.iterdir()) if entry.name not in used]
    from hnct.fetch import SKIPPED_COLUMNS

    skipped_table = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS).astype(object).fillna("")
    if not found:
        raise ValueError(f"no CT file matching {pattern} under {root} ({len(skipped)} entries, none a case)")
    name = collection or CT_LAYOUTS.get(layout, {}).get("collection") or root.name
    patients = dict(patients or {})
    unknown = sorted(set(patients) - set(found))
    if unknown:
        raise ValueError(f"patient mapping names case(s) {unknown[:5]} that {root} does not have")
    cases = sorted(found)
    table = pd.DataFrame({"case": cases, "patient": [patients.get(c, c) for c in cases],
                          "collection": name, "dicom_dir": "", "ct_file": [found[c] for c in cases]})
    return check_cohort(table, source=f"index of {root} (layout {layout})"), skipped_table


def read_patient_map(path: str | os.PathLike) -> dict[str, str]:
    """case -> patient from a TSV with columns ``case`` and ``patient``."""
    import pandas as pd

    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = {"case", "patient"} - set(table.columns)
    if missing:
        raise ValueError(f"patient mapping {path}: missing column(s) {sorted(missing)}")
    duplicated = sorted(set(table.loc[table["case"].duplicated(), "case"]))
    if duplicated:
        raise ValueError(f"patient mapping {path}: case(s) {duplicated[:5]} listed twice")
    return dict(zip(table["case"].str.strip(), table["patient"].str.strip()))
