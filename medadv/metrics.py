"""Clinical metrics at the model's operating threshold (the paper's Table 1) and of multi-class graders,
from scikit-learn."""

from __future__ import annotations

from typing import Any

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


def multiclass_metrics(labels: np.ndarray, probs: np.ndarray, *, class_names: tuple[str, ...] | None = None,
                       graded: bool = False, positive_from: int | None = None) -> dict[str, Any]:
    """Metrics of a K-class model from its N×K class probabilities (decision: the most probable class).

    Accuracy, balanced accuracy, per-class recall (sensitivity of each class) and one-vs-rest AUC (None
    for a class absent from ``labels`` or present alone: not estimable, never 0.5), macro AUC over the
    estimable classes, the confusion matrix (rows: true, columns: predicted) and mean confidence.
    ``graded`` (ordinal classes such as DR grades 0-4): quadratic-weighted Cohen's kappa, the grading
    literature's figure, and the mean absolute grade error. ``positive_from``: the clinically first
    decision derived from the grade (e.g. referable DR = grade >= 2), with its sensitivity and specificity.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) != len(y) or len(y) == 0 or p.shape[1] < 2:
        raise MedadvError(f"{len(y)} labels but probabilities of shape {p.shape}.", "score every image once, N×K.")
    if not np.isfinite(p).all():
        raise MedadvError("the model returned NaN or infinite probabilities.", "check the model and its input.")
    k = p.shape[1]
    if y.min() < 0 or y.max() >= k:
        raise MedadvError(f"labels run from {y.min()} to {y.max()} but the model has {k} classes.",
                          "evaluate the model on the task it was trained for.")
    names = list(class_names) if class_names and len(class_names) == k else [str(i) for i in range(k)]
    pred = p.argmax(1)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    support = cm.sum(1)
    recall = [float(cm[i, i] / support[i]) if support[i] else None for i in range(k)]
    auc: list[float | None] = []
    for i in range(k):
        pos = y == i
        auc.append(float(roc_auc_score(pos, p[:, i])) if 0 < pos.sum() < len(y) else None)
    estimable = [a for a in auc if a is not None]
    out: dict[str, Any] = {
        "n": int(len(y)), "classes": k, "class_names": names,
        "counts": {names[i]: int(support[i]) for i in range(k)},
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(np.mean([r for r in recall if r is not None])),
        "recall": {names[i]: recall[i] for i in range(k)},
        "auc_ovr": {names[i]: auc[i] for i in range(k)},
        "macro_auc": float(np.mean(estimable)) if estimable else None,
        "auc_not_estimable": [names[i] for i in range(k) if auc[i] is None],
        "mean_confidence": float(p.max(1).mean()),
        "confusion": cm.tolist(),
    }
    if graded:
        from sklearn.metrics import cohen_kappa_score

        # kappa is undefined (NaN in scikit-learn) when both raters use one grade only: say None
        kappa = cohen_kappa_score(y, pred, weights="quadratic", labels=list(range(k))) if len(set(y) | set(pred)) > 1 else None
        out["quadratic_kappa"] = None if kappa is None or not np.isfinite(kappa) else float(kappa)
        out["mean_abs_grade_error"] = float(np.abs(pred - y).mean())
    if positive_from is not None:
        yt, yp = y >= positive_from, pred >= positive_from
        tp, fn = int((yt & yp).sum()), int((yt & ~yp).sum())
        tn, fp = int((~yt & ~yp).sum()), int((~yt & yp).sum())
        out["positive"] = {"rule": f"class >= {positive_from} ({names[positive_from]} or worse)",
                           "n_positive": int(yt.sum()), "accuracy": float((yt == yp).mean()),
                           "sensitivity": tp / (tp + fn) if tp + fn else None,
                           "specificity": tn / (tn + fp) if tn + fp else None,
                           "tp": tp, "tn": tn, "fp": fp, "fn": fn}
    return out


# A finding's AUC needs both classes present in numbers that make it more than noise: with fewer positives
# (or negatives) among the known labels it is reported as not estimable, never as 0.5.
MIN_AUC_CASES = 5
MISSING = -1  # a multi-label finding's label that is unknown (blank, or "uncertain" under the ignore policy)


def _auc_or_reason(y: np.ndarray, p: np.ndarray) -> tuple[float | None, str | None]:
    pos = int(y.sum())
    neg = len(y) - pos
    if pos < MIN_AUC_CASES or neg < MIN_AUC_CASES:
        return None, f"not estimable: {pos} positive and {neg} negative known labels (at least {MIN_AUC_CASES} of each)"
    return float(roc_auc_score(y, p)), None


def multilabel_metrics(labels: np.ndarray, probs: np.ndarray, thresholds, *,
                       finding_names: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Metrics of a multi-label reader from its N×F finding probabilities and one threshold per finding.

    ``labels``: N×F with 0 absent, 1 present and :data:`MISSING` (-1) unknown; unknown labels are left out
    of every figure of their finding (never counted as absent). Per finding: known count, positives, AUC
    (None with the reason when fewer than :data:`MIN_AUC_CASES` positives or negatives), and sensitivity and
    specificity at its threshold. Overall: macro AUC (mean over estimable findings, with their count), micro
    AUC (every known image-finding pair), exact-match accuracy (every known finding right), label-wise
    accuracy, and the clinically first decision "any finding" vs "no finding" (abnormal when any finding
    reaches its threshold; its AUC scores an image by its most probable finding) on images whose labels are
    all known."""
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(thresholds, dtype=np.float64).ravel()
    if y.ndim != 2 or y.shape != p.shape or len(t) != y.shape[1] or len(y) == 0:
        raise MedadvError(f"multi-label metrics need N×F labels and probabilities and F thresholds; got labels "
                          f"{y.shape}, probabilities {p.shape}, {len(t)} thresholds.", "score every image once.")
    if not np.isfinite(p).all():
        raise MedadvError("the model returned NaN or infinite probabilities.", "check the model and its input.")
    names = tuple(finding_names) if finding_names else tuple(f"finding {i}" for i in range(y.shape[1]))
    known = y != MISSING
    pred = (p >= t).astype(np.int64)
    per_finding = []
    for f, name in enumerate(names):
        k = known[:, f]
        yf, pf, df = y[k, f], p[k, f], pred[k, f]
        auc, why = _auc_or_reason(yf, pf)
        tp, fn = int(((df == 1) & (yf == 1)).sum()), int(((df == 0) & (yf == 1)).sum())
        tn, fp = int(((df == 0) & (yf == 0)).sum()), int(((df == 1) & (yf == 0)).sum())
        per_finding.append({
            "finding": name, "n_known": int(k.sum()), "n_missing": int((~k).sum()), "positives": int(yf.sum()),
            "threshold": float(t[f]), "auc": auc, **({"auc_note": why} if why else {}),
            "sensitivity": tp / (tp + fn) if tp + fn else None, "specificity": tn / (tn + fp) if tn + fp else None,
            "tp": tp, "fn": fn, "tn": tn, "fp": fp,
        })
    estimable = [r["auc"] for r in per_finding if r["auc"] is not None]
    micro, micro_why = _auc_or_reason(y[known], p[known])
    full = known.all(1)
    abnormal_true, abnormal_pred = (y[full] == 1).any(1), (pred[full] == 1).any(1)
    any_auc, any_why = _auc_or_reason(abnormal_true.astype(np.int64), p[full].max(1)) if full.any() else (None, "no image with every label known")
    tp = int((abnormal_pred & abnormal_true).sum())
    fn = int((~abnormal_pred & abnormal_true).sum())
    tn = int((~abnormal_pred & ~abnormal_true).sum())
    fp = int((abnormal_pred & ~abnormal_true).sum())
    exact = ((pred == y) | ~known).all(1)
    confidence = np.where(pred == 1, p, 1.0 - p)[known]
    return {
        "n": int(len(y)), "n_findings": len(names), "findings": list(names),
        "accuracy": float(exact.mean()),
        "accuracy_definition": "exact match: every known finding of the image on the right side of its threshold",
        "label_accuracy": float((pred == y)[known].mean()) if known.any() else None,
        "macro_auc": float(np.mean(estimable)) if estimable else None,
        "macro_auc_findings": len(estimable),
        "micro_auc": micro, **({"micro_auc_note": micro_why} if micro_why else {}),
        "any_finding": {"n": int(full.sum()), "n_abnormal": int(abnormal_true.sum()), "auc": any_auc,
                        **({"auc_note": any_why} if any_why else {}),
                        "sensitivity": tp / (tp + fn) if tp + fn else None,
                        "specificity": tn / (tn + fp) if tn + fp else None, "tp": tp, "fn": fn, "tn": tn, "fp": fp,
                        "rule": "abnormal when any finding reaches its threshold"},
        "per_finding": per_finding,
        "thresholds": [float(v) for v in t],
        "n_missing_labels": int((~known).sum()),
        "mean_confidence": float(confidence.mean()) if confidence.size else None,
    }


def parse_threshold_rule(rule: str) -> float | None:
    """``youden`` -> None; ``sensitivity:S`` (S in (0, 1], e.g. 0.9) -> S. One line naming the fix else."""
    if rule == "youden":
        return None
    name, _, value = rule.partition(":")
    try:
        target = float(value)
    except ValueError:
        target = float("nan")
    if name != "sensitivity" or not 0 < target <= 1:
        raise MedadvError(f"threshold rule {rule!r} is not youden or sensitivity:S with S in (0, 1].",
                          "pass --threshold-rule youden or e.g. --threshold-rule sensitivity:0.9.")
    return target


def sensitivity_threshold(labels: np.ndarray, p_disease: np.ndarray, sensitivity: float) -> float:
    """A threshold whose sensitivity on ``labels`` reaches ``sensitivity`` with the most specific decisions
    that do (halfway between the last positive it must find and the next lower score); 0.5 when one class
    is absent."""
    y = np.asarray(labels).ravel().astype(np.int64)
    p = np.asarray(p_disease, dtype=np.float64).ravel()
    if not 0 < y.sum() < len(y):
        return 0.5
    positives = np.sort(p[y == 1])[::-1]  # a threshold at the k-th highest positive score finds k of them
    k = int(np.ceil(sensitivity * len(positives) - 1e-9))
    at = positives[max(k, 1) - 1]
    # halfway down to the next lower score of any image: the same decisions on these images, and not on a
    # knife's edge where a rounding-level change of the score would lose that positive
    below = p[p < at]
    return float(np.clip((at + below.max()) / 2 if below.size else at, 0.0, 1.0))


def rule_threshold(labels: np.ndarray, p_disease: np.ndarray, rule: str = "youden") -> float:
    """The operating point by ``rule`` (:func:`parse_threshold_rule`) on validation data."""
    target = parse_threshold_rule(rule)
    return youden_threshold(labels, p_disease) if target is None else sensitivity_threshold(labels, p_disease, target)


def youden_thresholds(labels: np.ndarray, probs: np.ndarray, rule: str = "youden") -> tuple[float, ...]:
    """One threshold per finding (column) on its known labels by ``rule`` (Youden's J, or
    ``sensitivity:S``); 0.5 where a column has one class."""
    parse_threshold_rule(rule)
    y = np.asarray(labels).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    out = []
    for f in range(y.shape[1]):
        k = y[:, f] != MISSING
        out.append(rule_threshold(y[k, f], p[k, f], rule) if k.any() else 0.5)
    return tuple(out)
