"""train{task, model, fold}: one trainer for every task, resumable, seeded.

The task (hnct.tasks: data, augmentation, loss, optimizer and schedule, validation metric, prediction
writing) and the model (hnct.models) come from the registries; this module is the loop they share:
``train_fold`` = restore, then per epoch ``run_epoch`` -> ``validate`` -> ``checkpoint``, then ``finish``.

Model selection never sees the outer validation fold (``train.selection``; hnct.tasks' doc has the
run interface): with ``inner`` the task holds an inner, patient-grouped, stratified split of the
outer fold's training side out of training, and ``validate`` (best epoch, early stopping after
``patience`` epochs without improvement, the task's LR scheduler) reads that inner validation only;
with ``fixed`` every epoch trains on the whole training side, nothing is validated and the last
epoch's model is kept. After training the kept model predicts the outer fold once
(``val_predictions.csv``), the inner validation (``inner_predictions.csv``) and the test set.

Outputs in ``out_dir`` (``results/train/{task}/{model}/fold{fold}/``), written atomically and only when
training has finished (early stop or last epoch):
``best.pt``              tensors and plain data only (``torch.load(..., weights_only=True)``):
                         ``model_state, model, task, config, epoch, metric, selection, cases,
                         fingerprint, versions`` (the selected epoch and its inner-validation metric;
                         ``selection``: mode, inner_folds, metric; ``cases``: the ``train``, ``inner``
                         (selection), ``val`` (outer fold) and ``test`` case IDs this run used)
``best.json``            the same without the weights
``history.csv``          the task's ``history_columns`` (epochs from 1): training loss (of the main
                         output, the definition the inner loss uses) and inner-validation loss and
                         metrics, never the outer fold's (NaN with ``selection: fixed``)
``val_predictions.csv``  the task's ``prediction_columns`` of the outer fold (classify ``case, label,
                         probability, fold``; segment ``case, slice, prob_npz, fold`` with
                         ``val_probs/{case}.npz``), written once by the selected model
``inner_predictions.csv`` the same for the inner validation cases (header only with ``fixed``)
``test_predictions.csv`` the same columns for the held-out test cases of folds.tsv (``fold == "test"``),
                         predicted by the best model; no test set (or a task without test-set
                         prediction, segment): the header and no rows.
``permuted_labels.tsv``  only in a permuted-label control run (``--permutation-seed``, rule
                         train_permuted_fold): the task's label table with the training side's labels
                         permuted (:func:`permute_training_labels`), what the run trained on.
Working state in ``out_dir/checkpoints/`` (tensors and plain data, loaded with ``weights_only=True``):
``last.pt`` (model, optimizer, scaler, scheduler, RNG states, epoch, best metric, patience counter,
history, fingerprint) every ``checkpoint_every`` epochs and on SIGTERM/SIGUSR1 (what SLURM sends before
a time limit or preemption: the current step finishes, the checkpoint is saved, the process exits with
128 + signal so the job is requeued/rerun), and ``best_model.pt``. A start with ``last.pt`` present
resumes from it only when its fingerprint (task, model, the --config JSON and the code hash of
hnct.tasks.training_modules: train, data, losses, common, the registries, the task's and the model's modules) is
this run's; otherwise (Snakemake reruns a job whose config or code changed) it starts from epoch 1 and
logs why. An epoch interrupted by a signal is run again from its start on resume (with the weights it
had reached); its per-epoch randomness (augmentation, sampling, shuffling) is seeded from ``seed`` and
the epoch number, so it draws the same data again.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from hnct.common import atomic_path, progress, setup_logging, software_versions, write_json
from hnct.models import build_model
from hnct.tasks import add_plugins_argument, code_hash, get_task, load_plugins, training_modules

log = logging.getLogger("hnct.train")

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
    """Every RNG's state as tensors and plain data (a ``weights_only`` checkpoint holds no numpy)."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                            "pos": int(numpy_state["state"]["pos"])}
    states = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    numpy_state = dict(states["numpy"])
    numpy_state["state"] = {"key": numpy_state["state"]["key"].numpy().astype(np.uint32),
                            "pos": numpy_state["state"]["pos"]}
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    np.random.set_state(numpy_state)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(payload: dict[str, Any], path: Path) -> None:
    """Atomic torch.save of tensors and plain data (what ``torch.load(weights_only=True)`` reads)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint`: no pickled objects are executed."""
    return torch.load(path, map_location=device, weights_only=True)


# ---------------------------------------------------------------- the permuted-label control
PERMUTED_LABELS = "permuted_labels.tsv"


def permute_training_labels(folds: pd.DataFrame, fold: int, seed: int) -> pd.DataFrame:
    """A copy of a folds table (``case, patient, label, fold``) whose training side for outer fold
    ``fold`` (the rows of every other fold; never ``fold`` itself nor ``test``) has its labels
    permuted among its patients, seeded by ``(seed, fold)``: the permuted-label control.

    Patients are shuffled within groups of equal scan count, each patient taking another patient's
    labels (in case order), so a patient keeps one label across its scans and the training side keeps
    its class counts exactly. The outer fold and the test rows keep their true labels: a model
    trained on the result, selected on its inner split as usual, is scored against the truth.
    """
    missing = {"case", "patient", "label", "fold"} - set(folds.columns)
    if missing:
        raise ValueError(f"folds table: missing columns {sorted(missing)} for the permuted-label control")
    fold_text = folds["fold"].astype(str)
    if not (fold_text == str(fold)).any():
        raise ValueError(f"folds table: fold {fold} has no validation cases")
    training = folds[(fold_text != str(fold)) & (fold_text != "test")]
    unnamed = training.loc[training["patient"].isna() | (training["patient"].astype(str).str.strip() == ""), "case"]
    if len(unnamed):
        raise ValueError(f"folds table: {len(unnamed)} training case(s) without a patient, e.g. "
                         f"{list(unnamed[:3])}: the permuted-label control permutes labels by patient")
    rng = np.random.default_rng([int(seed), int(fold)])
    permuted = folds.copy()
    scans = {patient: rows.sort_values("case").index
             for patient, rows in training.groupby(training["patient"].astype(str), sort=True)}
    by_size: dict[int, list[str]] = {}
    for patient, index in scans.items():
        by_size.setdefault(len(index), []).append(patient)
    for size in sorted(by_size):
        patients = by_size[size]
        donors = [patients[i] for i in rng.permutation(len(patients))]
        for patient, donor in zip(patients, donors):
            permuted.loc[scans[patient], "label"] = folds.loc[scans[donor], "label"].to_numpy()
    return permuted


def permuted_inputs(spec, fold: int, seed: int, out_dir: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    """``inputs`` with the task's label table (registry: ``label_permutation``) replaced by its
    permuted copy, written to ``out_dir/permuted_labels.tsv`` (the record of what this run trained on)."""
    name = spec.label_permutation
    if not name:
        raise ValueError(f"task {spec.name} has no permuted-label control (its registry entry sets no "
                         "label_permutation); remove it from train.permutation_models")
    source = inputs.get(name)
    if not source:
        raise ValueError(f"task {spec.name}: a permuted-label run needs the trainer input {name}")
    table = pd.read_csv(source, sep="\t", dtype=str, keep_default_na=False)
    permuted = permute_training_labels(table, fold, seed)
    path = out_dir / PERMUTED_LABELS
    with atomic_path(path) as tmp:
        permuted.to_csv(tmp, sep="\t", index=False)
    changed = int((permuted["label"] != table["label"]).sum())
    log.info("permuted-label control, seed %d: %d of %d training-side labels changed (%s)", seed, changed,
             int(((table["fold"] != str(fold)) & (table["fold"] != "test")).sum()), path)
    return {**inputs, name: str(path)}


# ---------------------------------------------------------------- the trainer
def trainer_code_hash(task: str, model_name: str) -> str:
    """sha256 of the code that defines a run of ``task`` x ``model_name`` (hnct.tasks.code_hash of
    hnct.tasks.training_modules); the train rule's code_version is the same hash."""
    return code_hash(training_modules(task, model_name))


def run_fingerprint(task: str, model_name: str, cfg: dict[str, Any],
                    permutation_seed: int | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: task, model, the --config JSON (with the
    permutation seed of a permuted-label run) and the code hash."""
    identity = cfg if permutation_seed is None else {**cfg, "permutation_seed": int(permutation_seed)}
    return {"task": task, "model": model_name, "config": json.loads(json.dumps(identity, sort_keys=True)),
            "code": trainer_code_hash(task, model_name)}


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


@dataclass
class Progress:
    """Where a run stands: what ``last.pt`` saves besides the weights and optimizer."""

    start_epoch: int = 1
    best_score: tuple | None = None
    best_epoch: int = 0
    stale: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Trainer:
    """The pieces of one run: the task's fold (``run``), the network and its optimization state."""

    task: Any
    model_name: str
    fold: int
    cfg: dict[str, Any]
    run: Any
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    device: torch.device
    amp: bool
    num_workers: int
    out_dir: Path
    fingerprint: dict[str, Any]
    permutation_seed: int | None = None

    @property
    def last_path(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"

    @property
    def best_model_path(self) -> Path:
        return self.out_dir / "checkpoints" / "best_model.pt"

    # ---- step: restore
    def restore(self) -> Progress:
        """Resume from last.pt when its fingerprint is this run's; otherwise start at epoch 1."""
        state = load_checkpoint(self.last_path, self.device) if self.last_path.exists() else None
        mismatch = resume_mismatch(state, self.fingerprint) if state is not None else None
        if mismatch:
            # Snakemake reruns a job whose config or code changed: that run starts over, it never
            # continues the weights, optimizer and history of another configuration or trainer.
            log.warning("not resuming %s: %s; starting from epoch 1", self.last_path, mismatch)
            self.best_model_path.unlink(missing_ok=True)
            return Progress()
        if state is None:
            return Progress()
        self.model.load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scaler.load_state_dict(state["scaler_state"])
        if self.scheduler is not None and state.get("scheduler_state"):
            self.scheduler.load_state_dict(state["scheduler_state"])
        set_rng_states(state["rng_states"])
        best = state["best_score"]
        log.info("resumed from %s: epoch %d done, best epoch %d", self.last_path, state["epoch"], state["best_epoch"])
        return Progress(state["epoch"] + 1, tuple(best) if best is not None else None, state["best_epoch"],
                        state["stale_epochs"], state["history"])

    # ---- step: one training epoch
    def run_epoch(self, epoch: int, stop: "_SignalFlag", done: Progress) -> float:
        """Mean training loss of ``epoch``; on a signal, checkpoints the previous epoch and raises."""
        self.model.train()
        total, count = 0.0, 0
        loader = self.run.train_loader(epoch, self.num_workers)
        for batch in progress(loader, total=len(loader), every=max(len(loader) // 4, 1),
                              what=f"epoch {epoch} training batches"):
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=self.device.type, enabled=self.amp):
                outputs = self.model(batch["image"])
            loss = self.run.loss(outputs, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"epoch {epoch}: training loss is {float(loss)}")
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # deep supervision ([main, aux...]) optimises the sum; the curve shows the main output's
            # loss, the one validation computes (the model returns only the main output in eval mode)
            recorded = (self.run.loss(outputs[0].detach(), batch) if isinstance(outputs, (list, tuple))
                        else loss.detach())
            total += float(recorded) * len(batch["image"])
            count += len(batch["image"])
            if stop.signum is not None:
                # the interrupted epoch reruns from its start on resume
                self.checkpoint(epoch - 1, done)
                raise StopRequested(stop.signum)
        return total / max(count, 1)

    @property
    def selecting(self) -> bool:
        """``train.selection: inner``: epochs are validated and selected on the inner split."""
        return self.cfg["selection"] == "inner"

    # ---- step: validate on the inner split, keep the best model, count patience
    def validate(self, epoch: int, train_loss: float, started: float, done: Progress) -> dict[str, Any]:
        metrics = self.run.validate(self.model, self.device, self.num_workers, self.amp)[0] if self.selecting else {}
        if self.selecting and self.scheduler is not None:
            self.scheduler.step(metrics[self.task.metric_name])
        row = {"epoch": epoch, "train_loss": train_loss, **metrics,
               "lr": self.optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started}
        done.history.append({c: row.get(c, math.nan) for c in self.task.history_columns})
        score = self.run.selection(metrics) if self.selecting else None
        if not self.selecting:  # fixed: the last epoch is the model
            done.best_epoch = epoch
        elif done.best_score is None or score > done.best_score:
            done.best_score, done.best_epoch, done.stale = score, epoch, 0
            save_checkpoint({"model_state": self.model.state_dict(), "epoch": epoch}, self.best_model_path)
        else:
            done.stale += 1
        measured = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        log.info("epoch %d/%d: train loss %.4f%s, %.1f s%s", epoch, int(self.cfg["epochs"]), train_loss,
                 f", {measured}" if measured else "", row["seconds"],
                 " (best)" if self.selecting and done.best_epoch == epoch else "")
        return row

    # ---- step: checkpoint
    def checkpoint(self, completed_epoch: int, done: Progress) -> None:
        save_checkpoint({"model_state": self.model.state_dict(), "optimizer_state": self.optimizer.state_dict(),
                         "scaler_state": self.scaler.state_dict(),
                         "scheduler_state": self.scheduler.state_dict() if self.scheduler is not None else None,
                         "rng_states": rng_states(), "epoch": completed_epoch, "best_score": done.best_score,
                         "best_epoch": done.best_epoch, "stale_epochs": done.stale, "history": done.history,
                         "model": self.model_name, "task": self.task.name, "config": self.cfg,
                         "fingerprint": self.fingerprint}, self.last_path)
        log.info("checkpoint: epoch %d -> %s", completed_epoch, self.last_path)

    # ---- step: finish (the declared outputs, each atomically, selected model first)
    def finish(self, done: Progress) -> dict[str, Any]:
        if self.selecting:
            self.model.load_state_dict(load_checkpoint(self.best_model_path, self.device)["model_state"])
        # fixed: the weights in memory are the last epoch's (restored from last.pt when resumed)
        model_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        args = (self.model, self.device, self.num_workers, self.amp, self.out_dir)
        # the outer fold, the inner validation and the held-out test cases, once, by the selected model
        for split in ("val", "inner", "test"):
            self.run.write_predictions(*args, self.out_dir / f"{split}_predictions.csv", split=split)
        with atomic_path(self.out_dir / "history.csv") as tmp:
            pd.DataFrame(done.history, columns=list(self.task.history_columns)).to_csv(tmp, index=False)
        metric_name = self.task.metric_name
        summary = {"model": self.model_name, "task": self.task.name, "config": self.cfg, "epoch": done.best_epoch,
                   "metric": {metric_name: done.history[done.best_epoch - 1].get(metric_name, math.nan)
                              if done.best_epoch else math.nan},
                   "selection": {"mode": self.cfg["selection"], "metric": metric_name,
                                 "inner_folds": int(self.cfg["inner_folds"]) if self.selecting else None},
                   "permutation_seed": self.permutation_seed,
                   "cases": self.run.cases, "fingerprint": self.fingerprint, "versions": software_versions()}
        write_json(self.out_dir / "best.json", summary)
        save_checkpoint({"model_state": model_state, **summary}, self.out_dir / "best.pt")
        log.info("done: best epoch %d of %d", done.best_epoch, len(done.history))
        return {"best_epoch": done.best_epoch, "epochs_run": len(done.history), "history": done.history}


def seed_everything(seed: int) -> None:
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def train_fold(task: str, model_name: str, fold: int, out_dir: str | Path, cfg: dict[str, Any],
               threads: int = 1, permutation_seed: int | None = None, **inputs: Any) -> dict[str, Any]:
    """Train ``model_name`` on fold ``fold`` of ``task``; resume from ``out_dir/checkpoints/last.pt``.

    ``cfg``: the job's train config (``train.<task>`` without the other models' keys, merged with
    ``seed``, ``device``, ``num_workers`` and ``checkpoint_every`` of ``train``). ``inputs``: what the
    task's ``prepare`` reads (classify: ``folds_tsv`` and ``crop_sidecars`` or ``crops_dir``; segment:
    ``fold_slices_tsv`` and ``slice_sidecars`` or ``slices_dir``). ``permutation_seed``: a
    permuted-label control run (:func:`permuted_inputs`; the task must support it). Returns the final summary.
    Raises StopRequested after checkpointing when SIGTERM/SIGUSR1 arrives.
    """
    spec = get_task(task)
    out_dir = Path(out_dir)
    seed_everything(int(cfg["seed"]))
    device = choose_device(cfg["device"])
    amp = device.type == "cuda"  # mixed precision on GPU only
    num_workers = min(int(cfg["num_workers"]), max(int(threads) - 1, 0))
    if device.type == "cpu":
        torch.set_num_threads(max(int(threads), 1))
    log.info("task %s model %s fold %d on %s (amp %s, workers %d)", task, model_name, fold, device, amp,
             num_workers)
    if permutation_seed is not None:
        inputs = permuted_inputs(spec, fold, int(permutation_seed), out_dir, inputs)
    run = spec.prepare(cfg, fold, inputs)
    model = build_model(task, model_name, cfg).to(device)
    optimizer = spec.optimizer(cfg, model.parameters())
    trainer = Trainer(spec, model_name, fold, cfg, run, model, optimizer, spec.scheduler(optimizer, cfg),
                      torch.amp.GradScaler("cuda", enabled=amp), device, amp, num_workers, out_dir,
                      run_fingerprint(task, model_name, cfg, permutation_seed), permutation_seed)
    done = trainer.restore()
    epochs, patience, every = int(cfg["epochs"]), int(cfg["patience"]), int(cfg["checkpoint_every"])
    with _SignalFlag() as stop:
        for epoch in range(done.start_epoch, epochs + 1):
            if done.stale >= patience:
                break
            started = time.perf_counter()
            train_loss = trainer.run_epoch(epoch, stop, done)
            trainer.validate(epoch, train_loss, started, done)
            if done.stale >= patience:
                log.info("early stop: no better inner-validation score for %d epochs", patience)
            if epoch % every == 0 or epoch == epochs or done.stale >= patience or stop.signum is not None:
                trainer.checkpoint(epoch, done)
            if stop.signum is not None:
                raise StopRequested(stop.signum)
    return trainer.finish(done)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--task", required=True)
    add_plugins_argument(first)
    known, _ = first.parse_known_args(argv)
    load_plugins(known.plugins)
    spec = get_task(known.task)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, help="a registered task (hnct.tasks)")
    parser.add_argument("--model", required=True, help="a registered model of the task (hnct.models)")
    parser.add_argument("--fold", required=True, type=int)
    parser.add_argument("--out-dir", required=True, help="results/train/{task}/{model}/fold{fold}")
    parser.add_argument("--config", required=True,
                        help="JSON: train.<task> (this model's keys) merged with train's shared keys")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--permutation-seed", type=int, default=None,
                        help="a permuted-label control run: the training side's labels permuted with this seed "
                             "(one of train.permutation_seeds)")
    parser.add_argument("--log")
    add_plugins_argument(parser)
    spec.add_train_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log)
    cfg = json.loads(args.config)
    shared = {"task", "model", "fold", "out_dir", "config", "threads", "log", "plugins", "permutation_seed"}
    # the task's own options (an empty value, as a rule may pass, is no value)
    inputs = {name: value if isinstance(value, list) else (value or None)
              for name, value in vars(args).items() if name not in shared}
    try:
        train_fold(args.task, args.model, args.fold, args.out_dir, cfg, threads=args.threads,
                   permutation_seed=args.permutation_seed, **inputs)
    except StopRequested as stop:
        log.warning("stopped by signal %d after checkpointing; rerun to resume", stop.signum)
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
