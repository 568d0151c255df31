"""Model selection never touches the reported data (issue 14, items 1-2).

A cohort whose images carry no label signal (noise crops): any per-epoch validation metric is noise,
so picking the best epoch on the outer fold would pick a lucky one. The tests show that the epoch,
the early stop and the Youden threshold of a fold are chosen on an inner, patient-grouped split of
its training side only: the selection sees no outer case, and flipping the outer fold's labels
changes neither the chosen epoch nor the threshold, while an outer-fold selection would move.
Tiny models and 12³ crops: seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

import hnct.tasks.classify as classify_module
from hnct.common import write_json
from hnct.evaluate import evaluate_classify
from hnct.folds import assign_folds
from hnct.metrics.classification import roc_auc, youden_threshold
from hnct.tasks import selection_caption
from hnct.train import Trainer, train_fold

torch.set_num_threads(1)
SIZE = 12


def noise_cohort(root: Path, n_patients: int = 20, two_scan: int = 4, seed: int = 5) -> tuple[Path, list[str]]:
    """Noise crops (no label signal), half the patients positive, the first ``two_scan`` scanned twice;
    folds.tsv from hnct.folds.assign_folds (2 outer folds, grouped by patient)."""
    rng = np.random.default_rng(seed)
    rows, sidecars = [], []
    for p in range(n_patients):
        for scan in range(2 if p < two_scan else 1):
            case = f"P{p:02d}_s{scan}"
            image = sitk.GetImageFromArray(rng.normal(0, 100, size=(SIZE,) * 3).astype(np.int16))
            crop = root / "crops" / f"{case}.nrrd"
            crop.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(crop))
            sidecar = root / "crops" / f"{case}.json"
            write_json(sidecar, {"case": case, "stage": "crop", "status": "ok", "volume": str(crop)})
            sidecars.append(str(sidecar))
            rows.append({"case": case, "patient": f"P{p:02d}", "collection": "NOISE", "label": p % 2})
    table = pd.DataFrame(rows)
    table["fold"] = assign_folds(table, 2, seed=seed)
    folds_tsv = root / "folds.tsv"
    table.to_csv(folds_tsv, sep="\t", index=False)
    return folds_tsv, sidecars


def cfg(**overrides) -> dict:
    base = {"seed": 0, "device": "cpu", "num_workers": 0, "checkpoint_every": 1, "selection": "inner",
            "inner_folds": 3, "input_shape": [SIZE] * 3, "fit": "resize", "epochs": 6, "batch_size": 4,
            "lr": 3e-2, "weight_decay": 0.0, "optimizer": "adam", "patience": 6, "focal_gamma": 0.0,
            "class_weights": [1.0, 1.0], "weighted_sampler": False, "hu_clip": [-300, 300], "augment": False,
            "cnn3d_channels": [2, 4]}
    return {**base, **overrides}


def flip_outer_labels(folds_tsv: Path, fold: int, out: Path) -> Path:
    folds = pd.read_csv(folds_tsv, sep="\t", dtype={"case": str, "fold": str})
    outer = folds["fold"] == str(fold)
    folds.loc[outer, "label"] = 1 - folds.loc[outer, "label"]
    out.parent.mkdir(parents=True, exist_ok=True)
    folds.to_csv(out, sep="\t", index=False)
    return out


@pytest.fixture
def spy(monkeypatch):
    """Record the cases each trainer validation step scored, and (for the comparison only) the
    outer fold's AUC of every epoch's model, i.e. what outer-fold selection would have read."""
    seen: list[list[str]] = []
    outer_auc: list[float] = []
    validate, trainer_validate = classify_module.ClassifyRun.validate, Trainer.validate

    def recording_validate(self, model, device, num_workers, amp, items=None):
        if items is None:  # the trainer's selection call (write_predictions passes its items)
            seen.append([it["case"] for it in self.inner_items])
        return validate(self, model, device, num_workers, amp, items)

    def measuring_trainer_validate(self, epoch, train_loss, started, done):
        row = trainer_validate(self, epoch, train_loss, started, done)
        probability = validate(self.run, self.model, self.device, 0, False, self.run.val_items)[1]
        outer_auc.append(roc_auc(np.array([it["label"] for it in self.run.val_items]), probability))
        return row

    monkeypatch.setattr(classify_module.ClassifyRun, "validate", recording_validate)
    monkeypatch.setattr(Trainer, "validate", measuring_trainer_validate)
    return {"seen": seen, "outer_auc": outer_auc}


def test_selection_sees_only_the_inner_split_and_ignores_outer_labels(tmp_path, spy):
    folds_tsv, sidecars = noise_cohort(tmp_path)
    folds = pd.read_csv(folds_tsv, sep="\t", dtype={"case": str, "fold": str})
    outer_cases = set(folds.loc[folds["fold"] == "0", "case"])
    runs = {}
    for name, table in (("true", folds_tsv), ("flipped", flip_outer_labels(folds_tsv, 0, tmp_path / "flip" / "folds.tsv"))):
        spy["seen"].clear(), spy["outer_auc"].clear()
        out = tmp_path / name
        train_fold("classify", "cnn3d", 0, out, cfg(), folds_tsv=table, crop_sidecars=sidecars)
        evaluate_classify(out / "val_predictions.csv", out / "metrics.json", out / "per_case.csv", "cnn3d", 0,
                          inner_predictions=out / "inner_predictions.csv")
        runs[name] = {"summary": json.loads((out / "best.json").read_text()), "seen": list(spy["seen"]),
                      "outer_auc": list(spy["outer_auc"]), "history": pd.read_csv(out / "history.csv"),
                      "metrics": json.loads((out / "metrics.json").read_text()),
                      "inner": pd.read_csv(out / "inner_predictions.csv", dtype={"case": str}),
                      "val": pd.read_csv(out / "val_predictions.csv", dtype={"case": str})}

    true = runs["true"]
    cases = true["summary"]["cases"]
    # the selection saw the inner validation cases, every epoch, and no outer case ever
    assert len(true["seen"]) == len(true["history"]) >= 2
    assert all(set(seen) == set(cases["inner"]) for seen in true["seen"])
    assert not set(cases["inner"]) & outer_cases and not set(cases["train"]) & outer_cases
    assert set(cases["val"]) == outer_cases and set(true["val"]["case"]) == outer_cases
    # inner split: whole patients (the two-scan patients on one side), both classes, the rest trains
    patient = folds.set_index("case")["patient"]
    assert not set(patient[cases["inner"]]) & set(patient[cases["train"]])
    assert set(cases["inner"]) | set(cases["train"]) == set(folds["case"]) - outer_cases
    assert set(folds.set_index("case").loc[cases["inner"], "label"]) == {0, 1}
    assert sorted(true["inner"]["case"]) == cases["inner"]
    # the chosen epoch is the inner selection score's best (history holds inner metrics only)
    history = true["history"]
    assert not any(c.startswith("val_") for c in history.columns)
    scores = list(zip(history["inner_f1"], -history["inner_loss"]))
    assert true["summary"]["epoch"] == 1 + max(range(len(scores)), key=lambda i: (scores[i], -i))

    # flipping the outer fold's labels: an outer-fold selection moves (its AUC per epoch becomes 1 - AUC) ...
    flipped = runs["flipped"]
    outer_true, outer_flipped = np.array(true["outer_auc"]), np.array(flipped["outer_auc"])
    np.testing.assert_allclose(outer_flipped, 1 - outer_true, atol=1e-12)
    assert np.argmax(outer_true) != np.argmax(outer_flipped), "noise metric expected to vary over epochs"
    # ... the inner selection does not: same epoch, same history, same model, same inner threshold
    assert flipped["summary"]["epoch"] == true["summary"]["epoch"]
    pd.testing.assert_frame_equal(flipped["history"].drop(columns="seconds"), true["history"].drop(columns="seconds"))
    np.testing.assert_array_equal(flipped["val"]["probability"], true["val"]["probability"])
    assert flipped["metrics"]["thresholds"]["youden"] == true["metrics"]["thresholds"]["youden"]
    # the threshold is Youden's J on the inner predictions, applied unchanged to the outer fold
    threshold, _ = youden_threshold(true["inner"]["label"], true["inner"]["probability"])
    assert true["metrics"]["thresholds"]["youden"] == pytest.approx(threshold)
    assert true["metrics"]["at_youden"]["threshold"] == pytest.approx(threshold)
    predicted = (true["val"].sort_values("case")["probability"] >= threshold).to_numpy()
    assert int(predicted.sum()) == true["metrics"]["at_youden"]["tp"] + true["metrics"]["at_youden"]["fp"]
    # the reported outer AUC is that of the inner-selected epoch; the outer-selected one would be the maximum
    reported = true["metrics"]["auc"]
    assert reported == pytest.approx(outer_true[true["summary"]["epoch"] - 1], abs=1e-9)
    assert outer_true.max() >= reported


def test_fixed_trains_every_epoch_on_the_whole_training_side_and_tunes_no_threshold(tmp_path, spy):
    folds_tsv, sidecars = noise_cohort(tmp_path, n_patients=12, two_scan=2)
    folds = pd.read_csv(folds_tsv, sep="\t", dtype={"case": str, "fold": str})
    out = tmp_path / "fixed"
    summary = train_fold("classify", "cnn3d", 1, out, cfg(selection="fixed", epochs=3, patience=1),
                         folds_tsv=folds_tsv, crop_sidecars=sidecars)
    assert spy["seen"] == []  # nothing validated during training
    assert summary["epochs_run"] == 3 and summary["best_epoch"] == 3  # no early stop, the last epoch
    best = json.loads((out / "best.json").read_text())
    assert best["selection"] == {"mode": "fixed", "metric": "inner_auc", "inner_folds": None}
    assert best["cases"]["inner"] == [] and best["cases"]["train"] == sorted(folds.loc[folds["fold"] == "0", "case"])
    history = pd.read_csv(out / "history.csv")
    assert history[["inner_loss", "inner_auc", "inner_f1"]].isna().all().all()
    assert pd.read_csv(out / "inner_predictions.csv").empty
    # the kept model is the last epoch's: best.pt holds the weights of checkpoints/last.pt
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model_state"]
    kept = torch.load(out / "best.pt", weights_only=True)["model_state"]
    assert all(torch.equal(last[k].cpu(), kept[k]) for k in last)
    metrics = evaluate_classify(out / "val_predictions.csv", out / "metrics.json", out / "per_case.csv", "cnn3d", 1,
                                inner_predictions=out / "inner_predictions.csv")
    assert math.isnan(metrics["thresholds"]["youden"]) and "fixed" in metrics["reasons"]["thresholds.youden"]
    assert "fixed" in metrics["reasons"]["at_youden.f1_macro"]


def test_captions_say_what_was_selected_on_what():
    config = {"train": {"selection": "inner", "inner_folds": 5, "seed": 0,
                        "classify": {"epochs": 40, "patience": 10}, "segment": {"epochs": 30, "patience": 9}}}
    inner = selection_caption("classify", config)
    assert "inner validation" in inner and "1/5" in inner and "Youden" in inner and "never" in inner
    assert "learning-rate" in selection_caption("segment", config)
    fixed = selection_caption("classify", {"train": {**config["train"], "selection": "fixed"}})
    assert "40 epochs" in fixed and "no model selection" in fixed


def test_test_set_thresholds_are_the_folds_inner_ones_never_the_test_sets(tmp_path):
    """ensemble_test applies each fold's inner threshold (its metrics.json) to that fold model's test
    predictions, and their mean to the ensemble's; none is chosen on the test predictions."""
    from hnct.evaluate import ensemble_test

    cases = [f"T{i}" for i in range(8)]
    labels = [0, 1] * 4
    test_files, metric_files = [], []
    for fold, (threshold, shift) in enumerate(((0.3, 0.0), (0.5, 0.1))):
        probability = np.clip(np.linspace(0.1, 0.8, 8) + shift, 0, 1)
        path = tmp_path / f"fold{fold}_test.csv"
        pd.DataFrame({"case": cases, "label": labels, "probability": probability, "fold": fold}).to_csv(path, index=False)
        metrics = tmp_path / f"fold{fold}_metrics.json"
        write_json(metrics, {"fold": fold, "auc": 0.7, "at_0.5": {"f1_macro": 0.6},
                             "thresholds": {"youden": threshold, "youden_j": 0.4, "youden_chosen_on": "inner"}})
        test_files.append(path), metric_files.append(metrics)
    payload = ensemble_test(test_files, metric_files, tmp_path / "ens.csv", tmp_path / "ens.json", "cnn3d")
    assert [entry["at_youden"]["threshold"] for entry in payload["per_fold"]] == [0.3, 0.5]
    assert payload["thresholds"]["youden"] == pytest.approx(0.4) and payload["at_youden"]["threshold"] == pytest.approx(0.4)
    assert "inner-validation thresholds" in payload["thresholds"]["youden_chosen_on"]
    # one fold without an inner threshold (train.selection: fixed): the ensemble reports none either
    write_json(metric_files[1], {"fold": 1, "auc": 0.7, "at_0.5": {"f1_macro": 0.6},
                                 "thresholds": {"youden": None, "youden_j": None, "youden_chosen_on": "fixed"}})
    payload = ensemble_test(test_files, metric_files, tmp_path / "ens.csv", tmp_path / "ens.json", "cnn3d")
    assert math.isnan(payload["thresholds"]["youden"]) and "no inner-validation threshold" in payload["reasons"]["thresholds.youden"]


def slice_cohort(root: Path, n_patients: int = 6, n_slices: int = 3, shape=(16, 16)) -> tuple[Path, list[str]]:
    """Slice NPZs (windowed HU, GTVn = 3 on every other slice) for ``n_patients`` patients, the first
    two scanned twice; fold 0's slice list (patient P0 and P1 validate) as hnct.folds writes it."""
    rng = np.random.default_rng(2)
    rows, sidecars = [], []
    for p in range(n_patients):
        for scan in range(2 if p < 2 else 1):
            case = f"P{p}_s{scan}"
            for k in range(n_slices):
                hu = rng.normal(40, 30, size=shape)
                mask = np.zeros(shape, np.uint8)
                if k % 2 == 0 and p % 3:  # patients 0 and 3 are node-negative
                    mask[5:10, 6:11] = 3
                    hu[mask == 3] = 180
                npz = root / "slices" / case / f"{k:04d}.npz"
                npz.parent.mkdir(parents=True, exist_ok=True)
                np.savez(npz, image=np.clip(hu, -160, 240).astype(np.int16), mask=mask, window=np.array([40.0, 400.0]))
                rows.append({"case": case, "patient": f"P{p}", "slice": k, "npz": str(npz),
                             "positive": int(mask.any()), "split": "val" if p in (0, 1) else "train"})
            sidecar = root / "slices" / f"{case}.json"
            write_json(sidecar, {"case": case, "status": "ok", "labels": {"3": "GTVn"}})
            sidecars.append(str(sidecar))
    tsv = root / "fold0_slices.tsv"
    pd.DataFrame(rows).to_csv(tsv, sep="\t", index=False)
    return tsv, sidecars


def test_segment_selects_on_inner_patients_and_records_one_loss_definition(tmp_path, monkeypatch):
    """Segmentation's inner split is by patient (never by slice); the training curve records the
    loss of S-Net's main output, what the inner loss is (the optimised deep-supervision sum is not)."""
    import hnct.tasks.segment as segment_module

    tsv, sidecars = slice_cohort(tmp_path)
    recorded: list[tuple[bool, float, int]] = []  # (deep-supervision list?, loss, batch size)
    loss = segment_module.SegmentRun.loss

    def spying_loss(self, outputs, batch):
        value = loss(self, outputs, batch)
        if self.model_training:
            recorded.append((isinstance(outputs, (list, tuple)), float(value.detach()), len(batch["target"])))
        return value

    monkeypatch.setattr(segment_module.SegmentRun, "loss", spying_loss)
    monkeypatch.setattr(segment_module.SegmentRun, "model_training", False, raising=False)
    run_epoch = Trainer.run_epoch

    def flagged_run_epoch(self, epoch, stop, done):
        self.run.model_training = True
        try:
            return run_epoch(self, epoch, stop, done)
        finally:
            self.run.model_training = False

    monkeypatch.setattr(Trainer, "run_epoch", flagged_run_epoch)
    config = {"seed": 0, "device": "cpu", "num_workers": 0, "checkpoint_every": 1, "selection": "inner",
              "inner_folds": 2, "input_size": 16, "epochs": 2, "batch_size": 4, "lr": 1e-3, "weight_decay": 1e-4,
              "patience": 5, "structure": "GTVn", "snet_width": 4, "unet_features": [4, 4, 8, 16, 32, 4],
              "augment": False}
    out = tmp_path / "snet"
    train_fold("segment", "snet", 0, out, config, fold_slices_tsv=tsv, slice_sidecars=sidecars)
    cases = json.loads((out / "best.json").read_text())["cases"]
    slices = pd.read_csv(tsv, sep="\t")
    patient = slices.drop_duplicates("case").set_index("case")["patient"]
    assert set(cases["val"]) == {"P0_s0", "P0_s1", "P1_s0", "P1_s1"}
    assert cases["inner"] and not set(patient[cases["inner"]]) & set(patient[cases["train"]])
    assert not (set(cases["inner"]) | set(cases["train"])) & set(cases["val"])
    assert {Path(p).parent.name for p in pd.read_csv(out / "inner_predictions.csv")["prob_npz"]} == {"inner_probs"}
    assert set(pd.read_csv(out / "inner_predictions.csv")["case"]) == set(cases["inner"])
    assert set(pd.read_csv(out / "val_predictions.csv")["case"]) == set(cases["val"])
    # per training batch: the optimised deep-supervision sum, then the main output's loss, which
    # is what the history's train_loss averages (weighted by batch size)
    history = pd.read_csv(out / "history.csv")
    assert [r[0] for r in recorded] == [True, False] * (len(recorded) // 2)
    main = [(value, n) for deep, value, n in recorded if not deep]
    per_epoch = len(main) // 2
    for epoch in (0, 1):
        chunk = main[epoch * per_epoch:(epoch + 1) * per_epoch]
        expected = sum(v * n for v, n in chunk) / sum(n for _, n in chunk)
        assert history.loc[epoch, "train_loss"] == pytest.approx(expected, rel=1e-6)
    summed = [value for deep, value, _ in recorded if deep]
    assert min(summed) > max(value for value, _ in main)  # the sum of four outputs is on another scale
