"""oar: 3D multi-structure segmentation of organs at risk (HaN-Seg, SegRap, HaN5K-style cohorts).

Reads convert's per-structure channels (``results/volumes/{case}/structures.nrrd``, one binary
channel per structure of ``convert.structures``) and the volume sidecar's ``structures`` list, whose
``annotated: false`` marks a structure that is *unknown* for that case (never background).

Folds read the volume sidecars; a case without a structures file or with no annotated structure is
excluded with the reason; folds are grouped by patient, not stratified (``stratified = False``; the
label is 1 when every structure is annotated). Preprocessing (``plan``: :mod:`hnct.preprocess`,
rules in workflow/rules/preprocess.smk): body crop, resampling to the fingerprint's spacing, arrays
memory-mapped in training, intensity clipping and z-scoring fitted on the fold's training cases.

Training (one trainer loop, :mod:`hnct.train`): random 3D patches of the plan's size, every third one
centred on a random voxel of a random annotated structure of its case (nnU-Net's foreground
oversampling), with ``augment`` mirrored left-right (each ``_L``/``_R`` pair's labels swapped) and
rotated, scaled and intensity-jittered (:func:`oar_augmentation`); loss :func:`masked_structure_loss`,
soft Dice + per-channel BCE in which each case's unknown structures weigh nothing (both terms); deep supervision over the network's heads (weights
1/2^i, normalised) when it returns them; AdamW, polynomial learning-rate decay (nnU-Net's, stepped
per epoch); with ``train.selection: inner`` the cases of an inner, patient-grouped split of the
outer fold's training side (:func:`hnct.tasks.inner_rows`, the plan's ``train_rows``) are held out of
training and model selection reads their Dice (mean over their annotated, non-empty structures, at
0.5; ties by the lower inner loss); the outer fold is predicted once, by the selected model.
``inner_f1`` is structure-level detection F1 (a structure is found when any voxel is predicted) over
the annotated structures.

Prediction: ``monai.inferers.sliding_window_inference`` over the whole preprocessed volume (Gaussian
weighting, ``sw_overlap``, optional left-right mirroring with the L/R structures swapped back), sigmoid probabilities resampled
back onto the CT's own grid (linear), thresholded at 0.5: per case ``{split}_pred/{case}/`` holds
``label.nrrd`` (uint8, value i+1 = structure i, painted in ``convert.structures`` order, later wins)
and ``<structure>.nrrd`` per structure, all with exactly the CT's size, origin, spacing and direction.
Evaluation: :func:`evaluate` with :mod:`hnct.metrics.structures` (Dice, HD95, NSD per structure and
case; unknown structures listed as not annotated, not scored).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

from hnct.tasks import Task, evaluate_fold_parser, register_task

log = logging.getLogger("hnct.train")

FOREGROUND_EVERY = 3  # every third patch is centred on an annotated structure (nnU-Net: 33 %)
PREPROCESS_DIR = "results/preprocess/{task}"


@register_task
class Oar(Task):
    name = "oar"
    positive_label = "fully annotated"
    report_kind = "structures"
    report_title = "Organs at risk, 3D multi-structure segmentation"
    fold_sidecars = "results/volumes/{case}.json"
    stratified = False
    plan = True
    train_inputs = {"plan": PREPROCESS_DIR + "/fold{fold}/plan.json"}
    evaluate_mem_mb = 4000
    modules = ("tasks.oar", "preprocess", "metrics.structures", "nrrdio")
    metric_name = "inner_dice"
    selection_metric = "mean Dice over annotated structures at 0.5 (ties: the lower loss)"
    # Dice needs no class on either side (the fold label only marks fully annotated cases)
    inner_required_labels = ()
    history_columns = ("epoch", "train_loss", "inner_loss", "inner_dice", "inner_f1", "lr", "seconds")
    prediction_columns = ("case", "fold", "split", "volume_sidecar", "preprocess_sidecar", "label_nrrd",
                          "masks_dir")

    # ---- workflow
    @classmethod
    def preprocess_options(cls, config):
        section = config["train"][cls.name]
        return {"fingerprint": {"target-spacing-mm": list(section["target_spacing_mm"] or [])},
                "case": {"body-threshold-hu": section["body_threshold_hu"],
                         "samples": section["foreground_samples"], "seed": config["train"]["seed"]},
                "plan": {"patch-size": list(section["patch_size"])}}

    @classmethod
    def evaluate_options(cls, config):
        tolerances = config["evaluate"]["nsd_tolerances_mm"]
        return {"nsd-tolerances": " ".join(f"{name}={mm}" for name, mm in tolerances.items()),
                "nsd-tolerance-mm": config["evaluate"]["structure_nsd_tolerance_mm"]}

    # ---- folds
    @classmethod
    def case_label(cls, case, row, sidecar_path, sidecar, cohort_file, options):
        stage = f"folds:{cls.name}"
        entries = sidecar.get("structures") or []
        structures_file = sidecar.get("structures_file") or ""
        if not entries or not structures_file:
            return None, {"case": case, "stage": stage, "file": str(sidecar_path),
                          "reason": "no per-structure channels (structures.nrrd): convert ran without labels"}
        if not any(entry.get("annotated") for entry in entries):
            return None, {"case": case, "stage": stage, "file": str(sidecar_path),
                          "reason": "no structure is annotated for this case"}
        return int(all(entry.get("annotated") for entry in entries)), None

    # ---- training
    @classmethod
    def add_train_arguments(cls, parser) -> None:
        parser.add_argument("--plan", dest="plan_json", required=True,
                            help="results/preprocess/oar/fold{k}/plan.json")

    @classmethod
    def prepare(cls, cfg, fold, inputs):
        """``inputs["plan_json"]``: the fold's plan. Adds ``cfg["plan"]`` (structures, spacing, patch
        size): what the networks are sized from, and part of the checkpoint fingerprint."""
        from hnct.common import read_json

        plan = read_json(inputs["plan_json"])
        cfg["plan"] = {"structures": plan["structures"], "spacing_zyx": plan["spacing_zyx"],
                       "patch_size": plan["patch_size"], "intensity": plan["intensity"],
                       "foreground_fraction": plan["foreground_fraction"]}
        run = OarRun(cfg, plan, fold)
        log.info("%d train, %d inner validation, %d outer validation, %d test cases; %d structures; patch %s",
                 len(run.volumes["train"]), len(run.volumes["inner"]), len(run.volumes["val"]),
                 len(run.volumes["test"]), len(plan["structures"]), plan["patch_size"])
        return run

    @classmethod
    def optimizer(cls, cfg, parameters):
        import torch

        return torch.optim.AdamW(parameters, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))

    @classmethod
    def scheduler(cls, optimizer, cfg):
        import torch

        # nnU-Net's poly schedule; the trainer steps a scheduler with the validation metric, which
        # LambdaLR's step ignores as its epoch argument would be deprecated: wrap it.
        return PolyLR(torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: (1 - min(epoch, int(cfg["epochs"])) / int(cfg["epochs"])) ** 0.9))

    # ---- evaluate
    @classmethod
    def evaluate_main(cls, argv):
        parser = evaluate_fold_parser(f"hnct evaluate --task {cls.name}", None,
                                      "val_predictions.csv (case, fold, split, ..., label_nrrd, masks_dir)")
        parser.add_argument("--nsd-tolerances", nargs="*", default=[], help="NAME=MM per structure")
        parser.add_argument("--nsd-tolerance-mm", type=float, required=True, help="structures not listed")
        args = parser.parse_args(argv)
        from hnct.common import setup_logging

        setup_logging(args.log)
        tolerances = {}
        for item in " ".join(args.nsd_tolerances).split():  # the rule passes one quoted string
            name, _, mm = item.partition("=")
            tolerances[name] = float(mm)
        from hnct.common import InputError

        try:
            evaluate(args.predictions, args.out_metrics, args.out_per_case, args.model, args.fold, tolerances,
                     args.nsd_tolerance_mm)
        except InputError as err:
            log.error("evaluate %s fold %s: %s", args.model, args.fold, err)
            return 1
        return 0


class PolyLR:
    """nnU-Net's polynomial decay, stepped once per epoch by the trainer (which passes its metric)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def step(self, metric=None) -> None:
        self.inner.step()

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state) -> None:
        self.inner.load_state_dict(state)


# ---------------------------------------------------------------- output prior
PRIOR_RANGE = (1e-4, 0.5)  # a structure absent from every training case still starts at 1e-4


def prior_logits(fractions: Sequence[float]) -> list[float]:
    """Per structure ``log(f / (1 - f))`` of its foreground fraction (the plan's
    ``foreground_fraction``, clipped to :data:`PRIOR_RANGE`): the logit at which the sigmoid
    predicts the structure's share of the voxels everywhere."""
    low, high = PRIOR_RANGE
    return [math.log(f / (1 - f)) for f in (min(max(float(x), low), high) for x in fractions)]


def init_output_bias(convs, fractions: Sequence[float]) -> None:
    """Set the bias of each output convolution in ``convs`` (C output channels: the final layer and
    every deep-supervision head) to :func:`prior_logits` (the focal-loss paper's prior init).

    With the default zero bias every voxel of every channel starts at probability 0.5, and the first
    AdamW steps of BCE over those voxels drive every channel to background, from where the demo's
    fold 0 learnt its structures one by one: after 300 steps at lr 1e-2 SpinalCord, Thyroid_L and
    A_Vertebral_R were still at Dice 0 (4 validation cases, preprocessed grid); from the prior,
    after 200 steps, they were at 0.84-0.87."""
    import torch

    bias = torch.tensor(prior_logits(fractions))
    with torch.no_grad():
        for conv in convs:
            if conv.bias is None or conv.bias.shape != bias.shape:
                raise ValueError(f"output convolution {conv}: expected a bias of {len(bias)} channels")
            conv.bias.copy_(bias.to(conv.bias.dtype))


# ---------------------------------------------------------------- loss
def masked_structure_loss(logits, target, annotated, smooth: float = 1e-5):
    """Soft Dice + per-channel BCE over (B, C, z, y, x); ``annotated`` (B, C) weighs each case's
    channels: an unknown structure (0) contributes nothing to either term. Mean over the annotated
    (case, structure) pairs; 0 (with gradient) when a batch has none."""
    import torch
    from monai.losses import DiceLoss

    dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=smooth, smooth_dr=smooth, batch=False)(logits, target)
    dice = dice.reshape(dice.shape[0], dice.shape[1])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = bce.flatten(2).mean(dim=2)
    weight = annotated.to(logits.dtype)
    return ((dice + bce) * weight).sum() / weight.sum().clamp_min(1.0)


def deep_supervision_loss(outputs, target, annotated):
    """:func:`masked_structure_loss` of a network's output, or of its deep-supervision heads
    (DynUNet in training: (B, heads, C, z, y, x), all at full size) weighted 1/2^i, normalised."""
    if outputs.dim() == target.dim():
        return masked_structure_loss(outputs.float(), target, annotated)
    heads = outputs.shape[1]
    weights = [0.5 ** i for i in range(heads)]
    total = sum(w * masked_structure_loss(outputs[:, i].float(), target, annotated) for i, w in enumerate(weights))
    return total / sum(weights)


# ---------------------------------------------------------------- data
class CaseVolume:
    """One preprocessed case: its sidecar and its memory-mapped arrays (opened on first use, so each
    DataLoader worker maps its own)."""

    def __init__(self, case: str, sidecar_path: str) -> None:
        from hnct.common import read_sidecar

        self.case, self.sidecar_path = case, sidecar_path
        self.sidecar = read_sidecar(sidecar_path)
        self.annotated = [bool(s["annotated"]) for s in self.sidecar["structures"]]
        self.lr_axis = lr_axis(self.sidecar["grid"]["direction"])
        self._arrays: dict[str, Any] = {}

    def array(self, name: str):
        import numpy as np

        if name not in self._arrays:
            self._arrays[name] = np.load(self.sidecar["files"][name], mmap_mode="r")
        return self._arrays[name]

    def __getstate__(self):  # workers map their own arrays
        return {**self.__dict__, "_arrays": {}}


def lr_axis(direction: Sequence[float]) -> int:
    """The (z, y, x) array axis that runs along the patient's left-right (LPS x) axis, from an ITK
    direction (row-major 3x3: column i is index axis i's direction; array axis = 2 - i)."""
    import numpy as np

    columns = np.reshape(np.asarray(direction, dtype=float), (3, 3))
    return 2 - int(np.argmax(np.abs(columns[0])))


def lr_swap_order(structures: Sequence[str]) -> list[int]:
    """Channel order after mirroring left and right: each ``<name>_L`` takes its ``<name>_R``'s channel
    and back (HaN-Seg, SegRap and the demo name paired structures so); unpaired ones keep theirs."""
    index = {name: i for i, name in enumerate(structures)}
    order = list(range(len(structures)))
    for name, i in index.items():
        stem, _, side = name.rpartition("_")
        other = {"L": "R", "R": "L"}.get(side)
        if other and f"{stem}_{other}" in index:
            order[i] = index[f"{stem}_{other}"]
    return order


def mirror_lr(image, target, axis: int, swap: Sequence[int]):
    """(1, z, y, x) image and (C, z, y, x) target mirrored over array ``axis`` (0..2) with the L/R
    channels swapped (:func:`lr_swap_order`): the mirrored anatomy keeps consistent labels."""
    import numpy as np

    return (np.ascontiguousarray(np.flip(image, axis=axis + 1)),
            np.ascontiguousarray(np.flip(target, axis=axis + 1)[list(swap)]))


def oar_augmentation(spacing_zyx: Sequence[float]):
    """Train-time 3D augmentation after the L/R mirror (MONAI dictionary transforms on ``image``
    (1, z, y, x) and ``target`` (C, z, y, x)), nnU-Net's kinds with milder ranges: rotation about
    the cranio-caudal axis (in-plane, +-15 deg; nnU-Net rotates about all three, not anatomical
    for a neck whose structures run along z) and scaling 0.85-1.15 together (p 0.2, labels nearest),
    brightness x 0.9-1.1 (p 0.15), contrast 0.75-1.25 (p 0.15), Gaussian noise SD 0.1 (p 0.1) on the
    z-scored image. ``spacing_zyx`` only decides whether in-plane rotation is isotropic enough."""
    import math

    from monai.transforms import (Compose, RandAdjustContrastd, RandAffined, RandGaussianNoised,
                                  RandScaleIntensityd)

    in_plane = abs(float(spacing_zyx[1]) - float(spacing_zyx[2])) <= 0.05 * float(spacing_zyx[1])
    rotate = (math.radians(15.0), 0.0, 0.0) if in_plane else None
    return Compose([
        RandAffined(keys=["image", "target"], prob=0.2, rotate_range=rotate, scale_range=(0.15, 0.15, 0.15),
                    mode=("bilinear", "nearest"), padding_mode=("border", "zeros")),
        RandScaleIntensityd(keys="image", prob=0.15, factors=0.1),
        RandAdjustContrastd(keys="image", prob=0.15, gamma=(0.75, 1.25), retain_stats=True),
        RandGaussianNoised(keys="image", prob=0.1, mean=0.0, std=0.1),
    ])


def normalise(hu, intensity: dict[str, float]):
    """Clip HU to the plan's percentiles, z-score with the training foreground's mean and SD."""
    import numpy as np

    clipped = np.clip(hu, intensity["clip_low"], intensity["clip_high"])
    return ((clipped - intensity["mean"]) / intensity["std"]).astype(np.float32)


def extract_patch(array, start, size, fill):
    """``array[..., start:start+size]`` over the last three axes, ``fill`` where it leaves the array."""
    import numpy as np

    shape = array.shape[-3:]
    out = np.full((*array.shape[:-3], *size), fill, dtype=array.dtype)
    src, dst = [], []
    for begin, n, extent in zip(start, size, shape):
        lo, hi = max(begin, 0), min(begin + n, extent)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - begin, hi - begin))
    out[(..., *dst)] = array[(..., *src)]
    return out


class PatchDataset:
    """``n_patches`` random patches of the training cases for one epoch, each drawn from its own RNG
    (seed, epoch, index): the same epoch draws the same patches, whatever the workers."""

    def __init__(self, volumes: list[CaseVolume], n_patches: int, patch_size, intensity, seed: int,
                 epoch: int, structures: Sequence[str] = (), augment=None) -> None:
        """``augment``: a MONAI transform (:func:`oar_augmentation`) applied after a random L/R mirror
        (p 0.5, channels swapped by ``structures``' names); None: patches as stored."""
        self.volumes, self.n_patches = volumes, int(n_patches)
        self.patch_size, self.intensity = [int(p) for p in patch_size], intensity
        self.seed, self.epoch = int(seed), int(epoch)
        self.augment, self.swap = augment, lr_swap_order(structures)

    def __len__(self) -> int:
        return self.n_patches

    def start_of(self, volume: CaseVolume, rng, foreground: bool) -> list[int]:
        import numpy as np

        shape = volume.array("image").shape
        if foreground:
            locations = volume.array("locations")
            if len(locations):
                channels = np.unique(np.asarray(locations[:, 0]))
                channel = rng.choice(channels)
                rows = np.flatnonzero(np.asarray(locations[:, 0]) == channel)
                centre = np.asarray(locations[rng.choice(rows), 1:])
                return [int(c) - p // 2 for c, p in zip(centre, self.patch_size)]
        return [int(rng.integers(min(0, n - p), max(0, n - p) + 1)) for n, p in zip(shape, self.patch_size)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        import numpy as np
        import torch

        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        volume = self.volumes[int(rng.integers(len(self.volumes)))]
        start = self.start_of(volume, rng, foreground=index % FOREGROUND_EVERY == FOREGROUND_EVERY - 1)
        image = extract_patch(volume.array("image"), start, self.patch_size, self.intensity["clip_low"])
        image = normalise(image, self.intensity)[None]
        target = extract_patch(volume.array("structures"), start, self.patch_size, 0).astype(np.float32)
        annotated = np.asarray(volume.annotated, dtype=np.float32)
        if self.augment is not None:
            if rng.random() < 0.5:
                image, target = mirror_lr(image, target, volume.lr_axis, self.swap)
                annotated = annotated[self.swap]
            self.augment.set_random_state(seed=int(rng.integers(2 ** 31)))
            item = self.augment({"image": torch.from_numpy(image), "target": torch.from_numpy(target)})
            image, target = (torch.as_tensor(item[k]).as_subclass(torch.Tensor).numpy() for k in ("image", "target"))
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)),
                "annotated": torch.from_numpy(annotated)}


# ---------------------------------------------------------------- the fold
class OarRun:
    """One fold's cases, patches, loss, validation and prediction writing (what the trainer calls)."""

    def __init__(self, cfg: dict[str, Any], plan: dict[str, Any], fold: int) -> None:
        self.cfg, self.plan, self.fold = cfg, plan, int(fold)
        self.structures = list(plan["structures"])
        import pandas as pd

        from hnct.tasks import inner_rows

        train = sorted(plan["cases"]["train"])
        rows = pd.DataFrame(plan["train_rows"]).set_index("case").loc[train].reset_index()
        inner = set(rows.loc[inner_rows(cfg, rows, f"plan of fold {fold}", Oar.inner_required_labels), "case"])
        sides = {"train": {c: p for c, p in plan["cases"]["train"].items() if c not in inner},
                 "inner": {c: p for c, p in plan["cases"]["train"].items() if c in inner},
                 "val": plan["cases"]["val"], "test": plan["cases"]["test"]}
        self.volumes = {split: [CaseVolume(case, path) for case, path in sorted(sides[split].items())]
                        for split in ("train", "inner", "val", "test")}
        self.cases = {split: [v.case for v in vols] for split, vols in self.volumes.items()}
        self.augment = oar_augmentation(plan["spacing_zyx"]) if cfg["augment"] else None

    def train_loader(self, epoch, num_workers):
        from hnct import data as hdata

        dataset = PatchDataset(self.volumes["train"], self.cfg["patches_per_epoch"], self.plan["patch_size"],
                               self.plan["intensity"], self.cfg["seed"], epoch, self.structures, self.augment)
        return hdata.seeded_loader(dataset, int(self.cfg["batch_size"]), True, num_workers, self.cfg["seed"], epoch)

    def loss(self, outputs, batch):
        return deep_supervision_loss(outputs, batch["target"].float(), batch["annotated"])

    # ---- whole volumes
    def probabilities(self, model, volume: CaseVolume, device, amp):
        """(C, z, y, x) sigmoid probabilities on the preprocessed grid (sliding window)."""
        import numpy as np
        import torch
        from monai.inferers import sliding_window_inference

        image = torch.from_numpy(normalise(np.asarray(volume.array("image")), self.plan["intensity"]))[None, None]
        image = image.to(device)
        # test-time mirroring as training augments: over the left-right axis, L/R channels swapped back
        mirrors = [False, True] if self.cfg["mirror"] else [False]
        axis, swap = volume.lr_axis + 2, lr_swap_order(self.structures)
        total = None
        with torch.no_grad(), torch.autocast(device_type=device.type, enabled=amp):
            for mirrored in mirrors:
                flipped = torch.flip(image, (axis,)) if mirrored else image
                logits = sliding_window_inference(flipped, self.plan["patch_size"], int(self.cfg["batch_size"]),
                                                  model, overlap=float(self.cfg["sw_overlap"]), mode="gaussian")
                logits = logits.as_subclass(torch.Tensor) if hasattr(logits, "as_subclass") else logits
                prob = torch.sigmoid(logits.float())
                prob = torch.flip(prob, (axis,))[:, swap] if mirrored else prob
                total = prob if total is None else total + prob
        return (total / len(mirrors))[0].cpu().numpy(), image

    def validate(self, model, device, num_workers, amp):
        import numpy as np
        import torch

        from hnct.metrics.structures import dice

        model.eval()
        dices, losses, found = [], [], {"tp": 0, "fp": 0, "fn": 0}
        for volume in self.volumes["inner"]:
            prob, _ = self.probabilities(model, volume, device, amp)
            ref = np.asarray(volume.array("structures")).astype(bool)
            logit = torch.logit(torch.from_numpy(prob).clamp(1e-6, 1 - 1e-6))[None]
            losses.append(float(masked_structure_loss(logit, torch.from_numpy(ref[None].astype(np.float32)),
                                                      torch.tensor([volume.annotated], dtype=torch.float32))))
            pred = prob >= 0.5
            for channel, annotated in enumerate(volume.annotated):
                if not annotated:
                    continue
                has_ref, has_pred = bool(ref[channel].any()), bool(pred[channel].any())
                found["tp"] += has_ref and has_pred
                found["fp"] += has_pred and not has_ref
                found["fn"] += has_ref and not has_pred
                if has_ref:
                    dices.append(dice(pred[channel], ref[channel]))
        detections = 2 * found["tp"] + found["fp"] + found["fn"]
        metrics = {"inner_loss": float(np.mean(losses)) if losses else math.nan,
                   "inner_dice": float(np.mean(dices)) if dices else 0.0,
                   "inner_f1": 2 * found["tp"] / detections if detections else 1.0}
        return metrics, None

    def selection(self, metrics):
        return (metrics["inner_dice"], -metrics["inner_loss"])

    def write_predictions(self, model, device, num_workers, amp, out_dir, predictions_path, split="val"):
        """Per case of ``split``: ``{split}_pred/{case}/label.nrrd`` and one NRRD per structure on the
        CT's grid, and the CSV listing them (``split="test"``: the held-out cases; none: header only)."""
        import pandas as pd

        from hnct.common import atomic_path

        model.eval()
        rows = []
        for volume in self.volumes[split]:
            prob, _ = self.probabilities(model, volume, device, amp)
            case_dir = Path(out_dir) / f"{split}_pred" / volume.case
            label_path = write_case_prediction(prob, volume.sidecar, self.structures, case_dir)
            rows.append({"case": volume.case, "fold": self.fold, "split": split,
                         "volume_sidecar": volume.sidecar["volume_sidecar"],
                         "preprocess_sidecar": volume.sidecar_path, "label_nrrd": str(label_path),
                         "masks_dir": str(case_dir)})
        with atomic_path(predictions_path) as tmp:
            pd.DataFrame(rows, columns=list(Oar.prediction_columns)).to_csv(tmp, index=False)


def to_ct_grid(prob, sidecar: dict[str, Any]):
    """(C, z, y, x) probabilities on the preprocessed grid -> (C, z, y, x) float32 on the CT's grid
    (linear), resampled inside the body crop only (0 outside it, where nothing was predicted)."""
    import numpy as np

    from hnct.preprocess import image_from_geometry, resample_channel

    ct, start, size = sidecar["ct_geometry"], sidecar["crop_index_start"], sidecar["crop_index_size"]
    axes = np.reshape(ct["direction"], (3, 3)) * np.asarray(ct["spacing"])
    box = image_from_geometry({**ct, "size": size,
                               "origin": list(np.asarray(ct["origin"]) + axes @ np.asarray(start, float))})
    grid = image_from_geometry(sidecar["grid"])
    out = np.zeros((len(prob), *reversed([int(n) for n in ct["size"]])), dtype=np.float32)
    (x0, y0, z0), (nx, ny, nz) = start, size
    for channel, p in enumerate(prob):
        out[channel, z0:z0 + nz, y0:y0 + ny, x0:x0 + nx] = resample_channel(p, grid, box, threshold=None)
    return out


def write_case_prediction(prob, sidecar: dict[str, Any], structures: list[str], case_dir: Path) -> Path:
    """Threshold the CT-grid probabilities at 0.5; write ``label.nrrd`` (priority order: later wins)
    and ``<structure>.nrrd`` with the CT's exact geometry. Returns the label map's path."""
    import numpy as np

    from hnct.common import fresh_dir
    from hnct.nrrdio import write_nrrd

    masks = to_ct_grid(prob, sidecar) >= 0.5
    label = np.zeros(masks.shape[1:], dtype=np.uint8)
    for channel in range(len(structures)):
        label[masks[channel]] = channel + 1
    geometry = sidecar["ct_geometry"]
    fresh_dir(case_dir)
    for channel, name in enumerate(structures):
        write_nrrd(masks[channel].astype(np.uint8), geometry, case_dir / f"{name}.nrrd")
    write_nrrd(label, geometry, case_dir / "label.nrrd")
    return case_dir / "label.nrrd"


# ---------------------------------------------------------------- evaluation
def read_predictions_table(predictions_csv):
    """A fold's ``val_predictions.csv`` with :attr:`Oar.prediction_columns`; InputError (case
    ``all``) naming the file when it is unreadable or lacks columns."""
    import pandas as pd

    from hnct.common import InputError

    try:
        table = pd.read_csv(predictions_csv, dtype={"case": str})
    except (OSError, ValueError) as err:
        raise InputError("all", predictions_csv, f"cannot read the predictions table: {err}") from err
    missing = [c for c in Oar.prediction_columns if c not in table.columns]
    if missing:
        raise InputError("all", predictions_csv, f"predictions table lacks columns {missing}")
    return table


def evaluate(predictions_csv, out_metrics, out_per_case, model: str, fold: int, tolerances: dict[str, float],
             default_tolerance_mm: float) -> dict[str, Any]:
    """Per-case, per-structure metrics (:func:`hnct.metrics.structures.case_structure_metrics`) of
    one fold's validation predictions against convert's reference channels, on the CT's grid."""
    import pandas as pd

    from hnct.common import InputError, atomic_path, software_versions, write_json
    from hnct.metrics import structures as metrics
    from hnct.preprocess import read_prediction, read_reference

    predictions = read_predictions_table(predictions_csv)
    rows = []
    for record in predictions.itertuples(index=False):
        # a missing or unreadable file, or a prediction whose grid or channels differ from the
        # reference: InputError naming the case and the file, not a traceback from deep inside
        try:
            ref, names, annotated, spacing = read_reference(record.volume_sidecar)
        except (OSError, KeyError, ValueError) as err:
            raise InputError(record.case, record.volume_sidecar,
                             f"cannot read the reference structures: {type(err).__name__}: {err}") from err
        try:
            pred = read_prediction(record.masks_dir, names, ref.shape[1:])
            case_rows = metrics.case_structure_metrics(pred, ref, names, annotated, spacing, tolerances,
                                                       default_tolerance_mm)
        except (OSError, ValueError) as err:
            raise InputError(record.case, record.masks_dir,
                             f"cannot score the predicted masks: {type(err).__name__}: {err}") from err
        rows += [{"case": record.case, "fold": fold, "model": model, **row} for row in case_rows]
    table = pd.DataFrame(rows, columns=["case", "fold", "model", *metrics.ROW_COLUMNS])
    with atomic_path(out_per_case) as tmp:
        table.to_csv(tmp, index=False)
    summary = metrics.summarise(table)
    payload = {"task": Oar.name, "model": model, "fold": int(fold), "n_cases": int(predictions["case"].nunique()),
               "dice": summary["mean_dice"], "structures": summary["structures"],
               "nsd_tolerances_mm": {n: metrics.tolerance_of(n, tolerances, default_tolerance_mm)
                                     for n in summary["structures"]},
               "versions": software_versions()}
    write_json(out_metrics, payload)
    log.info("oar %s fold %d: %d cases, mean Dice over structures %s", model, fold, payload["n_cases"],
             "n/a" if summary["mean_dice"] is None else f"{summary['mean_dice']:.3f}")
    return payload
