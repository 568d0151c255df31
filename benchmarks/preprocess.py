"""Preprocessing throughput and peak memory: hnct's convert, crop and slices against the decode
floor and against a naive reference, on the same generated CT series in the same run.

Cohort: realistic-size CT series written here with pydicom (512 x 512 in-plane, 0.5-1 mm pixels,
100-300 axial slices, int16 with RescaleIntercept -1024, a noisy body so compressed files cost
what they cost on real scans) plus an RTSTRUCT with a larynx-sized structure ("Larynx", about
36 x 28 x 45 mm) so the crop has a box, and the same structure as a label NRRD
(``labels/<case>/Larynx.nrrd``, the ``convert.labels: nrrd`` layout).

Per case, each stage runs in its own child process (this script with ``--worker``), so its peak
memory (``VmHWM``, read in that child) is its own; its time is measured inside
the child around the work only (imports and interpreter start excluded, reported separately):

* ``floor_pydicom``: ``pydicom.dcmread`` + ``pixel_array`` of every slice (the bytes must be read
  and decoded: nothing can be faster); ``floor_sitk``: SimpleITK's series reader on the folder;
* ``convert``: ``hnct.convert`` (DICOM -> int16 NRRD volume + label map + sidecar);
* ``crop``: ``hnct.crop`` (``method: mask``, Larynx + 8 mm, 1 mm, linear);
* ``slices``: ``hnct.slices`` from the crop (window 40/400, npz + jpg + overlay);
* ``naive_crop``: the seed's way (LaryngealCT ``dataprep.py``): resample the WHOLE volume (and
  label map) to 1 mm with SimpleITK, then cut the same box out of it, write NRRDs;
* ``naive_slices``: slices one at a time, each re-reading the crop and label NRRDs, windowing in
  floating point and writing ``np.savez_compressed`` + a JPG.

Ratios printed: hnct (convert + crop) / floor, naive / hnct for the crop stage and the slice
stage, and the peak memory of every stage for the largest case. Run:

    .venv/bin/python benchmarks/preprocess.py                 # 3 cases, incl. 512 x 512 x 300
    .venv/bin/python benchmarks/preprocess.py --cases 6 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402

STAGES = ("floor_pydicom", "floor_sitk", "convert", "crop", "slices", "naive_crop", "naive_slices",
          "slices_volume", "naive_slices_volume")
# Whole-volume slice export (slices.source: volume) is measured on the first case(s) only: the
# naive reference re-reads the whole scan for every slice (~20 s for 512 x 512 x 120).
VOLUME_SLICE_STAGES = ("slices_volume", "naive_slices_volume")
# The three default cases: a LUNG1-like 3 mm scan, a 1.5 mm scan, and the 512 x 512 x 300 case
# the memory target is about.
DEFAULT_SPECS = (
    {"n_slices": 120, "pixel_mm": 0.977, "slice_mm": 3.0},
    {"n_slices": 200, "pixel_mm": 0.703, "slice_mm": 1.5},
    {"n_slices": 300, "pixel_mm": 0.5, "slice_mm": 1.0},
)
ROWS = COLS = 512
WINDOW_LEVEL, WINDOW_WIDTH = 40.0, 400.0
MARGIN_MM = 8.0
SPACING_MM = 1.0
PEAK_TARGET_MB = 2048.0


# --------------------------------------------------------------------------- the generated cohort


def case_specs(n_cases: int, seed: int) -> list[dict[str, Any]]:
    """The default three, then random sizes in the issue's range (100-300 slices, 0.5-1 mm pixels)."""
    import numpy as np

    specs = [dict(s) for s in DEFAULT_SPECS[:n_cases]]
    rng = np.random.default_rng(seed)
    while len(specs) < n_cases:
        n_slices = int(rng.integers(100, 301))
        specs.append({
            "n_slices": n_slices,
            "pixel_mm": round(float(rng.uniform(0.5, 1.0)), 3),
            # Slice spacing such that the scan covers 150-360 mm of the neck and head.
            "slice_mm": float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0][: 6 if n_slices < 120 else 4])),
        })
    for n, spec in enumerate(specs):
        spec["case"] = f"BENCH-{n + 1:03d}"
    return specs


def _phantom_slice(x_mm, y_mm, z_mm: float, larynx: dict[str, float], rng):
    """HU and larynx mask of one axial slice (LPS: +x patient left, +y posterior)."""
    import numpy as np

    hu = np.full(x_mm.shape, -1000.0)
    neck = (x_mm / 115.0) ** 2 + ((y_mm - 10.0) / 95.0) ** 2 <= 1.0
    hu[neck] = 40.0
    fat = neck & ((x_mm / 115.0) ** 2 + ((y_mm - 10.0) / 95.0) ** 2 > 0.8)
    hu[fat] = -90.0
    spine = ((x_mm) ** 2 + (y_mm - 45.0) ** 2) <= 16.0**2
    hu[spine] = 700.0
    in_z = abs(z_mm - larynx["z"]) <= larynx["rz"]
    dx = (x_mm - larynx["x"]) / larynx["rx"]
    dy = (y_mm - larynx["y"]) / larynx["ry"]
    mask = np.zeros(x_mm.shape, dtype=np.uint8)
    if in_z:
        # Taper the ellipse towards its ends so the structure is a 3D ellipsoid-like body.
        scale = math.sqrt(max(1.0 - ((z_mm - larynx["z"]) / (larynx["rz"] * 1.15)) ** 2, 0.05))
        inside = dx**2 + dy**2 <= scale**2
        mask[inside] = 1
        hu[inside] = 150.0  # cartilage
        hu[dx**2 + dy**2 <= (0.55 * scale) ** 2] = -1000.0  # airway
    hu += rng.normal(0.0, 18.0, size=hu.shape) * (hu > -900)  # tissue noise, clean air
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), mask


def write_case(root: Path, spec: dict[str, Any], seed: int) -> dict[str, Any]:
    """Write one CT series + RTSTRUCT (NBIA Data Retriever layout) and the label NRRD.

    Returns where the files are and the larynx geometry (LPS mm).
    """
    import numpy as np
    import SimpleITK as sitk
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    case, n_slices = spec["case"], spec["n_slices"]
    pixel_mm, slice_mm = float(spec["pixel_mm"]), float(spec["slice_mm"])
    rng = np.random.default_rng([seed, n_slices])
    study_uid = generate_uid(entropy_srcs=[case, "study", str(seed)])
    series_uid = generate_uid(entropy_srcs=[case, "ct", str(seed)])
    rt_series_uid = generate_uid(entropy_srcs=[case, "rt", str(seed)])
    for_uid = generate_uid(entropy_srcs=[case, "for", str(seed)])
    ct_dir = root / "dicom" / "BENCH" / case / "01-01-2000-NA-CT-00001" / "2.000000-CT-00001"
    rt_dir = root / "dicom" / "BENCH" / case / "01-01-2000-NA-CT-00001" / "3.000000-RTSTRUCT-00001"
    ct_dir.mkdir(parents=True, exist_ok=True)
    rt_dir.mkdir(parents=True, exist_ok=True)

    origin_x = -(COLS - 1) / 2.0 * pixel_mm
    origin_y = -(ROWS - 1) / 2.0 * pixel_mm
    z0 = -n_slices * slice_mm / 2.0
    x_mm = origin_x + pixel_mm * np.arange(COLS)[None, :]
    y_mm = origin_y + pixel_mm * np.arange(ROWS)[:, None]
    x_mm, y_mm = np.broadcast_to(x_mm, (ROWS, COLS)), np.broadcast_to(y_mm, (ROWS, COLS))
    # Larynx: anterior (-y in LPS) of the spine, 45 mm tall, in the upper-middle of the scan.
    z_span = n_slices * slice_mm
    larynx = {"x": 0.0, "y": -35.0, "z": z0 + 0.55 * z_span, "rx": 18.0, "ry": 14.0, "rz": 22.5}

    label = np.zeros((n_slices, ROWS, COLS), dtype=np.uint8)
    sop_uids = []
    for k in range(n_slices):
        z = z0 + k * slice_mm
        hu, mask = _phantom_slice(x_mm, y_mm, z, larynx, rng)
        label[k] = mask
        sop_uid = generate_uid(entropy_srcs=[case, "ct", str(seed), str(k)])
        sop_uids.append(sop_uid)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = sop_uid
        ds.Modality = "CT"
        ds.PatientID = case
        ds.PatientName = case
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.StudyDate = ds.SeriesDate = "20000101"
        ds.SeriesNumber = 2
        ds.InstanceNumber = k + 1
        ds.Manufacturer = "hnct-benchmark"
        ds.ConvolutionKernel = "STANDARD"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [round(origin_x, 4), round(origin_y, 4), round(z, 4)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = round(z, 4)
        ds.SliceThickness = slice_mm
        ds.PixelSpacing = [pixel_mm, pixel_mm]
        ds.Rows, ds.Columns = ROWS, COLS
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.PixelData = (hu.astype(np.int32) + 1024).astype(np.int16).tobytes()
        ds.save_as(ct_dir / f"1-{k + 1:03d}.dcm", enforce_file_format=True)

    # RTSTRUCT: one closed planar contour per slice that holds the larynx (its in-plane ellipse).
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[case, "rtsop", str(seed)])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    rt = Dataset()
    rt.file_meta = meta
    rt.SOPClassUID = meta.MediaStorageSOPClassUID
    rt.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    rt.Modality = "RTSTRUCT"
    rt.PatientID = rt.PatientName = case
    rt.StudyInstanceUID = study_uid
    rt.SeriesInstanceUID = rt_series_uid
    rt.SeriesNumber = 3
    rt.StructureSetLabel = "BENCH"
    rt.StructureSetDate = "20000101"
    contour_images = Sequence()
    for sop_uid in sop_uids:
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        item.ReferencedSOPInstanceUID = sop_uid
        contour_images.append(item)
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = series_uid
    series_ref.ContourImageSequence = contour_images
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    study_ref.ReferencedSOPInstanceUID = study_uid
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = for_uid
    frame_ref.RTReferencedStudySequence = Sequence([study_ref])
    rt.ReferencedFrameOfReferenceSequence = Sequence([frame_ref])
    roi = Dataset()
    roi.ROINumber = 1
    roi.ReferencedFrameOfReferenceUID = for_uid
    roi.ROIName = "Larynx"
    roi.ROIGenerationAlgorithm = "MANUAL"
    rt.StructureSetROISequence = Sequence([roi])
    contours = Sequence()
    angles = np.linspace(0.0, 2 * np.pi, 64, endpoint=False)
    for k in range(n_slices):
        z = z0 + k * slice_mm
        if abs(z - larynx["z"]) > larynx["rz"]:
            continue
        scale = math.sqrt(max(1.0 - ((z - larynx["z"]) / (larynx["rz"] * 1.15)) ** 2, 0.05))
        xs = larynx["x"] + larynx["rx"] * scale * np.cos(angles)
        ys = larynx["y"] + larynx["ry"] * scale * np.sin(angles)
        contour = Dataset()
        image_ref = Dataset()
        image_ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        image_ref.ReferencedSOPInstanceUID = sop_uids[k]
        contour.ContourImageSequence = Sequence([image_ref])
        contour.ContourGeometricType = "CLOSED_PLANAR"
        contour.NumberOfContourPoints = len(angles)
        contour.ContourData = [round(float(v), 3) for p in zip(xs, ys, [z] * len(xs)) for v in p]
        contours.append(contour)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = [255, 0, 0]
    roi_contour.ContourSequence = contours
    rt.ROIContourSequence = Sequence([roi_contour])
    observation = Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = 1
    observation.RTROIInterpretedType = "ORGAN"
    observation.ROIInterpreter = ""
    rt.RTROIObservationsSequence = Sequence([observation])
    rt.save_as(rt_dir / "1-1.dcm", enforce_file_format=True)

    # The same structure as a label NRRD on the CT grid (convert.labels: nrrd layout).
    label_image = sitk.GetImageFromArray(label)
    label_image.SetSpacing((pixel_mm, pixel_mm, slice_mm))
    label_image.SetOrigin((origin_x, origin_y, z0))
    mask_path = root / "labels" / case / "Larynx.nrrd"
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(label_image, str(mask_path), useCompression=True)
    return {
        **spec,
        "ct_dir": str(ct_dir.relative_to(root)),
        "rtstruct": str((rt_dir / "1-1.dcm").relative_to(root)),
        "case_dir": str(ct_dir.parent.parent.relative_to(root)),
        "mask": str(mask_path.relative_to(root)),
        "rows": ROWS,
        "cols": COLS,
        "larynx_lps_mm": larynx,
        "dicom_mb": round(sum(p.stat().st_size for p in ct_dir.iterdir()) / 1024**2, 1),
    }


# --------------------------------------------------------------------------- stage workers


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm")


def stage_floor_pydicom(args: dict[str, Any]) -> dict[str, Any]:
    import pydicom

    files = _files(Path(args["ct_dir"]))
    start = time.perf_counter()
    total = 0
    for path in files:
        ds = pydicom.dcmread(path)
        total += int(ds.pixel_array.size)
    return {"seconds": time.perf_counter() - start, "voxels": total}


def stage_floor_sitk(args: dict[str, Any]) -> dict[str, Any]:
    import SimpleITK as sitk

    start = time.perf_counter()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(args["ct_dir"])))
    image = reader.Execute()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "pixel_type": image.GetPixelIDTypeAsString(), "size": list(image.GetSize())}


def convert_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("hnct.convert") is not None


def convert_argv(args: dict[str, Any]) -> list[str]:
    """The command line the convert rule runs (see workflow/rules/convert.smk)."""
    labels = args.get("labels", "rtstruct")
    # the mask folder only as the label source itself: beside an RTSTRUCT it is a second source, and a
    # structure in both is bad input
    masks = ["--mask-dir", "labels"] if labels == "nrrd" else []
    return [
        "--case", args["case"], "--dicom-dir", args["case_dir"],
        "--volume", f"results/volumes/{args['case']}.nrrd",
        "--label", f"results/labels/{args['case']}.nrrd",
        "--sidecar", f"results/volumes/{args['case']}.json",
        "--labels", labels, *masks,
        "--structures", "Larynx", "GTVp", "GTVn",
    ]


def stage_convert(args: dict[str, Any]) -> dict[str, Any]:
    import hnct.convert

    start = time.perf_counter()
    rc = hnct.convert.main(convert_argv(args))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rc": rc, "sidecar": _sidecar_status(f"results/volumes/{args['case']}.json")}


def _sidecar_status(path: str) -> dict[str, Any]:
    sidecar = json.loads(Path(path).read_text())
    return {k: sidecar.get(k) for k in ("status", "reason", "file", "size", "spacing") if k in sidecar}


def stage_crop(args: dict[str, Any]) -> dict[str, Any]:
    import hnct.crop

    case = args["case"]
    start = time.perf_counter()
    rc = hnct.crop.main([
        "--case", case, "--source-sidecar", f"results/volumes/{case}.json",
        "--out-volume", f"results/crops/{case}.nrrd", "--out-label", f"results/crops/{case}_label.nrrd",
        "--sidecar", f"results/crops/{case}.json", "--method", "mask", "--structures", "Larynx",
        "--margin-mm", str(MARGIN_MM), "--spacing-mm", str(SPACING_MM), "--interpolation", "linear",
    ])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rc": rc, "sidecar": _sidecar_status(f"results/crops/{case}.json")}


def _slices_paths(case: str, source: str) -> dict[str, str]:
    tag = "" if source == "crop" else "_volume"
    return {"sidecar": f"results/slices{tag}/{case}.json", "index": f"results/slices{tag}/{case}.tsv",
            "out_dir": f"results/slices{tag}/{case}",
            "source_sidecar": f"results/{'crops' if source == 'crop' else 'volumes'}/{case}.json"}


def stage_slices(args: dict[str, Any], source: str = "crop") -> dict[str, Any]:
    import hnct.slices

    case = args["case"]
    paths = _slices_paths(case, source)
    start = time.perf_counter()
    rc = hnct.slices.main([
        "--case", case, "--source-sidecar", paths["source_sidecar"], "--source", source,
        "--sidecar", paths["sidecar"], "--index", paths["index"],
        "--out-dir", paths["out_dir"], "--window-level", str(WINDOW_LEVEL),
        "--window-width", str(WINDOW_WIDTH), "--structure", "Larynx", "--jpg", "--overlay", "--no-compress",
    ])
    seconds = time.perf_counter() - start
    sidecar = json.loads(Path(paths["sidecar"]).read_text())
    return {"seconds": seconds, "rc": rc, "n_slices": sidecar.get("n_slices"), "status": sidecar.get("status"),
            "slice_shape": sidecar.get("slice_shape")}


def stage_naive_crop(args: dict[str, Any]) -> dict[str, Any]:
    """The seed's crop: resample the whole volume and label map to 1 mm, then cut the box out.

    Reads the same convert outputs and cuts the same LPS box (hnct's crop sidecar) as hnct.crop;
    the whole-volume 1 mm grid keeps the scan's origin, so the box lands within 0.5 mm of hnct's.
    """
    import numpy as np
    import SimpleITK as sitk

    case = args["case"]
    upstream = json.loads(Path(f"results/volumes/{case}.json").read_text())
    box = json.loads(Path(f"results/crops/{case}.json").read_text())["crop_box_lps"]
    start = time.perf_counter()
    volume = sitk.ReadImage(upstream["volume"])
    label = sitk.ReadImage(upstream["label"])
    spacing = np.asarray(volume.GetSpacing())
    size = np.asarray(volume.GetSize())
    new_size = [int(v) for v in np.round(size * spacing / SPACING_MM)]

    def whole(image, interpolator, default, pixel):
        return sitk.Resample(image, new_size, sitk.Transform(), interpolator, image.GetOrigin(),
                             [SPACING_MM] * 3, image.GetDirection(), default, pixel)

    volume_1mm = whole(volume, sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    label_1mm = whole(label, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt8)
    first = volume_1mm.TransformPhysicalPointToIndex([float(v) for v in box["min"]])
    last = volume_1mm.TransformPhysicalPointToIndex([float(v) for v in box["max"]])
    lo = [max(0, min(a, b)) for a, b in zip(first, last)]
    hi = [min(s - 1, max(a, b)) for a, b, s in zip(first, last, new_size)]
    extent = [h - l + 1 for l, h in zip(lo, hi)]
    crop = sitk.Cast(sitk.RegionOfInterest(volume_1mm, extent, lo), sitk.sitkInt16)
    crop_label = sitk.RegionOfInterest(label_1mm, extent, lo)
    out = Path("naive/crops")
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(crop, str(out / f"{case}.nrrd"), useCompression=False)
    sitk.WriteImage(crop_label, str(out / f"{case}_label.nrrd"), useCompression=False)
    return {"seconds": time.perf_counter() - start, "size": extent, "whole_1mm_size": new_size}


def stage_naive_slices(args: dict[str, Any], source: str = "crop") -> dict[str, Any]:
    """The seed's slices: one at a time, each re-reading the image, windowing in float, compressed NPZ + JPG."""
    import numpy as np
    import SimpleITK as sitk
    from PIL import Image

    case = args["case"]
    upstream = json.loads(Path(_slices_paths(case, source)["source_sidecar"]).read_text())
    out = Path("naive/slices" if source == "crop" else "naive/slices_volume") / case
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    n_slices = sitk.ReadImage(upstream["volume"]).GetSize()[2]
    low, high = WINDOW_LEVEL - WINDOW_WIDTH / 2, WINDOW_LEVEL + WINDOW_WIDTH / 2
    for k in range(n_slices):
        image = sitk.ReadImage(upstream["volume"])
        mask = sitk.GetArrayFromImage(sitk.ReadImage(upstream["label"]))[k]
        hu = sitk.GetArrayFromImage(image)[k].astype(np.float64)
        clipped = np.clip(hu, low, high)
        grey = ((clipped - low) / WINDOW_WIDTH * 255.0).round().astype(np.uint8)
        np.savez_compressed(out / f"{case}_{k:04d}.npz", image=clipped.astype(np.int16), mask=mask,
                            spacing=np.asarray(image.GetSpacing()[:2]), slice_index=k)
        Image.fromarray(grey).save(out / f"{case}_{k:04d}.jpg", quality=95)
    return {"seconds": time.perf_counter() - start, "n_slices": n_slices}


def stage_imports(args: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of a child that only imports what the stages import (the baseline)."""
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import pydicom  # noqa: F401
    import SimpleITK  # noqa: F401
    from PIL import Image  # noqa: F401

    import hnct.crop  # noqa: F401
    import hnct.slices  # noqa: F401

    return {"seconds": 0.0}


WORKERS = {
    "imports": stage_imports,
    "floor_pydicom": stage_floor_pydicom,
    "floor_sitk": stage_floor_sitk,
    "convert": stage_convert,
    "crop": stage_crop,
    "slices": stage_slices,
    "naive_crop": stage_naive_crop,
    "naive_slices": stage_naive_slices,
    "slices_volume": lambda args: stage_slices(args, source="volume"),
    "naive_slices_volume": lambda args: stage_naive_slices(args, source="volume"),
}


def peak_rss_mb_self() -> float:
    """This process's peak resident memory since its exec (``VmHWM``), MB.

    Not ``ru_maxrss``: Linux carries the forking parent's high-water mark over ``exec``
    into the child's ``ru_maxrss``, so the benchmark's own memory would leak into every stage.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return benchutil.self_peak_rss_mb()


def worker_main(stage: str, payload: str) -> int:
    args = json.loads(payload)
    result = WORKERS[stage](args)
    result["peak_rss_mb"] = peak_rss_mb_self()
    print("BENCH " + json.dumps(result, default=str), flush=True)
    return 0


# --------------------------------------------------------------------------- the run


def run_stage(stage: str, args: dict[str, Any], workdir: Path, timeout: float) -> dict[str, Any]:
    """Run one stage in a fresh child; its work time and peak memory (VmHWM) come back on stdout."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", stage, json.dumps(args)]
    measured = benchutil.run_measured(cmd, timeout=timeout, cwd=workdir)
    result = {"wall_s": measured["wall_s"], "peak_rss_mb": float("nan"),
              "cpu_s": measured["user_s"] + measured["sys_s"], "returncode": measured["returncode"]}
    for line in measured["stdout"].splitlines():
        if line.startswith("BENCH "):
            result.update(json.loads(line[len("BENCH "):]))
    if measured["returncode"] != 0 or "seconds" not in result:
        result["error"] = (measured["stderr"] or measured["stdout"])[-2000:]
    return result


def make_convert_stand_in(workdir: Path, case: dict[str, Any]) -> dict[str, Any]:
    """While hnct.convert does not exist: the convert outputs crop reads, written here.

    SimpleITK series read cast to int16, the generated label NRRD, a sidecar in the contract's
    format. Marked ``convert_stand_in`` in the results: convert itself is then not measured.
    """
    import SimpleITK as sitk

    sys.path.insert(0, str(benchutil.REPO / "workflow"))
    from hnct.common import ok_sidecar, write_json

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(workdir / case["ct_dir"])))
    volume = sitk.Cast(reader.Execute(), sitk.sitkInt16)
    label = sitk.ReadImage(str(workdir / case["mask"]))
    name = case["case"]
    (workdir / "results/volumes").mkdir(parents=True, exist_ok=True)
    (workdir / "results/labels").mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(volume, str(workdir / f"results/volumes/{name}.nrrd"), useCompression=False)
    sitk.WriteImage(sitk.Cast(label, sitk.sitkUInt8), str(workdir / f"results/labels/{name}.nrrd"), useCompression=False)
    write_json(workdir / f"results/volumes/{name}.json", ok_sidecar(
        name, "convert", volume=f"results/volumes/{name}.nrrd", label=f"results/labels/{name}.nrrd",
        labels={"1": "Larynx"}, structures_present=["Larynx"], convert_stand_in=True,
    ))
    return {"convert_stand_in": True}


def summarise(cases: list[dict[str, Any]]) -> dict[str, Any]:
    def total(stage: str) -> float:
        values = [c["stages"].get(stage, {}).get("seconds") for c in cases]
        return float("nan") if any(v is None for v in values) else float(sum(values))

    floor = total("floor_pydicom")
    hnct_convert_crop = total("convert") + total("crop")
    ratios = {
        "convert_plus_crop_over_floor_pydicom": hnct_convert_crop / floor,
        "convert_plus_crop_over_floor_sitk": hnct_convert_crop / total("floor_sitk"),
        "naive_crop_over_hnct_crop": total("naive_crop") / total("crop"),
        "naive_slices_over_hnct_slices": total("naive_slices") / total("slices"),
    }
    measured = [c for c in cases if "slices_volume" in c["stages"] and "naive_slices_volume" in c["stages"]]
    if measured:
        ratios["naive_slices_over_hnct_slices_whole_volume"] = (
            sum(c["stages"]["naive_slices_volume"]["seconds"] for c in measured)
            / sum(c["stages"]["slices_volume"]["seconds"] for c in measured))
    per_case = {c["case"]: {
        "convert_plus_crop_over_floor_pydicom": (c["stages"].get("convert", {}).get("seconds", math.nan)
                                                + c["stages"].get("crop", {}).get("seconds", math.nan))
        / c["stages"]["floor_pydicom"]["seconds"],
        "naive_crop_over_hnct_crop": c["stages"].get("naive_crop", {}).get("seconds", math.nan)
        / c["stages"].get("crop", {}).get("seconds", math.nan),
        "naive_slices_over_hnct_slices": c["stages"].get("naive_slices", {}).get("seconds", math.nan)
        / c["stages"].get("slices", {}).get("seconds", math.nan),
    } for c in cases}
    largest = max(cases, key=lambda c: c["n_slices"])
    hnct_stages = ("convert", "crop", "slices")
    peak = {s: largest["stages"].get(s, {}).get("peak_rss_mb") for s in STAGES}
    peak_hnct = max((v for s, v in peak.items() if s in hnct_stages and v is not None), default=math.nan)
    targets = {
        "convert_plus_crop_le_1.5x_floor": {
            "target": 1.5, "value": ratios["convert_plus_crop_over_floor_pydicom"],
            "met": bool(ratios["convert_plus_crop_over_floor_pydicom"] <= 1.5)},
        "naive_over_hnct_crop_ge_5": {
            "target": 5.0, "value": ratios["naive_crop_over_hnct_crop"],
            "met": bool(ratios["naive_crop_over_hnct_crop"] >= 5.0)},
        "naive_over_hnct_slices_ge_5": {
            "target": 5.0, "value": ratios["naive_slices_over_hnct_slices"],
            "met": bool(ratios["naive_slices_over_hnct_slices"] >= 5.0)},
        **({"naive_over_hnct_slices_whole_volume_ge_5": {
            "target": 5.0, "value": ratios["naive_slices_over_hnct_slices_whole_volume"],
            "met": bool(ratios["naive_slices_over_hnct_slices_whole_volume"] >= 5.0)}}
           if "naive_slices_over_hnct_slices_whole_volume" in ratios else {}),
        "peak_mb_lt_2048_largest_case": {
            "target": PEAK_TARGET_MB, "value": peak_hnct, "case": largest["case"],
            "shape": [largest["rows"], largest["cols"], largest["n_slices"]], "met": bool(peak_hnct < PEAK_TARGET_MB)},
    }
    if any(c.get("convert_stand_in") for c in cases):
        targets["convert_plus_crop_le_1.5x_floor"]["met"] = None
        targets["convert_plus_crop_le_1.5x_floor"]["note"] = "hnct.convert missing: not measured"
    return {"ratios": ratios, "per_case_ratios": per_case, "peak_rss_mb_largest_case": peak,
            "targets": targets}


def print_report(result: dict[str, Any]) -> None:
    rows = []
    for case in result["cases"]:
        for stage in STAGES:
            s = case["stages"].get(stage)
            if not s:
                continue
            rows.append({"case": case["case"], "shape": f"{case['rows']}x{case['cols']}x{case['n_slices']}",
                         "px": case["pixel_mm"], "dz": case["slice_mm"], "stage": stage,
                         "seconds": s.get("seconds"), "wall": s.get("wall_s"),
                         "peak": s.get("peak_rss_mb"), "note": s.get("error", "").splitlines()[-1][:60]
                         if s.get("error") else ""})
    print(benchutil.format_table(rows, [
        ("case", "case", ""), ("shape", "shape", ""), ("px", "px mm", ".3f"), ("dz", "dz mm", ".2f"),
        ("stage", "stage", ""), ("seconds", "work s", ".3f"), ("wall", "child wall s", ".2f"),
        ("peak", "peak MB", ".0f"), ("note", "note", "")]))
    print(f"\nbaseline child (imports only): {result['baseline_peak_rss_mb']:.0f} MB peak")
    print("\nratios (sums over the cases; work time inside each child):")
    for key, value in result["summary"]["ratios"].items():
        print(f"  {key:<40} {value:8.2f}")
    print("\ntargets:")
    for key, t in result["summary"]["targets"].items():
        met = {True: "MET", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"  {key:<34} value {t['value']:9.2f}  target {t['target']:g}  {met}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=3, help="number of generated cases (default 3)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per stage; the fastest is kept")
    parser.add_argument("--workdir", default=None, help="where the cohort and outputs go (default: a temp dir, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    parser.add_argument("--seed", type=int, default=20260101)
    parser.add_argument("--labels", choices=["rtstruct", "nrrd"], default="rtstruct",
                        help="what convert reads the larynx from")
    parser.add_argument("--small", action="store_true",
                        help="tiny cases (64 x 64, 20-40 slices) for the smoke test; the numbers mean nothing")
    parser.add_argument("--stages", nargs="*", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--volume-slice-cases", type=int, default=1,
                        help="cases (the first N) on which whole-volume slice export is also measured")
    parser.add_argument("--timeout", type=float, default=600.0, help="per child, seconds")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/preprocess.json)")
    parser.add_argument("--worker", nargs=2, metavar=("STAGE", "ARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)

    global ROWS, COLS
    info = benchutil.machine_info()
    specs = case_specs(args.cases, args.seed)
    if args.small:
        ROWS = COLS = 64
        for n, spec in enumerate(specs):
            spec.update(n_slices=[40, 30, 50][n % 3], pixel_mm=4.0, slice_mm=2.5)
    temp = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hnct-bench-preprocess-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    has_convert = convert_available_in_child()
    print(f"workdir {workdir}; {len(specs)} case(s); hnct.convert {'found' if has_convert else 'MISSING (stand-in)'}",
          flush=True)
    try:
        baseline = run_stage("imports", {}, workdir, args.timeout)
        cases = []
        for spec in specs:
            t0 = time.perf_counter()
            case = write_case(workdir, spec, args.seed)
            case["generate_s"] = round(time.perf_counter() - t0, 2)
            case["labels"] = args.labels
            stage_args = {**case, "ct_dir": str(workdir / case["ct_dir"]), "case_dir": str(workdir / case["case_dir"])}
            print(f"{case['case']}: {ROWS}x{COLS}x{case['n_slices']} written in {case['generate_s']} s "
                  f"({case['dicom_mb']} MB)", flush=True)
            case["stages"] = {}
            for stage in STAGES:
                if stage not in args.stages:
                    continue
                if stage in VOLUME_SLICE_STAGES and len(cases) >= args.volume_slice_cases:
                    continue
                if stage == "convert" and not has_convert:
                    case.update(make_convert_stand_in(workdir, case))
                    continue
                best = None
                for _ in range(max(1, args.repeat)):
                    result = run_stage(stage, stage_args, workdir, args.timeout)
                    if "error" in result:
                        best = result
                        break
                    if best is None or result["seconds"] < best["seconds"]:
                        best = {**result, "peak_rss_mb": max(result["peak_rss_mb"], (best or result)["peak_rss_mb"])}
                case["stages"][stage] = best
                print(f"  {case['case']} {stage:<14} {best.get('seconds', float('nan')):8.3f} s  "
                      f"{best['peak_rss_mb']:6.0f} MB{'  ERROR' if 'error' in best else ''}", flush=True)
            cases.append(case)
        result = {
            "benchmark": "preprocess",
            "machine": benchutil.finish_info(info),
            "settings": {"repeat": args.repeat, "labels": args.labels, "small": args.small,
                         "window": [WINDOW_LEVEL, WINDOW_WIDTH], "margin_mm": MARGIN_MM, "spacing_mm": SPACING_MM,
                         "threads_per_child": 1, "timing": "work time inside each child (imports excluded); "
                         "fastest of --repeat runs; peak = max ru_maxrss of the child over the runs",
                         "cache": "warm: the series were written just before (page cache)"},
            "baseline_peak_rss_mb": baseline["peak_rss_mb"],
            "cases": cases,
        }
        result["summary"] = summarise(cases)
        print()
        print_report(result)
        path = benchutil.write_result("preprocess", result, args.out)
        print(f"\nwrote {path}")
        return 0 if all("error" not in s for c in cases for s in c["stages"].values()) else 1
    finally:
        if temp and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def convert_available_in_child() -> bool:
    sys.path.insert(0, str(benchutil.REPO / "workflow"))
    return convert_available()


if __name__ == "__main__":
    sys.exit(main())
