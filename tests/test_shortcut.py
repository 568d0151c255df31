"""No shortcut to the T4 label: simple intensity and size statistics of a crop do not separate T4.

For the learnability cohort of tests/test_train.py, neither any single statistic (voxel counts per HU
band, the crop's size) nor a cross-validated logistic regression on all of them reaches a ROC-AUC
above 0.7, while the label is in the image: a trained 3D CNN separates it (tests/test_train.py's
learnability test, AUC >= 0.9 on the same cohort). The same holds for the demo's phantoms (crops
straight from hnct.demo's anatomy, no workflow: seconds; the tumour's voxel count too), whose label
is in the planted breach (tests/test_workflow.py's learnability gate trains on the workflow's crops).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from hnct import demo

# HU bands: air, fat, soft tissue and nodes, tumour (110-120 HU), cartilage matrix, ossified cartilage and bone.
HU_BANDS = [(-np.inf, -500), (-500, -100), (-100, 100), (100, 150), (150, 300), (300, np.inf)]
MAX_AUC = 0.7


def crop_statistics(hu: np.ndarray, tumour: np.ndarray | None = None) -> dict[str, float]:
    """Voxel counts per HU band (lower edge included), the tumour label's voxel count, the crop size."""
    stats = {f"hu[{lo:g},{hi:g})": float(((hu >= lo) & (hu < hi)).sum()) for lo, hi in HU_BANDS}
    if tumour is not None:
        stats["tumour_voxels"] = float(tumour.sum())
    stats["crop_voxels"] = float(hu.size)
    return stats


def separation_aucs(table: pd.DataFrame, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """max(AUC, 1 - AUC) of each column alone (a constant column: 0.5), and the out-of-fold AUC of a
    logistic regression on all columns (standardised, 5-fold stratified cross-validation)."""
    aucs = {}
    for column in table.columns:
        values = table[column].to_numpy()
        auc = roc_auc_score(labels, values) if np.ptp(values) > 0 else 0.5
        aucs[column] = max(auc, 1 - auc)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    folds = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    predicted = cross_val_predict(model, table.to_numpy(), labels, cv=folds, method="predict_proba")[:, 1]
    aucs["logistic_regression_cv"] = roc_auc_score(labels, predicted)
    return aucs


def assert_no_shortcut(table: pd.DataFrame, labels: np.ndarray, what: str) -> None:
    aucs = separation_aucs(table, labels)
    print(what, {name: round(value, 3) for name, value in aucs.items()})
    too_high = {name: round(value, 3) for name, value in aucs.items() if value > MAX_AUC}
    assert not too_high, f"{what}: simple statistics separate T4 (AUC > {MAX_AUC}): {too_high}"


@pytest.fixture(scope="module")
def phantom_cohort() -> pd.DataFrame:
    """96 usable demo patients, half T4, with the demo's seed (no broken or two-scan patients)."""
    return demo.plan_cohort(n_patients=96, seed=1729, t4_fraction=0.5, broken_cases=False, two_scan_patients=0)


@pytest.fixture(scope="module")
def phantom_statistics(phantom_cohort) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """(statistics, breach, labels): crop statistics of every phantom, and the tumour voxels more than
    1 mm beyond the thyroid shield's outer surface (the planted difference, from the planted truth)."""
    rows, breach = [], []
    for case in phantom_cohort.index:
        row = phantom_cohort.loc[case]
        crop = demo.phantom_crop(row)
        rows.append(crop_statistics(crop["hu"], crop["tumour"]))
        anat = demo.anatomy(row)
        k, j, i = np.indices(crop["hu"].shape)
        half = demo.LARYNX_RADIUS + 8.0  # phantom_crop's default margin
        r = np.hypot(i - half, j - half)  # the crop's centre voxel is the airway axis (1 mm voxels)
        outside = r > anat["cartilage"]["shield_outer_mm"] + 1.0
        breach.append({"tumour_beyond_shield": float((crop["tumour"] & outside).sum())})
    labels = phantom_cohort["label_t4"].astype(int).to_numpy()
    return pd.DataFrame(rows), pd.DataFrame(breach), labels


def test_demo_phantom_crops_have_no_simple_shortcut(phantom_statistics):
    stats, _, labels = phantom_statistics
    assert labels.sum() == len(labels) // 2
    assert_no_shortcut(stats, labels, "demo phantoms")


def test_the_planted_breach_separates_the_phantoms_perfectly(phantom_statistics):
    """The label is in the image (the check above can fail: a statistic of the breach reaches 1.0)."""
    _, breach, labels = phantom_statistics
    assert separation_aucs(breach, labels)["tumour_beyond_shield"] == 1.0


def test_learnability_cohort_has_no_simple_shortcut():
    from test_train import synthetic_crop

    rng = np.random.default_rng(3)  # make_cohort's default seed
    labels = np.array([i % 2 for i in range(120)])
    stats = pd.DataFrame([crop_statistics(synthetic_crop(bool(label), rng)) for label in labels])
    assert_no_shortcut(stats, labels, "learnability cohort")


def test_the_statistics_flag_a_planted_size_shortcut():
    """The same machinery flags a shortcut when there is one: tumour voxel counts 1.7 times larger in
    T4 crops (the old learnability cohort's blobs were 3.6 times larger by volume)."""
    rng = np.random.default_rng(5)
    labels = np.array([i % 2 for i in range(120)])
    tumour = rng.normal(150, 20, size=labels.size) * np.where(labels == 1, 1.7, 1.0)
    stats = pd.DataFrame({"tumour_voxels": tumour, "noise": rng.normal(size=labels.size)})
    aucs = separation_aucs(stats, labels)
    assert aucs["tumour_voxels"] > 0.9 and aucs["logistic_regression_cv"] > 0.9
    assert aucs["noise"] < MAX_AUC
