"""Seeded, stratified, patient-level splits for sources that ship without one."""

from __future__ import annotations

import numpy as np

from medadv.errors import MedadvError

# 10 folds: 7 train, 1 val, 2 test (70/10/20), each fold stratified by label and whole by patient.
_FOLDS = 10
_ROLE = ("train",) * 7 + ("val",) + ("test",) * 2


def _patient_folds(labels: np.ndarray, patient_ids: list[str | None] | None, seed: int):
    """Ten seeded folds, stratified by label and whole by patient (an image without an id is its own
    patient), as (fold, image indices) pairs, or None when there are fewer than ten patients; and the
    number of patients."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.asarray(labels)
    if labels.ndim == 2:  # multi-label: stratified by "any finding" against "no finding"
        labels = (labels == 1).any(1).astype(np.int64)
    n = len(labels)
    groups = [pid if pid not in (None, "") else f"__image{i}" for i, pid in enumerate(patient_ids or [None] * n)]
    patients = len(set(groups))
    if patients < _FOLDS:
        return None, patients
    folds = StratifiedGroupKFold(n_splits=_FOLDS, shuffle=True, random_state=seed)
    return ((fold, idx) for fold, (_, idx) in enumerate(folds.split(np.zeros(n), labels, groups))), patients


def patient_split(labels: np.ndarray, patient_ids: list[str | None] | None, seed: int = 0) -> np.ndarray:
    """Assign each image to train/val/test so that no patient appears in two splits.

    Images without a patient id count as their own patient. Returns an array of split names.
    """
    folds, patients = _patient_folds(labels, patient_ids, seed)
    if folds is None:
        raise MedadvError(f"only {patients} patients: too few for a 70/10/20 patient-level split.",
                          "add a 'split' column to labels.csv.")
    out = np.empty(len(labels), dtype=object)
    for fold, idx in folds:
        out[idx] = _ROLE[fold]
    return out.astype(str)


VAL_FRACTION = f"1/{_FOLDS}"


def val_from_train(labels: np.ndarray, patient_ids: list[str | None] | None, seed: int = 0) -> np.ndarray | None:
    """For data that ships train and test only: a validation split carved from train, one tenth of its
    patients (one of :func:`patient_split`'s folds), stratified by label; no patient is in both. Returns
    "train" or "val" per image, or None when train has fewer than ten patients (the given splits stand)."""
    folds, _ = _patient_folds(labels, patient_ids, seed)
    if folds is None:
        return None
    _, val = next(folds)
    out = np.full(len(labels), "train", dtype=object)
    out[val] = "val"
    return out
