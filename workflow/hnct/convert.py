"""convert{case}: the case's CT series as an int16 HU NRRD, its structures and label map as uint8 NRRDs.

Reads the case's DICOM folder through :mod:`hnct.dicomio` (which documents the series choice and
the geometry checks), writes ``results/volumes/{case}/volume.nrrd`` (int16 HU, LPS geometry, no
compression) and, unless ``labels`` is ``none``, on the same grid
``results/volumes/{case}/structures.nrrd`` (one 0/1 channel per structure of ``structures``,
lossless where structures overlap, :func:`hnct.structures.write_structures`) and
``results/volumes/{case}/label.nrrd`` (uint8, value = position in ``structures`` + 1, painted in
that order so the later structure wins where two overlap: the priority order of challenge-format
label maps), then the sidecar ``results/volumes/{case}.json`` that names them.

A case whose cohort row gives a ``ct_file`` (HaN-Seg's ``case_XX_IMG_CT.nrrd``, SegRap's
``image.nii.gz``) has its CT read from that volume file instead (:func:`hnct.volume_ct.read_ct_file`:
the same int16 HU NRRD and geometry fields, the file's SHA-256 in place of the series' DICOM facts);
its labels come from a mask folder (``nrrd``) or there are none: an RTSTRUCT or SEG references DICOM
images.

Labels come from the RTSTRUCT (:mod:`hnct.dicomio`), the DICOM SEG (:mod:`hnct.seg`), whichever of
the two the case has (``auto``: :func:`hnct.seg.pick_label_source`) or a mask folder (``nrrd``).
With ``rtstruct``/``seg``/``auto`` a ``mask_dir`` is a second source: the structures its masks have
are added (a structure found in both sources is bad input). ROI names and mask file names are
harmonised through ``structure_names`` (:mod:`hnct.structures`). The sidecar's ``structures`` list
says per structure whether the case has it (``annotated``: a structure without contour or mask is
unknown for the case, its channel all zero, never to be read as background), where it came from
and its voxel count; ``unmatched_rois`` lists every ROI name or mask file that matched no
structure. Everything is computed in memory before the first file is written, so an excluded case
leaves no NRRD behind (stale ones from an earlier run are removed too).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from hnct.common import InputError, run_case_stage, setup_logging
from hnct.nrrdio import _blank_write_time, blank_write_time_in_file, write_nrrd  # noqa: F401  (re-exported)

log = logging.getLogger("hnct.convert")

LABEL_SOURCES = ("rtstruct", "seg", "auto", "nrrd", "none")


def series_uid_param(cohort) -> Callable[[Any], str]:
    """A Snakemake params function for ``convert_series``: the cohort table's ``series_uid`` of the
    job's case ('' when the table gives none, so convert chooses by the rule in hnct.dicomio).

    Made here rather than in the rule file so the rules stay free of function definitions.
    """
    import pandas as pd

    uids = {str(case): "" if pd.isna(uid) else str(uid).strip()
            for case, uid in zip(cohort["case"], cohort.get("series_uid", pd.Series([""] * len(cohort))))}

    def series_uid(wildcards) -> str:
        return uids.get(wildcards.case, "")

    return series_uid


def convert_case(
    case: str,
    dicom_dir: str | Path,
    volume_path: str | Path,
    label_path: str | Path | None,
    sidecar_path: str | Path,
    series_uid: str = "",
    labels: str = "rtstruct",
    mask_dir: str | Path = "",
    structures: Sequence[str] = ("Larynx", "GTVp", "GTVn"),
    required_structures: Sequence[str] = (),
    structure_names: dict[str, Sequence[str]] | None = None,
    mask_pattern: str = "default",
    annotation_table: str | Path = "",
    structures_path: str | Path | None = None,
    gantry_tilt: str = "correct",
    max_tilt_deg: float = 0.5,
    max_spacing_spread: float = 0.01,
    max_slice_gap_mm: float = 5.0,
    slice_step_mm: float = 0.0,
    upstream: str | Path | None = None,
    out_dir: str | Path | None = None,
    ct_file: str | Path = "",
    ct_rounding_tolerance_hu: float | None = None,
) -> dict[str, Any]:
    """Convert one case; always writes ``sidecar_path`` (ok or excluded) and returns it.

    ``out_dir``: the case's declared folder holding ``volume_path`` and ``label_path`` (emptied
    first; stays empty when the case is excluded), see :func:`hnct.common.run_case_stage`.
    ``structures_path``: the channels' NRRD (default ``structures.nrrd`` beside ``label_path``).
    ``mask_dir`` and ``annotation_table`` may name the case's DICOM folder as ``{dicom_dir}``.
    ``ct_file``: the case's CT as a volume file (read instead of ``dicom_dir``'s DICOM), its float
    voxels rounded to HU within ``ct_rounding_tolerance_hu`` (required with ``ct_file``).
    """
    if labels not in LABEL_SOURCES:
        raise ValueError(f"labels must be one of {LABEL_SOURCES}, not {labels!r}")
    if ct_file and labels not in ("nrrd", "none"):
        raise ValueError(f"case {case}: labels {labels!r} needs the DICOM images an RTSTRUCT/SEG references; "
                         f"a CT from the volume file {ct_file} takes labels nrrd (a mask folder) or none")
    if ct_file and ct_rounding_tolerance_hu is None:
        raise ValueError(f"case {case}: a CT volume file needs ct_rounding_tolerance_hu (convert.ct_rounding_tolerance_hu)")
    structures = list(structures)
    missing_config = [s for s in required_structures if s not in structures]
    if missing_config:
        raise ValueError(f"required_structures {missing_config} are not in structures {structures}")
    if label_path and structures_path is None:
        structures_path = Path(label_path).with_name("structures.nrrd")
    for stale in (volume_path, label_path, structures_path):
        if stale and Path(stale).exists():
            Path(stale).unlink()

    # Imported here so the rule file can import this module's params helpers without pydicom.
    import numpy as np

    from hnct import dicomio
    from hnct import structures as structures_mod
    from hnct import volume_ct

    def read_structures(folder, index, series, geometry, hu):
        """(channels, report of the DICOM label object or mask folder, report of a second mask
        source or None, the label source used)."""
        from hnct import seg  # highdicom: only where a SEG may be read

        try:
            structures_mod.check_structures(structures, structure_names)
        except ValueError as err:
            raise InputError(case, "convert.structures", f"convert.structures / structure_names: {err}") from None
        volume = dicomio.image_on_grid(hu, geometry)
        masks_at = str(mask_dir).replace("{dicom_dir}", str(folder))
        table_at = str(annotation_table).replace("{dicom_dir}", str(folder))

        def masks(required: bool):
            return dicomio.mask_folder_label_map(case, masks_at, volume, structures, mask_pattern, structure_names,
                                                 table_at, required=required)

        source = seg.pick_label_source(index) if labels == "auto" else labels
        if source == "nrrd":
            channels, report = masks(required=True)
            return channels, report, None, source
        if source == "rtstruct":
            channels, report = dicomio.rtstruct_label_map(case, index, series, geometry, volume, structures,
                                                          structure_names)
        else:
            channels, report = seg.seg_label_map(case, index, series, geometry, volume, structures, structure_names)
        if not mask_dir:
            return channels, report, None, source
        extra, mask_report = masks(required=False)
        both = sorted(set(report["annotated"]) & set(mask_report["annotated"]))
        if both:
            raise InputError(case, mask_report["folder"], f"structure(s) {both} are both in the {source.upper()} "
                             f"{report.get('file')} and in the mask folder {mask_report['folder']}: keep one source")
        channels |= extra
        return channels, report, mask_report, source

    def read_dicom_ct(folder: Path):
        """(hu, geometry, the series' sidecar fields, index, series) of the case's DICOM CT."""
        if not folder.is_dir():
            raise InputError(case, folder, f"no DICOM image series under {folder} (folder does not exist)")
        index = dicomio.scan_series(folder, keep_datasets=True)
        series, choice = dicomio.choose_ct_series(case, folder, index, series_uid)
        hu, geometry = dicomio.read_ct_array(case, series, gantry_tilt=gantry_tilt, max_tilt_deg=max_tilt_deg,
                                             max_spacing_spread=max_spacing_spread,
                                             max_slice_gap_mm=max_slice_gap_mm, slice_step_mm=slice_step_mm)
        log.info("case %s: series %s, %d slices", case, series["series_uid"], len(geometry["files"]))
        fields = {
            "ct_source": "dicom",
            "series_uid": series["series_uid"],
            "series_identity": series["series_identity"],
            "study_uid": series["study_uid"],
            "patient_id": series["patient_id"],
            "modality": series["modality"],
            "series_description": series["series_description"],
            "n_files": int(series["n_files"]),
            "n_slices": len(geometry["files"]),
            "dicom_dir": str(folder),
            "unreadable_files": [{"file": f, "reason": r} for f, r in index.unreadable],
            "manufacturer": series["manufacturer"],
            "model": series["model"],
            "kernel": series["kernel"],
            "slice_positions": geometry["slice_positions"],
            "series_choice": choice,
        }
        return hu, geometry, fields, index, series

    def work() -> dict[str, Any]:
        started = time.perf_counter()
        folder = Path(dicom_dir)
        if ct_file:
            hu, geometry, ct_fields = volume_ct.read_ct_file(case, ct_file, ct_rounding_tolerance_hu)
            ct_fields = {"ct_source": "file", **ct_fields, "modality": "CT", "n_slices": int(hu.shape[0])}
            index = series = None  # labels nrrd or none: no DICOM label object to look up
        else:
            hu, geometry, ct_fields, index, series = read_dicom_ct(folder)
        channels, label_report, mask_report, source = None, None, None, labels
        if labels != "none":  # SimpleITK only where labels are painted or resampled onto the CT grid
            channels, label_report, mask_report, source = read_structures(folder, index, series, geometry, hu)
        label_image, present, entries, unmatched = None, [], [], []
        if channels is not None:
            label_image = structures_mod.paint_label_map(channels)
            entries, unmatched = structure_entries(structures, channels, label_report, mask_report)
            present = [e["name"] for e in entries if e["annotated"] and e["voxels"] > 0]
            counts = np.bincount(label_image.ravel(), minlength=len(structures) + 1)
            label_report["voxels"] = {s: int(counts[v]) for v, s in enumerate(structures, start=1)}
            absent = [s for s in required_structures if s not in present]
            if absent:
                label_file = label_report.get("file") or label_report.get("folder", "")
                raise InputError(case, label_file, f"required structure(s) {absent} missing from the labels "
                                 f"(found {present}; ROI names {label_report.get('roi_names', '')})")
        write_nrrd(hu, geometry, volume_path)
        if label_image is not None:
            structures_mod.write_structures(channels, geometry, structures_path)
            write_nrrd(label_image, geometry, label_path)
        seconds = time.perf_counter() - started
        log.info("case %s: CT from %s, size %s, spacing %s mm in %.1f s", case, ct_file or "DICOM",
                 geometry["size"], [round(s, 3) for s in geometry["spacing"]], seconds)
        return {
            **ct_fields,
            "size": geometry["size"],
            "spacing": geometry["spacing"],
            "origin": geometry["origin"],
            "direction": geometry["direction"],
            "hu_clipped_voxels": geometry["hu_clipped_voxels"],
            "label_source": source,
            "labels": {str(v): s for v, s in enumerate(structures, start=1)} if label_image is not None else {},
            "structures_present": present,
            "structures": entries,
            "unmatched_rois": unmatched,
            "label_matching": label_report,
            "mask_matching": mask_report,
            "volume": str(volume_path),
            "label": str(label_path) if label_image is not None else None,
            "structures_file": str(structures_path) if label_image is not None else None,
            "seconds": round(seconds, 3),
        }

    return run_case_stage(case, "convert", sidecar_path, work, upstream=upstream or None, out_dir=out_dir)


def structure_entries(structures: Sequence[str], channels, label_report: dict[str, Any],
                      mask_report: dict[str, Any] | None) -> tuple[list[dict[str, Any]], list[str]]:
    """The sidecar's ``structures`` (name, channel, label, annotated, source, voxels per structure)
    and ``unmatched_rois`` (of both sources)."""
    import numpy as np

    reports = [r for r in (label_report, mask_report) if r]
    entries = []
    for channel, structure in enumerate(structures):
        found = next((r for r in reports if structure in r["annotated"]), None)
        match = found["matched"][structure] if found else {}
        entries.append({"name": structure, "channel": channel, "label": channel + 1, "annotated": found is not None,
                        "source": match.get("file") or match.get("roi"),
                        "voxels": int(np.count_nonzero(channels[channel]))})
    return entries, sorted({name for r in reports for name in r.get("unmatched_rois", [])})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnct convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", required=True)
    parser.add_argument("--dicom-dir", default="", help="folder holding the case's DICOM (any layout); unused with "
                        "--ct-file but for {dicom_dir} in --mask-dir / --annotation-table")
    parser.add_argument("--volume", required=True, help="output CT NRRD (int16 HU)")
    parser.add_argument("--label", default="", help="output label map NRRD (uint8); unused with --labels none")
    parser.add_argument("--sidecar", required=True, help="output sidecar JSON (written last)")
    parser.add_argument("--out-dir", default="", help="the case's folder of --volume and --label (emptied first)")
    parser.add_argument("--series-uid", nargs="?", const="", default="", help="CT SeriesInstanceUID to use")
    parser.add_argument("--labels", choices=LABEL_SOURCES, default="rtstruct")
    parser.add_argument("--mask-dir", nargs="?", const="", default="")
    parser.add_argument("--structures", nargs="*", default=["Larynx", "GTVp", "GTVn"])
    parser.add_argument("--required-structures", nargs="*", default=[])
    parser.add_argument("--structure-names", default="{}", help="JSON: structure -> ROI-name patterns")
    parser.add_argument("--mask-pattern", default="default", help="mask file layout below --mask-dir, or a preset")
    parser.add_argument("--annotation-table", nargs="?", const="", default="",
                        help="table saying which structures each case has (HaN-Seg's OAR_data.csv)")
    parser.add_argument("--structures-file", default="", help="output channels NRRD (default beside --label)")
    parser.add_argument("--gantry-tilt", choices=("correct", "exclude"), default="correct",
                        help="tilted series: resample onto an orthogonal grid, or exclude")
    parser.add_argument("--max-tilt-deg", type=float, default=0.5)
    parser.add_argument("--max-spacing-spread", type=float, default=0.01)
    parser.add_argument("--max-slice-gap-mm", type=float, default=5.0)
    parser.add_argument("--slice-step-mm", type=float, default=0.0, help="resampled slice step (0: smallest)")
    parser.add_argument("--upstream", nargs="?", const="", default="", help="fetch sidecar (tcia source)")
    parser.add_argument("--ct-file", nargs="?", const="", default="",
                        help="the CT as a volume file (NRRD, NIfTI, MHA), read instead of --dicom-dir's DICOM")
    parser.add_argument("--ct-rounding-tolerance-hu", type=float, default=None,
                        help="with --ct-file: float voxels further than this from an integer HU exclude the case")
    parser.add_argument("--log", default=None)
    args = parser.parse_args(argv)
    setup_logging(args.log)
    if args.labels != "none" and not args.label:
        parser.error("--label is required unless --labels none")
    if not (args.dicom_dir or args.ct_file):
        parser.error("give the CT: --dicom-dir (DICOM) or --ct-file (a volume file)")
    if args.ct_file and args.ct_rounding_tolerance_hu is None:
        parser.error("--ct-file needs --ct-rounding-tolerance-hu (config convert.ct_rounding_tolerance_hu)")
    # Snakemake renders an empty list parameter as an empty word: drop empty names.
    structures = [s for s in args.structures if s]
    required = [s for s in args.required_structures if s]
    convert_case(
        args.case, args.dicom_dir, args.volume, args.label or None, args.sidecar,
        series_uid=args.series_uid, labels=args.labels, mask_dir=args.mask_dir,
        structures=structures, required_structures=required, structure_names=json.loads(args.structure_names),
        mask_pattern=args.mask_pattern, annotation_table=args.annotation_table,
        structures_path=args.structures_file or None,
        gantry_tilt=args.gantry_tilt, max_tilt_deg=args.max_tilt_deg,
        max_spacing_spread=args.max_spacing_spread, max_slice_gap_mm=args.max_slice_gap_mm,
        slice_step_mm=args.slice_step_mm,
        upstream=args.upstream or None, out_dir=args.out_dir or None,
        ct_file=args.ct_file, ct_rounding_tolerance_hu=args.ct_rounding_tolerance_hu,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
