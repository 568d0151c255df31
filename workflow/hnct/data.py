"""Datasets and transforms of both training tasks (used by hnct.train).

classify: one item per case, from the 1 mm laryngeal crop ``results/crops/{case}.nrrd`` (path from
the crop sidecar's ``volume``; int16 HU, LPS) and the label of ``folds.tsv``. The deterministic part
(read, clip HU to ``hu_clip``, z-score over the volume, fit to ``input_shape``) runs once per case and
is cached in memory; augmentation (MONAI dictionary transforms, train only) is the only per-epoch cost.
SimpleITK -> numpy gives axes (z, y, x); in LPS x runs right -> left, so the left-right flip is the
x axis (spatial axis 2 of the (C, z, y, x) array).

segment: one item per axial slice, from the slice NPZs of ``results/folds/segment/fold{k}_slices.tsv``
(``image`` int16 = windowed HU, ``mask`` uint8 label map, axes (y, x)). Image -> [0, 1] by the
slice's own window; target = ``mask == value`` of ``train.segment.structure`` in the case's labels
(slices sidecar ``labels``: value -> name). Slices are centre padded/cropped to ``input_size`` with
offsets that ``unfit_slice`` undoes exactly, so predictions return to the original slice grid.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from hnct.common import InputError, progress, read_image, read_sidecar, structure_values

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- classify
def read_fold_cases(folds_tsv: str | Path, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train (other folds) and validation (fold ``fold``) rows of ``folds.tsv``; test cases are in neither."""
    folds = pd.read_csv(folds_tsv, sep="\t", dtype={"fold": str, "case": str})
    folds = folds[folds["fold"] != "test"]
    is_val = folds["fold"] == str(fold)
    if not is_val.any():
        raise ValueError(f"{folds_tsv}: fold {fold} has no validation cases")
    return folds[~is_val].reset_index(drop=True), folds[is_val].reset_index(drop=True)


def read_test_cases(folds_tsv: str | Path) -> pd.DataFrame:
    """The held-out test rows of ``folds.tsv`` (``fold == "test"``); empty when there is no test set."""
    folds = pd.read_csv(folds_tsv, sep="\t", dtype={"fold": str, "case": str})
    return folds[folds["fold"] == "test"].reset_index(drop=True)


def sidecars_by_case(sidecar_paths: Sequence[str | Path]) -> dict[str, Path]:
    """``{case: sidecar path}`` from per-case sidecars named ``{case}.json``."""
    return {Path(p).stem: Path(p) for p in sidecar_paths}


def sidecars_in(directory: str | Path, cases: Sequence[str]) -> dict[str, Path]:
    """``{case: directory/{case}.json}``: the per-case sidecars of the cases a fold table lists.

    The workflow's fold tables are built from every case's sidecar, so a training job depends on the
    fold table alone and finds each listed case's sidecar here (``results/crops``, ``results/slices``).
    """
    return {str(case): Path(directory) / f"{case}.json" for case in cases}


def given_or_found_sidecars(given, directory: str | Path | None, cases: Sequence[str]):
    """The sidecars a caller gave (paths or ``{case: path}``), else those of ``cases`` in ``directory``
    (what a training job does: it depends on the fold table, not on every sidecar)."""
    if given is None and directory is not None:
        return sidecars_in(directory, list(cases))
    return given or []


def fit_volume(volume: np.ndarray, shape: Sequence[int], fit: str) -> np.ndarray:
    """Bring a (z, y, x) float volume to ``shape``: ``resize`` (trilinear, whole crop, aspect not kept)
    or ``pad_crop`` (centred; pads with the volume's minimum, i.e. air after clipping)."""
    shape = tuple(int(s) for s in shape)
    if fit == "resize":
        tensor = torch.from_numpy(np.ascontiguousarray(volume))[None, None]
        return F.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()
    if fit == "pad_crop":
        from monai.transforms import ResizeWithPadOrCrop

        fitted = ResizeWithPadOrCrop(spatial_size=shape, mode="constant",
                                     value=float(volume.min()))(volume[None])
        return np.asarray(fitted)[0]
    raise ValueError(f"train.classify.fit must be resize or pad_crop, not {fit!r}")


def preprocess_crop(case: str, crop_path: str | Path, hu_clip: Sequence[float],
                    input_shape: Sequence[int], fit: str) -> np.ndarray:
    """(1, D, H, W) float32 network input of one crop: HU clipped to ``hu_clip``, z-scored over the
    volume (after clipping), fitted to ``input_shape``."""
    image = read_image(case, crop_path, "crop")
    hu = sitk.GetArrayFromImage(image).astype(np.float32)  # (z, y, x)
    if hu.ndim != 3:
        raise InputError(case, str(crop_path), f"crop is not a 3D image (shape {hu.shape})")
    hu = np.clip(hu, float(hu_clip[0]), float(hu_clip[1]))
    # z-score per volume; a constant crop would divide by zero, so its scale is taken as 1
    std = float(hu.std())
    normalised = (hu - float(hu.mean())) / (std if std > 1e-6 else 1.0)
    return fit_volume(normalised, input_shape, fit)[None].astype(np.float32)


def load_classify_items(rows: pd.DataFrame, crop_sidecars: dict[str, Path],
                        cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The cached, deterministic part of the classify dataset: ``{"image", "label", "case"}`` per row."""
    items = []
    for row in progress(list(rows.itertuples(index=False)), every=20, what="crops preprocessed"):
        sidecar_path = crop_sidecars.get(row.case)
        if sidecar_path is None:
            raise InputError(row.case, "results/crops/", "no crop sidecar given for a case in folds.tsv")
        sidecar = read_sidecar(sidecar_path)
        if sidecar.get("status") != "ok" or not sidecar.get("volume"):
            raise InputError(row.case, str(sidecar_path), "crop sidecar is not ok (case excluded upstream)")
        image = preprocess_crop(row.case, sidecar["volume"], cfg["hu_clip"], cfg["input_shape"], cfg["fit"])
        items.append({"image": image, "label": int(row.label), "case": str(row.case)})
    return items


def classify_augmentation(input_shape: Sequence[int]):
    """Train-time 3D augmentation (MONAI dictionary transforms on ``image``, (1, z, y, x))."""
    from monai.transforms import (Compose, Rand3DElasticd, RandAdjustContrastd, RandAffined,
                                  RandFlipd, RandGaussianNoised)

    return Compose([
        RandAffined(keys="image", prob=0.5, rotate_range=(0.17, 0.17, 0.17), scale_range=(0.1, 0.1, 0.1),
                    translate_range=(2, 2, 2), mode="bilinear", padding_mode="border"),
        # small, smooth deformations (sigma in voxels = mm at 1 mm spacing)
        Rand3DElasticd(keys="image", prob=0.2, sigma_range=(4, 6), magnitude_range=(0, 2),
                       mode="bilinear", padding_mode="border"),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
        RandGaussianNoised(keys="image", prob=0.3, mean=0.0, std=0.1),
        # left-right: x, the last array axis of a SimpleITK (z, y, x) array in LPS
        RandFlipd(keys="image", prob=0.5, spatial_axis=2),
    ])


# ---------------------------------------------------------------- segment
def fit_offsets(size: int, target: int) -> tuple[int, int]:
    """(pad_before, crop_start) along one axis for centring a ``size`` axis into ``target``."""
    if size <= target:
        return (target - size) // 2, 0
    return 0, (size - target) // 2


def fit_slice(array: np.ndarray, target: int, fill: float = 0) -> np.ndarray:
    """Centre pad/crop a (y, x) array to (target, target); ``unfit_slice`` is its exact inverse."""
    out = np.full((target, target), fill, dtype=array.dtype)
    (pad_y, crop_y), (pad_x, crop_x) = fit_offsets(array.shape[0], target), fit_offsets(array.shape[1], target)
    ny, nx = min(array.shape[0], target), min(array.shape[1], target)
    out[pad_y:pad_y + ny, pad_x:pad_x + nx] = array[crop_y:crop_y + ny, crop_x:crop_x + nx]
    return out


def unfit_slice(fitted: np.ndarray, shape: Sequence[int], fill: float = 0) -> np.ndarray:
    """A (target, target) prediction back on the original (y, x) grid of ``shape`` (outside: ``fill``)."""
    target = fitted.shape[-1]
    out = np.full(tuple(shape), fill, dtype=fitted.dtype)
    (pad_y, crop_y), (pad_x, crop_x) = fit_offsets(shape[0], target), fit_offsets(shape[1], target)
    ny, nx = min(shape[0], target), min(shape[1], target)
    out[crop_y:crop_y + ny, crop_x:crop_x + nx] = fitted[pad_y:pad_y + ny, pad_x:pad_x + nx]
    return out


def structure_value(labels: dict[str, str], structure: str) -> int | None:
    """Label value of ``structure`` (case-insensitive) in ``labels`` (value -> name), None if absent."""
    values = structure_values(labels, structure)
    return values[0] if values else None


def load_segment_slices(fold_slices_tsv: str | Path, slice_sidecars: dict[str, Path], structure: str,
                        input_size: int) -> pd.DataFrame:
    """Every slice of the fold, cached: columns of the TSV plus ``image`` ((S, S) float32 in [0, 1]),
    ``target`` ((S, S) uint8 0/1) and ``shape`` (original (y, x))."""
    table = pd.read_csv(fold_slices_tsv, sep="\t", dtype={"case": str})
    value_of: dict[str, int | None] = {}
    images, targets, shapes = [], [], []
    for row in progress(list(table.itertuples(index=False)), every=500, what="slices loaded"):
        if row.case not in value_of:
            sidecar_path = slice_sidecars.get(row.case)
            if sidecar_path is None:
                raise InputError(row.case, str(fold_slices_tsv), "no slices sidecar given for a case of the fold")
            # a case without the structure in its label map is all background (node-negative)
            value_of[row.case] = structure_value(read_sidecar(sidecar_path).get("labels") or {}, structure)
        try:
            with np.load(row.npz) as npz:
                hu, mask, window = npz["image"], npz["mask"], npz["window"]
        except (OSError, KeyError, ValueError) as error:
            raise InputError(row.case, str(row.npz), f"cannot read slice NPZ: {error}") from error
        level, width = float(window[0]), float(window[1])
        image = ((hu.astype(np.float32) - (level - width / 2)) / width).clip(0.0, 1.0)
        value = value_of[row.case]
        target = (mask == value).astype(np.uint8) if value is not None else np.zeros(mask.shape, np.uint8)
        shapes.append(tuple(hu.shape))
        images.append(fit_slice(image, input_size, fill=0.0))
        targets.append(fit_slice(target, input_size, fill=0))
    table = table.assign(image=images, target=targets, shape=shapes)
    return table


def balanced_epoch_indices(positive: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Every positive slice plus an equal random draw of negatives (all of them if fewer), re-drawn
    each epoch from ``seed`` and ``epoch`` (so a resumed run draws the same slices)."""
    positive = np.asarray(positive).astype(bool)
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    rng = np.random.default_rng([int(seed), int(epoch)])
    drawn = rng.choice(neg, size=min(len(pos), len(neg)), replace=False) if len(pos) else neg
    return np.sort(np.concatenate([pos, drawn]))


def segment_augmentation():
    """Train-time 2D augmentation of ``image`` and ``target`` ((1, y, x)): flips, small affine, intensity."""
    from monai.transforms import (Compose, RandAffined, RandFlipd, RandGaussianNoised,
                                  RandScaleIntensityd)

    return Compose([
        RandFlipd(keys=["image", "target"], prob=0.5, spatial_axis=1),
        RandAffined(keys=["image", "target"], prob=0.5, rotate_range=0.17, scale_range=(0.1, 0.1),
                    translate_range=(4, 4), mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", prob=0.3, factors=0.1),
        RandGaussianNoised(keys="image", prob=0.3, mean=0.0, std=0.02),
    ])


def seeded_loader(dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int, epoch: int,
                  sampler=None):
    """A DataLoader whose shuffling and worker seeds depend only on (seed, epoch)."""
    from monai.data import DataLoader

    generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, generator=generator, drop_last=False,
                      persistent_workers=False)


class ItemDataset(torch.utils.data.Dataset):
    """Cached items with an optional (random) dictionary transform applied on access."""

    def __init__(self, items: list[dict[str, Any]], keys: Sequence[str], transform=None) -> None:
        self.items, self.keys, self.transform = items, tuple(keys), transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        data = {k: torch.as_tensor(item[k]) for k in self.keys}
        if self.transform is not None:
            data = self.transform(data)
        # MONAI returns MetaTensors; plain tensors keep the default collate simple
        out = {k: torch.as_tensor(data[k]).as_subclass(torch.Tensor) for k in self.keys}
        out["index"] = index
        return out
