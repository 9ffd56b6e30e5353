"""Gaussian noise on the input (a randomized defense, cf. Cohen et al. 2019's base classifier under
noise): x -> clip(x + N(0, σ²), 0, 1), fresh noise at every pass, in eval mode too. Differentiable.

The noise comes from torch's global generator (seed it with ``torch.manual_seed``). A model behind this
defense is randomized: evaluate it with expectation over transformation (:mod:`medadv.defenses.eot`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from medadv.defenses.base import Preprocessor, register
from medadv.errors import MedadvError


@register
class GaussianNoise(Preprocessor):
    """x (N×C×H×W in [0, 1]) -> clip(x + σ·ε, 0, 1), ε ~ N(0, I) drawn anew at every call; σ in [0, 1] units."""

    name = "gaussian-noise"
    differentiable = True
    description = "add Gaussian noise of sigma (pixel units in [0, 1]) at every pass (randomized)"

    def __init__(self, sigma: float = 0.1) -> None:
        super().__init__()
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not math.isfinite(sigma) or sigma <= 0:
            raise MedadvError(f"noise sigma must be > 0 in [0, 1] pixel units; got {sigma!r}.", "pass e.g. sigma=0.1.")
        self.sigma = float(sigma)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.sigma * torch.randn_like(x)).clamp(0, 1)

    def params(self) -> dict[str, Any]:
        return {"sigma": self.sigma}
