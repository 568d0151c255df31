"""preprocess{task, case}: whole CT volumes with their structure channels, as nnU-Net prepares them.

For the tasks whose registry entry has ``plan`` (hnct.tasks), three steps, each a file a user can read:

``fingerprint``  ``results/preprocess/{task}/fingerprint.json``: every case's spacing and size (from
                 the volume sidecars) and the target spacing: the median spacing (x, y, z, mm) of the
                 non-test cases of folds.tsv, or the configured one.
``case``         ``results/preprocess/{task}/{case}/`` + ``{case}.json``: the CT cropped to the body
                 (HU above a threshold, largest connected component, its bounding box on the CT grid),
                 resampled to the target spacing (linear for HU; each structure channel linearly
                 interpolated and thresholded at 0.5, as nnU-Net resamples one-hot labels), stored as
                 uncompressed ``image.npy`` (float32 HU, (z, y, x)) and ``structures.npy`` (uint8,
                 (C, z, y, x)) that training memory-maps; ``foreground.npy`` (a seeded sample of the
                 HU values inside the annotated structures) and ``locations.npy`` (int32 rows
                 ``channel, z, y, x``: a seeded sample of each structure's voxels, for foreground
                 oversampling). The sidecar holds the CT's geometry, the crop box and the
                 preprocessed grid (LPS origin, spacing, direction), so predictions go back exactly.
``plan``         ``results/preprocess/{task}/fold{k}/plan.json``: the fold's cases (train, val, test,
                 each with its preprocessed sidecar), the intensity normalisation fitted on the
                 *training* cases of that fold only (clip to the 0.5 and 99.5 percentiles of their
                 foreground HU, then z-score with the clipped values' mean and SD), each structure's
                 ``foreground_fraction`` (its share of the training cases' voxels where annotated),
                 the target spacing and the patch size. The networks are sized from it and start
                 their output biases from the fractions (hnct.models.oar_nets).

Reads ``results/volumes/{case}.json`` (``volume``, ``structures_file``: uint8 (C, z, y, x) NRRD on
the CT's grid, ``structures``: name, channel, annotated per structure). Bad input (no structures
file, a structures file whose grid is not the CT's, no body above the threshold) excludes the case
with the file and the reason. ``python -m hnct.preprocess {fingerprint,case,plan} --help``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hnct.common import (InputError, atomic_path, is_ok, read_json, read_sidecar, run_case_stage,
                         setup_logging, write_json)

log = logging.getLogger("hnct.preprocess")

STAGE = "preprocess"
FILES = ("image", "structures", "foreground", "locations")


# ---------------------------------------------------------------- fingerprint
def read_folds(folds_tsv: str | Path):
    import pandas as pd

    return pd.read_csv(folds_tsv, sep="\t", dtype={"case": str, "fold": str})


def fingerprint(folds_tsv: str | Path, volume_sidecars: Sequence[str | Path], out: str | Path,
                target_spacing_mm: Sequence[float] | None = None) -> dict[str, Any]:
    """Write the cohort fingerprint: per case ``spacing`` and ``size`` (x, y, z), and the target spacing."""
    folds = read_folds(folds_tsv)
    in_folds = set(folds["case"])
    non_test = set(folds.loc[folds["fold"] != "test", "case"])
    cases = {}
    for path in volume_sidecars:
        sidecar = read_sidecar(path)
        case = str(sidecar["case"])
        if case in in_folds and is_ok(sidecar):
            cases[case] = {"spacing": [float(s) for s in sidecar["spacing"]],
                           "size": [int(s) for s in sidecar["size"]], "sidecar": str(path)}
    training_side = sorted(set(cases) & non_test)
    if not training_side:
        raise ValueError(f"{folds_tsv}: no non-test case with a volume sidecar: nothing to fingerprint")
    median = np.median([cases[c]["spacing"] for c in training_side], axis=0)
    if target_spacing_mm:
        target, source = [float(s) for s in target_spacing_mm], "config"
    else:
        target, source = [float(s) for s in median], f"median of {len(training_side)} non-test cases"
    payload = {"target_spacing_mm": target, "target_spacing_source": source,
               "median_spacing_mm": [float(s) for s in median], "cases": cases}
    write_json(out, payload)
    log.info("fingerprint: %d cases, target spacing %s mm (%s)", len(cases), [round(s, 3) for s in target], source)
    return payload


# ---------------------------------------------------------------- one case
def read_channels(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """A structures NRRD as a (C, z, y, x) array and its header, whichever file axis its header's
    ``kinds`` mark as the ``list`` (channel) axis: the last file axis (fastest first: x, y, z,
    channel; what convert writes) or the first (channel, x, y, z)."""
    import nrrd

    array, header = nrrd.read(str(path), index_order="C")
    kinds = [str(k).lower() for k in header.get("kinds", [])]
    if array.ndim == 4 and kinds[:1] == ["list"] and kinds[-1:] != ["list"]:
        array = np.moveaxis(array, -1, 0)  # C order reverses the file's axes: (z, y, x, C)
    return array, header


def read_structures(case: str, sidecar: dict[str, Any], ct) -> tuple[np.ndarray, list[str], list[bool]]:
    """The (C, z, y, x) uint8 channels of the volume sidecar's ``structures_file``, their names and
    ``annotated`` flags; InputError when missing, not binary or not on the CT's grid."""
    path = Path(sidecar.get("structures_file") or "")
    entries = sidecar.get("structures") or []
    if not entries or not path.is_file():
        raise InputError(case, path if str(path) != "." else sidecar.get("volume", ""),
                         "no structures file (structures.nrrd) or no structures list in the volume sidecar: "
                         "the task needs convert's per-structure channels")
    array, header = read_channels(path)
    expected = (len(entries), *reversed([int(s) for s in ct.GetSize()]))
    if array.ndim != 4 or tuple(array.shape) != expected:
        raise InputError(case, path, f"structures array has shape {tuple(array.shape)}, expected {expected} "
                         "(channels x the CT's z, y, x)")
    origin = np.asarray(header.get("space origin", [np.nan] * 3), dtype=float)
    if not np.allclose(origin, ct.GetOrigin(), atol=1e-3):
        raise InputError(case, path, f"structures origin {origin.tolist()} is not the CT's {list(ct.GetOrigin())}")
    if array.min(initial=0) < 0 or array.max(initial=0) > 1:
        raise InputError(case, path, "structures channels are not binary (values other than 0 and 1)")
    order = sorted(entries, key=lambda e: int(e["channel"]))
    return array.astype(np.uint8), [str(e["name"]) for e in order], [bool(e["annotated"]) for e in order]


def body_box(case: str, ct, threshold_hu: float, file: str | Path) -> tuple[list[int], list[int]]:
    """Index start and size (x, y, z) of the bounding box of the largest connected component of
    voxels above ``threshold_hu`` (the body; the table and air left out)."""
    import SimpleITK as sitk

    above = sitk.Cast(ct, sitk.sitkFloat32) > float(threshold_hu)  # a float threshold on int16 HU
    body = sitk.RelabelComponent(sitk.ConnectedComponent(above), sortByObjectSize=True) == 1
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(body)
    if not stats.HasLabel(1):
        raise InputError(case, file, f"no voxel above {threshold_hu} HU: no body to crop to")
    box = stats.GetBoundingBox(1)
    return list(box[:3]), list(box[3:])


def resampled_grid(image, spacing: Sequence[float]):
    """An empty image covering ``image``'s extent at ``spacing`` (same origin and direction)."""
    import SimpleITK as sitk

    size = [max(int(round(n * s / t)), 1) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetOrigin(image.GetOrigin())
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetDirection(image.GetDirection())
    return grid


def resample_channel(channel: np.ndarray, like, reference, threshold: float | None = 0.5) -> np.ndarray:
    """A (z, y, x) array on ``like``'s grid resampled linearly onto ``reference``'s (0 outside), as
    float32, or as uint8 ``>= threshold`` when a threshold is given."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(channel.astype(np.float32))
    image.CopyInformation(like)
    out = sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0,
                                               sitk.sitkFloat32))
    return out if threshold is None else (out >= threshold).astype(np.uint8)


def geometry_of(image) -> dict[str, Any]:
    return {"size": list(image.GetSize()), "spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection())}


def image_from_geometry(geometry: dict[str, Any]):
    """An empty float32 SimpleITK image on ``geometry`` (size, spacing, origin, direction: ITK's)."""
    import SimpleITK as sitk

    image = sitk.Image([int(s) for s in geometry["size"]], sitk.sitkFloat32)
    image.SetSpacing([float(s) for s in geometry["spacing"]])
    image.SetOrigin([float(s) for s in geometry["origin"]])
    image.SetDirection([float(s) for s in geometry["direction"]])
    return image


def case_rng(seed: int, case: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(case.encode())])


def save_npy(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array))


def preprocess_case(case: str, volume_sidecar: str | Path, fingerprint_json: str | Path, out_dir: str | Path,
                    sidecar_path: str | Path, body_threshold_hu: float = -500.0, samples: int = 10000,
                    seed: int = 0) -> dict[str, Any]:
    """Crop, resample and store one case (module doc); always writes ``sidecar_path``."""
    out_dir = Path(out_dir)

    def work() -> dict[str, Any]:
        import SimpleITK as sitk

        from hnct.common import read_image

        volume = read_sidecar(volume_sidecar)
        target = read_json(fingerprint_json)["target_spacing_mm"]
        ct = read_image(case, volume["volume"], "CT volume")
        channels, names, annotated = read_structures(case, volume, ct)
        start, size = body_box(case, ct, body_threshold_hu, volume["volume"])
        cropped = sitk.RegionOfInterest(ct, size, start)
        grid = resampled_grid(cropped, target)
        image = resample_channel(sitk.GetArrayFromImage(cropped), cropped, grid, threshold=None)
        z0, y0, x0 = start[2], start[1], start[0]
        z1, y1, x1 = z0 + size[2], y0 + size[1], x0 + size[0]
        structures = np.stack([resample_channel(c[z0:z1, y0:y1, x0:x1], cropped, grid) for c in channels])
        rng = case_rng(seed, case)
        inside = structures[np.asarray(annotated, dtype=bool)].any(axis=0) if any(annotated) else \
            np.zeros(image.shape, dtype=bool)
        values = image[inside]
        foreground = rng.choice(values, min(samples, values.size), replace=False) if values.size else values
        locations = []
        for channel in range(len(names)):
            where = np.argwhere(structures[channel] > 0) if annotated[channel] else np.empty((0, 3), dtype=np.int64)
            if len(where) > samples:
                where = where[np.sort(rng.choice(len(where), samples, replace=False))]
            locations.append(np.column_stack([np.full(len(where), channel), where]))
        files = {name: str(out_dir / f"{name}.npy") for name in FILES}
        save_npy(image.astype(np.float32), Path(files["image"]))
        save_npy(structures, Path(files["structures"]))
        save_npy(foreground.astype(np.float32), Path(files["foreground"]))
        save_npy(np.concatenate(locations).astype(np.int32), Path(files["locations"]))
        voxels = [int(structures[c].sum()) for c in range(len(names))]
        log.info("case %s: body box %s + %s on the CT grid, resampled to %s at %s mm; voxels %s", case, start,
                 size, list(grid.GetSize()), [round(t, 3) for t in target], dict(zip(names, voxels)))
        return {"volume_sidecar": str(volume_sidecar), "volume": volume["volume"],
                "structures_file": volume["structures_file"],
                # convert's own geometry (what it wrote volume.nrrd from): predictions written from it
                # read back with exactly the CT's header
                "ct_geometry": {key: volume[key] for key in ("size", "spacing", "origin", "direction")},
                "crop_index_start": start, "crop_index_size": size, "grid": geometry_of(grid),
                "shape_zyx": list(image.shape), "structures": [
                    {"name": n, "channel": c, "annotated": a, "voxels": v}
                    for c, (n, a, v) in enumerate(zip(names, annotated, voxels))],
                "foreground_voxels": int(values.size), "body_threshold_hu": float(body_threshold_hu),
                "files": files}

    return run_case_stage(case, STAGE, sidecar_path, work, upstream=volume_sidecar, out_dir=out_dir)


def read_reference(volume_sidecar_path: str | Path):
    """A case's (C, z, y, x) boolean reference channels (convert's structures.nrrd), their names and
    annotated flags, and its spacing (z, y, x, mm), from its volume sidecar."""
    sidecar = read_sidecar(volume_sidecar_path)
    entries = sorted(sidecar["structures"], key=lambda e: int(e["channel"]))
    ref, _ = read_channels(sidecar["structures_file"])
    return (ref.astype(bool), [e["name"] for e in entries], [bool(e["annotated"]) for e in entries],
            list(reversed([float(s) for s in sidecar["spacing"]])))


def read_prediction(masks_dir: str | Path, names: Sequence[str], shape_zyx: Sequence[int]) -> np.ndarray:
    """The (C, z, y, x) boolean predicted masks ``<masks_dir>/<name>.nrrd`` in ``names``' order;
    ValueError naming the file when a mask's (z, y, x) shape is not ``shape_zyx`` (the CT's)."""
    import nrrd

    masks = []
    for name in names:
        path = Path(masks_dir) / f"{name}.nrrd"
        mask = nrrd.read(str(path), index_order="C")[0]
        if tuple(mask.shape) != tuple(shape_zyx):
            raise ValueError(f"{path.name} has shape {tuple(mask.shape)}, the reference {tuple(shape_zyx)}")
        masks.append(mask.astype(bool))
    return np.stack(masks)


# ---------------------------------------------------------------- one fold's plan
def plan_fold(folds_tsv: str | Path, fold: int, fingerprint_json: str | Path,
              preprocess_sidecars: Sequence[str | Path], out: str | Path, patch_size: Sequence[int],
              percentiles: Sequence[float] = (0.5, 99.5)) -> dict[str, Any]:
    """Write fold ``fold``'s plan (module doc). Normalisation uses the fold's training cases only.

    A case of the folds whose preprocessing excluded it is listed in ``excluded`` with its reason
    and left out of the plan's cases (the log says so); the exclusions table lists it too.
    """
    folds = read_folds(folds_tsv)
    sidecars = {}
    for path in preprocess_sidecars:
        sidecar = read_sidecar(path)
        sidecars[str(sidecar["case"])] = (str(path), sidecar)
    split_of = {"train": (folds["fold"] != str(fold)) & (folds["fold"] != "test"),
                "val": folds["fold"] == str(fold), "test": folds["fold"] == "test"}
    cases: dict[str, dict[str, str]] = {}
    excluded = []
    for split, chosen in split_of.items():
        cases[split] = {}
        for case in sorted(folds.loc[chosen, "case"]):
            if case not in sidecars:
                raise ValueError(f"{folds_tsv}: case {case} has no preprocessed sidecar among the inputs")
            path, sidecar = sidecars[case]
            if is_ok(sidecar):
                cases[split][case] = path
            else:
                excluded.append({"case": case, "split": split, "file": sidecar.get("file", ""),
                                 "reason": sidecar.get("reason", "excluded")})
                log.warning("fold %d: case %s (%s) left out: %s", fold, case, split, sidecar.get("reason"))
    if not cases["train"] or not cases["val"]:
        raise ValueError(f"{folds_tsv}: fold {fold} needs preprocessed train and val cases "
                         f"({len(cases['train'])} train, {len(cases['val'])} val)")
    names = {case: [s["name"] for s in sidecars[case][1]["structures"]] for split in cases for case in cases[split]}
    first = next(iter(names.values()))
    differing = sorted(c for c, n in names.items() if n != first)
    if differing:
        raise ValueError(f"cases {differing[:5]} list other structures than {first}: one structure list per task")
    foreground = np.concatenate([np.load(sidecars[c][1]["files"]["foreground"]) for c in cases["train"]])
    if foreground.size == 0:
        raise ValueError(f"fold {fold}: the training cases have no annotated foreground voxel to normalise with")
    low, high = np.percentile(foreground, list(percentiles))
    clipped = np.clip(foreground, low, high)
    target = read_json(fingerprint_json)["target_spacing_mm"]
    plan = {"fold": int(fold), "structures": first, "target_spacing_mm": target,
            "foreground_fraction": foreground_fractions([sidecars[c][1] for c in cases["train"]]),
            "spacing_zyx": list(reversed(target)), "patch_size": [int(p) for p in patch_size],
            "intensity": {"clip_low": float(low), "clip_high": float(high), "mean": float(clipped.mean()),
                          "std": float(max(clipped.std(), 1e-6)), "percentiles": list(percentiles),
                          "n_voxels": int(foreground.size), "fitted_on": sorted(cases["train"])},
            "cases": cases, "excluded": excluded,
            # the training side's patients and fold labels: the trainer's inner split (model selection)
            # groups by patient as the outer folds do
            "train_rows": [{"case": str(r.case), "patient": str(r.patient), "label": int(r.label)}
                           for r in folds[folds["case"].isin(cases["train"])].itertuples()]}
    write_json(out, plan)
    log.info("fold %d plan: %d train, %d val, %d test cases; HU clip %.1f..%.1f, mean %.1f, SD %.1f", fold,
             len(cases["train"]), len(cases["val"]), len(cases["test"]), low, high, plan["intensity"]["mean"],
             plan["intensity"]["std"])
    return plan


def foreground_fractions(sidecars: Sequence[dict[str, Any]]) -> list[float]:
    """Per structure, the share of the preprocessed voxels it covers over the cases where it is
    annotated (what the networks' output biases start from, hnct.models.oar_nets); a structure
    annotated nowhere (or never present) gets 0."""
    names = [s["name"] for s in sidecars[0]["structures"]]
    inside, total = np.zeros(len(names)), np.zeros(len(names))
    for sidecar in sidecars:
        voxels = float(np.prod(sidecar["shape_zyx"]))
        for c, entry in enumerate(sidecar["structures"]):
            if entry["annotated"]:
                inside[c] += float(entry["voxels"])
                total[c] += voxels
    return [float(i / t) if t else 0.0 for i, t in zip(inside, total)]


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hnct preprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", help="log file (also logged to stderr)")
    sub = parser.add_subparsers(dest="command", required=True)
    fp = sub.add_parser("fingerprint", help="fingerprint.json from folds.tsv and the volume sidecars")
    fp.add_argument("--folds", required=True)
    fp.add_argument("--volume-sidecars", nargs="+", required=True)
    fp.add_argument("--out", required=True)
    fp.add_argument("--target-spacing-mm", nargs="*", type=float, default=[],
                    help="x y z mm (train.<task>.target_spacing_mm); none: the median spacing")
    case = sub.add_parser("case", help="one case's cropped, resampled arrays and sidecar")
    case.add_argument("--case", required=True)
    case.add_argument("--volume-sidecar", required=True)
    case.add_argument("--fingerprint", required=True)
    case.add_argument("--out-dir", required=True)
    case.add_argument("--sidecar", required=True)
    case.add_argument("--body-threshold-hu", type=float, required=True)
    case.add_argument("--samples", type=int, required=True)
    case.add_argument("--seed", type=int, required=True)
    plan = sub.add_parser("plan", help="one fold's plan.json")
    plan.add_argument("--folds", required=True)
    plan.add_argument("--fold", type=int, required=True)
    plan.add_argument("--fingerprint", required=True)
    plan.add_argument("--sidecars", nargs="+", required=True)
    plan.add_argument("--out", required=True)
    plan.add_argument("--patch-size", nargs=3, type=int, required=True, help="z y x voxels")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    if args.command == "fingerprint":
        fingerprint(args.folds, args.volume_sidecars, args.out, args.target_spacing_mm or None)
    elif args.command == "case":
        preprocess_case(args.case, args.volume_sidecar, args.fingerprint, args.out_dir, args.sidecar,
                        args.body_threshold_hu, args.samples, args.seed)
    else:
        plan_fold(args.folds, args.fold, args.fingerprint, args.sidecars, args.out, args.patch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
