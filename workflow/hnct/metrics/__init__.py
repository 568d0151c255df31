"""Evaluation metrics: :mod:`hnct.metrics.classification` (T4 vs non-T4) and
:mod:`hnct.metrics.segmentation` (masks). Plain functions on numpy arrays, cross-checked against
scikit-learn (classification) in the tests."""
