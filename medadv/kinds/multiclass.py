"""Multi-class: one of K >= 3 classes per image (e.g. diabetic retinopathy grades 0-4)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medadv.errors import MedadvError
from medadv.kinds.base import TaskKind
from medadv.metrics import multiclass_metrics


class MultiClass(TaskKind):
    """K logits; scores are the N×K class probabilities; the decision is the most probable class (no
    threshold: the operating point is argmax, recorded as 0.5 only to keep the checkpoint schema).

    Graded tasks (ordinal classes) select the best epoch by quadratic-weighted kappa on validation,
    others by macro one-vs-rest AUC."""

    name = "multiclass"
    title = "multi-class classifier"
    selection_rule = "validation quadratic-weighted kappa (graded) or macro AUC"

    def selection_name(self, graded: bool = False) -> str:
        return "validation quadratic-weighted kappa" if graded else "validation macro AUC"

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1)

    def predict(self, scores, threshold: float) -> np.ndarray:
        return np.asarray(scores).argmax(1).astype(np.int64)

    def operating_point(self, labels: np.ndarray, scores: np.ndarray, rule: str = "youden") -> float:
        if rule != "youden":
            raise MedadvError(f"a multi-class model decides by its most probable class; --threshold-rule {rule} "
                              "has no threshold to set.", "leave --threshold-rule out.")
        return 0.5

    def metrics(self, labels, scores, threshold, *, class_names=None, graded=False, positive_from=None) -> dict[str, Any]:
        return multiclass_metrics(labels, scores, class_names=class_names, graded=graded, positive_from=positive_from)

    def selection_score(self, labels, scores, *, graded=False) -> float:
        m = multiclass_metrics(labels, scores, graded=graded)
        value = m.get("quadratic_kappa") if graded else m.get("macro_auc")
        return float(value) if value is not None else -1.0

    def summary(self, metrics: dict[str, Any]) -> list[tuple[str, Any]]:
        rows = [("accuracy", metrics.get("accuracy")), ("macro AUC", metrics.get("macro_auc"))]
        if "quadratic_kappa" in metrics:
            rows.append(("kappa (quadratic)", metrics["quadratic_kappa"]))
        if "positive" in metrics:
            rows += [("sensitivity " + metrics["positive"]["rule"].split(" (")[0], metrics["positive"]["sensitivity"]),
                     ("specificity", metrics["positive"]["specificity"])]
        return rows
