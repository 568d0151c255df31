"""DICOM SEG -> label map on the CT grid that convert wrote (highdicom), a label source of convert.

:func:`seg_label_map` reads every SEG under the case folder with highdicom and keeps those that
refer to the chosen CT: the SEG's ReferencedSeriesSequence names the CT series, or one of its
frames' source images (DerivationImageSequence) is an instance of it, or (neither given) its
FrameOfReferenceUID is the CT's. SEGs that refer elsewhere are ignored (listed in the report) as
long as one refers to the CT; among those the one whose segments match the most ``structures``
wins, then the smallest file path.

Segment labels (SegmentLabel) match structures by :func:`hnct.structures.harmonise`, the rule
RTSTRUCT ROI names follow (exact, then case-insensitive, then ignoring punctuation and spaces, then
the ``structure_names`` patterns; a label matching two structures excludes the case; labels
matching none are listed in ``unmatched_rois``); segments carrying the matched label are combined. Each matched segment is read as a volume
(highdicom ``get_volume``: frames placed by their PlanePositionSequence, in any order, frames
left out by the writer are empty) and made binary: a BINARY segment as stored; a FRACTIONAL one
(probability or occupancy) is inside where its value is at least 0.5 of MaximumFractionalValue.
The segment then goes onto the CT grid:

* frames on the CT's voxel grid (same orientation and pixel spacing, positions on CT voxels; a
  SEG written over the CT always is): placed voxel for voxel (highdicom ``match_geometry``: axes
  permuted, padded, cropped, never interpolated); voxels on planes outside the CT volume are
  counted in the report (``voxels_outside_ct``);
* otherwise (another grid of the same frame of reference): the fractional value is resampled
  linearly onto the CT grid (SimpleITK) and thresholded at 0.5 as above; the report lists the
  segment under ``resampled``. A segment that then has no voxel on the CT excludes the case.

Each structure is one binary channel (C, z, y, x), so overlapping segments stay apart; the label
map convert paints of them puts the later structure over the earlier (as for RTSTRUCT). Unreadable SEGs, SEGs whose frames do not form a
regular volume and SEGs that do not refer to the CT raise :class:`~hnct.common.InputError`
naming case, file and reason (the case's sidecar says excluded).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import SimpleITK as sitk

from hnct.common import InputError
from hnct.dicomio import as_series_index, choose_label_object, match_structures, no_label_object
from hnct.structures import harmonise, raise_if_ambiguous

log = logging.getLogger("hnct.seg")

# Fractional segments: inside where value >= FRACTION_INSIDE * MaximumFractionalValue.
FRACTION_INSIDE = 0.5


def pick_label_source(index: pd.DataFrame) -> str:
    """``convert.labels: auto``: ``rtstruct`` when the case folder holds an RTSTRUCT, else ``seg`` when
    it holds a SEG, else ``rtstruct`` (no contours: an empty label map, as for a case without any)."""
    modalities = {row["modality"] for row in as_series_index(index)}
    return "seg" if "SEG" in modalities and "RTSTRUCT" not in modalities else "rtstruct"


def _references(seg: hd.seg.Segmentation) -> tuple[set[str], set[str]]:
    """(series UIDs the SEG names, SOP instance UIDs its frames were derived from)."""
    series = {str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])
              if s.get("SeriesInstanceUID")}
    sources: set[str] = set()
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in frame.get("DerivationImageSequence", []):
            sources.update(str(s.ReferencedSOPInstanceUID) for s in derivation.get("SourceImageSequence", []))
    return series, sources


def check_seg_reference(case: str, file: str, seg: hd.seg.Segmentation, series: pd.Series,
                        sop_uids: Sequence[str]) -> dict[str, Any]:
    """Raise InputError unless the SEG refers to the chosen CT series; returns how it matched."""
    uid = series["series_uid"]
    ref_series, sources = _references(seg)
    in_ct = sources & set(sop_uids)
    note = {"n_source_instances": len(sources), "n_source_instances_in_ct": len(in_ct)}
    if uid in ref_series:
        return {"by": "ReferencedSeriesSequence", **note}
    if in_ct:
        return {"by": "per-frame source images", **note}
    frame = str(seg.get("FrameOfReferenceUID", "") or "")
    if not ref_series and not sources and frame and frame == series["frame_of_reference_uid"]:
        return {"by": "FrameOfReferenceUID", **note}
    raise InputError(case, file, f"SEG {file} refers to series {sorted(ref_series) or '(none)'} "
                     f"({len(sources)} source instances, none in series {uid}; FrameOfReferenceUID "
                     f"{frame or '(none)'}), not to CT series {uid}")


def ct_volume_geometry(reference: sitk.Image) -> hd.VolumeGeometry:
    """The CT grid as a highdicom geometry, indices in SimpleITK's (x, y, z) order (as
    ``Volume.from_simpleitk`` has them), without copying the CT's voxels."""
    affine = np.eye(4)
    affine[:3, :3] = np.array(reference.GetDirection()).reshape(3, 3) * np.array(reference.GetSpacing())
    affine[:3, 3] = reference.GetOrigin()
    return hd.VolumeGeometry(affine, reference.GetSize(), "PATIENT")


def _segment_on_grid(case: str, file: str, seg: hd.seg.Segmentation, numbers: Sequence[int],
                     reference: sitk.Image, ct_geometry: hd.VolumeGeometry) -> tuple[np.ndarray, dict[str, Any]]:
    """Boolean (z, y, x) mask of the union of ``numbers`` on the reference grid, and how it got there."""
    try:
        volume = seg.get_volume(segment_numbers=list(numbers), combine_segments=False, rescale_fractional=True,
                                dtype=np.float32)
    except (ValueError, RuntimeError) as err:
        raise InputError(case, file, f"SEG {file}: frames of segment(s) {list(numbers)} do not form a regular "
                         f"volume ({err})") from None
    fraction = volume.with_array(volume.array.max(axis=3), channels={})  # the union of the segments
    n_inside = int((fraction.array >= FRACTION_INSIDE).sum())
    try:
        placed = fraction.match_geometry(ct_geometry)
        mask = sitk.GetArrayFromImage(placed.to_simpleitk()) >= FRACTION_INSIDE
        return mask, {"resampled": False, "voxels_outside_ct": n_inside - int(mask.sum())}
    except RuntimeError:  # not on the CT's voxels: resample the fraction, then threshold
        resampled = sitk.Resample(fraction.to_simpleitk(), reference, sitk.Transform(), sitk.sitkLinear, 0.0,
                                  sitk.sitkFloat32)
        mask = sitk.GetArrayFromImage(resampled) >= FRACTION_INSIDE
        if n_inside and not mask.any():
            raise InputError(case, file, f"SEG {file}: segment(s) {list(numbers)} do not overlap the CT volume")
        return mask, {"resampled": True}


def rasterise_seg(case: str, file: str, seg: hd.seg.Segmentation, reference: sitk.Image, structures: Sequence[str],
                  structure_names: Mapping[str, Sequence[str]] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The SEG's segments matching ``structures`` on the reference grid: (C, z, y, x) uint8 0/1 channels."""
    labels = {int(s.SegmentNumber): str(s.get("SegmentLabel", "")) for s in seg.SegmentSequence}
    harmonised = harmonise(structures, sorted(set(labels.values())), structure_names)
    raise_if_ambiguous(case, file, harmonised)
    matched = harmonised["matched"]
    ct_geometry = ct_volume_geometry(reference)
    channels = np.zeros((len(structures),) + tuple(reversed(reference.GetSize())), dtype=np.uint8)
    report: dict[str, Any] = {
        "matched": matched, "roi_names": sorted(set(labels.values())),
        "unmatched_rois": harmonised["unmatched"], "not_used": harmonised["not_used"],
        "annotated": [s for s in structures if s in matched],
        "segmentation_type": seg.segmentation_type.value, "threshold": f">= {FRACTION_INSIDE} of the maximum"
        if seg.segmentation_type == hd.seg.SegmentationTypeValues.FRACTIONAL else "binary as stored",
        "segments": {},
    }
    for channel, structure in enumerate(structures):
        if structure not in matched:
            continue
        numbers = sorted(n for n, name in labels.items() if name == matched[structure]["roi"])
        mask, placement = _segment_on_grid(case, file, seg, numbers, reference, ct_geometry)
        channels[channel][mask] = 1
        report["segments"][structure] = {"segment_numbers": numbers, **placement}
    report["resampled"] = [s for s, p in report["segments"].items() if p["resampled"]]
    return channels, report


def read_seg(case: str, file: str) -> hd.seg.Segmentation:
    """A SEG file through highdicom; InputError (case, file, reason) when it is not a readable SEG."""
    try:
        return hd.seg.segread(file)
    except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError,
            KeyError, IndexError) as err:
        raise InputError(case, file, f"SEG {file} is not a readable DICOM SEG: {type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}") from None


def seg_label_map(case: str, index: pd.DataFrame, series: pd.Series, geometry: dict[str, Any],
                  reference: sitk.Image, structures: Sequence[str],
                  structure_names: Mapping[str, Sequence[str]] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The structures' channels (C, z, y, x) from the SEG under the case folder that refers to the
    chosen CT (module docstring), and the report."""
    seg_rows = [row for row in as_series_index(index) if row["modality"] == "SEG"]
    if not seg_rows:
        return no_label_object(reference, "SEG", series, structures)
    usable, rejected = [], []
    for file in sorted(f for row in seg_rows for f in row["files"]):
        try:
            seg = read_seg(case, file)
            reference_note = check_seg_reference(case, file, seg, series, geometry["sop_uids"])
        except InputError as err:
            rejected.append(err)
            continue
        names = [str(s.get("SegmentLabel", "")) for s in seg.SegmentSequence]
        usable.append((len(match_structures(structures, names, structure_names)), file, seg, reference_note))
    file, seg, chosen = choose_label_object(usable, rejected)
    channels, report = rasterise_seg(case, file, seg, reference, structures, structure_names)
    report.update(chosen)
    log.info("case %s: SEG %s (%s), segments %s", case, file, report["segmentation_type"],
             {s: p["segment_numbers"] for s, p in report["segments"].items()})
    return channels, report
