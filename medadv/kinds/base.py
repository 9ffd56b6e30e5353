"""The task-kind interface (see :mod:`medadv.kinds`) and the attack targets every kind understands."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medadv.errors import MedadvError

# hide: a multi-label reader's every finding below its threshold (the image reads "no finding")
# erase-left / erase-right: a segmentation model's mask without one lung (medadv.kinds.segmentation)
NAMED_TARGETS = ("opposite", "disease", "healthy", "none", "hide", "erase-left", "erase-right")
SEGMENTATION_TARGETS = ("erase-left", "erase-right")

# An operating point: binary, the threshold on P(disease); multi-class, unused (argmax); multi-label, one
# threshold per finding.
Point = float | Sequence[float]


@dataclass(frozen=True)
class Target:
    """An attack's goal, parsed: ``name`` is one of :data:`NAMED_TARGETS`, ``class`` (then ``index``) or
    ``finding`` (then ``index``, the finding's column, and ``value``, 0 remove or 1 add)."""

    name: str
    index: int | None = None
    value: int | None = None

    def __str__(self) -> str:
        if self.name == "finding":
            return f"finding:{self.index}={self.value}"
        return f"class:{self.index}" if self.name == "class" else self.name


def _small_index(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 4


def parse_target(text: str, finding_names: Sequence[str] = ()) -> Target:
    """``opposite | disease | healthy | none | hide | class:<k> | finding:<name or column>=<0|1>`` ->
    :class:`Target` (one line on anything else). A finding's name is resolved to its column through
    ``finding_names`` (the model's findings); a column index needs none."""
    if text in NAMED_TARGETS:
        return Target(text)
    head, _, tail = str(text).partition(":")
    if head == "class" and _small_index(tail):
        return Target("class", int(tail))
    if head == "finding":
        name, eq, value = tail.rpartition("=")
        if eq and value in ("0", "1") and name:
            if _small_index(name):
                return Target("finding", int(name), int(value))
            if name in finding_names:
                return Target("finding", list(finding_names).index(name), int(value))
            known = f" (the model's findings: {', '.join(finding_names)})" if finding_names else ""
            raise MedadvError(f"unknown finding '{name}' in target '{text}'{known}.",
                              "name a finding the model reads, e.g. finding:Pneumothorax=1, or its column index.")
    raise MedadvError(f"unknown target '{text}'.", "use opposite, disease, healthy, none or class:<k> (k a class "
                      "index); for a multi-label model also hide or finding:<name>=<0|1>.")


class TaskKind(ABC):
    """One kind of model output. Scores are what the kind carries between model, metrics and report:
    see :meth:`scores`. ``classes`` is the number of classes (K >= 2) wherever it is asked for."""

    name: str
    title: str
    # outputs per pixel (N×C×H×W logits, N×H×W labels) rather than per image (N×K logits)
    spatial: bool = False
    # how many class names a checkpoint of this kind may have (None: the spec check's own rule)
    class_names_range: tuple[int, int] | None = None
    # a fixed decision rule recorded as the checkpoint's threshold rule (None: chosen on validation)
    fixed_rule: str | None = None
    # the attack target when none is given ("": the threat model's default, the opposite class)
    default_target: str = ""
    # the results record's key for :meth:`attack_details` (multi-label: per finding)
    details_key: str = "findings"

    def outputs(self, classes: int) -> int:
        """Logits the network's head produces for ``classes`` classes."""
        return classes

    def soft_targets(self, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """N labels -> N×outputs float training targets (one-hot; mixup mixes them)."""
        return F.one_hot(labels.long(), classes).float()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean training loss of N×outputs logits against :meth:`soft_targets` (mixed or not)."""
        return F.cross_entropy(logits, targets)

    def hard_labels(self, targets: torch.Tensor) -> torch.Tensor:
        """The labels an attack inside a training step moves away from, from the (possibly mixed) soft
        targets: a classifier's dominant class."""
        return targets.argmax(1)

    @abstractmethod
    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """N×outputs logits -> the scores medadv carries (float, on the logits' device)."""

    @abstractmethod
    def predict(self, scores: np.ndarray | torch.Tensor, threshold: float) -> np.ndarray:
        """Decisions (N class indices, int64) from :meth:`scores` at the operating point."""

    @abstractmethod
    def operating_point(self, labels: np.ndarray, scores: np.ndarray, rule: str = "youden") -> float:
        """The threshold chosen on validation data by ``rule`` (``youden``, or ``sensitivity:S`` where the
        kind has thresholds; recorded in the checkpoint)."""

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
        self.check_target(target, classes)
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

    def point_of(self, spec: Any) -> Point:
        """The operating point a model's spec records (binary: its threshold on P(disease))."""
        return float(getattr(spec, "threshold", 0.5))

    # -- the attack engine's view (torch, batched, on the logits' device) -------------------------------

    def check_target(self, target: Target, classes: int) -> None:
        """Refuse a target this kind cannot mean (one line naming the ones it can)."""
        if target.name in SEGMENTATION_TARGETS:
            raise MedadvError(f"target '{target}' is for segmentation models; this model is a {self.title}.",
                              "use opposite, disease, healthy, none or class:<k>.")
        if target.name in ("hide", "finding"):
            raise MedadvError(f"target '{target}' is for multi-label models; this model is a {self.title}.",
                              "use opposite, disease, healthy, none or class:<k>.")

    def decide(self, logits: torch.Tensor, point: Point) -> torch.Tensor:
        """Decisions from N×outputs logits: P(disease) >= the threshold for two classes, argmax for more."""
        if logits.shape[1] == 2:
            return (logits.softmax(1)[:, 1] >= point).long()
        return logits.argmax(1)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """What a score-based oracle returns: N×K class probabilities."""
        return F.softmax(logits, dim=1)

    def decide_probs(self, probs: torch.Tensor, point: Point) -> torch.Tensor:
        """Decisions from :meth:`probabilities` (a score or label oracle's view)."""
        return (probs[:, 1] >= point).long() if probs.shape[1] == 2 else probs.argmax(1)

    def objective(self, logits: torch.Tensor, goal: torch.Tensor, targeted: bool, loss: str = "ce",
                  point: Point = 0.5) -> torch.Tensor:
        """Summed objective a gradient attack ascends: toward ``goal`` if targeted, away from it otherwise.

        ``ce``: cross-entropy (negated when targeted). ``margin``: the logit margin of the goal class over
        the best other one (Carlini-Wagner style; it does not saturate on confident models; for two
        classes the other one)."""
        if loss == "margin":
            z_goal = logits.gather(1, goal[:, None])[:, 0]
            margin = z_goal - logits.scatter(1, goal[:, None], -float("inf")).amax(1)
            return margin.sum() if targeted else -margin.sum()
        ce = F.cross_entropy(logits, goal, reduction="sum")
        return -ce if targeted else ce

    def per_image_loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, loss: str,
                       point: Point = 0.5) -> torch.Tensor:
        """The per-image objective APGD ascends (``target`` None: untargeted, away from y). ``margin``:
        two classes, the logit margin at the operating threshold toward the wanted class; K >= 3, DLR."""
        k = logits.shape[1]
        if loss == "ce":
            return -F.cross_entropy(logits, target, reduction="none") if target is not None else \
                F.cross_entropy(logits, y, reduction="none")
        if k == 2:
            threshold = float(point)
            s = logits[:, 1] - logits[:, 0] - math.log(threshold / (1 - threshold))
            want = target if target is not None else 1 - y
            return torch.where(want == 1, s, -s)
        z, _ = logits.sort(1, descending=True)
        z_y = logits.gather(1, y[:, None])[:, 0]
        if target is None:  # DLR: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3)
            others = logits.scatter(1, y[:, None], -float("inf")).amax(1)
            return -(z_y - others) / (z[:, 0] - z[:, 2] + 1e-12)
        z_t = logits.gather(1, target[:, None])[:, 0]
        scale = z[:, 0] - ((z[:, 2] + z[:, 3]) / 2 if k >= 4 else z[:, 2])
        return -(z_y - z_t) / (scale + 1e-12)

    def margin_targets(self, logits: torch.Tensor, y: torch.Tensor, count: int) -> list[torch.Tensor]:
        """An untargeted margin attack's passes (APGD): the classes to target in turn, top logits first."""
        if logits.shape[1] == 2:
            return [1 - y]
        order = logits.scatter(1, y[:, None], -float("inf")).argsort(1, descending=True)
        return [order[:, i] for i in range(min(count, logits.shape[1] - 1))]

    def query_goal(self, target: Target, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """What a score-based attack's margin is measured toward: the goal, or for a binary untargeted
        attack the class that is not the label (for K classes, the label to leave)."""
        goal = self.goal(target, labels, classes)
        return goal if target.name != "none" or classes > 2 else 1 - goal

    def query_margin(self, probs: torch.Tensor, want: torch.Tensor, point: Point, untargeted: bool = False
                     ) -> torch.Tensor:
        """Margin loss to minimize, in log-odds: how far each image is from being predicted ``want``.

        Binary: <= 0 on the wanted side of logit(threshold) (< 0 for ``want`` = healthy, where ties go to
        disease). K classes: log P(want) against the best other class (``untargeted``: ``want`` is the label
        to leave, and the margin is how far the label still leads)."""
        tiny = torch.finfo(probs.dtype).tiny
        if probs.shape[1] > 2:
            logp = probs.clamp_min(tiny).log()
            own = logp.gather(1, want[:, None])[:, 0]
            best_other = logp.scatter(1, want[:, None], -float("inf")).amax(1)
            return own - best_other if untargeted else best_other - own
        threshold = float(point)
        if not 0.0 < threshold < 1.0:
            raise MedadvError(f"operating threshold {threshold} is not inside (0, 1).", "pass the victim's threshold.")
        # log P(disease) - log P(healthy) from the two probabilities separately: a confident softmax keeps the
        # small one precise where 1 - p would round to 0, so the margin does not saturate
        s = probs[:, 1].clamp_min(tiny).log() - probs[:, 0].clamp_min(tiny).log() - math.log(threshold / (1.0 - threshold))
        return torch.where(want == 1, -s, s)

    def check_attack(self, name: str, access: str, needs_fit: bool) -> None:
        """Refuse, before it runs, an attack whose objective this kind cannot express (one line naming
        why); every registered attack can attack a classifier."""

    def label_shape(self, x: torch.Tensor, classes: int) -> tuple[int, ...] | None:
        """The shape the labels of the images ``x`` must have (None: the attack's own rule: N, or N×F)."""
        return None

    # -- what the runner counts ---------------------------------------------------------------------------

    def needs_decisions(self, target: Target) -> bool:
        """Does :meth:`attack_labels` read the model's decisions for ``target`` (classification: never)?"""
        return False

    def attack_labels(self, target: Target, labels: np.ndarray, decisions: np.ndarray) -> np.ndarray:
        """The labels an attack is handed (classification: the true ones)."""
        return labels

    def eligible(self, target: Target, labels: np.ndarray, decisions: np.ndarray) -> np.ndarray:
        """Per image: does it count toward the success rate (classification: correct before the attack)?"""
        return decisions == labels

    def attack_details(self, target: Target, labels: np.ndarray, before: np.ndarray, after: np.ndarray,
                       class_names: Sequence[str]) -> dict[str, Any] | None:
        """Extra per-output counts for the results record (multi-label: per finding); None here."""
        return None

    def check_labels(self, labels: np.ndarray, classes: int, where: str) -> None:
        """Refuse labels outside 0..classes-1, naming the first bad row."""
        bad = (labels < 0) | (labels >= classes)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise MedadvError(f"{where}: label {labels[row]} at row {row} is out of range ({int(bad.sum())} such rows); "
                              f"labels are 0 to {classes - 1}.", "fix the labels, or pick the task they belong to.")
