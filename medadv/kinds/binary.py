"""Binary: one decision per image, P(disease) against an operating threshold (the paper's three tasks)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medadv.kinds.base import TaskKind
from medadv.metrics import clinical_metrics, rule_threshold, youden_threshold


class Binary(TaskKind):
    """Two logits (healthy, disease). Scores are P(disease), N floats; a case is called disease when
    P(disease) >= the threshold chosen on validation by Youden's J."""

    name = "binary"
    title = "binary classifier"
    selection_rule = "validation AUC"

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1)[:, 1]

    def predict(self, scores, threshold: float) -> np.ndarray:
        return (np.asarray(scores) >= threshold).astype(np.int64)

    def operating_point(self, labels: np.ndarray, scores: np.ndarray, rule: str = "youden") -> float:
        return youden_threshold(labels, scores) if rule == "youden" else rule_threshold(labels, scores, rule)

    def metrics(self, labels, scores, threshold, *, class_names=None, graded=False, positive_from=None) -> dict[str, Any]:
        return clinical_metrics(labels, scores, threshold)

    def selection_score(self, labels, scores, *, graded=False) -> float:
        return clinical_metrics(labels, scores, 0.5)["auc"] or 0.0

    def success_definition(self, target) -> str:
        # the binary record's wording is kept as it has always been written (results stay comparable)
        return "images correctly classified before the attack whose decision reached the attack's goal after it"

    def summary(self, metrics: dict[str, Any]) -> list[tuple[str, Any]]:
        return [(k, metrics.get(k)) for k in ("accuracy", "auc", "sensitivity", "specificity")]
