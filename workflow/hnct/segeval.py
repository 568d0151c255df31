"""Evaluate one segmentation fold in 3D: stack slice predictions into each case's volume, score them.

For every validation case of the fold (rows of ``val_predictions.csv``: ``case, slice, prob_npz,
fold``) this reads ``val_probs/{case}.npz`` (``prob`` float16 (z, y, x) foreground probability
for the case's slices in slice order, ``slice`` int array of slice indices k), thresholds it
(``prob >= threshold``), and places slice k at index k of the source image of the slices
(the crop NRRD, or the volume, named ``source_volume`` in the slices sidecar
``{slices_dir}/{case}.json``; ``--slices-dir``, the folder the task's registry entry names). The truth is the source label map
(``source_label``) restricted to the segmented structure (the sidecar's ``structure``, or
``--structure``; label values from the sidecar's ``labels``).

Outputs:

* ``masks/{case}.nrrd``: the predicted mask, uint8 0/1, written with SimpleITK in exactly the
  source image's geometry (size, origin, spacing, direction, LPS), so it overlays the CT in 3D Slicer.
* ``per_case.csv``: one row per case: Dice, IoU, HD95 (mm), NSD, component matches at IoU >=
  ``--detection-iou``, per-slice Dice both ways, the empty-mask status (see
  :mod:`hnct.metrics.segmentation` for every definition, after Metrics Reloaded).
* ``metrics.json``: the headline numbers (Dice, IoU, NSD over reference-present cases, median HD95
  and the cases without a finite one, per-case sensitivity, false-positive rate on
  structure-negative cases, lesion-wise sensitivity and precision), counts, the distributions,
  the empty-mask policy text, the S-Net
  per-slice Dice pooled over all slices of the fold (both ways), lesion-wise totals, and the cases
  that could not be scored (with the file and reason).

CLI: ``python -m hnct.segeval --predictions ... --fold-slices ... --slices-dir results/slices
--out-metrics ... --out-per-case ... --masks-dir ... --model M --fold K --nsd-tolerance-mm 2 --threshold 0.5
--detection-iou 0.1``
(``python -m hnct.evaluate --task segment ...`` forwards here).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from hnct.common import (InputError, exit_status, atomic_path, progress, read_image, read_json, setup_logging,
                         software_versions, write_json)
from hnct.common import structure_values as common_structure_values
from hnct.metrics import json_safe
from hnct.metrics import segmentation as segm
from hnct.tasks import evaluate_fold_parser
from hnct.tasks.segment import Segment

log = logging.getLogger(__name__)

PER_CASE_COLUMNS = [
    "case", "fold", "model", "structure", "empty_status", "dice", "iou", "hd95_mm", "nsd", "nsd_tolerance_mm",
    "n_true", "n_pred", "tp", "fp", "fn", "detected", "false_positive", "detection_iou", "pred_volume_mm3",
    "truth_volume_mm3",
    "n_slices", "n_labelled_slices", "snet_slice_dice", "labelled_slice_dice", "mask",
]


def structure_values(case: str, sidecar_file: Path, labels: dict[str, str], structure: str) -> list[int]:
    """Label values whose name is ``structure`` (case-insensitive) in the sidecar's ``labels``."""
    if not labels:
        raise InputError(case, sidecar_file, "slices sidecar lists no labels")
    return common_structure_values(labels, structure)


def _source_image(case: str, sidecar_file: Path, sidecar: dict[str, Any], key: str, what: str) -> sitk.Image:
    """The image the slices sidecar names under ``key`` (read by hnct.common.read_image)."""
    if not sidecar.get(key):
        raise InputError(case, sidecar_file, f"slices sidecar names no {what} ({key})")
    return read_image(case, sidecar[key], what)


def load_case(case: str, prob_npz: str | Path, sidecar_file: str | Path, threshold: float,
              structure: str | None = None) -> dict[str, Any]:
    """Predicted and true masks of one case as (z, y, x) bool arrays, and the source image geometry;
    ``sidecar_file``: the case's slices sidecar."""
    sidecar_file = Path(sidecar_file)
    if not sidecar_file.exists():
        raise InputError(case, sidecar_file, "slices sidecar not found")
    sidecar = read_json(sidecar_file)
    if sidecar.get("status") != "ok":
        raise InputError(case, sidecar_file, f"slices sidecar status is {sidecar.get('status')!r}")
    structure = structure or sidecar.get("structure")
    if not structure:
        raise InputError(case, sidecar_file, "no segmentation structure in the sidecar and none given")
    image = _source_image(case, sidecar_file, sidecar, "source_volume", "source volume")
    size_zyx = tuple(reversed(image.GetSize()))
    labels = sidecar.get("labels") or {}
    values = structure_values(case, sidecar_file, labels, structure)
    if sidecar.get("source_label"):
        label_image = _source_image(case, sidecar_file, sidecar, "source_label", "source label map")
        if (label_image.GetSize() != image.GetSize()
                or not np.allclose(label_image.GetOrigin(), image.GetOrigin(), atol=1e-3)
                or not np.allclose(label_image.GetSpacing(), image.GetSpacing(), atol=1e-6)):
            raise InputError(case, sidecar["source_label"], "label map geometry differs from the source volume")
        truth = np.isin(sitk.GetArrayViewFromImage(label_image), values) if values else np.zeros(size_zyx, bool)
    else:
        truth = np.zeros(size_zyx, dtype=bool)
    if not values:
        log.warning("case %s: structure %s not in the label map (%s): truth is empty", case, structure, labels)

    prob_path = Path(prob_npz)
    if not prob_path.exists():
        raise InputError(case, prob_path, "probability NPZ not found")
    try:
        with np.load(prob_path) as data:
            prob = np.asarray(data["prob"], dtype=np.float32)
            slice_index = np.asarray(data["slice"], dtype=np.int64)
    except (KeyError, ValueError, OSError) as err:
        raise InputError(case, prob_path, f"cannot read prob/slice arrays: {err}") from err
    if prob.ndim != 3 or prob.shape[0] != slice_index.size:
        raise InputError(case, prob_path, f"prob shape {prob.shape} does not match {slice_index.size} slice indices")
    if prob.shape[1:] != size_zyx[1:]:
        raise InputError(case, prob_path, f"prob slices are {prob.shape[1:]} (y, x) but the source image "
                                          f"slices are {size_zyx[1:]}")
    if slice_index.min(initial=0) < 0 or slice_index.max(initial=0) >= size_zyx[0]:
        raise InputError(case, prob_path, f"slice indices outside 0..{size_zyx[0] - 1}")
    if np.unique(slice_index).size != slice_index.size:
        raise InputError(case, prob_path, "repeated slice indices")
    pred = np.zeros(size_zyx, dtype=bool)
    pred[slice_index] = prob >= threshold
    missing = size_zyx[0] - slice_index.size
    if missing:
        log.warning("case %s: %d of %d slices have no prediction (scored as background)", case, missing, size_zyx[0])
    return {"pred": pred, "truth": truth, "image": image, "structure": structure,
            "spacing_zyx": tuple(reversed(image.GetSpacing())), "scored_slices": np.sort(slice_index)}


def write_mask(pred: np.ndarray, reference: sitk.Image, path: str | Path) -> Path:
    """Write a (z, y, x) mask as uint8 NRRD with the reference image's origin, spacing, direction."""
    mask = sitk.GetImageFromArray(pred.astype(np.uint8))
    mask.SetOrigin(reference.GetOrigin())
    mask.SetSpacing(reference.GetSpacing())
    mask.SetDirection(reference.GetDirection())
    with atomic_path(path, suffix=".nrrd") as tmp:
        sitk.WriteImage(mask, str(tmp), useCompression=False)
    return Path(path)


def evaluate_segment(predictions: str | Path, fold_slices: str | Path, out_metrics: str | Path,
                     out_per_case: str | Path, masks_dir: str | Path, model: str, fold: int,
                     slices_dir: str | Path, nsd_tolerance_mm: float, threshold: float,
                     detection_iou: float, structure: str | None = None,
                     task: str = Segment.name) -> dict[str, Any]:
    """Score every validation case of one fold; write masks, per_case.csv and metrics.json."""
    pred_table = pd.read_csv(predictions)
    missing = {"case", "slice", "prob_npz"} - set(pred_table.columns)
    if missing:
        raise InputError(f"fold {fold}", predictions, f"missing columns {sorted(missing)}")
    slices = pd.read_csv(fold_slices, sep="\t")
    missing = {"case", "slice", "npz", "split"} - set(slices.columns)
    if missing:
        raise InputError(f"fold {fold}", fold_slices, f"missing columns {sorted(missing)}")
    val_slices = slices[slices["split"] == "val"]
    cases = list(dict.fromkeys(pred_table["case"].astype(str)))
    masks_dir = Path(masks_dir)
    rows: list[dict[str, Any]] = []
    excluded: list[dict[str, str]] = []
    pooled_slice_dice: list[np.ndarray] = []
    pooled_labelled: list[np.ndarray] = []
    structures: set[str] = set()
    for case in progress(cases, total=len(cases), every=10, what=f"segment fold {fold} cases"):
        try:
            case_rows = val_slices[val_slices["case"].astype(str) == case]
            if case_rows.empty:
                raise InputError(case, fold_slices, "case has predictions but no val slices in the fold table")
            prob_files = pred_table.loc[pred_table["case"].astype(str) == case, "prob_npz"].unique()
            if len(prob_files) != 1:
                raise InputError(case, predictions, f"expected one prob_npz per case, got {len(prob_files)}")
            loaded = load_case(case, prob_files[0], Path(slices_dir) / f"{case}.json", threshold, structure)
        except InputError as err:
            log.error("%s", err)
            excluded.append({"case": case, "file": str(err.file), "reason": err.reason})
            continue
        pred, truth = loaded["pred"], loaded["truth"]
        structures.add(loaded["structure"])
        mask_path = write_mask(pred, loaded["image"], masks_dir / f"{case}.nrrd")
        metrics = segm.case_metrics(pred, truth, loaded["spacing_zyx"], tolerance_mm=nsd_tolerance_mm,
                                    iou_threshold=detection_iou)
        # Per-slice Dice over the slices that were predicted (all of them in the normal case).
        scored = loaded["scored_slices"]
        per_slice = segm.slice_dices(pred[scored], truth[scored])
        pooled_slice_dice.append(per_slice)
        pooled_labelled.append(per_slice[truth[scored].reshape(scored.size, -1).any(axis=1)])
        rows.append({"case": case, "fold": fold, "model": model, "structure": loaded["structure"], **metrics,
                     "mask": str(mask_path)})
        log.info("case %s: Dice %s, HD95 %s mm, NSD %s (%s)", case, metrics["dice"], metrics["hd95_mm"],
                 metrics["nsd"], metrics["empty_status"])

    per_case = pd.DataFrame(rows, columns=PER_CASE_COLUMNS)
    with atomic_path(out_per_case, suffix=".csv") as tmp:
        per_case.to_csv(tmp, index=False)
    summary = segm.aggregate_cases(rows)
    all_slices = np.concatenate(pooled_slice_dice) if pooled_slice_dice else np.zeros(0)
    labelled = np.concatenate(pooled_labelled) if pooled_labelled else np.zeros(0)
    payload = {
        "task": task,
        "model": model,
        "fold": int(fold),
        "structure": sorted(structures)[0] if len(structures) == 1 else sorted(structures),
        "threshold": float(threshold),
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "detection_iou": float(detection_iou),
        **summary,
        "pooled_slices": {
            "n_slices": int(all_slices.size),
            "n_labelled_slices": int(labelled.size),
            "snet_slice_dice": float(all_slices.mean()) if all_slices.size else None,
            "labelled_slice_dice": float(labelled.mean()) if labelled.size else None,
            "note": "S-Net convention: every slice of every case, empty/empty slice = 1; labelled: slices "
                    "with non-empty truth only",
        },
        "excluded_cases": excluded,
        "predictions": str(predictions),
        "fold_slices": str(fold_slices),
        "versions": software_versions(),
    }
    write_json(out_metrics, json_safe(payload))
    log.info("segment %s fold %s: %d cases, mean Dice %s over %d with the structure, %d both empty, %d excluded",
             model, fold, len(rows), summary["summary"]["dice"], summary["n_reference_present"], summary["n_both_empty"],
             len(excluded))
    return payload


def main(argv: list[str] | None = None) -> int:
    parser = evaluate_fold_parser("hnct segeval", Segment.name, "val_predictions.csv (case, slice, prob_npz, fold)",
                                  __doc__.split("\n\n")[0])
    parser.add_argument("--fold-slices", required=True, help="results/folds/segment/fold{k}_slices.tsv")
    parser.add_argument("--masks-dir", required=True, help="folder for masks/{case}.nrrd")
    parser.add_argument("--slices-dir", required=True, help="folder of the slices sidecars {case}.json")
    # No defaults here: the schema's (evaluate.*) reach this through the task's evaluate options.
    parser.add_argument("--nsd-tolerance-mm", type=float, required=True, help="surface Dice tolerance, mm")
    parser.add_argument("--threshold", type=float, required=True, help="probability threshold of the masks")
    parser.add_argument("--detection-iou", type=float, required=True,
                        help="IoU at which a predicted component matches a true one")
    parser.add_argument("--structure", default=None, help="structure name (default: the slices sidecar's)")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    return exit_status(lambda: evaluate_segment(
        args.predictions, args.fold_slices, args.out_metrics, args.out_per_case, args.masks_dir, args.model,
        args.fold, args.slices_dir, nsd_tolerance_mm=args.nsd_tolerance_mm, threshold=args.threshold,
        detection_iou=args.detection_iou, structure=args.structure, task=args.task), log)


if __name__ == "__main__":
    sys.exit(main())
