"""What every attack shares: the result type, the black-box oracles, and one small base class.

White-box attacks get the model (an ``nn.Module`` returning N×K logits for images in [0, 1]; binary
models K = 2).
Black-box attacks get only an oracle: :class:`ProbabilityOracle` (score-based) or :class:`LabelOracle`
(label-only). Oracles run the victim under ``torch.no_grad`` and count every image they score, so a
black-box attack cannot use gradients by accident and its query budget is auditable.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from medadv.attacks.threat_model import ThreatModel
from medadv.errors import MedadvError


@dataclass
class AttackResult:
    """x_adv: N×C×H×W in [0, 1] on the threat model's storage grid, within eps of the input.
    queries: per-image number of oracle queries (black-box attacks), else None."""

    x_adv: torch.Tensor
    queries: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


def check_logits(logits: torch.Tensor, n: int, classes: int | None = None, spatial: bool = False) -> torch.Tensor:
    """``logits`` if it is N×``classes`` (``classes=None``: N×K for any K >= 2), else a MedadvError.
    ``spatial`` (a segmentation model's kind): N×C×H×W logits, one map per output channel."""
    if spatial:
        if logits.ndim != 4 or logits.shape[0] != n:
            raise MedadvError(f"the model returned shape {tuple(logits.shape)} for {n} images; a segmentation model "
                              "returns N×C×H×W logits.", "wrap the network so it returns one logit map per channel.")
        return logits
    ok = logits.ndim == 2 and logits.shape[0] == n and (logits.shape[1] == classes if classes else logits.shape[1] >= 2)
    if not ok:
        want = f"N×{classes}" if classes else "N×K (K >= 2)"
        raise MedadvError(f"the model returned shape {tuple(logits.shape)} for {n} images; medadv needs {want} logits.",
                          "wrap the network so it returns one logit per class (binary: healthy, disease) per image.")
    return logits


def operating_point(model: object):
    """The decision point a model's decisions are made at: its ``operating_point`` (a multi-label reader's
    per-finding thresholds), else its binary ``threshold`` when that is inside (0, 1), else 0.5."""
    point = getattr(model, "operating_point", None)
    if point is not None:
        return point
    t = getattr(model, "threshold", 0.5)
    return float(t) if isinstance(t, (int, float)) and 0 < t < 1 else 0.5


def _kind_of(model: object):
    from medadv.kinds import get_kind

    kind = getattr(model, "kind", None)
    return kind if kind is not None and hasattr(kind, "probabilities") else get_kind("binary")


class ProbabilityOracle:
    """Score-based black-box access: ``oracle(x)`` returns N×K class probabilities and counts N queries."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 512) -> None:
        self._fn = fn
        self.batch_size = batch_size
        self.total_queries = 0

    @classmethod
    def from_model(cls, model: nn.Module, batch_size: int = 512) -> ProbabilityOracle:
        kind = _kind_of(model)  # a classifier's class probabilities; a multi-label reader's per finding

        def probs(x: torch.Tensor) -> torch.Tensor:
            return kind.probabilities(check_logits(model(x), len(x)))

        return cls(probs, batch_size)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.total_queries += len(x)
        out = torch.cat([self._fn(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)])
        if out.ndim != 2 or out.shape[0] != len(x) or out.shape[1] < 2 or not torch.isfinite(out).all():
            raise MedadvError(f"the victim returned {tuple(out.shape)} probabilities for {len(x)} images.",
                              "the victim must return N×K finite probabilities (K >= 2 classes).")
        return out.detach()


class LabelOracle:
    """Label-only black-box access: ``oracle(x)`` returns N predicted labels and counts N queries.

    The label is the victim's decision: at its operating threshold on P(disease) for a binary model, the
    most probable class for a K-class one.
    """

    def __init__(self, probability: ProbabilityOracle, threshold=0.5, kind=None) -> None:
        self._probability = probability
        self.threshold = threshold  # the operating point: a float, or a multi-label reader's per finding
        self.kind = kind if kind is not None else _kind_of(None)

    @property
    def total_queries(self) -> int:
        return self._probability.total_queries

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kind.decide_probs(self._probability(x), self.threshold)


class Attack(ABC):
    """Base of every attack: ``attack(victim, x, y) -> AttackResult``.

    ``victim`` is an ``nn.Module`` for white-box attacks and an oracle for black-box ones. x is
    N×C×H×W in [0, 1], y the N true labels (0 healthy, 1 disease). Subclasses implement :meth:`run`
    and return continuous images inside the threat model; the base class checks the input and rounds
    the output onto the storage grid (still inside eps).
    """

    name: ClassVar[str]
    access: ClassVar[str]  # what the victim is handed: white-box (the model) | score | label (an oracle)
    bounded: ClassVar[bool] = True  # False for region attacks (a patch): eps does not bound them
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")  # the balls the attack is defined for

    def __init__(self, threat: ThreatModel, seed: int = 0) -> None:
        if self.bounded and threat.norm not in self.norms:
            title = getattr(type(self), "title", None) or type(self).__name__
            raise MedadvError(f"{title} is defined for {' and '.join(self.norms)} only; the threat model is {threat.norm}.",
                              f"use --norm {' or --norm '.join(self.norms)}.")
        self.threat = threat
        self.seed = seed

    def at_eps(self, eps: float) -> Attack:
        """A copy of this attack (same seed, parameters and fitted state) under the budget ``eps``."""
        clone = copy.copy(self)
        clone.threat = self.threat.with_(eps=float(eps))
        return clone

    def set_random_state(self, seed: int) -> Attack:
        """Seed the attack's random stream (MONAI's ``Randomizable`` form); returns self."""
        self.seed = int(seed)
        return self

    @classmethod
    def describe(cls, threat: dict[str, Any], params: dict[str, Any]) -> list[str]:
        """Short phrases for a report row's title beyond the name, access, budget and target (e.g.
        "20 steps", "1000 queries"), from the row's threat model record and its params."""
        return []

    def __call__(self, victim, x: torch.Tensor, y: torch.Tensor, *, eps: float | Sequence[float] | None = None):
        """Attack x (labels y) under the threat model; ``eps`` (Foolbox style) overrides its budget: one
        number gives one :class:`AttackResult`, a list gives one per eps, in order (each run from the same
        seed, the step size following eps where the attack's schedule leaves it to the threat model)."""
        if eps is not None and not isinstance(eps, (int, float)):
            return [self.at_eps(e)(victim, x, y) for e in eps]
        if eps is not None:
            return self.at_eps(eps)(victim, x, y)
        self.threat.check_input(x)
        multilabel = self.threat.kind == "multilabel"
        want = self.threat.task_kind.label_shape(x, self.threat.classes)  # a segmentation model's: N×H×W masks
        if want is None:
            want = (len(x), self.threat.classes) if multilabel else (len(x),)
        elif tuple(y.shape) != want:
            raise MedadvError(f"{len(x)} images of {x.shape[-2]}×{x.shape[-1]} px but labels of shape {tuple(y.shape)}; "
                              f"this {self.threat.task_kind.title} needs {'×'.join(map(str, want))}.",
                              "give one mask per image at the image's size.")
        if tuple(y.shape) != want:
            raise MedadvError(f"{len(x)} images but labels of shape {tuple(y.shape)}; this {self.threat.task_kind.title} "
                              f"needs {'×'.join(map(str, want))}.",
                              "give one label per finding of each image." if multilabel else "give one label per image.")
        generator = torch.Generator(device=x.device).manual_seed(self.seed)
        result = self.run(victim, x, y.to(x.device), generator)
        if self.bounded:
            x_adv = self.threat.project(result.x_adv, x, self.threat.mask_for(x))
            result.x_adv = self.threat.to_grid(x_adv, x)
        else:
            result.x_adv = self.threat.snap(result.x_adv)
        return result

    @abstractmethod
    def run(self, victim, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> AttackResult:
        ...
