"""train{task, model, fold}: one trainer for both tasks, resumable, seeded.

classify: 3D crops -> T4 vs non-T4 (focal loss with per-class weights, early stopping on validation
macro-F1). segment: 2D slices -> foreground of ``train.segment.structure`` (hnct.losses.snet_loss,
every positive slice plus an equal draw of negatives per epoch, ReduceLROnPlateau, early stopping on
validation Dice). Same loop, checkpointing and resume for both.

Outputs in ``out_dir`` (``results/train/{task}/{model}/fold{fold}/``), written atomically and only when
training has finished (early stop or last epoch):
``best.pt``              ``model_state, model, task, config, epoch, metric, cases, fingerprint, versions``
                         (best validation epoch; ``cases``: the ``train``, ``val`` and ``test`` case IDs
                         this run used)
``history.csv``          ``epoch, train_loss, val_loss, val_auc|val_dice, val_f1, lr, seconds`` (epochs from 1)
``val_predictions.csv``  classify ``case, label, probability, fold``; segment ``case, slice, prob_npz,
                         fold`` with ``val_probs/{case}.npz`` (``prob`` float16 (z, y, x) on the original
                         slice grid, ``slice`` int) per validation case.
``test_predictions.csv`` the same columns for the held-out test cases of folds.tsv (``fold == "test"``),
                         predicted by the best model (the epoch early stopping kept); ``fold`` is the
                         model's fold. No test set: the header and no rows. segment: always header-only
                         (test-set prediction of slices is not implemented; the log says so).
Working state in ``out_dir/checkpoints/``: ``last.pt`` (model, optimizer, scaler, scheduler, RNG states,
epoch, best metric, patience counter, history, fingerprint) every ``checkpoint_every`` epochs and on
SIGTERM/SIGUSR1 (what SLURM sends before a time limit or preemption: the current step finishes, the
checkpoint is saved, the process exits with 128 + signal so the job is requeued/rerun), and
``best_model.pt``. A start with ``last.pt`` present resumes from it only when its fingerprint (task,
model, the --config JSON and a sha256 of the trainer's code: train, data, losses, common, models) is
this run's; otherwise (Snakemake reruns a job whose config or code changed) it starts from epoch 1 and
logs why. An epoch interrupted by a signal is run again from its start on
resume (with the weights it had reached); its per-epoch randomness (augmentation, sampling, shuffling)
is seeded from ``seed`` and the epoch number, so it draws the same data again.

Validation Dice (segment) is pooled over all validation slices (2·Σ|P∩T| / (Σ|P| + Σ|T|), threshold 0.5),
so slices and cases without foreground cannot make it undefined; hnct.evaluate reports per-case 3D metrics.
Segment ``val_f1`` is slice-level detection F1 (a slice is positive when any pixel is).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hnct import data as hdata
from hnct.common import atomic_path, progress, setup_logging, software_versions
from hnct.models import build_model

log = logging.getLogger("hnct.train")

PREDICTION_COLUMNS = {"classify": ("case", "label", "probability", "fold"),
                      "segment": ("case", "slice", "prob_npz", "fold")}
HISTORY_COLUMNS = {
    "classify": ["epoch", "train_loss", "val_loss", "val_auc", "val_f1", "lr", "seconds"],
    "segment": ["epoch", "train_loss", "val_loss", "val_dice", "val_f1", "lr", "seconds"],
}


class StopRequested(Exception):
    """A SIGTERM/SIGUSR1 arrived: the checkpoint has been saved, exit non-zero."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


class _SignalFlag:
    """Remember SIGTERM/SIGUSR1 instead of dying mid-step; the loop checks it after every step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_SignalFlag":
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: finishing the current step, then checkpointing", signum)
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


# ---------------------------------------------------------------- helpers
def choose_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def rng_states() -> dict[str, Any]:
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _save_torch(payload: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def macro_f1(labels: np.ndarray, predicted: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(labels, predicted, average="macro", labels=[0, 1], zero_division=0))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def _loader(dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int, epoch: int,
            sampler=None):
    """A DataLoader whose shuffling and worker seeds depend only on (seed, epoch)."""
    from monai.data import DataLoader

    generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(epoch))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers, generator=generator, drop_last=False,
                      persistent_workers=False)


# ---------------------------------------------------------------- task adapters
class ClassifyTask:
    metric_name = "val_auc"

    def __init__(self, cfg, train_rows, val_rows, crop_sidecars, fold, test_rows=None):
        """``crop_sidecars``: ``{case: sidecar}`` or a list of ``{case}.json`` paths; ``test_rows``: the
        held-out test rows of folds.tsv (predicted by the best model, never trained or validated on)."""
        self.cfg, self.fold = cfg, fold
        sidecars = crop_sidecars if isinstance(crop_sidecars, dict) else hdata.sidecars_by_case(crop_sidecars)
        self.train_items = hdata.load_classify_items(train_rows, sidecars, cfg)
        self.val_items = hdata.load_classify_items(val_rows, sidecars, cfg)
        self.test_items = (hdata.load_classify_items(test_rows, sidecars, cfg)
                           if test_rows is not None and len(test_rows) else [])
        self.augment = hdata.classify_augmentation(cfg["input_shape"]) if cfg.get("augment", True) else None
        from monai.losses import FocalLoss

        # Per-class weights [non-T4, T4] via `weight`; alpha stays None: MONAI's scalar alpha with
        # softmax means [1-alpha, alpha], so a value > 1 would give non-T4 a negative weight.
        self.loss_fn = FocalLoss(gamma=float(cfg["focal_gamma"]), alpha=None,
                                 weight=[float(w) for w in cfg["class_weights"]],
                                 use_softmax=True, to_onehot_y=True, include_background=True)

    def train_loader(self, epoch, num_workers):
        if self.augment is not None:
            self.augment.set_random_state(seed=int(self.cfg["seed"]) * 1000 + epoch)
        dataset = hdata.ItemDataset(self.train_items, ["image", "label"], self.augment)
        sampler = None
        if self.cfg.get("weighted_sampler"):
            labels = np.array([it["label"] for it in self.train_items])
            counts = np.bincount(labels, minlength=2).astype(float)
            weights = 1.0 / np.maximum(counts[labels], 1.0)
            sampler = torch.utils.data.WeightedRandomSampler(
                torch.as_tensor(weights, dtype=torch.double), num_samples=len(labels), replacement=True,
                generator=torch.Generator().manual_seed(int(self.cfg["seed"]) * 7919 + epoch))
        return _loader(dataset, int(self.cfg["batch_size"]), True, num_workers, self.cfg["seed"], epoch, sampler)

    def val_loader(self, num_workers, items=None):
        items = self.val_items if items is None else items
        return _loader(hdata.ItemDataset(items, ["image", "label"]), int(self.cfg["batch_size"]),
                       False, num_workers, self.cfg["seed"], 0)

    def loss(self, outputs, batch):
        return self.loss_fn(outputs.float(), batch["label"].view(-1, 1).long())

    def validate(self, model, device, num_workers, amp, items=None):
        """Metrics and P(T4) of ``items`` (default: the validation cases), in their order."""
        items = self.val_items if items is None else items
        probabilities, losses, weights = [], [], []
        model.eval()
        with torch.no_grad():
            for batch in self.val_loader(num_workers, items):
                image = batch["image"].to(device)
                with torch.autocast(device_type=device.type, enabled=amp):
                    logits = model(image)
                losses.append(float(self.loss(logits.float(), {"label": batch["label"].to(device)})))
                weights.append(len(image))
                probabilities.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
        probability = np.concatenate(probabilities)
        labels = np.array([it["label"] for it in items])
        metrics = {"val_loss": float(np.average(losses, weights=weights)),
                   "val_auc": roc_auc(labels, probability),
                   "val_f1": macro_f1(labels, (probability >= 0.5).astype(int))}
        return metrics, probability

    def selection(self, metrics):
        """Early stopping score: macro-F1, ties broken by the lower validation loss."""
        return (metrics["val_f1"], -metrics["val_loss"])

    def write_predictions(self, model, device, num_workers, amp, out_dir, predictions_path, split="val"):
        """``case, label, probability, fold`` of the validation (``split="val"``) or test cases; an empty
        test set gives the header and no rows."""
        items = self.val_items if split == "val" else self.test_items
        probability = self.validate(model, device, num_workers, amp, items)[1] if items else np.zeros(0)
        table = pd.DataFrame({"case": [it["case"] for it in items], "label": [it["label"] for it in items],
                              "probability": probability, "fold": self.fold},
                             columns=list(PREDICTION_COLUMNS["classify"]))
        with atomic_path(predictions_path) as tmp:
            table.to_csv(tmp, index=False)


class SegmentTask:
    metric_name = "val_dice"

    def __init__(self, cfg, fold_slices_tsv, slice_sidecars, fold):
        self.cfg, self.fold = cfg, fold
        size = int(cfg["input_size"])
        sidecars = slice_sidecars if isinstance(slice_sidecars, dict) else hdata.sidecars_by_case(slice_sidecars)
        table = hdata.load_segment_slices(fold_slices_tsv, sidecars, cfg["structure"], size)
        self.train_table = table[table["split"] == "train"].reset_index(drop=True)
        self.val_table = table[table["split"] == "val"].reset_index(drop=True)
        if self.train_table.empty or self.val_table.empty:
            raise ValueError(f"{fold_slices_tsv}: fold {fold} needs train and val slices")
        self.train_items = [{"image": im[None].astype(np.float32), "target": t[None].astype(np.float32)}
                            for im, t in zip(self.train_table["image"], self.train_table["target"])]
        self.val_items = [{"image": im[None].astype(np.float32), "target": t[None].astype(np.float32)}
                          for im, t in zip(self.val_table["image"], self.val_table["target"])]
        self.train_positive = np.array([t.any() for t in self.train_table["target"]])
        self.augment = hdata.segment_augmentation() if cfg.get("augment", True) else None
        from hnct.losses import snet_loss

        self.loss_fn = snet_loss

    def train_loader(self, epoch, num_workers):
        if self.augment is not None:
            self.augment.set_random_state(seed=int(self.cfg["seed"]) * 1000 + epoch)
        chosen = hdata.balanced_epoch_indices(self.train_positive, int(self.cfg["seed"]), epoch)
        dataset = hdata.ItemDataset([self.train_items[i] for i in chosen], ["image", "target"], self.augment)
        return _loader(dataset, int(self.cfg["batch_size"]), True, num_workers, self.cfg["seed"], epoch)

    def val_loader(self, num_workers):
        return _loader(hdata.ItemDataset(self.val_items, ["image", "target"]), int(self.cfg["batch_size"]),
                       False, num_workers, self.cfg["seed"], 0)

    def loss(self, outputs, batch):
        if isinstance(outputs, (list, tuple)):
            outputs = [o.float() for o in outputs]
        else:
            outputs = outputs.float()
        return self.loss_fn(outputs, batch["target"].float())

    def predict(self, model, device, num_workers, amp):
        probs, losses, weights = [], [], []
        model.eval()
        with torch.no_grad():
            for batch in self.val_loader(num_workers):
                image, target = batch["image"].to(device), batch["target"].to(device)
                with torch.autocast(device_type=device.type, enabled=amp):
                    logits = model(image)
                if isinstance(logits, (list, tuple)):  # a model that keeps deep supervision in eval
                    logits = logits[0]
                losses.append(float(self.loss(logits, {"target": target})))
                weights.append(len(image))
                probs.append(torch.sigmoid(logits.float())[:, 0].cpu().numpy())
        return np.concatenate(probs), float(np.average(losses, weights=weights))

    def validate(self, model, device, num_workers, amp):
        prob, val_loss = self.predict(model, device, num_workers, amp)
        target = np.stack(list(self.val_table["target"])).astype(bool)
        predicted = prob >= 0.5
        overlap, total = np.logical_and(predicted, target).sum(), predicted.sum() + target.sum()
        dice = float(2 * overlap / total) if total else 1.0
        slice_truth = target.any(axis=(1, 2)).astype(int)
        slice_pred = predicted.any(axis=(1, 2)).astype(int)
        from sklearn.metrics import f1_score

        detection_f1 = float(f1_score(slice_truth, slice_pred, zero_division=0))
        return {"val_loss": val_loss, "val_dice": dice, "val_f1": detection_f1}, prob

    def selection(self, metrics):
        return (metrics["val_dice"], -metrics["val_loss"])

    def write_predictions(self, model, device, num_workers, amp, out_dir, predictions_path, split="val"):
        """``val_probs/{case}.npz`` per validation case (original slice grid) and the CSV listing them.

        ``split="test"``: segmentation has no test-set prediction yet (the fold slice lists hold train
        and val slices only); the table is written with its header and no rows, and the log says so.
        """
        if split == "test":
            log.warning("segment: test-set prediction is not implemented; %s lists no cases", predictions_path)
            with atomic_path(predictions_path) as tmp:
                pd.DataFrame(columns=list(PREDICTION_COLUMNS["segment"])).to_csv(tmp, index=False)
            return
        prob, _ = self.predict(model, device, num_workers, amp)
        rows = []
        table = self.val_table.assign(order=np.arange(len(self.val_table)))
        for case, group in table.groupby("case", sort=True):
            group = group.sort_values("slice")
            volume = np.stack([hdata.unfit_slice(prob[i], shape) for i, shape in
                               zip(group["order"], group["shape"])]).astype(np.float16)
            npz_path = Path(out_dir) / "val_probs" / f"{case}.npz"
            with atomic_path(npz_path) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez_compressed(handle, prob=volume, slice=group["slice"].to_numpy(dtype=np.int64))
            rows += [{"case": case, "slice": int(s), "prob_npz": str(npz_path), "fold": self.fold}
                     for s in group["slice"]]
        with atomic_path(predictions_path) as tmp:
            pd.DataFrame(rows, columns=["case", "slice", "prob_npz", "fold"]).to_csv(tmp, index=False)


# ---------------------------------------------------------------- the trainer
def trainer_code_hash() -> str:
    """sha256 of the code that defines a training run (this module, data, losses, models, common)."""
    root = Path(__file__).resolve().parent
    files = [root / "train.py", root / "data.py", root / "losses.py", root / "common.py",
             *sorted((root / "models").glob("*.py"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_fingerprint(task: str, model_name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: task, model, the --config JSON and the code hash."""
    return {"task": task, "model": model_name, "config": json.loads(json.dumps(cfg, sort_keys=True)),
            "code": trainer_code_hash()}


def resume_mismatch(state: dict[str, Any], fingerprint: dict[str, Any]) -> str | None:
    """Why ``state`` (a last.pt) must not be resumed under ``fingerprint``; None when it may."""
    stored = state.get("fingerprint")
    if not isinstance(stored, dict):
        return "it has no fingerprint (written by an older trainer)"
    changed = [key for key in ("task", "model", "config", "code") if stored.get(key) != fingerprint[key]]
    if not changed:
        return None
    names = {"task": "task", "model": "model", "config": "--config JSON", "code": "trainer code"}
    return "it was written with a different " + " and ".join(names[key] for key in changed)


def train_fold(task: str, model_name: str, fold: int, out_dir: str | Path, cfg: dict[str, Any],
               folds_tsv: str | Path | None = None, crop_sidecars: list[str] | None = None,
               fold_slices_tsv: str | Path | None = None, slice_sidecars: list[str] | None = None,
               threads: int = 1, crops_dir: str | Path | None = None,
               slices_dir: str | Path | None = None) -> dict[str, Any]:
    """Train ``model_name`` on fold ``fold`` of ``task``; resume from ``out_dir/checkpoints/last.pt``.

    ``cfg``: the task's ``train.<task>`` section merged with ``seed``, ``device``, ``num_workers`` and
    ``checkpoint_every`` of ``train``. classify reads ``folds_tsv`` and the crop sidecars; segment reads
    ``fold_slices_tsv`` and the slices sidecars (for the label names). The sidecars are either given
    (``crop_sidecars`` / ``slice_sidecars``) or found as ``{crops_dir|slices_dir}/{case}.json`` for the
    cases the fold table lists (what the workflow does). Returns the final summary.
    Raises StopRequested after checkpointing when SIGTERM/SIGUSR1 arrives.
    """
    from monai.utils import set_determinism

    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / "checkpoints"
    last_path, best_model_path = checkpoint_dir / "last.pt", checkpoint_dir / "best_model.pt"
    seed = int(cfg["seed"])
    set_determinism(seed=seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    device = choose_device(cfg.get("device", "auto"))
    amp = device.type == "cuda"  # mixed precision on GPU only
    num_workers = min(int(cfg.get("num_workers", 0)), max(int(threads) - 1, 0))
    if device.type == "cpu":
        torch.set_num_threads(max(int(threads), 1))
    log.info("task %s model %s fold %d on %s (amp %s, workers %d)", task, model_name, fold, device, amp,
             num_workers)

    if task == "classify":
        train_rows, val_rows = hdata.read_fold_cases(folds_tsv, fold)
        test_rows = hdata.read_test_cases(folds_tsv)
        if crop_sidecars is None and crops_dir is not None:
            listed = pd.concat([train_rows["case"], val_rows["case"], test_rows["case"]])
            sidecars: Any = hdata.sidecars_in(crops_dir, list(listed))
        else:
            sidecars = crop_sidecars or []
        log.info("%d train, %d validation and %d test cases", len(train_rows), len(val_rows), len(test_rows))
        if test_rows.empty:
            log.info("no test set in %s (folds.test: none, or no case marked test)", folds_tsv)
        adapter: ClassifyTask | SegmentTask = ClassifyTask(cfg, train_rows, val_rows, sidecars, fold, test_rows)
        cases = {"train": sorted(train_rows["case"]), "val": sorted(val_rows["case"]),
                 "test": sorted(test_rows["case"])}
    elif task == "segment":
        if slice_sidecars is None and slices_dir is not None:
            listed = pd.read_csv(fold_slices_tsv, sep="\t", usecols=["case"], dtype={"case": str})["case"]
            segment_sidecars: Any = hdata.sidecars_in(slices_dir, sorted(set(listed)))
        else:
            segment_sidecars = slice_sidecars or []
        adapter = SegmentTask(cfg, fold_slices_tsv, segment_sidecars, fold)
        log.info("%d train slices (%d positive), %d validation slices", len(adapter.train_items),
                 int(adapter.train_positive.sum()), len(adapter.val_items))
        cases = {"train": sorted(set(adapter.train_table["case"])), "val": sorted(set(adapter.val_table["case"])),
                 "test": []}
    else:
        raise ValueError(f"unknown task {task!r}")

    model = build_model(task, model_name, cfg).to(device)
    # classify: Adam or AdamW from config; segment: AdamW (S-Net)
    optimizer_name = cfg.get("optimizer", "adamw") if task == "classify" else "adamw"
    optimizer_cls = torch.optim.AdamW if optimizer_name == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(model.parameters(), lr=float(cfg["lr"]), weight_decay=float(cfg.get("weight_decay", 0)))
    scheduler = (torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                            patience=max(int(cfg["patience"]) // 3, 1))
                 if task == "segment" else None)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    start_epoch, best_score, best_epoch, stale, history = 1, None, 0, 0, []
    fingerprint = run_fingerprint(task, model_name, cfg)
    state = torch.load(last_path, map_location=device, weights_only=False) if last_path.exists() else None
    mismatch = resume_mismatch(state, fingerprint) if state is not None else None
    if mismatch:
        # Snakemake reruns a job whose config or code changed: that run starts over, it never
        # continues the weights, optimizer and history of another configuration or trainer.
        log.warning("not resuming %s: %s; starting from epoch 1", last_path, mismatch)
        state = None
        best_model_path.unlink(missing_ok=True)
    if state is not None:
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        scaler.load_state_dict(state["scaler_state"])
        if scheduler is not None and state.get("scheduler_state"):
            scheduler.load_state_dict(state["scheduler_state"])
        set_rng_states(state["rng_states"])
        start_epoch, stale, history = state["epoch"] + 1, state["stale_epochs"], state["history"]
        best_score, best_epoch = state["best_score"], state["best_epoch"]
        best_score = tuple(best_score) if best_score is not None else None
        log.info("resumed from %s: epoch %d done, best epoch %d", last_path, state["epoch"], best_epoch)

    def save_last(completed_epoch: int) -> None:
        _save_torch({"model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(),
                     "scaler_state": scaler.state_dict(),
                     "scheduler_state": scheduler.state_dict() if scheduler is not None else None,
                     "rng_states": rng_states(), "epoch": completed_epoch, "best_score": best_score,
                     "best_epoch": best_epoch, "stale_epochs": stale, "history": history,
                     "model": model_name, "task": task, "config": cfg, "fingerprint": fingerprint}, last_path)
        log.info("checkpoint: epoch %d -> %s", completed_epoch, last_path)

    epochs, patience, every = int(cfg["epochs"]), int(cfg["patience"]), int(cfg.get("checkpoint_every", 1))
    finished_early = stale >= patience
    with _SignalFlag() as stop:
        for epoch in range(start_epoch, epochs + 1):
            if finished_early:
                break
            started = time.perf_counter()
            model.train()
            total, count = 0.0, 0
            loader = adapter.train_loader(epoch, num_workers)
            for batch in progress(loader, total=len(loader), every=max(len(loader) // 4, 1),
                                  what=f"epoch {epoch} training batches"):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device_type=device.type, enabled=amp):
                    outputs = model(batch["image"])
                loss = adapter.loss(outputs, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"epoch {epoch}: training loss is {float(loss)}")
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total += float(loss.detach()) * len(batch["image"])
                count += len(batch["image"])
                if stop.signum is not None:
                    # the interrupted epoch reruns from its start on resume
                    save_last(epoch - 1)
                    raise StopRequested(stop.signum)
            metrics, _ = adapter.validate(model, device, num_workers, amp)
            if scheduler is not None:
                scheduler.step(metrics[adapter.metric_name])
            row = {"epoch": epoch, "train_loss": total / max(count, 1), **metrics,
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started}
            history.append({c: row[c] for c in HISTORY_COLUMNS[task]})
            score = adapter.selection(metrics)
            if best_score is None or score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                _save_torch({"model_state": model.state_dict(), "epoch": epoch}, best_model_path)
            else:
                stale += 1
            log.info("epoch %d/%d: train loss %.4f, val loss %.4f, %s %.3f, val F1 %.3f, %.1f s%s", epoch,
                     epochs, row["train_loss"], row["val_loss"], adapter.metric_name,
                     row[adapter.metric_name], row["val_f1"], row["seconds"],
                     " (best)" if best_epoch == epoch else "")
            finished_early = stale >= patience
            if finished_early:
                log.info("early stop: no better validation score for %d epochs", patience)
            if epoch % every == 0 or epoch == epochs or finished_early or stop.signum is not None:
                save_last(epoch)
            if stop.signum is not None:
                raise StopRequested(stop.signum)

    # finished: the declared outputs, each atomically, best model first
    best = torch.load(best_model_path, map_location=device, weights_only=False)
    model.load_state_dict(best["model_state"])
    adapter.write_predictions(model, device, num_workers, amp, out_dir, out_dir / "val_predictions.csv")
    # the held-out test cases, by the same (early-stopping) best model
    adapter.write_predictions(model, device, num_workers, amp, out_dir, out_dir / "test_predictions.csv",
                              split="test")
    with atomic_path(out_dir / "history.csv") as tmp:
        pd.DataFrame(history, columns=HISTORY_COLUMNS[task]).to_csv(tmp, index=False)
    _save_torch({"model_state": {k: v.cpu() for k, v in best["model_state"].items()}, "model": model_name,
                 "task": task, "config": cfg, "epoch": best_epoch,
                 "metric": {adapter.metric_name: history[best_epoch - 1][adapter.metric_name]
                            if best_epoch else math.nan},
                 "cases": cases, "fingerprint": fingerprint,
                 "versions": software_versions()}, out_dir / "best.pt")
    log.info("done: best epoch %d of %d", best_epoch, len(history))
    return {"best_epoch": best_epoch, "epochs_run": len(history), "history": history}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=["classify", "segment"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--fold", required=True, type=int)
    parser.add_argument("--out-dir", required=True, help="results/train/{task}/{model}/fold{fold}")
    parser.add_argument("--config", required=True,
                        help="JSON: train.<task> merged with train's seed, device, num_workers, checkpoint_every")
    parser.add_argument("--folds", help="results/folds/{task}/folds.tsv (classify)")
    parser.add_argument("--crop-sidecars", nargs="*", default=None,
                        help="results/crops/{case}.json (classify; default: --crops-dir/{case}.json)")
    parser.add_argument("--crops-dir", help="folder of the crop sidecars of the cases in --folds (classify)")
    parser.add_argument("--fold-slices", help="results/folds/segment/fold{k}_slices.tsv (segment)")
    parser.add_argument("--slice-sidecars", nargs="*", default=None,
                        help="results/slices/{case}.json (segment; default: --slices-dir/{case}.json)")
    parser.add_argument("--slices-dir", help="folder of the slices sidecars of the cases in --fold-slices")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log")
    args = parser.parse_args(argv)
    setup_logging(args.log)
    cfg = json.loads(args.config)
    try:
        # a rule passes the other task's inputs as empty values
        train_fold(args.task, args.model, args.fold, args.out_dir, cfg, folds_tsv=args.folds or None,
                   crop_sidecars=args.crop_sidecars, fold_slices_tsv=args.fold_slices or None,
                   slice_sidecars=args.slice_sidecars, threads=args.threads,
                   crops_dir=args.crops_dir or None, slices_dir=args.slices_dir or None)
    except StopRequested as stop:
        log.warning("stopped by signal %d after checkpointing; rerun to resume", stop.signum)
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
