"""segment: 2D axial-slice segmentation of one structure (``train.segment.structure``, e.g. GTVn).

Labels: a case is positive (node-positive) when any slice of its slice index has a voxel of the
structure; a case without a label map is excluded. Folds read the slices sidecars and also write
per-fold slice lists. Training: hnct.losses.snet_loss, every positive slice plus an equal draw of
negatives per epoch, AdamW. With ``train.selection: inner`` the cases of an inner, patient-grouped
split of the outer fold's training side (stratified by node status, :func:`hnct.splits.inner_split`;
the slice list's ``patient`` column) are held out of training: ReduceLROnPlateau and model selection
read their Dice (ties: the lower inner loss), and the outer fold is predicted once, by the selected
model. Inner Dice is pooled over all inner slices (2·Σ|P∩T| / (Σ|P| + Σ|T|), threshold 0.5; 1 when no
slice has foreground in either), and ``inner_f1`` is slice-level detection F1 (a slice is positive
when any pixel is), both from :mod:`hnct.metrics`. Predictions: ``val_probs/{case}.npz`` per outer
validation case (``inner_probs/`` for the inner ones); evaluation: :mod:`hnct.segeval` (per-case 3D
metrics, fixed ``evaluate.mask_threshold``). No test-set prediction yet (the header-only table says so).
"""

from __future__ import annotations

import logging
from pathlib import Path

from hnct.tasks import Task, inner_rows, register_task

log = logging.getLogger("hnct.train")


@register_task
class Segment(Task):
    name = "segment"
    positive_label = "node-positive"
    report_kind = "segmentation"
    report_title = "Slice segmentation, per-case 3D metrics"
    fold_sidecars = "results/slices/{case}.json"
    slice_lists = True
    train_inputs = {"fold-slices": "results/folds/{task}/fold{fold}_slices.tsv"}
    train_options = {"slices-dir": "results/slices"}
    evaluate_inputs = {"fold-slices": "results/folds/{task}/fold{fold}_slices.tsv"}
    evaluate_mem_mb = 4000
    # The demo's critical path: five S-Net folds of about 1.5-2 minutes each on one CPU core, against
    # 15 cnn3d jobs of about 10-20 s (2026-12-02, 2 busy cores). Without a priority the scheduler ran
    # the cnn3d jobs first (their fold slice lists 3.7 minutes after the folds) and the fifth fold alone.
    train_priority = 1
    modules = ("tasks.segment", "data", "losses", "segeval", "metrics.segmentation", "metrics.segmentation_summary",
               "metrics.classification")
    metric_name = "inner_dice"
    selection_metric = "pooled Dice at 0.5 (ties: the lower loss)"
    selection_chooses = "the epoch and the learning-rate schedule (ReduceLROnPlateau)"
    # Dice needs node-positive cases on both sides; node-negative ones may all train (few patients)
    inner_required_labels = (1,)
    history_columns = ("epoch", "train_loss", "inner_loss", "inner_dice", "inner_f1", "lr", "seconds")
    prediction_columns = ("case", "slice", "prob_npz", "fold")

    @classmethod
    def fold_options(cls, config):
        return {"structure": config["train"][cls.name]["structure"]}

    @classmethod
    def slice_structure(cls, config):
        return config["train"][cls.name]["structure"]

    @classmethod
    def evaluate_options(cls, config):
        return {"masks-dir": "results/evaluate/{task}/{model}/fold{fold}/masks",
                "slices-dir": "results/slices",
                "nsd-tolerance-mm": config["evaluate"]["nsd_tolerance_mm"],
                "threshold": config["evaluate"]["mask_threshold"],
                "detection-iou": config["evaluate"]["detection_iou"]}

    @classmethod
    def case_label(cls, case, row, sidecar_path, sidecar, cohort_file, options):
        import pandas as pd

        from hnct.folds import structure_column

        stage = f"folds:{cls.name}"
        if not sidecar.get("labels"):
            return None, {"case": case, "stage": stage, "file": str(sidecar_path),
                          "reason": "no label map: segmentation needs labelled structures"}
        index_path = Path(sidecar.get("index", ""))
        if not index_path.is_file():
            return None, {"case": case, "stage": stage, "file": str(index_path),
                          "reason": "slice index TSV named in the slices sidecar is missing"}
        index = pd.read_csv(index_path, sep="\t")
        column = structure_column(index, options["structure"])
        return int(column is not None and (index[column] > 0).any()), None

    @classmethod
    def add_train_arguments(cls, parser) -> None:
        parser.add_argument("--fold-slices", dest="fold_slices_tsv", required=True,
                            help="results/folds/segment/fold{k}_slices.tsv")
        parser.add_argument("--slice-sidecars", nargs="*", default=None,
                            help="results/slices/{case}.json (default: --slices-dir/{case}.json)")
        parser.add_argument("--slices-dir", help="folder of the slices sidecars of the cases in --fold-slices")

    @classmethod
    def prepare(cls, cfg, fold, inputs):
        """``inputs``: ``fold_slices_tsv`` and ``slice_sidecars`` (paths or ``{case: path}``) or ``slices_dir``."""
        import pandas as pd

        from hnct import data as hdata

        fold_slices_tsv = inputs["fold_slices_tsv"]
        listed = pd.read_csv(fold_slices_tsv, sep="\t", usecols=["case"], dtype={"case": str})["case"]
        sidecars = hdata.given_or_found_sidecars(inputs.get("slice_sidecars"), inputs.get("slices_dir"),
                                                 sorted(set(listed)))
        run = SegmentRun(cfg, fold_slices_tsv, sidecars, fold)
        log.info("%d train slices (%d positive), %d inner validation slices (%d cases), %d outer validation "
                 "slices", len(run.train_items), int(run.train_positive.sum()), len(run.inner_items),
                 len(run.cases["inner"]), len(run.val_items))
        return run

    @classmethod
    def optimizer(cls, cfg, parameters):
        import torch

        return torch.optim.AdamW(parameters, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))

    @classmethod
    def scheduler(cls, optimizer, cfg):
        import torch

        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                          patience=max(int(cfg["patience"]) // 3, 1))

    @classmethod
    def evaluate_main(cls, argv):
        from hnct.segeval import main as segeval_main

        return int(segeval_main(argv) or 0)


class SegmentRun:
    """One fold's slices, loss, validation and prediction writing (what the trainer loop calls)."""

    def __init__(self, cfg, fold_slices_tsv, slice_sidecars, fold):
        import numpy as np

        from hnct import data as hdata
        from hnct.losses import snet_loss

        self.cfg, self.fold = cfg, fold
        size = int(cfg["input_size"])
        sidecars = slice_sidecars if isinstance(slice_sidecars, dict) else hdata.sidecars_by_case(slice_sidecars)
        table = hdata.load_segment_slices(fold_slices_tsv, sidecars, cfg["structure"], size)
        train_table = table[table["split"] == "train"].reset_index(drop=True)
        self.val_table = table[table["split"] == "val"].reset_index(drop=True)
        if train_table.empty or self.val_table.empty:
            raise ValueError(f"{fold_slices_tsv}: fold {fold} needs train and val slices")
        if "patient" not in train_table.columns:
            raise ValueError(f"{fold_slices_tsv}: no patient column (written by an older hnct.folds): "
                             "rerun the folds rule")
        # the inner split is by patient (never by slice), stratified by whether a case is node-positive
        cases = train_table.groupby("case", sort=True).agg(patient=("patient", "first"),
                                                            label=("target", lambda ts: int(any(t.any() for t in ts))))
        inner = cases.index[inner_rows(cfg, cases, f"{fold_slices_tsv} fold {fold}", Segment.inner_required_labels)]
        is_inner = train_table["case"].isin(set(inner))
        self.train_table = train_table[~is_inner].reset_index(drop=True)
        self.inner_table = train_table[is_inner].reset_index(drop=True)
        self.train_items, self.inner_items, self.val_items = (
            [{"image": im[None].astype(np.float32), "target": t[None].astype(np.float32)}
             for im, t in zip(part["image"], part["target"])]
            for part in (self.train_table, self.inner_table, self.val_table))
        self.train_positive = np.array([t.any() for t in self.train_table["target"]])
        self.augment = hdata.segment_augmentation() if cfg["augment"] else None
        self.cases = {"train": sorted(set(self.train_table["case"])), "inner": sorted(inner),
                      "val": sorted(set(self.val_table["case"])), "test": []}
        self.loss_fn = snet_loss

    def train_loader(self, epoch, num_workers):
        from hnct import data as hdata

        if self.augment is not None:
            self.augment.set_random_state(seed=int(self.cfg["seed"]) * 1000 + epoch)
        chosen = hdata.balanced_epoch_indices(self.train_positive, int(self.cfg["seed"]), epoch)
        dataset = hdata.ItemDataset([self.train_items[i] for i in chosen], ["image", "target"], self.augment)
        return hdata.seeded_loader(dataset, int(self.cfg["batch_size"]), True, num_workers, self.cfg["seed"], epoch)

    def val_loader(self, num_workers, items):
        from hnct import data as hdata

        return hdata.seeded_loader(hdata.ItemDataset(items, ["image", "target"]),
                                   int(self.cfg["batch_size"]), False, num_workers, self.cfg["seed"], 0)

    def loss(self, outputs, batch):
        if isinstance(outputs, (list, tuple)):
            outputs = [o.float() for o in outputs]
        else:
            outputs = outputs.float()
        return self.loss_fn(outputs, batch["target"].float())

    def predict(self, model, device, num_workers, amp, items):
        """Per-slice probabilities of ``items`` (fitted size) and their mean loss."""
        import numpy as np
        import torch

        probs, losses, weights = [], [], []
        model.eval()
        with torch.no_grad():
            for batch in self.val_loader(num_workers, items):
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
        """``inner_loss, inner_dice, inner_f1`` of the inner validation slices (what selection reads)."""
        import math

        import numpy as np

        from hnct.metrics import classification as clf
        from hnct.metrics import segmentation as segm

        prob, inner_loss = self.predict(model, device, num_workers, amp, self.inner_items)
        target = np.stack(list(self.inner_table["target"])).astype(bool)
        predicted = prob >= 0.5
        dice = segm.dice(predicted, target)
        dice = 1.0 if math.isnan(dice) else dice  # no foreground in either: agreement
        detection_f1 = clf.positive_f1(target.any(axis=(1, 2)), predicted.any(axis=(1, 2)))
        return {"inner_loss": inner_loss, "inner_dice": dice, "inner_f1": detection_f1}, prob

    def selection(self, metrics):
        return (metrics["inner_dice"], -metrics["inner_loss"])

    def write_predictions(self, model, device, num_workers, amp, out_dir, predictions_path, split="val"):
        """``val_probs/{case}.npz`` per outer validation case (``split="val"``; ``inner_probs/`` for
        ``"inner"``), on the original slice grid, and the CSV listing them.

        ``split="test"``: segmentation has no test-set prediction yet (the fold slice lists hold train
        and val slices only); the table is written with its header and no rows, and the log says so.
        """
        import numpy as np
        import pandas as pd

        from hnct import data as hdata
        from hnct.common import atomic_path

        columns = list(Segment.prediction_columns)
        if split == "test":
            log.warning("segment: test-set prediction is not implemented; %s lists no cases", predictions_path)
            with atomic_path(predictions_path) as tmp:
                pd.DataFrame(columns=columns).to_csv(tmp, index=False)
            return
        part, items = (self.inner_table, self.inner_items) if split == "inner" else (self.val_table, self.val_items)
        prob = self.predict(model, device, num_workers, amp, items)[0] if items else np.zeros((0,))
        rows = []
        table = part.assign(order=np.arange(len(part)))
        for case, group in table.groupby("case", sort=True):
            group = group.sort_values("slice")
            volume = np.stack([hdata.unfit_slice(prob[i], shape) for i, shape in
                               zip(group["order"], group["shape"])]).astype(np.float16)
            npz_path = Path(out_dir) / f"{split}_probs" / f"{case}.npz"
            with atomic_path(npz_path) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez_compressed(handle, prob=volume, slice=group["slice"].to_numpy(dtype=np.int64))
            rows += [{"case": case, "slice": int(s), "prob_npz": str(npz_path), "fold": self.fold}
                     for s in group["slice"]]
        with atomic_path(predictions_path) as tmp:
            pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
