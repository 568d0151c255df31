"""The permuted-label control (issue 14 item 7): labels permuted within the training side of each
outer fold only (seeded, patient-consistent, class counts kept), the outer fold scored against its
true labels, the report table beside the real AUC, and the DAG's own jobs for it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from hnct import report
from hnct.common import write_json
from hnct.metrics.classification import classification_metrics, roc_auc
from hnct.tasks import get_task, task_names
from hnct.train import PERMUTED_LABELS, permute_training_labels, permuted_inputs, train_fold

REPO = Path(__file__).resolve().parents[1]
# "estimate [low, high]" as the report prints a value with its CI (tests/test_report.py's pattern).
INTERVAL_CELL = re.compile(r"(-?\d+(?:\.\d+)?) \[(-?\d+(?:\.\d+)?), (-?\d+(?:\.\d+)?)\]")


def folds_table(n_patients: int = 30, n_folds: int = 3, seed: int = 1) -> pd.DataFrame:
    """A folds table as rule split_folds writes it: one or two scans per patient, one label per
    patient, every fold and a small test set holding both classes."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int((p // 3) % 3 == 0)  # independent of the fold (p % n_folds)
        fold = "test" if p >= n_patients - 4 else str(p % n_folds)
        for scan in range(1 + int(rng.random() < 0.3)):
            rows.append({"case": f"P{p:02d}-{scan}", "patient": f"P{p:02d}", "collection": "AB"[p % 2],
                         "label": str(label), "fold": fold})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("fold", [0, 1, 2])
def test_permutation_stays_in_the_training_side_keeps_patients_and_class_counts(fold):
    folds = folds_table()
    training = (folds["fold"] != str(fold)) & (folds["fold"] != "test")
    for seed in (0, 1, 2, 7):
        permuted = permute_training_labels(folds, fold, seed)
        # the outer fold and the test set keep their true labels; nothing but the label changes
        pd.testing.assert_frame_equal(permuted[~training], folds[~training])
        pd.testing.assert_frame_equal(permuted.drop(columns="label"), folds.drop(columns="label"))
        # the training side: really permuted, class counts kept, one label per patient
        assert (permuted.loc[training, "label"] != folds.loc[training, "label"]).any(), seed
        assert (permuted.loc[training, "label"].value_counts().to_dict()
                == folds.loc[training, "label"].value_counts().to_dict())
        assert (permuted[training].groupby("patient")["label"].nunique() == 1).all()
        # seeded: the same seed gives the same labels
        pd.testing.assert_frame_equal(permute_training_labels(folds, fold, seed), permuted)
    draws = {tuple(permute_training_labels(folds, fold, seed).loc[training, "label"]) for seed in range(6)}
    assert len(draws) > 1


def test_a_two_scan_patient_takes_another_two_scan_patients_label():
    """Patients swap labels only with patients of as many scans, so scan-level class counts stay exact."""
    folds = pd.DataFrame({"case": ["A-0", "A-1", "B-0", "C-0", "D-0", "D-1", "E-0", "V-0", "V-1"],
                          "patient": ["A", "A", "B", "C", "D", "D", "E", "V", "V"],
                          "label": ["1", "1", "0", "1", "0", "0", "0", "1", "1"],
                          "fold": ["1", "1", "1", "2", "2", "2", "1", "0", "0"]})
    seen = set()
    for seed in range(20):
        permuted = permute_training_labels(folds, 0, seed).set_index("case")["label"]
        assert permuted["A-0"] == permuted["A-1"] and permuted["D-0"] == permuted["D-1"]
        assert {permuted["A-0"], permuted["D-0"]} == {"0", "1"}  # A and D swap or keep theirs
        assert sorted(permuted[["B-0", "C-0", "E-0"]]) == ["0", "0", "1"]
        assert permuted["V-0"] == permuted["V-1"] == "1"  # the outer fold
        seen.add(permuted["A-0"])
    assert seen == {"0", "1"}


def test_missing_columns_and_an_empty_outer_fold_are_errors_naming_the_problem():
    folds = folds_table()
    with pytest.raises(ValueError, match="missing columns \\['patient'\\]"):
        permute_training_labels(folds.drop(columns="patient"), 0, 1)
    with pytest.raises(ValueError, match="fold 9 has no validation cases"):
        permute_training_labels(folds, 9, 1)
    unnamed = folds.assign(patient=np.where(folds["case"] == "P01-0", "", folds["patient"]))
    with pytest.raises(ValueError, match=r"1 training case\(s\) without a patient, e.g. \['P01-0'\]"):
        permute_training_labels(unnamed, 0, 1)


def test_only_tasks_whose_label_is_one_table_support_the_control(tmp_path):
    supported = {name for name in task_names() if get_task(name).label_permutation}
    assert "classify" in supported and not {"segment", "oar"} & supported
    with pytest.raises(ValueError, match="task segment has no permuted-label control"):
        permuted_inputs(get_task("segment"), 0, 1, tmp_path, {})


def write_crops(root: Path, folds: pd.DataFrame) -> list[str]:
    """Tiny noise crops (int16 HU, 1 mm) with ok crop sidecars for every case of ``folds``."""
    rng = np.random.default_rng(0)
    sidecars = []
    for case in folds["case"]:
        image = sitk.GetImageFromArray(rng.normal(0, 100, (8, 8, 8)).astype(np.int16))
        image.SetSpacing((1.0, 1.0, 1.0))
        crop = root / "crops" / f"{case}.nrrd"
        crop.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(crop))
        write_json(root / "crops" / f"{case}.json", {"case": case, "status": "ok", "volume": str(crop)})
        sidecars.append(str(root / "crops" / f"{case}.json"))
    return sidecars


def test_a_permuted_run_trains_on_permuted_labels_and_is_scored_on_the_true_ones(tmp_path):
    folds = folds_table(n_patients=24, n_folds=2)
    folds_tsv = tmp_path / "folds.tsv"
    folds.to_csv(folds_tsv, sep="\t", index=False)
    sidecars = write_crops(tmp_path, folds)
    cfg = {"seed": 0, "device": "cpu", "num_workers": 0, "checkpoint_every": 1, "selection": "inner",
           "inner_folds": 2, "input_shape": [8, 8, 8], "fit": "resize", "epochs": 1, "batch_size": 8, "lr": 1e-3,
           "weight_decay": 0.0, "optimizer": "adam", "patience": 5, "focal_gamma": 2.0,
           "class_weights": [1.0, 1.0], "weighted_sampler": False, "hu_clip": [-300, 300], "augment": False,
           "cnn3d_channels": [2]}
    out = tmp_path / "train_permuted" / "seed5" / "fold0"
    train_fold("classify", "cnn3d", 0, out, cfg, permutation_seed=5, folds_tsv=str(folds_tsv),
               crop_sidecars=sidecars)
    trained_on = pd.read_csv(out / PERMUTED_LABELS, sep="\t", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(trained_on, permute_training_labels(
        pd.read_csv(folds_tsv, sep="\t", dtype=str, keep_default_na=False), 0, 5))
    truth = folds.set_index("case")["label"].astype(int)
    permuted = trained_on.set_index("case")["label"].astype(int)
    # the outer fold and the test set: predicted against their true labels
    for split in ("val", "test"):
        predictions = pd.read_csv(out / f"{split}_predictions.csv", dtype={"case": str})
        assert len(predictions) and (predictions["label"].to_numpy() == truth[predictions["case"]].to_numpy()).all()
    # the inner selection reads the permuted labels, as a real run reads its own
    inner = pd.read_csv(out / "inner_predictions.csv", dtype={"case": str})
    assert len(inner) and (inner["label"].to_numpy() == permuted[inner["case"]].to_numpy()).all()
    summary = json.loads((out / "best.json").read_text())
    assert summary["permutation_seed"] == 5 and summary["fingerprint"]["config"]["permutation_seed"] == 5
    assert set(summary["cases"]["val"]) == set(folds.loc[folds["fold"] == "0", "case"])


# ---------------------------------------------------------------- the report table
@pytest.fixture()
def prediction_files(tmp_path):
    """Hand-written out-of-fold predictions: a model that separates the classes (real) and three
    permuted-label runs that do not, two folds each, with the folds table."""
    folds = folds_table(n_patients=24, n_folds=2).query("fold != 'test'")
    folds_tsv = tmp_path / "results" / "folds" / "classify" / "folds.tsv"
    folds_tsv.parent.mkdir(parents=True)
    folds.to_csv(folds_tsv, sep="\t", index=False)
    rng = np.random.default_rng(4)
    real, permuted = [], []
    for fold in (0, 1):
        rows = folds[folds["fold"] == str(fold)]
        labels = rows["label"].astype(int).to_numpy()
        path = tmp_path / "results" / "train" / "classify" / "cnn3d" / f"fold{fold}" / "val_predictions.csv"
        path.parent.mkdir(parents=True)
        pd.DataFrame({"case": rows["case"], "label": labels, "fold": fold,
                      "probability": np.clip(0.2 + 0.6 * labels + rng.normal(0, 0.15, len(labels)), 0, 1)}
                     ).to_csv(path, index=False)
        real.append(str(path))
        for seed in (1, 2, 3):
            path = (tmp_path / "results" / "train_permuted" / "classify" / "cnn3d" / f"seed{seed}" / f"fold{fold}"
                    / "val_predictions.csv")
            path.parent.mkdir(parents=True)
            pd.DataFrame({"case": rows["case"], "label": labels, "fold": fold,
                          "probability": rng.uniform(0, 1, len(labels))}).to_csv(path, index=False)
            permuted.append(str(path))
    return tmp_path, real, permuted, str(folds_tsv)


def test_permutation_table_puts_the_real_auc_with_its_ci_beside_the_permuted_runs(prediction_files):
    root, real, permuted, folds_tsv = prediction_files
    out = root / "results" / "report"
    report.main(["permutation", "--real-predictions", *real, "--permuted-predictions", *permuted,
                 "--folds", folds_tsv, "--out-csv", str(out / "permutation_control.csv"),
                 "--out-markdown", str(out / "permutation_control.md"), "--bootstrap", "200", "--seed", "7"])
    table = pd.read_csv(out / "permutation_control.csv")
    assert list(table["run"]) == ["real", "permuted", "permuted", "permuted", "permuted_mean"]
    real_row = table.iloc[0]
    pooled = pd.concat([pd.read_csv(p) for p in real])
    # the real value is the metrics summary's pooled AUC, its CI contains it
    assert real_row["value"] == pytest.approx(classification_metrics(pooled["label"], pooled["probability"],
                                                                     threshold=0.5)["auc"], abs=1e-9)
    assert real_row["ci_low"] <= real_row["value"] <= real_row["ci_high"] and real_row["n_resamples"] == 200
    # ... with the very interval the metrics summary prints for it (same rows, bootstrap and seed)
    folds = report.read_folds([folds_tsv])
    summary = report.summary_table(pd.DataFrame({"task": ["classify"] * 2, "model": ["cnn3d"] * 2, "auc": [0.5, 0.5]}),
                                   report.pooled_rows(real, [], folds), n_bootstrap=200, seed=7)
    auc = summary[summary["metric"] == "auc"].iloc[0]
    assert (real_row["value"], real_row["ci_low"], real_row["ci_high"]) == pytest.approx(
        (auc["pooled"], auc["ci_low"], auc["ci_high"]), abs=1e-12)
    assert real_row["n_cases"] == len(pooled) and real_row["n_patients"] == pooled["case"].str[:3].nunique()
    aucs = []
    for seed, row in zip((1, 2, 3), table.iloc[1:4].itertuples()):
        runs = pd.concat([pd.read_csv(p) for p in permuted if f"/seed{seed}/" in p])
        aucs.append(roc_auc(runs["label"].to_numpy(), runs["probability"].to_numpy()))
        assert row.permutation_seed == seed and row.value == pytest.approx(aucs[-1], abs=1e-9)
        assert np.isnan(row.ci_low) and row.n_folds == 2
    mean_row = table.iloc[4]
    assert mean_row["value"] == pytest.approx(np.mean(aucs)) and mean_row["sd"] == pytest.approx(np.std(aucs, ddof=1))
    assert (mean_row["min"], mean_row["max"]) == pytest.approx((min(aucs), max(aucs)))
    assert real_row["value"] > max(aucs) and real_row["p_permutation"] == pytest.approx(1 / 4)
    # printed: the interval beside its own number, the permuted AUCs beside it, what was permuted
    text = (out / "permutation_control.md").read_text()
    cells = [tuple(float(x) for x in m.groups()) for m in INTERVAL_CELL.finditer(text)]
    assert cells == [pytest.approx((real_row["value"], real_row["ci_low"], real_row["ci_high"]), abs=6e-4)]
    assert f"seed 2: {aucs[1]:.3f}" in text and f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}" in text
    assert "training side permuted" in text and "learnt nothing from the image" in text


def test_permuted_runs_without_the_real_run_are_an_error(prediction_files):
    root, real, permuted, folds_tsv = prediction_files
    with pytest.raises(report.InputError, match="without the real run's predictions"):
        report.permutation_table([], permuted, 50, 7, report.read_folds([folds_tsv]))


# ---------------------------------------------------------------- the DAG
JOB = re.compile(r"^(?:local)?rule (\w+):\n((?:    \w[\w ]*: .*\n)*)(?:Shell command: (.*)\n)?", re.M)


def dry_run(tmp_path: Path, name: str, extra: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """A dry run of the small demo (tests/slurm/demo_small.yaml) with ``extra`` config, started; its
    output goes to ``tmp_path/{name}.out``."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(extra)
    output = tmp_path / f"{name}.out"
    with output.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args,
                                 "--directory", str(tmp_path / name), "--snakefile", str(REPO / "Snakefile"),
                                 "--configfile", str(REPO / "config" / "config.yaml"),
                                 str(REPO / "tests" / "slurm" / "demo_small.yaml"), str(config)],
                                stdout=sink, stderr=subprocess.STDOUT, text=True)
    return proc, output


def finished(started: tuple[subprocess.Popen, Path]) -> tuple[int, str]:
    """The dry run's exit status and output (stdout and stderr), once it has ended."""
    proc, output = started
    return proc.wait(timeout=300), output.read_text()


def dag_jobs(started: tuple[subprocess.Popen, Path]) -> dict[tuple[str, str], tuple[str, str]]:
    """(rule, outputs) -> (inputs, shell command) of every job a ``-p --forceall`` dry run lists."""
    returncode, stdout = finished(started)
    assert returncode == 0, stdout[-6000:]
    jobs = {}
    for match in JOB.finditer(stdout):
        fields = dict(line.strip().split(": ", 1) for line in match.group(2).splitlines())
        jobs[(match.group(1), fields.get("output", ""))] = (fields.get("input", ""), match.group(3) or "")
    assert jobs, stdout[-3000:]
    return jobs


def test_permutation_seeds_add_their_runs_and_the_table_and_change_no_other_job(tmp_path):
    # both dry runs at once (each mostly parses the workflow)
    started = [dry_run(tmp_path, "plain", "train:\n  permutation_seeds: []\n", "-p", "--forceall"),
               dry_run(tmp_path, "seeded", "train:\n  permutation_seeds: [3, 5]\n  permutation_models: [cnn3d]\n",
                       "-p", "--forceall")]
    plain, seeded = (dag_jobs(run) for run in started)
    added = {key: value for key, value in seeded.items() if key not in plain}
    # every job of the run without the control is there, defined exactly as before (inputs, command)
    assert {key: seeded[key] for key in plain if key[0] != "all"} == {k: v for k, v in plain.items() if k[0] != "all"}
    permuted = {key: value for key, value in added.items() if key[0] == "train_permuted_fold"}
    n_folds = 2  # tests/slurm/demo_small.yaml
    assert len(permuted) == 2 * n_folds and set(added) - set(permuted) == {
        key for key in added if key[0] in ("permutation_control", "all")}
    assert sum(key[0] == "permutation_control" for key in added) == 1
    for (rule, outputs), (inputs, command) in permuted.items():
        seed = re.search(r"train_permuted/classify/cnn3d/seed(\d)/fold\d/best\.pt", outputs).group(1)
        assert f"--permutation-seed {seed}" in command and "permuted_labels.tsv" in outputs
        real = plain[("train_fold", outputs.rsplit(", ", 1)[0].replace("train_permuted", "train")
                      .replace(f"seed{seed}/", ""))]
        # the same job as the real run (config, inputs) but for the seed and its own folder
        assert command.replace(f" --permutation-seed {seed}", "").replace("train_permuted_fold", "train_fold") \
            .replace(f"train_permuted/classify/cnn3d/seed{seed}/", "train/classify/cnn3d/") \
            .replace(f"cnn3d_seed{seed}_", "cnn3d_") == real[1]
        assert inputs == real[0]
    # no model table, ensemble or figure reads a permuted run: only the control table does
    readers = {key[0] for key, (inputs, _) in seeded.items() if "results/train_permuted/" in inputs}
    assert readers == {"permutation_control"}
    control = next(value for key, value in added.items() if key[0] == "permutation_control")
    assert control[0].count("results/train_permuted/") == 2 * n_folds
    assert control[0].count("results/train/classify/cnn3d/") == n_folds


def test_a_permutation_model_no_supporting_task_trains_is_an_error(tmp_path):
    returncode, output = finished(dry_run(tmp_path, "bad", "train:\n  permutation_seeds: [1]\n  permutation_models: [unet]\n"))
    assert returncode != 0
    assert "train.permutation_models: ['unet'] trained by no task with a permuted-label control" in output
