"""slices{case}: every axial slice of a crop (or of the whole volume), windowed, as .npz and .jpg.

The volume is read once (SimpleITK -> numpy), windowed for the whole volume at once, then each
axial slice k (array axes (y, x) = (row, col)) is written:

* ``{case}_{k:04d}.npz`` (``np.savez``; ``compress`` uses ``np.savez_compressed``, see below):
  ``image`` int16 = HU clipped to [level - width/2, level + width/2] (exactly the windowed HU),
  ``mask`` uint8 (the label map's values), ``spacing`` [x, y] mm, ``origin`` [x, y, z] LPS mm of
  pixel (0, 0), ``direction`` [9], ``slice_index`` k, ``z_mm`` (LPS z of pixel (0, 0)),
  ``window`` [level, width];
* ``{case}_{k:04d}.jpg``: 8-bit grey = round((clip(HU) - (level - width/2)) / width * 255),
  JPEG quality 100, no chroma subsampling (decodes within 1 grey level of those values
  for all but ~1 pixel per million, which are 2 off);
* ``{case}_{k:04d}_overlay.jpg`` (slices with a labelled voxel): RGB with each structure's outline.

The index TSV has one row per slice: ``case, slice, z_mm, npz, jpg, overlay``, ``n_<structure>``
(labelled voxels of every structure of the label map) and ``positive`` (1 when the segmentation
structure has a voxel in the slice).

Uncompressed by default: measured on LUNG1-001 (512 x 512 slices) ``np.savez`` writes a slice in
0.8 ms and loads it in 0.3 ms, ``np.savez_compressed`` takes 7.6 ms and 1.2 ms (9x / 3.5x slower)
for files ~10x smaller (770 vs 81 KiB: the window clips air to one value). Training reads every
slice every epoch, and 1 mm crops make small slices, so speed wins; ``compress`` is there for
whole-volume exports of large cohorts where disk is the limit.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from PIL import Image

from hnct.common import (InputError, atomic_path, progress, read_image, read_sidecar, run_case_stage,
                         setup_logging, structure_values)

log = logging.getLogger("hnct.slices")

# Quality 100 (all quantisation steps 1): measured on LUNG1-001 (134 slices, window 40/400) the
# decoded JPG is within 1 grey level of the 8-bit rescale for all but 15 of 11.8 M pixels (those
# are 2 off: rounding in the integer DCT, which no quality setting removes); quality 95 is up to
# 10 off. The NPZ, not the JPG, is the exact carrier of the windowed HU.
JPEG_QUALITY = 100
# 4:4:4 (no chroma subsampling); with a grey image it also keeps Pillow from any colour path.
JPEG_SUBSAMPLING = 0
# Outline colours per label value (RGB), cycled for more structures.
PALETTE = np.array(
    [[255, 64, 64], [64, 255, 64], [64, 128, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]],
    dtype=np.uint8,
)


def window_bounds(window_level: float, window_width: float) -> tuple[float, float]:
    """HU bounds of a CT window: [level - width/2, level + width/2]."""
    if window_width <= 0:
        raise ValueError(f"window width must be positive, not {window_width}")
    return window_level - window_width / 2.0, window_level + window_width / 2.0


def window_hu(hu: np.ndarray, window_level: float, window_width: float) -> np.ndarray:
    """int16 HU clipped to the window (the NPZ ``image``): exact, no rescaling.

    HU are integers, so clipping to [ceil(low), floor(high)] equals clipping to [low, high].
    """
    low, high = window_bounds(window_level, window_width)
    if not np.issubdtype(hu.dtype, np.integer):
        hu = np.rint(hu)
    bounds = np.array([np.ceil(low), np.floor(high)]).astype(hu.dtype)  # same dtype: no upcast
    return np.clip(hu, bounds[0], bounds[1]).astype(np.int16, copy=False)


def window_uint8(hu: np.ndarray, window_level: float, window_width: float) -> np.ndarray:
    """8-bit rescale of the window: round((clip(HU) - low) / width * 255), float64 arithmetic.

    Integer HU go through a lookup table over [floor(low), ceil(high)] (every value the window
    can tell apart), which is exact and ~5x faster than rescaling the volume in floating point.
    """
    low, high = window_bounds(window_level, window_width)

    def rescale(values: np.ndarray) -> np.ndarray:
        return np.rint((np.clip(values, low, high) - low) / window_width * 255.0).astype(np.uint8)

    if not np.issubdtype(hu.dtype, np.integer):
        return rescale(hu.astype(np.float64))
    first, last = int(np.floor(low)), int(np.ceil(high))
    table = rescale(np.arange(first, last + 1, dtype=np.float64))
    bounds = np.array([first, last]).astype(hu.dtype)  # same dtype: numpy clips without upcasting
    index = np.clip(hu, bounds[0], bounds[1])
    index -= bounds[0]
    return table[index]


def label_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of each labelled region that touch a different value in-plane (4-neighbours).

    Works on a stack (z, y, x) at once; returns the label value on the outline, 0 elsewhere.
    """
    edge = np.zeros(mask.shape, dtype=bool)
    edge[..., 1:, :] |= mask[..., 1:, :] != mask[..., :-1, :]
    edge[..., :-1, :] |= mask[..., :-1, :] != mask[..., 1:, :]
    edge[..., :, 1:] |= mask[..., :, 1:] != mask[..., :, :-1]
    edge[..., :, :-1] |= mask[..., :, :-1] != mask[..., :, 1:]
    return np.where(edge & (mask > 0), mask, 0).astype(mask.dtype)


def overlay_rgb(grey: np.ndarray, outline: np.ndarray) -> np.ndarray:
    """RGB slice: the 8-bit window with each structure's outline in its palette colour."""
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    on = outline > 0
    if on.any():
        rgb[on] = PALETTE[(outline[on].astype(int) - 1) % len(PALETTE)]
    return rgb


def write_jpg(path: Path, pixels: np.ndarray) -> None:
    with atomic_path(path, suffix=".jpg") as tmp:
        Image.fromarray(pixels).save(tmp, format="JPEG", quality=JPEG_QUALITY, subsampling=JPEG_SUBSAMPLING)


def write_index(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """The slice index TSV as pandas' ``to_csv(sep="\t", index=False)`` writes it (header of the first
    row's keys; ints, floats as repr, strings; minimal quoting), without importing pandas: about 0.3 s of
    each export_slices job's start (the demo runs 51)."""
    with open(path, "w", newline="") as handle:
        if not rows:
            handle.write("\n")
            return
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def export_slices(
    case: str,
    source_sidecar: str | Path,
    sidecar: str | Path,
    index: str | Path,
    slice_dir: str | Path,
    source: str = "crop",
    window_level: float = 40.0,
    window_width: float = 400.0,
    structure: str = "GTVn",
    jpg: bool = True,
    overlay: bool = True,
    compress: bool = False,
) -> dict[str, Any]:
    """Export the axial slices of one case; the sidecar (written last) records the index and counts.

    ``slice_dir`` is the case's own declared folder (the workflow puts the index in it too): it is
    emptied first, so a rerun with fewer slices leaves none of the old ones, and stays empty when
    the case is excluded (:func:`hnct.common.run_case_stage`).
    """
    slice_dir = Path(slice_dir)
    window_bounds(window_level, window_width)

    def work() -> dict[str, Any]:
        upstream = read_sidecar(source_sidecar)
        image = read_image(case, upstream["volume"], "volume")
        hu = sitk.GetArrayFromImage(image)  # (z, y, x)
        if hu.ndim != 3:
            raise InputError(case, upstream["volume"], f"expected a 3D volume, got {hu.ndim}D")
        labels = {int(v): name for v, name in (upstream.get("labels") or {}).items()}
        if upstream.get("label"):
            label_image = read_image(case, upstream["label"], "label map")
            mask = sitk.GetArrayFromImage(label_image).astype(np.uint8)
            if mask.shape != hu.shape:
                raise InputError(case, upstream["label"], f"label map shape {mask.shape} differs from volume {hu.shape}")
        else:
            mask = np.zeros(hu.shape, dtype=np.uint8)

        # The whole volume at once: windowed HU, 8-bit rescale, per-slice label counts, outlines.
        image_hu = window_hu(hu, window_level, window_width)
        grey = window_uint8(hu, window_level, window_width) if (jpg or overlay) else None
        counts = {value: (mask == value).sum(axis=(1, 2)) for value in sorted(labels)}
        seg_values = structure_values(labels, structure)
        if structure and not seg_values:
            log.warning("case %s: segmentation structure %s is not in the label map (%s): no positive slice",
                        case, structure, ", ".join(labels.values()) or "no labels")
        positive = np.isin(mask, seg_values).any(axis=(1, 2)) if seg_values else np.zeros(hu.shape[0], bool)
        outline = label_outline(mask) if overlay else None
        labelled = mask.any(axis=(1, 2))

        spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
        direction = np.asarray(image.GetDirection(), dtype=np.float64)
        window = np.array([window_level, window_width], dtype=np.float64)
        save = np.savez_compressed if compress else np.savez
        rows = []
        for k in progress(range(hu.shape[0]), total=hu.shape[0], every=100, what=f"{case} slices"):
            origin = np.asarray(image.TransformIndexToPhysicalPoint((0, 0, k)), dtype=np.float64)
            stem = slice_dir / f"{case}_{k:04d}"
            npz_path = stem.with_name(stem.name + ".npz")
            with atomic_path(npz_path, suffix=".npz") as tmp:
                save(
                    tmp, image=image_hu[k], mask=mask[k], spacing=spacing[:2], origin=origin,
                    direction=direction, slice_index=np.int64(k), z_mm=np.float64(origin[2]), window=window,
                )
            jpg_path = overlay_path = ""
            if jpg:
                jpg_path = str(stem.with_name(stem.name + ".jpg"))
                write_jpg(Path(jpg_path), grey[k])
            if overlay and labelled[k]:
                overlay_path = str(stem.with_name(stem.name + "_overlay.jpg"))
                write_jpg(Path(overlay_path), overlay_rgb(grey[k], outline[k]))
            row = {"case": case, "slice": k, "z_mm": round(float(origin[2]), 4), "npz": str(npz_path),
                   "jpg": jpg_path, "overlay": overlay_path}
            for value in sorted(labels):
                row[f"n_{labels[value]}"] = int(counts[value][k])
            row["positive"] = int(positive[k])
            rows.append(row)
        with atomic_path(index, suffix=".tsv") as tmp:
            write_index(tmp, rows)
        return {
            "index": str(index),
            "slice_dir": str(slice_dir),
            "n_slices": int(hu.shape[0]),
            "n_positive": int(positive.sum()),
            "structure": structure,
            "window_level": float(window_level),
            "window_width": float(window_width),
            "source": source,
            "source_volume": upstream["volume"],
            "source_label": upstream.get("label"),
            "source_sidecar": str(source_sidecar),
            "labels": upstream.get("labels") or {},
            "jpg": bool(jpg),
            "overlay": bool(overlay),
            "jpeg_quality": JPEG_QUALITY,
            "compress": bool(compress),
            "slice_shape": [int(hu.shape[1]), int(hu.shape[2])],
            "spacing": spacing.tolist(),
        }

    return run_case_stage(case, "slices", sidecar, work, upstream=source_sidecar, out_dir=slice_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnct slices", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True)
    parser.add_argument("--source-sidecar", required=True, help="crop or convert sidecar of the case")
    parser.add_argument("--source", choices=["crop", "volume"], default="crop")
    parser.add_argument("--sidecar", required=True, help="slices sidecar JSON (written last)")
    parser.add_argument("--index", required=True, help="per-case slice index TSV")
    parser.add_argument("--out-dir", required=True, help="the case's own folder of .npz/.jpg files (emptied first)")
    parser.add_argument("--window-level", type=float, default=40.0, help="HU")
    parser.add_argument("--window-width", type=float, default=400.0, help="HU")
    parser.add_argument("--structure", default="", help="the structure whose voxels make a slice positive (none: no positive slice)")
    parser.add_argument("--jpg", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compress", action=argparse.BooleanOptionalAction, default=False,
                        help="np.savez_compressed (10x smaller, 9x slower to write)")
    parser.add_argument("--log", default=None)
    args = parser.parse_args(argv)
    setup_logging(args.log)
    sidecar = export_slices(
        args.case, args.source_sidecar, args.sidecar, args.index, args.out_dir, source=args.source,
        window_level=args.window_level, window_width=args.window_width, structure=args.structure,
        jpg=args.jpg, overlay=args.overlay, compress=args.compress,
    )
    if sidecar["status"] == "ok":
        log.info("case %s: %d slices (%d positive for %s)", args.case, sidecar["n_slices"],
                 sidecar["n_positive"], args.structure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
