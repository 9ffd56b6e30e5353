"""Adversarial patch (Brown et al. 2017): one square sticker that pushes any image it is pasted on.

Trained with Adam on training images under expectation over transformations: each image of each
minibatch gets the patch at a random location, rotation and scale, placed differentiably (an affine
sampling grid), so the patch works wherever it lands. Applied to unseen images at a seeded random
location, upright and at its own size, pixel for pixel. A region attack: eps does not bound it
(``bounded = False``); the base class only clips and snaps the result to the storage grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medadv.attacks.base import AttackResult, check_logits, operating_point
from medadv.attacks.gradient import objective
from medadv.attacks.registry import Access, fit_steps, one_pass, register
from medadv.attacks.threat_model import ThreatModel
from medadv.attacks.universal import UniversalAttack, minibatches
from medadv.errors import MedadvError
from medadv.progress import Monitor


def patch_side(fraction: float, height: int, width: int) -> int:
    """Side in pixels of the square patch covering ``fraction`` of an H×W image (28×28 at 0.1: 9)."""
    return max(1, min(height, width, round(math.sqrt(fraction * height * width))))


def place(patch: torch.Tensor, shape: torch.Size, center: torch.Tensor, side: torch.Tensor,
          angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiably paint a C×s×s patch onto N blank H×W canvases (bilinear, zero outside).

    center: N×2 (row, col) of the patch centre in pixels, continuous (pixel i spans [i, i+1]). side: N
    displayed side lengths in pixels. angle: N rotations in radians. Returns the patch image (already
    multiplied by its coverage) and the coverage (N×1×H×W in [0, 1]): x·(1 − coverage) + image pastes it.
    At angle 0, side s and a whole-pixel corner this equals pasting the patch pixel for pixel.
    """
    n, _, h, w = shape
    cos, sin = angle.cos(), angle.sin()
    # affine_grid maps each canvas point (normalized to [-1, 1]) to a patch point: shift to the centre,
    # go to pixels, rotate back by the angle, and divide by the half side.
    ax, ay = w / side, h / side
    a = torch.stack([torch.stack([cos * ax, sin * ay], 1), torch.stack([-sin * ax, cos * ay], 1)], 1)  # N×2×2
    c = torch.stack([2 * center[:, 1] / w - 1, 2 * center[:, 0] / h - 1], 1)  # (x, y) normalized
    theta = torch.cat([a, -(a @ c[:, :, None])], 2)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    image = F.grid_sample(patch.expand(n, -1, -1, -1), grid, align_corners=False)
    coverage = F.grid_sample(torch.ones_like(patch[:1, :1]).expand(n, -1, -1, -1), grid, align_corners=False)
    return image, coverage


@register("patch", kind=Access.UNIVERSAL, title="Adversarial patch", battery=True, needs_fit=True, cost=one_pass,
          fit_cost=fit_steps(300))
class AdversarialPatch(UniversalAttack):
    """One square patch (C×s×s, s² ≈ patch_fraction·H·W) pushing images toward ``threat.goal(y)``.

    angle: training rotations are uniform in ±angle degrees. scale: training side lengths are uniform in
    this range times s. steps, batch_size, lr: Adam steps on minibatches of training images. Only pixels
    where ``threat.mask`` is 1 take the patch.
    """

    name = "patch"
    bounded = False
    state_keys = ("patch",)

    def __init__(self, threat: ThreatModel, seed: int = 0, *, patch_fraction: float = 0.1, angle: float = 20.0,
                 scale: tuple[float, float] = (0.8, 1.2), steps: int = 300, batch_size: int = 32,
                 lr: float = 0.05) -> None:
        if not 0 < patch_fraction <= 1:
            raise MedadvError(f"patch_fraction is the share of the image the patch covers; got {patch_fraction}.",
                              "pass a fraction in (0, 1], e.g. 0.1.")
        lo, hi = scale
        if not 0 < lo <= hi or angle < 0 or steps < 1 or batch_size < 1 or not lr > 0:
            raise MedadvError(f"bad patch options: scale {scale}, angle {angle}, steps {steps}, "
                              f"batch_size {batch_size}, lr {lr}.",
                              "use 0 < scale[0] <= scale[1], angle >= 0, and positive steps, batch_size and lr.")
        super().__init__(threat, seed)
        self.patch_fraction = patch_fraction
        self.angle = angle
        self.scale = (float(lo), float(hi))
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr

    @classmethod
    def describe(cls, threat: dict[str, Any], params: dict[str, Any]) -> list[str]:
        return [f"{params.get('patch_fraction', 0.1):.0%} of the image"]

    def _fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
             monitor: Monitor) -> dict[str, torch.Tensor]:
        _, c, h, w = x.shape
        s = patch_side(self.patch_fraction, h, w)
        mask = self.threat.mask_for(x[:1])
        goal = self.threat.goal(y)
        point = operating_point(model)
        # a flat grey start: from uniform noise Adam settled in a dark optimum that a plain white square
        # beats toward "disease" on the chest model (flipped 4% vs 19%); from grey it found a bright one (26%)
        patch = torch.full((1, c, s, s), 0.5, device=x.device, dtype=x.dtype, requires_grad=True)
        optimizer = torch.optim.Adam([patch], lr=self.lr)
        success = torch.zeros((), device=x.device)
        batches = minibatches(len(x), self.batch_size, self.steps, generator, x.device)
        for idx in monitor.track(batches, f"fitting patch on {len(x)} images", total=self.steps):
            xb = x[idx]
            x_adv = self._paste_random(patch, xb, mask, generator)
            logits = check_logits(model(x_adv), len(xb))
            loss = -objective(logits, goal[idx], self.threat.targeted, threat=self.threat, point=point) / len(xb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                patch.clamp_(0.0, 1.0)
                success = 0.9 * success + 0.1 * self._success(model, logits, y[idx]).mean()
        self.fit_success = float(success / (1 - 0.9 ** self.steps))
        return {"patch": self.threat.snap(patch.detach())[0]}

    def _paste_random(self, patch: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None,
                      generator: torch.Generator) -> torch.Tensor:
        """x with the patch at a random location, rotation and scale per image (one EOT draw)."""
        n, _, h, w = x.shape
        s = patch.shape[-1]
        u = torch.rand((n, 4), generator=generator, device=x.device, dtype=x.dtype)
        lo, hi = self.scale
        side = s * (lo + (hi - lo) * u[:, 0])
        angle = math.radians(self.angle) * (2 * u[:, 1] - 1)
        # centres keep the (unrotated) scaled square inside the image where it fits
        half = (side / 2).clamp(max=min(h, w) / 2)
        center = torch.stack([half + (h - 2 * half) * u[:, 2], half + (w - 2 * half) * u[:, 3]], 1)
        image, coverage = place(patch, x.shape, center, side, angle)
        if mask is not None:
            image, coverage = image * mask, coverage * mask
        return (x * (1 - coverage) + image).clamp(0.0, 1.0)

    def apply(self, state: dict[str, torch.Tensor], x: torch.Tensor, generator: torch.Generator) -> AttackResult:
        patch = state["patch"]
        n, c, h, w = x.shape
        s = patch.shape[-1]
        if patch.shape[0] != c or s > min(h, w):
            raise MedadvError(f"the patch is {'×'.join(map(str, patch.shape))}; it does not fit "
                              f"{c}×{h}×{w} images.", "apply it to images with its channels and at least its size.")
        rows = torch.randint(0, h - s + 1, (n,), generator=generator, device=x.device)
        cols = torch.randint(0, w - s + 1, (n,), generator=generator, device=x.device)
        mask = self.threat.mask_for(x)
        x_adv = x.clone()
        for i, (r, q) in enumerate(zip(rows.tolist(), cols.tolist())):
            region = x_adv[i, :, r:r + s, q:q + s]
            region.copy_(patch if mask is None else torch.where(mask[i, :, r:r + s, q:q + s] > 0, patch, region))
        return AttackResult(x_adv, info={"location": torch.stack([rows, cols], 1)})  # top-left (row, col)

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        super()._check_state(state)
        p = state["patch"]
        if p.ndim != 3 or p.shape[1] != p.shape[2] or p.min() < 0 or p.max() > 1:
            raise MedadvError(f"a patch is a C×s×s tensor in [0, 1]; the saved one has shape {tuple(p.shape)}.",
                              "load a state saved by AdversarialPatch.state().")
