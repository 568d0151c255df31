"""Splitting errors and the inner validation split: what both the folds rule (:mod:`hnct.folds`) and
every training job (:func:`hnct.tasks.inner_rows`) need, with numpy and scikit-learn only (the task
registry is imported by the report rules, whose environment has no DICOM stack)."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

# What to do when a fold's training side is too small for an inner split.
INNER_REMEDY = "lower train.inner_folds, add cases, or train a fixed number of epochs (train.selection: fixed)"


class FoldError(ValueError):
    """The cohort cannot be split as configured (not one case: the whole task)."""


def inner_split(table: pd.DataFrame, inner_folds: int, seed: int, where: str = "training side",
                required_labels: Iterable[int] = (0, 1)) -> np.ndarray:
    """Boolean mask of the inner-validation rows of one outer fold's training side (``case, patient,
    label`` rows): one fold of ``StratifiedGroupKFold(inner_folds, shuffle=True, random_state=seed)``,
    grouped by patient and stratified by the task label as the outer folds are (a patient's scans
    are on one side; about ``1 / inner_folds`` of the patients validate). The first of its folds
    whose both sides hold every one of ``required_labels`` that the training side holds is taken
    (with few patients of a class, a fold can lack it; classify needs both classes to select on
    AUC/F1, segment only node-positive cases for Dice). Model selection (best epoch, early stopping,
    LR schedule, the classification threshold) reads only these rows; the outer fold is never among
    them. FoldError naming ``where`` when no fold gives both sides those labels.
    """
    if inner_folds < 2:
        raise FoldError(f"{where}: train.inner_folds must be at least 2, not {inner_folds}")
    labels = table["label"].to_numpy(int)
    groups = table["patient"].astype(str).to_numpy()
    n_patients = len(set(groups))
    if n_patients < inner_folds:
        raise FoldError(f"{where}: {n_patients} training patient(s) cannot be split into train.inner_folds = "
                        f"{inner_folds} patient groups; {INNER_REMEDY}")
    present = set(labels) & {int(label) for label in required_labels}
    splitter = StratifiedGroupKFold(n_splits=inner_folds, shuffle=True, random_state=int(seed))
    try:
        splits = list(splitter.split(np.zeros(len(table)), labels, groups))
    except ValueError as error:  # e.g. every class has fewer cases than inner_folds
        raise FoldError(f"{where}: no inner split (train.inner_folds = {inner_folds}): {error}; {INNER_REMEDY}") from None
    for _, inner_index in splits:
        inner = np.zeros(len(table), dtype=bool)
        inner[inner_index] = True
        if present <= set(labels[inner]) and present <= set(labels[~inner]):
            return inner
    counts = ", ".join(f"{int((labels == label).sum())} label-{label}" for label in sorted(present))
    raise FoldError(f"{where}: no inner split (train.inner_folds = {inner_folds}) gives the inner training and "
                    f"inner validation sides every label ({counts} case(s) of {n_patients} patients on the "
                    f"training side); {INNER_REMEDY}")
