"""The loop every gradient attack shares (FGSM, PGD L-inf and L2, NES), split Foolbox-style into the parts
that vary: a gradient function (autograd through the model, or a black-box estimate), the step's
normalization (sign for L-inf, unit L2 norm for L2) and the projection (the threat model's).

The loop runs on batched tensors on the images' device: no NumPy round trips, no host syncs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from medadv.attacks.base import check_logits, operating_point
from medadv.attacks.geometry import LINF, geometry
from medadv.attacks.threat_model import ThreatModel
from medadv.kinds import get_kind

CLASSIFICATION = get_kind("binary")  # binary and K-class models share their objectives

# (x_adv, goal) -> per-image gradient of the objective to ASCEND, same shape as x_adv.
GradientFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def objective(logits: torch.Tensor, goal: torch.Tensor, targeted: bool, loss: str = "ce",
              threat: ThreatModel | None = None, point=0.5) -> torch.Tensor:
    """Summed per-image objective to ascend: toward ``goal`` if targeted, away from it otherwise. What it
    is belongs to the task kind (``threat.kind``; a classifier's when no threat model is given):
    :meth:`medadv.kinds.TaskKind.objective` (``ce`` or ``margin``); ``point``: the operating point."""
    kind = threat.task_kind if threat is not None else CLASSIFICATION
    return kind.objective(logits, goal, targeted, loss, point)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients for the duration of an attack; restored afterwards."""
    from medadv.models.interface import eval_mode

    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with eval_mode(model):  # every submodule's own mode restored (a wrapper's flag is not pushed down)
            yield model
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def autograd_gradient(model: nn.Module, targeted: bool, loss: str = "ce", threat: ThreatModel | None = None
                      ) -> GradientFn:
    """Exact gradient of :func:`objective` through ``model`` (white box). Use inside :func:`frozen`.
    ``threat``: whose task kind the objective is (a classifier's when None), at the model's operating point.

    Only the input's gradient is computed: ``torch.autograd.grad`` w.r.t. ``x_adv`` alone, so with the
    parameters frozen no weight gradient is formed or stored.
    """

    point = operating_point(model)
    spatial = threat is not None and threat.task_kind.spatial  # a segmentation model's N×C×H×W logits

    def gradient(x_adv: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        x_adv = x_adv.detach().requires_grad_(True)  # a view: no copy of the batch
        logits = check_logits(model(x_adv), len(x_adv), spatial=spatial)
        (grad,) = torch.autograd.grad(objective(logits, goal, targeted, loss, threat, point), x_adv)
        return grad

    return gradient


def normalize(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit size in ``norm``: sign(g) for L-inf, g/||g||_2 for L2."""
    return geometry(norm).normalize(grad)


def random_start(x: torch.Tensor, threat: ThreatModel, generator: torch.Generator) -> torch.Tensor:
    """A uniform point of the L-inf ball, or a uniformly random direction and radius in the L2 ball."""
    return threat.geometry.random_start(x, threat.radius, generator)


StopFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def box(x: torch.Tensor, threat: ThreatModel, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel bounds (lo, hi) of the L-inf ball around x intersected with [0, 1] and the mask.

    Projection onto that set is one clamp: ``x_adv.clamp_(lo, hi)``. Pixels outside the mask get
    lo = hi = x, so they never move whatever the gradient says.
    """
    return LINF.box(x, threat.radius, mask)


def ascend(x: torch.Tensor, goal: torch.Tensor, gradient: GradientFn, threat: ThreatModel,
           generator: torch.Generator, *, steps: int | None = None, step_size: float | None = None,
           start: bool | None = None, stop: StopFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected steepest ascent of the objective inside the threat model, from x (or a random start).

    ``stop(x_adv_active, active_index)`` (optional) returns which of the still-active images are done
    after a step; done images are frozen and get no more gradient calls (query attacks stop at success).
    Returns the continuous images (inside the ball, the mask and [0, 1]; rounding to the storage grid
    is the caller's) and the number of gradient calls each image received.
    """
    mask = threat.mask_for(x)
    geo = threat.geometry
    steps = threat.steps if steps is None else steps
    alpha = threat.alpha if step_size is None else step_size
    x_adv = x.clone()
    if threat.random_start if start is None else start:
        delta = random_start(x, threat, generator)
        x_adv = threat.project(x + (delta if mask is None else delta * mask), x, mask)
    calls = torch.zeros(len(x), dtype=torch.long, device=x.device)
    if stop is None and geo.per_pixel_box:
        # the white-box hot path: whole batch, in place, one preallocated step buffer; the projection
        # is a clamp to precomputed per-pixel bounds (the mask is in the bounds, so no gradient masking)
        lo, hi = geo.box(x, threat.radius, mask)
        x_adv.clamp_(lo, hi)
        direction = torch.empty_like(x)
        for _ in range(steps):
            torch.sign(gradient(x_adv, goal), out=direction)
            x_adv.add_(direction, alpha=alpha).clamp_(lo, hi)
        return x_adv, calls + steps
    if stop is None:  # other balls (L2): whole batch, no indexing
        for _ in range(steps):
            grad = gradient(x_adv, goal)
            if mask is not None:
                grad = grad * mask  # normalize over the pixels that may change only
            x_adv = threat.project(x_adv + alpha * geo.normalize(grad), x, mask)
        return x_adv, calls + steps
    active = torch.arange(len(x), device=x.device)
    for _ in range(steps):
        xa, x0 = x_adv[active], x[active]
        m = None if mask is None else mask[active]
        grad = gradient(xa, goal[active])
        if m is not None:
            grad = grad * m
        x_adv[active] = xa = threat.project(xa + alpha * geo.normalize(grad), x0, m)
        calls[active] += 1
        active = active[~stop(xa, active)]
        if len(active) == 0:
            break
    return x_adv, calls
