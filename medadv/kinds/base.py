"""The task-kind interface (see :mod:`medadv.kinds`) and the attack targets every kind understands."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medadv.errors import MedadvError

NAMED_TARGETS = ("opposite", "disease", "healthy", "none")


@dataclass(frozen=True)
class Target:
    """An attack's goal, parsed: ``name`` is one of :data:`NAMED_TARGETS` or ``class`` (then ``index``)."""

    name: str
    index: int | None = None

    def __str__(self) -> str:
        return f"class:{self.index}" if self.name == "class" else self.name


def parse_target(text: str) -> Target:
    """``opposite | disease | healthy | none | class:<k>`` -> :class:`Target` (one line on anything else)."""
    if text in NAMED_TARGETS:
        return Target(text)
    head, _, tail = str(text).partition(":")
    if head == "class" and tail.isascii() and tail.isdigit() and len(tail) <= 4:
        return Target("class", int(tail))
    raise MedadvError(f"unknown target '{text}'.", "use opposite, disease, healthy, none or class:<k> (k a class index).")


class TaskKind(ABC):
    """One kind of model output. Scores are what the kind carries between model, metrics and report:
    see :meth:`scores`. ``classes`` is the number of classes (K >= 2) wherever it is asked for."""

    name: str
    title: str

    def outputs(self, classes: int) -> int:
        """Logits the network's head produces for ``classes`` classes."""
        return classes

    def soft_targets(self, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """N labels -> N×outputs float training targets (one-hot; mixup mixes them)."""
        return F.one_hot(labels.long(), classes).float()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean training loss of N×outputs logits against :meth:`soft_targets` (mixed or not)."""
        return F.cross_entropy(logits, targets)

    @abstractmethod
    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """N×outputs logits -> the scores medadv carries (float, on the logits' device)."""

    @abstractmethod
    def predict(self, scores: np.ndarray | torch.Tensor, threshold: float) -> np.ndarray:
        """Decisions (N class indices, int64) from :meth:`scores` at the operating point."""

    @abstractmethod
    def operating_point(self, labels: np.ndarray, scores: np.ndarray) -> float:
        """The threshold chosen on validation data (the kind's rule; recorded in the checkpoint)."""

    @abstractmethod
    def metrics(self, labels: np.ndarray, scores: np.ndarray, threshold: float, *,
                class_names: tuple[str, ...] | None = None, graded: bool = False,
                positive_from: int | None = None) -> dict[str, Any]:
        """Clinical metrics of ``scores`` against ``labels`` at ``threshold``; always with ``n``,
        ``accuracy`` and ``mean_confidence``."""

    @abstractmethod
    def selection_score(self, labels: np.ndarray, scores: np.ndarray, *, graded: bool = False) -> float:
        """The validation figure training keeps the best epoch by (higher is better)."""

    selection_rule: str = ""

    def selection_name(self, graded: bool = False) -> str:
        """What :meth:`selection_score` is, in words (recorded as the checkpoint's selection rule)."""
        return self.selection_rule

    # -- attacks -----------------------------------------------------------------------------------------

    def goal(self, target: Target, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """The class each image is pushed toward (targeted) or away from (untargeted: its label).

        ``healthy`` is class 0 and ``disease`` the last class (for a graded task the most severe grade);
        ``opposite`` is the class farthest from the label (binary: the other one); ``class:k`` is k."""
        if target.name == "class":
            if not 0 <= int(target.index) < classes:
                raise MedadvError(f"target class:{target.index} is out of range for a model with {classes} classes.",
                                  f"use class:0 to class:{classes - 1}.")
            return torch.full_like(labels, int(target.index))
        if target.name == "healthy":
            return torch.zeros_like(labels)
        if target.name == "disease":
            return torch.full_like(labels, classes - 1)
        if target.name == "opposite":
            return torch.where(2 * labels < classes - 1, torch.full_like(labels, classes - 1), torch.zeros_like(labels))
        return labels

    def succeeded(self, target: Target, predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """Per image: did the decision reach the goal (targeted) or leave the label (untargeted)?"""
        goal = self.goal(target, labels, classes)
        return predicted == goal if target.name != "none" else predicted != goal

    def success_definition(self, target: Target) -> str:
        """The per-image success rule in words, written into results.json beside the counts."""
        if target.name == "none":
            return "images correctly classified before the attack whose decision differs from the true label after it"
        goal = {"healthy": "class 0 (healthy)", "disease": "the last class (disease, or the most severe grade)",
                "opposite": "the class farthest from the true one (binary: the other class)"}.get(
            target.name, f"class {target.index}")
        return f"images correctly classified before the attack whose decision is {goal} after it"

    def summary(self, metrics: dict[str, Any]) -> list[tuple[str, Any]]:
        """(label, value) pairs for one line of a console or report table."""
        return [("accuracy", metrics.get("accuracy"))]

    def check_labels(self, labels: np.ndarray, classes: int, where: str) -> None:
        """Refuse labels outside 0..classes-1, naming the first bad row."""
        bad = (labels < 0) | (labels >= classes)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise MedadvError(f"{where}: label {labels[row]} at row {row} is out of range ({int(bad.sum())} such rows); "
                              f"labels are 0 to {classes - 1}.", "fix the labels, or pick the task they belong to.")
