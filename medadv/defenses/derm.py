"""Dermoscopy colour constancy (Shades of Gray): the dataset-specific preprocessing for skin lesions.

Dermoscopy images come from many dermatoscopes, cameras and light sources, so the same lesion arrives
with different colour casts; the colour of a lesion is part of its diagnosis (the "C" of ABCD), so the
ISIC pipelines normalize it first (Barata, Celebi and Marques 2015; most ISIC 2017-2019 top entries).
Shades of Gray (Finlayson and Trezzi 2004) estimates each image's illuminant as the per-channel
Minkowski p-norm mean ``e_c = (mean_pixels x_c^p)^(1/p)`` (p = 1: grey world; p → ∞: max-RGB; p = 6 is
the usual choice) and applies the von Kries correction ``x'_c = x_c · ‖e‖ / (√C · e_c)``, clamped to
[0, 1]. After it every channel has the same p-norm mean ``‖e‖ / √C`` (exactly, where nothing clips):
a neutral illuminant of the image's own overall intensity. This is the formulation of the widely used
ISIC implementation (``rgb_vec = 1 / (e / ‖e‖ · √3)``); one channel (C = 1) is left unchanged.

As a defense it is standardization, not purification: a colour cast (any per-channel gain) an attacker
applies is undone up to a global brightness factor, and a model trained on colour-constant images sees
one colour distribution; a small per-pixel perturbation passes through, scaled by the channel gains.

Gradient: every step is differentiable torch code, the illuminant estimate included (each pixel moves
``e`` by ``x^(p-1)``-weighted amounts), so ``differentiable = True``: autograd's gradient is the exact
gradient (zero only on pixels the final clamp saturates), and an adaptive attacker uses it directly.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from medadv.defenses.base import Preprocessor, register
from medadv.errors import MedadvError

EPS = 1e-6


@register
class ShadesOfGray(Preprocessor):
    """x (N×C×H×W in [0, 1]) -> each image's channels scaled so that their ``power``-norm means are equal
    (Shades of Gray colour constancy, Finlayson and Trezzi 2004), clamped to [0, 1]."""

    name = "derm-color-constancy"
    differentiable = True
    description = "dermoscopy Shades-of-Gray colour constancy (p-norm illuminant, von Kries correction)"

    def __init__(self, power: float = 6.0) -> None:
        super().__init__()
        if (not isinstance(power, (int, float)) or isinstance(power, bool) or not math.isfinite(power)
                or not 1 <= power <= 64):
            raise MedadvError(f"Shades-of-Gray power must be a number from 1 to 64; got {power!r}.",
                              "pass e.g. power=6 (1 is grey world; large values approach max-RGB).")
        self.power = float(power)

    def illuminant(self, x: torch.Tensor) -> torch.Tensor:
        """N×C: each image's per-channel p-norm mean ``(mean x^p)^(1/p)`` (differentiable in ``x``)."""
        flat = x.flatten(2)
        # Divide by each channel's maximum first so x^p cannot underflow for large p. The maximum is
        # detached: (mean (x/m)^p)^(1/p)·m equals (mean x^p)^(1/p) for any m > 0, so the function and its
        # gradient are those of the plain p-norm mean.
        scale = flat.detach().amax(dim=2, keepdim=True).clamp_min(EPS)
        # The mean is >= 1/pixels unless the channel is all black; the floor keeps d(M^(1/p))/dM finite there.
        mean = (flat / scale).pow(self.power).mean(dim=2).clamp_min(1e-30)
        return mean.pow(1 / self.power) * scale[..., 0]

    def gains(self, x: torch.Tensor) -> torch.Tensor:
        """N×C: the von Kries channel gains ``‖e‖ / (√C · e_c)``."""
        e = self.illuminant(x)
        return e.norm(dim=1, keepdim=True) / (math.sqrt(x.shape[1]) * e.clamp_min(EPS))

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            return x  # one channel has no colour to correct (the gain is exactly 1)
        return (x * self.gains(x)[:, :, None, None]).clamp(0, 1)

    def params(self) -> dict[str, Any]:
        return {"power": self.power}
