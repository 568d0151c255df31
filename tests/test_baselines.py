"""hnct.baselines: image-free classifiers fitted on each outer fold's training cases only, the
per-collection / per-manufacturer tables, and their intervals."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hnct import baselines
from hnct.common import write_json
from test_report import assert_every_interval_contains_its_value

STYLE = {"ALPHA": ("GE MEDICAL SYSTEMS", "LightSpeed RT16", "STANDARD", 0.5, 2.5),
         "BETA": ("SIEMENS", "SOMATOM Definition AS", "B31f", 0.9, 2.0),
         "GAMMA": ("Philips", "Brilliance Big Bore", "B", 0.7, 3.0)}
T4_RATE = {"ALPHA": 0.8, "BETA": 0.15, "GAMMA": 0.5}


@pytest.fixture()
def cohort(tmp_path):
    """Three collections whose T4 prevalence differs (the shortcut), 12 patients each, one patient with
    two scans; 4 folds by patient and a test split; volume sidecars; one image model's predictions."""
    rng = np.random.default_rng(1)
    rows, sidecars = [], []
    for collection, (manufacturer, scanner, kernel, pixel, thickness) in STYLE.items():
        for i in range(12):
            patient = f"{collection}-{i:02d}"
            label = int(rng.random() < T4_RATE[collection])
            fold = "test" if i >= 10 else str(i % 4)
            scans = [f"{patient}-01", f"{patient}-02"] if i == 3 else [patient]
            for case in scans:
                rows.append({"case": case, "patient": patient, "collection": collection, "label": label,
                             "fold": fold})
                path = tmp_path / "results" / "volumes" / f"{case}.json"
                write_json(path, {"case": case, "status": "ok", "manufacturer": manufacturer, "model": scanner,
                                  "kernel": kernel, "spacing": [pixel + 0.01 * i, pixel + 0.01 * i, thickness]})
                sidecars.append(str(path))
    folds = pd.DataFrame(rows)
    folds_file = tmp_path / "results" / "folds" / "classify" / "folds.tsv"
    folds_file.parent.mkdir(parents=True)
    folds.to_csv(folds_file, sep="\t", index=False)
    predictions = []
    for k in range(4):
        val = folds[folds["fold"] == str(k)]
        path = tmp_path / "results" / "train" / "classify" / "cnn3d" / f"fold{k}" / "val_predictions.csv"
        path.parent.mkdir(parents=True)
        probability = np.clip(0.3 + 0.4 * val["label"] + rng.normal(0, 0.15, len(val)), 0, 1)
        pd.DataFrame({"case": val["case"], "label": val["label"], "probability": probability,
                      "fold": k}).to_csv(path, index=False)
        predictions.append(str(path))
    return tmp_path, folds, str(folds_file), sidecars, predictions


def test_baselines_are_fitted_on_each_outer_folds_training_cases_only(cohort):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import OneHotEncoder

    root, folds, folds_file, sidecars, _ = cohort
    cases = baselines.read_case_metadata(folds, folds_file, sidecars)
    fitted = baselines.fit_baseline(cases, "collection_only")
    for k in "0123":
        train = cases[(cases["fold"] != k) & (cases["fold"] != "test")]
        val = cases[cases["fold"] == k]
        encoder = OneHotEncoder(handle_unknown="ignore").fit(train[["collection"]])
        model = LogisticRegression(class_weight="balanced", max_iter=1000).fit(
            encoder.transform(train[["collection"]]), train["label"])
        expected = model.predict_proba(encoder.transform(val[["collection"]]))[:, 1]
        got = fitted[fitted["fold"] == k].set_index("case").loc[val["case"], "probability"]
        np.testing.assert_allclose(got.to_numpy(), expected, atol=1e-9)
    # The validation fold's own labels never reach its model: flipping them changes none of its predictions.
    flipped = cases.assign(label=np.where(cases["fold"] == "2", 1 - cases["label"], cases["label"]))
    again = baselines.fit_baseline(flipped, "metadata_only")
    before = baselines.fit_baseline(cases, "metadata_only")
    np.testing.assert_allclose(again.loc[again["fold"] == "2", "probability"].to_numpy(),
                               before.loc[before["fold"] == "2", "probability"].to_numpy(), atol=1e-12)
    # The test cases get the mean of the four fold baselines; every non-test case one validation prediction.
    assert sorted(fitted.loc[fitted["fold"] == "test", "case"]) == sorted(cases.loc[cases["fold"] == "test", "case"])
    assert fitted.loc[fitted["fold"] != "test", "case"].is_unique
    assert len(fitted[fitted["fold"] != "test"]) == int((cases["fold"] != "test").sum())


def test_shortcut_tables_per_collection_and_manufacturer(cohort):
    root, folds, folds_file, sidecars, predictions = cohort
    out = baselines.run([folds_file], sidecars, predictions, root / "report", n_bootstrap=200, seed=7)
    table = pd.read_csv(out["baselines"])
    assert set(table["model"]) == {"cnn3d", "collection_only", "metadata_only"}
    assert set(table["setting"]) == {"cv", "test"}  # the image model has no test predictions here
    assert set(table.loc[table["model"] == "cnn3d", "setting"]) == {"cv"}
    cv = table[(table["setting"] == "cv") & (table["metric"] == "auc")].set_index("model")
    # The collection alone carries the planted prevalence shortcut: well above chance, seen without an image.
    assert cv.loc["collection_only", "value"] > 0.6 and not cv.loc["collection_only", "image"]
    assert cv.loc["cnn3d", "n_cases"] == 33 and cv.loc["cnn3d", "n_patients"] == 30  # patient 3: two scans
    by_group = pd.read_csv(out["by_group"])
    assert set(by_group["group_by"]) == {"collection", "manufacturer"}
    alpha = by_group[(by_group["group_by"] == "collection") & (by_group["group"] == "ALPHA")
                     & (by_group["model"] == "cnn3d")].set_index("metric")
    expected_cases = folds[(folds["collection"] == "ALPHA") & (folds["fold"] != "test")]
    assert alpha.loc["auc", "n_cases"] == len(expected_cases)
    assert alpha.loc["auc", "n_positive"] == int(expected_cases["label"].sum())
    # The demo's three collections have three manufacturers: the two groupings hold the same cases.
    manufacturer = by_group[(by_group["group_by"] == "manufacturer") & (by_group["group"] == "SIEMENS")]
    collection = by_group[(by_group["group_by"] == "collection") & (by_group["group"] == "BETA")]
    np.testing.assert_allclose(manufacturer["value"].to_numpy(float), collection["value"].to_numpy(float))
    assert assert_every_interval_contains_its_value(root / "report") > 100
    text = out["markdown"].read_text()
    assert "image-free baselines" in text and "per collection" in text and "per manufacturer" in text
    assert "collection_only (no image)" in text and "ALPHA (" in text


def test_a_single_class_collection_has_no_auc_but_its_rates(cohort):
    root, folds, folds_file, sidecars, predictions = cohort
    folds = folds.assign(label=np.where(folds["collection"] == "GAMMA", 0, folds["label"]))
    folds.to_csv(folds_file, sep="\t", index=False)
    for path in predictions:
        frame = pd.read_csv(path)
        frame.loc[frame["case"].str.startswith("GAMMA"), "label"] = 0
        frame.to_csv(path, index=False)
    out = baselines.run([folds_file], sidecars, predictions, root / "report", n_bootstrap=50, seed=7)
    gamma = pd.read_csv(out["by_group"])
    gamma = gamma[(gamma["group"] == "GAMMA") & (gamma["model"] == "cnn3d")].set_index("metric")
    assert np.isnan(gamma.loc["auc", "value"]) and np.isnan(gamma.loc["sensitivity", "value"])
    assert np.isfinite(gamma.loc["specificity", "value"])
    assert "GAMMA (0 T4 /" in out["markdown"].read_text()


def test_a_case_without_a_usable_volume_sidecar_is_named(cohort, capfd):
    root, folds, folds_file, sidecars, predictions = cohort
    missing = [s for s in sidecars if not s.endswith("BETA-05.json")]
    argv = ["--folds", folds_file, "--volume-sidecars", *missing, "--predictions", *predictions,
            "--out-dir", str(root / "report"), "--bootstrap", "10", "--seed", "7"]
    assert baselines.main(argv) == 1
    err = capfd.readouterr().err
    assert "BETA-05" in err and "no volume sidecar" in err
    assert not (root / "report" / "baselines.csv").exists()
    write_json(root / "results" / "volumes" / "BETA-05.json", {"case": "BETA-05", "status": "excluded",
                                                               "reason": "missing slices"})
    assert baselines.main(argv[:3] + sidecars + argv[3 + len(missing):]) == 1
    assert "status is 'excluded'" in capfd.readouterr().err
