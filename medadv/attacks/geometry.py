"""One geometry object per norm: everything an attack does differently under L-inf and L2 lives here.

``Linf`` and ``L2`` own the ball's projection, the steepest-ascent normalization of a gradient, the
random start, the per-image distance and the rounding onto a storage grid that never leaves eps
(:meth:`Geometry.to_grid`). Attacks and the threat model ask ``geometry(norm)`` (or
``ThreatModel.geometry``) and never branch on the norm's name, so adding a norm is adding one class.

Units: images and eps in [0, 1] pixel units; a delta is N×C×H×W and norms are per image (row).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from medadv.errors import MedadvError


def _per_image(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-image scalar (N) shaped to broadcast over N×C×H×W."""
    return v.view(-1, *([1] * (like.ndim - 1)))


class Geometry:
    """The ball of one norm. Subclasses define the methods below; instances are stateless singletons."""

    name: ClassVar[str]
    title: ClassVar[str]
    per_pixel_box: ClassVar[bool] = False  # True when the ball is a per-pixel box (projection = one clamp)
    default_step_fraction: ClassVar[float]  # default step size = eps times this

    def check_eps(self, eps: float) -> None:
        """Raise MedadvError for an eps this ball cannot mean (>= 0 and finite is checked by the caller)."""

    def radius(self, eps: float, levels: int | None) -> float:
        """The ball an attack searches (eps; L-inf on a grid: whole storage levels within eps)."""
        return eps

    def default_step(self, eps: float) -> float:
        return eps * self.default_step_fraction

    def distance(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-image size of ``delta`` in this norm (N)."""
        raise NotImplementedError

    def project_delta(self, delta: torch.Tensor, radius: float) -> torch.Tensor:
        """The closest delta of norm <= radius (per image)."""
        raise NotImplementedError

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, radius: float,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Closest point to ``x_adv`` inside the ball of ``radius`` around x, the mask and [0, 1]."""
        delta = x_adv - x
        if mask is not None:
            delta = delta * mask
        return (x + self.project_delta(delta, radius)).clamp(0.0, 1.0)

    def normalize(self, grad: torch.Tensor) -> torch.Tensor:
        """Steepest-ascent direction of unit size in this norm."""
        raise NotImplementedError

    def noise(self, shape: tuple[int, ...], generator: torch.Generator, device, dtype) -> torch.Tensor:
        """Random directions natural to the ball (uniform in the box / Gaussian)."""
        raise NotImplementedError

    def random_start(self, x: torch.Tensor, radius: float, generator: torch.Generator) -> torch.Tensor:
        """A random delta inside the ball (seeded by ``generator``)."""
        raise NotImplementedError

    def grid_steps(self, delta: torch.Tensor, eps: float, levels: int, slack: float = 0.0) -> torch.Tensor:
        """``delta`` in whole storage levels (float), rounded so that it stays within eps."""
        raise NotImplementedError

    def to_grid(self, x_adv: torch.Tensor, x: torch.Tensor, eps: float, levels: int | None) -> torch.Tensor:
        """Round ``x_adv`` onto the storage grid without leaving the eps-ball (``x`` must lie on the grid)."""
        if levels is None:
            return x_adv
        steps = self.grid_steps(x_adv - x, eps, levels)
        base = torch.round(x * levels)
        return ((base + steps).clamp(0, levels) / levels).to(x.dtype)

    def dual_of_ones(self, d: torch.Tensor) -> torch.Tensor:
        """Dual norm of the all-ones vector in d dimensions (HopSkipJump's dimension factor)."""
        raise NotImplementedError

    def per_pixel(self, radius: float, pixels: int) -> float:
        """The per-pixel change that spreads a ``radius`` budget evenly over ``pixels`` pixels."""
        raise NotImplementedError

    def toward(self, p: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """HopSkipJump's line search point: from x toward p, a in [0, span(p, x)]."""
        raise NotImplementedError

    def span(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The value of a in :meth:`toward` that returns p itself (per image)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{self.title} geometry>"


class Linf(Geometry):
    """The L-inf ball: a per-pixel box. Steps are signs; rounding caps each pixel at floor(eps·levels)."""

    name = "linf"
    title = "L-inf"
    per_pixel_box = True
    default_step_fraction = 1 / 4

    def check_eps(self, eps: float) -> None:
        if eps > 1:
            raise MedadvError(f"an L-inf eps of {eps} exceeds the pixel range [0, 1].", "pass eps <= 1.")

    def radius(self, eps: float, levels: int | None) -> float:
        if levels is not None:
            return math.floor(eps * levels + 1e-6) / levels
        return eps

    def distance(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(1).abs().amax(1)

    def project_delta(self, delta: torch.Tensor, radius: float) -> torch.Tensor:
        return delta.clamp(-radius, radius)

    def normalize(self, grad: torch.Tensor) -> torch.Tensor:
        return grad.sign()

    def noise(self, shape, generator, device, dtype) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=device, dtype=dtype) * 2 - 1

    def random_start(self, x: torch.Tensor, radius: float, generator: torch.Generator) -> torch.Tensor:
        return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * radius

    def box(self, x: torch.Tensor, radius: float,
            mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel bounds (lo, hi) of the ball around x intersected with [0, 1] and the mask: projection
        onto that set is one clamp. Pixels outside the mask get lo = hi = x."""
        lo, hi = (x - radius).clamp_(min=0.0), (x + radius).clamp_(max=1.0)
        if mask is not None:
            keep = mask == 0
            lo, hi = torch.where(keep, x, lo), torch.where(keep, x, hi)
        return lo, hi

    def grid_steps(self, delta: torch.Tensor, eps: float, levels: int, slack: float = 0.0) -> torch.Tensor:
        cap = math.floor(eps * levels + 1e-6)
        return torch.round(delta * levels).clamp(-cap, cap)

    def dual_of_ones(self, d: torch.Tensor) -> torch.Tensor:
        return d

    def per_pixel(self, radius: float, pixels: int) -> float:
        return radius

    def toward(self, p: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        a = _per_image(a, x)
        return torch.minimum(torch.maximum(p, x - a), x + a)

    def span(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.distance(p - x)


class L2(Geometry):
    """The L2 ball over the whole image (all channels and pixels). Steps are unit-L2 gradients; rounding
    goes to the nearest level, or toward zero for an image that rounding would push past eps."""

    name = "l2"
    title = "L2"
    default_step_fraction = 1 / 5

    def distance(self, delta: torch.Tensor) -> torch.Tensor:
        return delta.flatten(1).norm(dim=1)

    def project_delta(self, delta: torch.Tensor, radius: float) -> torch.Tensor:
        norms = _per_image(delta.flatten(1).norm(dim=1).clamp_min(1e-12), delta)
        return delta * torch.clamp(radius / norms, max=1.0)

    def normalize(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / _per_image(grad.flatten(1).norm(dim=1).clamp_min(1e-12), grad)

    def noise(self, shape, generator, device, dtype) -> torch.Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def random_start(self, x: torch.Tensor, radius: float, generator: torch.Generator) -> torch.Tensor:
        delta = self.normalize(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))
        return delta * radius * torch.rand((len(x), 1, 1, 1), generator=generator, device=x.device, dtype=x.dtype)

    def grid_steps(self, delta: torch.Tensor, eps: float, levels: int, slack: float = 0.0) -> torch.Tensor:
        steps = torch.round(delta * levels)
        too_long = _per_image(steps.flatten(1).norm(dim=1) / levels > eps * (1 - slack), delta)
        return torch.where(too_long, torch.trunc(delta * levels), steps)

    def dual_of_ones(self, d: torch.Tensor) -> torch.Tensor:
        return d.sqrt()

    def per_pixel(self, radius: float, pixels: int) -> float:
        return radius / math.sqrt(pixels)

    def toward(self, p: torch.Tensor, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return x + _per_image(a, x) * (p - x)

    def span(self, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(len(p), device=p.device, dtype=p.dtype)


LINF, L2_BALL = Linf(), L2()
GEOMETRIES: dict[str, Geometry] = {g.name: g for g in (LINF, L2_BALL)}


def geometry(norm: str) -> Geometry:
    """The geometry of ``norm`` (``linf`` or ``l2``); a MedadvError for anything else."""
    try:
        return GEOMETRIES[norm]
    except (KeyError, TypeError):
        raise MedadvError(f"unknown norm '{norm}'.", f"use {' or '.join(GEOMETRIES)}.") from None
