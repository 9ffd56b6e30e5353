"""Clinical metrics at the model's operating threshold (the paper's Table 1), from scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score, roc_curve

from medadv.errors import MedadvError


def clinical_metrics(labels: np.ndarray, p_disease: np.ndarray, threshold: float) -> dict[str, float | int | None]:
    """Accuracy, AUC, sensitivity, specificity and mean confidence of the predicted class.

    ``labels`` are 0 (healthy) / 1 (disease), ``p_disease`` the model's P(disease); a case is called
    disease when P(disease) >= ``threshold``. AUC is None when only one class is present.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(p_disease, dtype=np.float64).ravel()
    if len(y) != len(p) or len(y) == 0:
        raise MedadvError(f"{len(y)} labels but {len(p)} predictions.", "score every image once.")
    if not np.isfinite(p).all():
        raise MedadvError("the model returned NaN or infinite probabilities.", "check the model and its input.")
    pred = (p >= threshold).astype(np.int64)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    confidence = np.where(pred == 1, p, 1.0 - p)
    return {
        "n": int(len(y)),
        "n_disease": int(y.sum()),
        "n_healthy": int(len(y) - y.sum()),
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(y, pred)),
        "auc": float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else None,
        "sensitivity": float(tp / (tp + fn)) if tp + fn else None,
        "specificity": float(tn / (tn + fp)) if tn + fp else None,
        "mean_confidence": float(confidence.mean()),
        "tp": int(tp), "tn": int(tn), "fp": int(fp), "fn": int(fn),
    }


def youden_threshold(labels: np.ndarray, p_disease: np.ndarray) -> float:
    """The threshold that maximizes Youden's J = sensitivity + specificity - 1 (on validation data)."""
    y = np.asarray(labels).ravel()
    if not 0 < y.sum() < len(y):
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, np.asarray(p_disease).ravel())
    best = int(np.argmax(tpr - fpr))
    return float(np.clip(thresholds[best], 0.0, 1.0))
