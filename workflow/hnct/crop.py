"""crop{case}: the laryngeal box of one scan, resampled to an isotropic grid (1 mm for LaryngealCT).

Every box is a physical box in LPS millimetres before anything is resampled. It comes from

* ``method: mask``: the bounding box of ``structures`` in the case's label map (the physical
  corners of the labelled voxels, through the label map's own origin, spacing and direction)
  widened by ``margin_mm`` on every side;
* ``method: table, table_format: lps``: hnct's own crop table (TSV, one row per case:
  ``case, x_min_mm, y_min_mm, z_min_mm, x_max_mm, y_max_mm, z_max_mm``, LPS mm);
* ``method: table, table_format: bbox3d``: LaryngealCT's published ``bbox3d.txt``
  (``case_id,x,y,z,size_x,size_y,size_z``, integer voxels of the ORIGINAL scan grid, see
  ``docs/laryngealct_boxes.md``; read by :func:`hnct.laryngealct.parse_bbox3d`), converted once
  to millimetres with the scan's own geometry.

Box convention: a box's ``min``/``max`` are the outermost output voxel CENTRES. The output grid is
axis-aligned (identity direction, LPS), starts at ``min`` and has ``ceil((max - min) / spacing) + 1``
voxels per axis, so its last voxel centre is at or just past ``max``; the sidecar's
``crop_box_lps`` is that realised centre extent (feeding it back as an ``lps`` table row gives the
same grid). Only the box is resampled (a sub-region of the scan around it, never the whole volume):
CT with linear or B-spline interpolation (``pad_hu``, air, outside the scan), labels with nearest
neighbour (0 outside). A box partly outside the scan is padded and flagged (``padded``,
``outside_fraction`` = share of output voxel centres outside the scan); wholly outside excludes the case.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from hnct.common import InputError, atomic_path, read_image, read_sidecar, run_case_stage, setup_logging

if TYPE_CHECKING:  # annotations only
    import pandas as pd

# pandas, hnct.cohort and hnct.laryngealct (pandas, requests) are imported where the crop tables are
# read: a mask-placed crop (the demo's 51 jobs) needs none of them (about 0.3 s of each job's start).

log = logging.getLogger("hnct.crop")

LPS_COLUMNS = ("case", "x_min_mm", "y_min_mm", "z_min_mm", "x_max_mm", "y_max_mm", "z_max_mm")
INTERPOLATORS = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline}
# Input voxels kept around the box when the sub-region is cut out: the interpolation kernel's
# support (B-spline coefficients are computed on the sub-region; 4 voxels make the edge effect
# of its recursive prefilter negligible, < 0.3 % of the signal).
KERNEL_MARGIN = {"linear": 1, "bspline": 4, "nearest": 1}
# Tolerance when counting voxels: a box extent that is a whole number of voxels up to float noise.
_EPS = 1e-6
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

# A repeat-scan suffix on an hnct case ID (``HN_018_01``: scan 01 of patient HN_018).
REPEAT_SUFFIX = re.compile(r"^(?P<base>.+?)[_-](?P<scan>\d{2})$")


# --------------------------------------------------------------------------- geometry


def image_geometry(image: sitk.Image) -> dict[str, list]:
    """Size (voxels), spacing (mm), origin (LPS mm) and direction (row-major 3x3) of an image."""
    return {
        "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def index_box_to_lps(image: sitk.Image, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LPS mm min/max of the 8 corners of a continuous-index box ``lower..upper`` of ``image``.

    With a non-identity direction the axis-aligned physical box is the min/max over all corners.
    """
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        for corner in itertools.product(*zip(lower, upper))
    ]
    corners = np.asarray(corners, dtype=float)
    return corners.min(axis=0), corners.max(axis=0)


def bbox3d_to_lps(image: sitk.Image, start: tuple[int, int, int], size: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Convert a LaryngealCT voxel box to an LPS mm box (outermost voxel centres).

    ``start`` = (x, y, z), ``size`` = (size_x, size_y, size_z) index the ORIGINAL scan as
    SimpleITK reads the series: x = column index i, y = row index j, z = slice index k with
    slices sorted along the slice normal (from the most inferior slice for an axial
    head-first scan). The box holds voxels ``x .. x+size_x-1`` (Python slicing, as
    ``img[x:x+sx, y:y+sy, z:z+sz]`` in LaryngealCT's dataprep.py); its physical box is spanned by
    the centres of its first and last voxels. dataprep.py's in-plane flips reorder the crop's
    array only and do not move the box. See docs/laryngealct_boxes.md.
    """
    start_idx = np.asarray(start, dtype=float)
    last_idx = start_idx + np.asarray(size, dtype=float) - 1.0
    return index_box_to_lps(image, start_idx, last_idx)


def mask_box_lps(label: sitk.Image, values: list[int], margin_mm: float) -> tuple[np.ndarray, np.ndarray] | None:
    """LPS mm box around every voxel whose label is in ``values``, plus ``margin_mm`` on every side.

    The box holds the labelled voxels whole: their physical corners (index +- 0.5 voxel) are
    transformed with the label map's origin, spacing and direction. ``None`` when no voxel has
    one of the values.
    """
    array = sitk.GetArrayViewFromImage(label)  # (z, y, x)
    selected = np.isin(array, values)
    if not selected.any():
        return None
    # Per-axis extents without listing every voxel: project onto each axis.
    zyx_bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(selected.any(axis=other))
        zyx_bounds.append((hits[0], hits[-1]))
    lower = np.array([zyx_bounds[2][0], zyx_bounds[1][0], zyx_bounds[0][0]], dtype=float) - 0.5
    upper = np.array([zyx_bounds[2][1], zyx_bounds[1][1], zyx_bounds[0][1]], dtype=float) + 0.5
    box_min, box_max = index_box_to_lps(label, lower, upper)
    return box_min - margin_mm, box_max + margin_mm


def crop_grid(box_min: np.ndarray, box_max: np.ndarray, spacing_mm: float) -> tuple[list[float], list[int]]:
    """Origin (LPS mm, first voxel centre) and size of the axis-aligned grid whose centres span the box."""
    extent = np.asarray(box_max, dtype=float) - np.asarray(box_min, dtype=float)
    if np.any(extent < 0):
        raise ValueError(f"box max {list(box_max)} below min {list(box_min)}")
    size = [int(math.ceil(e / spacing_mm - _EPS)) + 1 for e in extent]
    return [float(v) for v in box_min], size


def outside_fraction(image: sitk.Image, origin: list[float], size: list[int], spacing_mm: float) -> float:
    """Share of the output grid's voxel centres that fall outside ``image`` (its voxels' outer faces).

    The same inside test as ITK's interpolators: continuous index within [-0.5, size - 0.5].
    """
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    inverse = np.linalg.inv(direction) / np.asarray(image.GetSpacing(), dtype=float)[:, None]
    scan_origin = np.asarray(image.GetOrigin(), dtype=float)
    scan_size = np.asarray(image.GetSize(), dtype=float)
    # Continuous index is affine in the output index: c = A @ (origin + s * ijk - o).
    axes = [np.asarray(origin[d]) + spacing_mm * np.arange(size[d]) - scan_origin[d] for d in range(3)]
    inside = np.ones((size[2], size[1], size[0]), dtype=bool)
    for row in range(3):
        c = (
            inverse[row, 0] * axes[0][None, None, :]
            + inverse[row, 1] * axes[1][None, :, None]
            + inverse[row, 2] * axes[2][:, None, None]
        )
        inside &= (c >= -0.5 - _EPS) & (c <= scan_size[row] - 0.5 + _EPS)
    return float(1.0 - inside.mean())


def _source_region(image: sitk.Image, origin: list[float], size: list[int], spacing_mm: float, margin: int):
    """Index region (start, size) of ``image`` that the output grid needs, or None when disjoint."""
    last = np.asarray(origin) + spacing_mm * (np.asarray(size) - 1)
    cidx = np.asarray([
        image.TransformPhysicalPointToContinuousIndex([float(c) for c in corner])
        for corner in itertools.product(*zip(origin, last))
    ])
    lo = np.floor(cidx.min(axis=0)).astype(int) - margin
    hi = np.ceil(cidx.max(axis=0)).astype(int) + margin
    scan_size = np.asarray(image.GetSize())
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, scan_size - 1)
    if np.any(hi < lo):
        return None
    return [int(v) for v in lo], [int(v) for v in hi - lo + 1]


def resample_box(
    image: sitk.Image,
    origin: list[float],
    size: list[int],
    spacing_mm: float,
    interpolation: str,
    default_value: float,
    output_pixel_type: int,
) -> sitk.Image:
    """Resample ``image`` onto the axis-aligned grid (identity direction) ``origin``/``size``/``spacing_mm``.

    Only the sub-region of ``image`` under the box (plus the interpolation kernel's support) is
    handed to SimpleITK, so the cost follows the box, not the scan.
    """
    interpolator = sitk.sitkNearestNeighbor if interpolation == "nearest" else INTERPOLATORS[interpolation]
    region = _source_region(image, origin, size, spacing_mm, KERNEL_MARGIN[interpolation])
    source = image if region is None else sitk.RegionOfInterest(image, region[1], region[0])
    return sitk.Resample(
        source,
        [int(s) for s in size],
        sitk.Transform(),
        interpolator,
        [float(o) for o in origin],
        [float(spacing_mm)] * 3,
        IDENTITY,
        float(default_value),
        output_pixel_type,
    )


def to_int16_hu(image: sitk.Image) -> sitk.Image:
    """Round a float CT image to int16 HU (B-spline can overshoot: clip to the int16 range)."""
    array = np.rint(sitk.GetArrayViewFromImage(image))
    array = np.clip(array, np.iinfo(np.int16).min, np.iinfo(np.int16).max).astype(np.int16)
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(image)
    return out


# --------------------------------------------------------------------------- crop tables


def read_lps_table(path: str | Path) -> pd.DataFrame:
    """hnct's crop table: TSV ``case, x_min_mm, y_min_mm, z_min_mm, x_max_mm, y_max_mm, z_max_mm`` (LPS mm)."""
    import pandas as pd

    table = pd.read_csv(path, sep="\t", dtype={"case": str}, comment="#")
    missing = [c for c in LPS_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: crop table lacks column(s) {', '.join(missing)} (needs {', '.join(LPS_COLUMNS)})")
    return table


def _norm(identifier: str) -> str:
    from hnct.cohort import tcia_patient_id

    return tcia_patient_id(str(identifier)).upper()


def find_bbox3d_row(table: pd.DataFrame, case: str, patient: str | None, table_path: str | Path) -> pd.Series:
    """The bbox3d row of one hnct case.

    LaryngealCT IDs write ``_`` where TCIA writes ``-``; they are compared through
    :func:`hnct.cohort.tcia_patient_id`, first with the case ID, then with the patient ID (a
    patient with one scan), then with the case ID without a two-digit repeat-scan suffix
    (``HN_018_01`` -> ``HN_018``). Ambiguous or missing -> :class:`InputError`.
    """
    keys = table["case_id"].map(_norm)
    tried = []
    candidates = [case]
    if patient:
        candidates.append(patient)
    suffix = REPEAT_SUFFIX.match(case)
    if suffix:
        candidates.append(suffix.group("base"))
    for candidate in candidates:
        tried.append(candidate)
        rows = table[keys == _norm(candidate)]
        if len(rows) == 1:
            return rows.iloc[0]
        if len(rows) > 1:
            raise InputError(case, table_path, f"{len(rows)} bbox3d rows match {candidate!r}: ambiguous crop box")
    raise InputError(
        case, table_path,
        f"no crop box in the bbox3d table for this case (looked for {', '.join(map(repr, tried))}, "
        "'_' and '-' treated alike)",
    )


def find_lps_row(table: pd.DataFrame, case: str, table_path: str | Path) -> pd.Series:
    rows = table[table["case"].astype(str).str.strip() == case]
    if len(rows) == 0:
        raise InputError(case, table_path, "no crop box for this case in the crop table")
    if len(rows) > 1:
        raise InputError(case, table_path, f"{len(rows)} rows for this case in the crop table: ambiguous crop box")
    return rows.iloc[0]


# --------------------------------------------------------------------------- the stage


def _label_values(labels: dict[str, str], structures: list[str]) -> tuple[list[int], list[str]]:
    by_name = {name.lower(): int(value) for value, name in labels.items()}
    values, missing = [], []
    for name in structures:
        if name.lower() in by_name:
            values.append(by_name[name.lower()])
        else:
            missing.append(name)
    return values, missing


def place_box(
    case: str,
    upstream: dict[str, Any],
    volume: sitk.Image,
    label: sitk.Image | None,
    method: str,
    table: str | None,
    table_format: str,
    structures: list[str],
    margin_mm: float,
) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    """The requested box (LPS mm, outermost voxel centres), its source name and provenance."""
    if method == "mask":
        labels = upstream.get("labels") or {}
        present = upstream.get("structures_present", list(labels.values()))
        if label is None:
            raise InputError(case, upstream.get("volume", ""), "crop.method is mask but the case has no label map")
        values, missing = _label_values(labels, structures)
        if missing:
            raise InputError(
                case, upstream.get("label", ""),
                f"crop structure(s) {', '.join(missing)} not in the label map (labels: {', '.join(labels.values()) or 'none'})",
            )
        box = mask_box_lps(label, values, margin_mm)
        if box is None:
            raise InputError(
                case, upstream.get("label", ""),
                f"crop structure(s) {', '.join(structures)} have no labelled voxel "
                f"(structures present: {', '.join(present) or 'none'})",
            )
        return box[0], box[1], "mask", {"structures": list(structures), "margin_mm": float(margin_mm)}
    if method != "table":
        raise ValueError(f"unknown crop method {method!r}")
    if not table:
        raise ValueError("crop.method is table but no crop.table is given")
    if table_format == "lps":
        row = find_lps_row(read_lps_table(table), case, table)
        box_min = np.array([row["x_min_mm"], row["y_min_mm"], row["z_min_mm"]], dtype=float)
        box_max = np.array([row["x_max_mm"], row["y_max_mm"], row["z_max_mm"]], dtype=float)
        if np.any(box_max < box_min):
            raise InputError(case, table, f"crop box max {box_max.tolist()} below min {box_min.tolist()}")
        return box_min, box_max, "lps table", {"table": str(table)}
    if table_format == "bbox3d":
        from hnct.laryngealct import parse_bbox3d

        row = find_bbox3d_row(parse_bbox3d(table), case, upstream.get("patient_id"), table)
        start = (int(row["x"]), int(row["y"]), int(row["z"]))
        size = (int(row["size_x"]), int(row["size_y"]), int(row["size_z"]))
        box_min, box_max = bbox3d_to_lps(volume, start, size)
        return box_min, box_max, "bbox3d table", {
            "table": str(table),
            "bbox3d_case_id": row["case_id"],
            "bbox3d_voxels": {"start": list(start), "size": list(size)},
        }
    raise ValueError(f"unknown crop table format {table_format!r}")


def crop_case(
    case: str,
    source_sidecar: str | Path,
    out_volume: str | Path,
    out_label: str | Path,
    sidecar: str | Path,
    method: str = "mask",
    table: str | None = None,
    table_format: str = "lps",
    structures: list[str] | None = None,
    margin_mm: float = 8.0,
    spacing_mm: float = 1.0,
    interpolation: str = "linear",
    pad_hu: int = -1024,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Crop one case; writes ``out_volume`` (int16 HU), ``out_label`` (uint8) and the sidecar (last).

    ``out_dir``: the case's declared folder holding both NRRDs (emptied first; stays empty when
    the case is excluded), see :func:`hnct.common.run_case_stage`.
    """
    structures = list(structures or [])
    if interpolation not in INTERPOLATORS:
        raise ValueError(f"interpolation must be one of {sorted(INTERPOLATORS)}, not {interpolation!r}")

    def work() -> dict[str, Any]:
        upstream = read_sidecar(source_sidecar)
        volume = read_image(case, upstream["volume"], "volume")
        label = read_image(case, upstream["label"], "label map") if upstream.get("label") else None
        box_min, box_max, box_source, box_detail = place_box(
            case, upstream, volume, label, method, table, table_format, structures, margin_mm,
        )
        origin, size = crop_grid(box_min, box_max, spacing_mm)
        fraction = outside_fraction(volume, origin, size, spacing_mm)
        if fraction >= 1.0:
            raise InputError(
                case, table or upstream.get("label") or upstream["volume"],
                f"crop box {np.round(box_min, 1).tolist()}..{np.round(box_max, 1).tolist()} mm (LPS) lies "
                "wholly outside the scan",
            )
        if fraction > 0:
            log.warning("case %s: %.1f %% of the crop box lies outside the scan: padded with %s HU",
                        case, 100 * fraction, pad_hu)
        ct = resample_box(volume, origin, size, spacing_mm, interpolation, pad_hu, sitk.sitkFloat32)
        ct = to_int16_hu(ct)
        with atomic_path(out_volume, suffix=".nrrd") as tmp:
            sitk.WriteImage(ct, str(tmp), useCompression=False)
        label_path = None
        if label is not None:
            label_crop = resample_box(label, origin, size, spacing_mm, "nearest", 0, sitk.sitkUInt8)
            with atomic_path(out_label, suffix=".nrrd") as tmp:
                sitk.WriteImage(label_crop, str(tmp), useCompression=False)
            label_path = str(out_label)
        last = np.asarray(origin) + spacing_mm * (np.asarray(size) - 1)
        return {
            "crop_box_lps": {"min": [float(v) for v in origin], "max": [float(v) for v in last]},
            "requested_box_lps": {"min": [float(v) for v in box_min], "max": [float(v) for v in box_max]},
            "box_convention": "min/max are the outermost output voxel centres (LPS mm)",
            "box_source": box_source,
            "box_detail": box_detail,
            "spacing": [float(spacing_mm)] * 3,
            "size": [int(s) for s in size],
            "origin": [float(v) for v in origin],
            "direction": list(IDENTITY),
            "padded": bool(fraction > 0),
            "outside_fraction": round(fraction, 6),
            "pad_hu": int(pad_hu),
            "interpolation": interpolation,
            "source_geometry": image_geometry(volume),
            "volume": str(out_volume),
            "label": label_path,
            "labels": upstream.get("labels") or {},
            "structures_present": upstream.get("structures_present", []),
            "source_sidecar": str(source_sidecar),
            "patient_id": upstream.get("patient_id", ""),
            "series_uid": upstream.get("series_uid", ""),
        }

    return run_case_stage(case, "crop", sidecar, work, upstream=source_sidecar, out_dir=out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnct crop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True)
    parser.add_argument("--source-sidecar", required=True, help="convert sidecar (results/volumes/{case}.json)")
    parser.add_argument("--out-volume", required=True, help="cropped CT, int16 HU NRRD")
    parser.add_argument("--out-label", required=True, help="cropped label map, uint8 NRRD")
    parser.add_argument("--sidecar", required=True, help="crop sidecar JSON (written last)")
    parser.add_argument("--out-dir", default="", help="the case's folder of --out-volume and --out-label (emptied first)")
    parser.add_argument("--method", choices=["mask", "table"], default="mask")
    parser.add_argument("--table", nargs="?", const="", default="", help="crop table (method table)")
    parser.add_argument("--table-format", choices=["lps", "bbox3d"], default="lps")
    parser.add_argument("--structures", nargs="*", default=["Larynx"], help="structures bounding the box (method mask)")
    parser.add_argument("--margin-mm", type=float, default=8.0)
    parser.add_argument("--spacing-mm", type=float, default=1.0)
    parser.add_argument("--interpolation", choices=sorted(INTERPOLATORS), default="linear")
    parser.add_argument("--pad-hu", type=int, default=-1024)
    parser.add_argument("--log", default=None)
    args = parser.parse_args(argv)
    setup_logging(args.log)
    sidecar = crop_case(
        args.case, args.source_sidecar, args.out_volume, args.out_label, args.sidecar,
        method=args.method, table=args.table or None, table_format=args.table_format,
        structures=args.structures, margin_mm=args.margin_mm, spacing_mm=args.spacing_mm,
        interpolation=args.interpolation, pad_hu=args.pad_hu, out_dir=args.out_dir or None,
    )
    if sidecar["status"] == "ok":
        log.info("case %s: crop %s voxels at %s mm, box %s", args.case, sidecar["size"],
                 args.spacing_mm, sidecar["crop_box_lps"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
