"""The one threat model every attack takes: what the attacker may change, how much, and toward what.

Units: images are float tensors in [0, 1] (N×C×H×W, the pixels a file stores, scaled), and ``eps`` and
``step_size`` are in those [0, 1] pixel units for every norm. For L2, eps bounds the Euclidean norm of
the whole image's perturbation (all channels and pixels) in the same units.

The paper (Finlayson et al. 2018) states its budget in [-1, 1] pixel space, where a distance is twice
as large as in [0, 1]. :func:`from_signed_unit` is the one place that converts; ``PAPER`` is the paper's
setting: eps 0.02 and step 0.01 in [-1, 1], i.e. 0.01 and 0.005 in [0, 1], 20 iterations, targeted at
the opposite class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch

from medadv.attacks.geometry import GEOMETRIES, Geometry, geometry
from medadv.errors import MedadvError
from medadv.kinds import get_kind, parse_target

Norm = Literal["linf", "l2"]
Target = str  # opposite | disease | healthy | none | class:<k> | hide | finding:<f>=<v> (medadv.kinds.parse_target)
HEALTHY, DISEASE = 0, 1


def from_signed_unit(value: float) -> float:
    """A distance in [-1, 1] pixel space (the paper's unit) expressed in [0, 1] pixel units."""
    return value / 2.0


@dataclass(frozen=True)
class ThreatModel:
    """What an attack may do to a batch of images.

    norm: ``linf`` or ``l2``. eps: the budget in [0, 1] pixel units. step_size: per-iteration step
    (default eps/4 for linf, eps/5 for l2). steps: iterations. random_start: start from a random point
    of the ball (seeded). target: ``opposite`` (each image toward the class it is not, as in the paper),
    ``disease`` (force "disease": a provider's fraud), ``healthy`` (force "healthy": an insurer's), or
    ``none`` (untargeted: any error), or ``class:<k>`` (toward class k, e.g. a DR grade); for a K-class
    model ``disease`` is the last class (the most severe grade) and ``opposite`` the class farthest from
    the true one (:meth:`medadv.kinds.TaskKind.goal`). A multi-label reader's targets are ``hide`` (every
    finding below its threshold), ``finding:<f>=<0|1>`` (one finding removed or added, the others kept),
    ``opposite`` and ``none`` (:mod:`medadv.kinds.multilabel`). classes: the victim's number of classes K
    (multi-label: findings F; the job sets it from the model; 2 for binary). kind: the victim's task kind
    (:mod:`medadv.kinds`): it gives targets, objectives, decisions and success their meaning. mask: 1 where pixels may change (H×W, 1×H×W, C×H×W or N×C×H×W;
    e.g. a fundus field of view), None for everywhere. levels: the storage grid, 255 (8-bit) or 65535
    (16-bit); the returned images lie on it, still within eps. None keeps them continuous.
    """

    norm: Norm = "linf"
    eps: float = 8 / 255
    step_size: float | None = None
    steps: int = 20
    random_start: bool = True
    target: Target = "opposite"
    mask: torch.Tensor | None = None
    levels: int | None = 255
    classes: int = 2
    kind: str = "binary"

    def __post_init__(self) -> None:
        if self.norm not in GEOMETRIES:
            raise MedadvError(f"unknown norm '{self.norm}'.", f"use {' or '.join(GEOMETRIES)}.")
        if not isinstance(self.eps, (int, float)) or math.isnan(self.eps) or self.eps < 0 or math.isinf(self.eps):
            raise MedadvError(f"eps must be a finite number >= 0 in [0, 1] pixel units; got {self.eps}.",
                              "pass e.g. --eps 0.01 (or --eps 4/255).")
        self.geometry.check_eps(self.eps)
        if self.step_size is not None and (math.isnan(self.step_size) or self.step_size <= 0):
            raise MedadvError(f"step size must be > 0; got {self.step_size}.", "pass a positive --step-size.")
        if self.steps < 1:
            raise MedadvError(f"steps must be >= 1; got {self.steps}.", "pass --steps 1 or more.")
        target = parse_target(self.target)  # one line on an unknown target
        least = 1 if self.kind == "multilabel" else 2  # a reader may read a single finding
        if isinstance(self.classes, bool) or not isinstance(self.classes, int) or self.classes < least:
            raise MedadvError(f"a threat model needs the victim's number of classes (>= {least}); got {self.classes}.",
                              "set classes from the model's spec.")
        self.task_kind.check_target(target, self.classes)  # an unknown kind, or a target it cannot mean
        if self.levels not in (None, 255, 65535):
            raise MedadvError(f"storage grid of {self.levels} levels is not supported.", "use 255 or 65535.")

    @property
    def geometry(self) -> Geometry:
        """The norm's geometry (:mod:`medadv.attacks.geometry`): projection, steps, random start, grid."""
        return geometry(self.norm)

    @property
    def alpha(self) -> float:
        """The step size actually used (default: eps/4 L-inf, eps/5 L2)."""
        return self.step_size if self.step_size is not None else self.geometry.default_step(self.eps)

    @property
    def radius(self) -> float:
        """The ball the attack searches: eps, or for L-inf on a storage grid the largest whole number of
        levels within eps (floor(eps·levels)/levels), so that rounding never has to cut the change."""
        return self.geometry.radius(self.eps, self.levels)

    @property
    def targeted(self) -> bool:
        return self.target != "none"

    @property
    def task_kind(self):
        """The :class:`medadv.kinds.TaskKind` that gives targets, objectives and decisions their meaning."""
        return get_kind(self.kind)

    def with_(self, **changes) -> ThreatModel:
        return replace(self, **changes)

    def goal(self, labels: torch.Tensor) -> torch.Tensor:
        """The class each image is pushed toward (targeted) or away from (untargeted: its label); what a
        target means is the task kind's (:meth:`medadv.kinds.TaskKind.goal`)."""
        return self.task_kind.goal(parse_target(self.target), labels, self.classes)

    def succeeded(self, predicted: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per image: did the prediction reach the goal (targeted) or leave the label (untargeted)? The
        leading axes broadcast (a multi-label decision's last axis is its findings)."""
        return self.task_kind.succeeded(parse_target(self.target), predicted, labels, self.classes)

    def decide(self, logits: torch.Tensor, point) -> torch.Tensor:
        """The decisions the kind reads off logits at the operating ``point`` (binary: the threshold)."""
        return self.task_kind.decide(logits, point)

    def objective(self, logits: torch.Tensor, goal: torch.Tensor, loss: str = "ce", point=0.5) -> torch.Tensor:
        """The summed objective a gradient attack ascends toward (targeted) or away from ``goal``."""
        return self.task_kind.objective(logits, goal, self.targeted, loss, point)

    def mask_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask broadcast to x's shape (checked), or None."""
        if self.mask is None:
            return None
        if x.ndim == 5:  # a mask is a 2D picture (PNG); a per-voxel region is not supported
            raise MedadvError("a mask confines 2D images; this attack is on 3D volumes.", "drop --mask for volumes.")
        m = self.mask.to(device=x.device, dtype=x.dtype)
        if m.ndim == 2:
            m = m[None, None]
        elif m.ndim == 3:
            m = m[None]
        ok = m.ndim == 4 and all(a in (1, b) for a, b in zip(m.shape, x.shape)) and m.shape[-2:] == x.shape[-2:]
        if not ok:
            raise MedadvError(f"mask of shape {tuple(self.mask.shape)} does not fit images of shape {tuple(x.shape)}.",
                              "give an H×W (or C×H×W) mask at the stored image size.")
        if not torch.all((m == 0) | (m == 1)):
            raise MedadvError("the mask must hold only 0 (keep) and 1 (may change).", "binarize the mask.")
        return m.expand_as(x)

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim not in (4, 5):
            raise MedadvError(f"images must be N×C×H×W (volumes N×C×D×H×W); got shape {tuple(x.shape)}.",
                              "add a batch dimension.")
        if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise MedadvError("images must be finite and in [0, 1].", "scale stored pixels by 1/255 or 1/65535.")

    # -- the geometry shared by every attack -------------------------------------------------------

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Closest point to ``x_adv`` inside the eps-ball around ``x``, the mask and [0, 1]."""
        return self.geometry.project(x_adv, x, self.radius, mask)

    def snap(self, x: torch.Tensor) -> torch.Tensor:
        """Images clipped to [0, 1] and rounded to the nearest storage level (no eps: region attacks)."""
        x = x.clamp(0.0, 1.0)
        return x if self.levels is None else torch.round(x * self.levels) / self.levels

    def to_grid(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Round ``x_adv`` to the storage grid without leaving the eps-ball (``x`` must lie on the grid).

        L-inf: each pixel's change is rounded to whole levels and capped at floor(eps·levels) levels.
        L2: changes are rounded to the nearest level; an image whose norm then exceeds eps has its
        changes rounded toward zero instead (never larger than before rounding).
        """
        return self.geometry.to_grid(x_adv, x, self.eps, self.levels)


# The paper's setting (Finlayson et al. 2018): eps 0.02 and step 0.01 in [-1, 1] pixel space,
# 20 iterations, targeted at the opposite class.
PAPER = ThreatModel(
    norm="linf", eps=from_signed_unit(0.02), step_size=from_signed_unit(0.01), steps=20, random_start=True,
    target="opposite",
)
