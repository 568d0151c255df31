"""classify: 3D T4 vs non-T4 classification of the 1 mm laryngeal crops.

Labels: the cohort's ``label_t4`` (empty: excluded, "no T-stage label"); usable cases are those whose
crop sidecar is ok, so the folds read the crop sidecars (never the slices). Training: focal loss with
per-class weights, Adam or AdamW (``train.classify.optimizer``), no schedule. With ``train.selection:
inner`` an inner, patient-grouped, stratified split of the outer fold's training side
(:func:`hnct.splits.inner_split`) is held out of training, and the epoch is selected on its macro-F1
(ties: the lower inner loss); the outer validation fold is predicted once, by the selected model.
Predictions: ``case, label, probability, fold`` (P(T4)) of the outer validation, the inner validation
(``inner_predictions.csv``: the Youden threshold is chosen there, :mod:`hnct.evaluate`) and the held-out
test cases; evaluation: :func:`hnct.evaluate.classify_main`; the test set is predicted by every fold
and ensembled (rule ``ensemble_test``).
"""

from __future__ import annotations

from pathlib import Path

from hnct.tasks import Task, inner_rows, register_task


@register_task
class Classify(Task):
    name = "classify"
    positive_label = "T4"
    report_kind = "classification"
    report_title = "T4 vs non-T4 classification"
    fold_sidecars = "results/crops/{case}.json"
    train_inputs = {"folds": "results/folds/{task}/folds.tsv"}
    train_options = {"crops-dir": "results/crops"}
    # the selected model's inner-validation predictions: the threshold is chosen on them
    evaluate_inputs = {"inner-predictions": "results/train/{task}/{model}/fold{fold}/inner_predictions.csv"}
    test_ensemble = True
    # the permuted-label control permutes the training side's labels of folds.tsv (hnct.train)
    label_permutation = "folds_tsv"
    modules = ("tasks.classify", "data", "metrics.classification")
    metric_name = "inner_auc"
    selection_metric = "macro-F1 at 0.5 (ties: the lower loss)"
    selection_chooses = "the epoch and the Youden threshold"
    history_columns = ("epoch", "train_loss", "inner_loss", "inner_auc", "inner_f1", "lr", "seconds")
    prediction_columns = ("case", "label", "probability", "fold")

    @classmethod
    def case_label(cls, case, row, sidecar_path, sidecar, cohort_file, options):
        from hnct.cohort import CohortError

        text = str(row.get("label_t4", "")).strip()
        if text == "":
            return None, {"case": case, "stage": f"folds:{cls.name}", "file": cohort_file,
                          "reason": "no T-stage label"}
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if value not in (0.0, 1.0):
            raise CohortError(f"{cohort_file}: case {case}: label_t4 must be 1, 0 or empty, not {text!r}")
        return int(value), None

    @classmethod
    def add_train_arguments(cls, parser) -> None:
        parser.add_argument("--folds", dest="folds_tsv", required=True, help="results/folds/classify/folds.tsv")
        parser.add_argument("--crop-sidecars", nargs="*", default=None,
                            help="results/crops/{case}.json (default: --crops-dir/{case}.json)")
        parser.add_argument("--crops-dir", help="folder of the crop sidecars of the cases in --folds")

    @classmethod
    def prepare(cls, cfg, fold, inputs):
        """``inputs``: ``folds_tsv`` and ``crop_sidecars`` (paths or ``{case: path}``) or ``crops_dir``."""
        import logging

        import pandas as pd

        from hnct import data as hdata

        log = logging.getLogger("hnct.train")
        folds_tsv = inputs["folds_tsv"]
        train_rows, val_rows = hdata.read_fold_cases(folds_tsv, fold)
        test_rows = hdata.read_test_cases(folds_tsv)
        listed = pd.concat([train_rows["case"], val_rows["case"], test_rows["case"]])
        sidecars = hdata.given_or_found_sidecars(inputs.get("crop_sidecars"), inputs.get("crops_dir"), listed)
        inner = inner_rows(cfg, train_rows, f"{folds_tsv} fold {fold}", cls.inner_required_labels)
        log.info("%d train, %d inner validation, %d outer validation and %d test cases", int((~inner).sum()),
                 int(inner.sum()), len(val_rows), len(test_rows))
        if test_rows.empty:
            log.info("no test set in %s (folds.test: none, or no case marked test)", folds_tsv)
        return ClassifyRun(cfg, train_rows[~inner], val_rows, sidecars, fold, test_rows, train_rows[inner])

    @classmethod
    def optimizer(cls, cfg, parameters):
        import torch

        optimizer_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[cfg["optimizer"]]
        return optimizer_cls(parameters, lr=float(cfg["lr"]), weight_decay=float(cfg["weight_decay"]))

    @classmethod
    def evaluate_main(cls, argv):
        from hnct.evaluate import classify_main

        return classify_main(argv)


class ClassifyRun:
    """One fold's data, loss, validation and prediction writing (what the trainer loop calls)."""

    def __init__(self, cfg, train_rows, val_rows, crop_sidecars, fold, test_rows=None, inner_val_rows=None):
        """``crop_sidecars``: ``{case: sidecar}`` or a list of ``{case}.json`` paths; ``val_rows``: the
        outer validation fold (predicted once by the selected model); ``test_rows``: the held-out test
        rows of folds.tsv (predicted by the selected model, never trained or validated on);
        ``inner_val_rows``: the inner validation cases the epoch is selected on (none: ``selection: fixed``)."""
        from monai.losses import FocalLoss

        from hnct import data as hdata

        self.cfg, self.fold = cfg, fold
        sidecars = crop_sidecars if isinstance(crop_sidecars, dict) else hdata.sidecars_by_case(crop_sidecars)
        self.train_items = hdata.load_classify_items(train_rows, sidecars, cfg)
        self.val_items = hdata.load_classify_items(val_rows, sidecars, cfg)
        self.test_items = (hdata.load_classify_items(test_rows, sidecars, cfg)
                           if test_rows is not None and len(test_rows) else [])
        self.inner_items = (hdata.load_classify_items(inner_val_rows, sidecars, cfg)
                            if inner_val_rows is not None and len(inner_val_rows) else [])
        self.augment = hdata.classify_augmentation(cfg["input_shape"]) if cfg["augment"] else None
        self.cases = {"train": sorted(train_rows["case"]), "val": sorted(val_rows["case"]),
                      "test": sorted(test_rows["case"]) if test_rows is not None else [],
                      "inner": sorted(it["case"] for it in self.inner_items)}
        # Per-class weights [non-T4, T4] via `weight`; alpha stays None: MONAI's scalar alpha with
        # softmax means [1-alpha, alpha], so a value > 1 would give non-T4 a negative weight.
        self.loss_fn = FocalLoss(gamma=float(cfg["focal_gamma"]), alpha=None,
                                 weight=[float(w) for w in cfg["class_weights"]],
                                 use_softmax=True, to_onehot_y=True, include_background=True)

    def train_loader(self, epoch, num_workers):
        import numpy as np
        import torch

        from hnct import data as hdata

        if self.augment is not None:
            self.augment.set_random_state(seed=int(self.cfg["seed"]) * 1000 + epoch)
        dataset = hdata.ItemDataset(self.train_items, ["image", "label"], self.augment)
        sampler = None
        if self.cfg["weighted_sampler"]:
            labels = np.array([it["label"] for it in self.train_items])
            counts = np.bincount(labels, minlength=2).astype(float)
            weights = 1.0 / np.maximum(counts[labels], 1.0)
            sampler = torch.utils.data.WeightedRandomSampler(
                torch.as_tensor(weights, dtype=torch.double), num_samples=len(labels), replacement=True,
                generator=torch.Generator().manual_seed(int(self.cfg["seed"]) * 7919 + epoch))
        return hdata.seeded_loader(dataset, int(self.cfg["batch_size"]), True, num_workers, self.cfg["seed"],
                                   epoch, sampler)

    def val_loader(self, num_workers, items):
        from hnct import data as hdata

        return hdata.seeded_loader(hdata.ItemDataset(items, ["image", "label"]), int(self.cfg["batch_size"]),
                                   False, num_workers, self.cfg["seed"], 0)

    def loss(self, outputs, batch):
        return self.loss_fn(outputs.float(), batch["label"].view(-1, 1).long())

    def validate(self, model, device, num_workers, amp, items=None):
        """Metrics (hnct.metrics.classification: ``inner_loss, inner_auc, inner_f1``) and P(T4) of
        ``items`` (default: the inner validation cases, the only ones the trainer selects on)."""
        import numpy as np
        import torch

        from hnct.metrics import classification as clf

        items = self.inner_items if items is None else items
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
        metrics = {"inner_loss": float(np.average(losses, weights=weights)),
                   "inner_auc": clf.roc_auc(labels, probability),
                   "inner_f1": clf.threshold_metrics(labels, probability, 0.5)["f1_macro"]}
        return metrics, probability

    def selection(self, metrics):
        """Early stopping score: inner macro-F1, ties broken by the lower inner loss."""
        return (metrics["inner_f1"], -metrics["inner_loss"])

    def write_predictions(self, model, device, num_workers, amp, out_dir, predictions_path, split="val"):
        """``case, label, probability, fold`` of the outer validation (``split="val"``), inner validation
        (``"inner"``) or test cases; an empty set gives the header and no rows."""
        import numpy as np
        import pandas as pd

        from hnct.common import atomic_path

        items = {"val": self.val_items, "inner": self.inner_items, "test": self.test_items}[split]
        probability = self.validate(model, device, num_workers, amp, items)[1] if items else np.zeros(0)
        table = pd.DataFrame({"case": [it["case"] for it in items], "label": [it["label"] for it in items],
                              "probability": probability, "fold": self.fold},
                             columns=list(Classify.prediction_columns))
        with atomic_path(Path(predictions_path)) as tmp:
            table.to_csv(tmp, index=False)
