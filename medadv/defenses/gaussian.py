"""Gaussian smoothing: a separable Gaussian blur per channel (reflect padding); differentiable."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from medadv.defenses.base import Preprocessor, register
from medadv.errors import MedadvError


@register
class GaussianBlur(Preprocessor):
    """x (N×C×H×W) -> x convolved with a Gaussian of standard deviation ``sigma`` px (kernel ±3σ)."""

    name = "gaussian"
    differentiable = True
    description = "Gaussian blur of sigma px"

    def __init__(self, sigma: float = 1.0) -> None:
        super().__init__()
        if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
            raise MedadvError(f"blur sigma must be > 0 px; got {sigma!r}.", "pass e.g. sigma=1.0.")
        self.sigma = float(sigma)
        radius = max(1, math.ceil(3 * self.sigma))
        t = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (t / self.sigma) ** 2)
        self.register_buffer("kernel", kernel / kernel.sum(), persistent=False)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        k = self.kernel.to(dtype=x.dtype, device=x.device)
        r = len(k) // 2
        # reflect padding needs the pad below the image size: tiny images fall back to replicate
        mode = "reflect" if min(x.shape[-2:]) > r else "replicate"
        x = F.pad(x, (r, r, r, r), mode=mode)
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)

    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma}
