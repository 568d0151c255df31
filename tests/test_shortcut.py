"""No shortcut to the T4 label: simple intensity and size statistics of a crop do not separate T4.

For the learnability cohort of tests/test_train.py, neither any single statistic (voxel counts per HU
band, the crop's size) nor a cross-validated logistic regression on all of them reaches a ROC-AUC
above 0.7, while the label is in the image: a trained 3D CNN separates it (tests/test_train.py's
learnability test, AUC >= 0.9 on the same cohort). The demo's phantoms still have the size shortcut
(issue 14 item 6; a shortcut-free phantom is on branch demo, not yet learnable through the workflow).
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
