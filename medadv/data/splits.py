"""Seeded, stratified, patient-level splits for sources that ship without one."""

from __future__ import annotations

import numpy as np

from medadv.errors import MedadvError

# 10 folds: 7 train, 1 val, 2 test (70/10/20), each fold stratified by label and whole by patient.
_FOLDS = 10
_ROLE = ("train",) * 7 + ("val",) + ("test",) * 2


def patient_split(labels: np.ndarray, patient_ids: list[str | None] | None, seed: int = 0) -> np.ndarray:
    """Assign each image to train/val/test so that no patient appears in two splits.

    Images without a patient id count as their own patient. Returns an array of split names.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    n = len(labels)
    groups = [
        pid if pid not in (None, "") else f"__image{i}" for i, pid in enumerate(patient_ids or [None] * n)
    ]
    if len(set(groups)) < _FOLDS:
        raise MedadvError(
            f"only {len(set(groups))} patients: too few for a 70/10/20 patient-level split.",
            "add a 'split' column to labels.csv.",
        )
    out = np.empty(n, dtype=object)
    folds = StratifiedGroupKFold(n_splits=_FOLDS, shuffle=True, random_state=seed)
    for fold, (_, idx) in enumerate(folds.split(np.zeros(n), labels, groups)):
        out[idx] = _ROLE[fold]
    return out.astype(str)


_VAL_FOLDS = 10
VAL_FRACTION = f"1/{_VAL_FOLDS}"


def val_from_train(labels: np.ndarray, patient_ids: list[str | None] | None, seed: int = 0) -> np.ndarray | None:
    """For data that ships train and test only: a validation split carved from train, one tenth of its
    patients, stratified by label; no patient is in both. Returns "train" or "val" per image, or None
    when train has fewer than ten patients (too few to carve from: the given splits stand)."""
    from sklearn.model_selection import StratifiedGroupKFold

    n = len(labels)
    groups = [pid if pid not in (None, "") else f"__image{i}" for i, pid in enumerate(patient_ids or [None] * n)]
    if len(set(groups)) < _VAL_FOLDS:
        return None
    folds = StratifiedGroupKFold(n_splits=_VAL_FOLDS, shuffle=True, random_state=seed)
    _, val = next(iter(folds.split(np.zeros(n), labels, groups)))
    out = np.full(n, "train", dtype=object)
    out[val] = "val"
    return out
