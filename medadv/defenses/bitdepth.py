"""Bit-depth reduction (Xu et al. 2017, feature squeezing): round each pixel to 2**bits levels.

Not differentiable (rounding's gradient is zero almost everywhere); BPDA uses the identity, since the
rounded image differs from the input by at most half a level.
"""

from __future__ import annotations

from typing import Any

import torch

from medadv.defenses.base import Preprocessor, register
from medadv.errors import MedadvError


@register
class BitDepth(Preprocessor):
    """x (N×C×H×W in [0, 1]) -> round(x·(2**bits - 1)) / (2**bits - 1)."""

    name = "bit-depth"
    differentiable = False
    description = "round pixels to 2**bits grey levels (feature squeezing)"

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        if not isinstance(bits, int) or not 1 <= bits <= 16:
            raise MedadvError(f"bit depth must be a whole number from 1 to 16; got {bits!r}.", "pass e.g. bits=4.")
        self.bits = bits

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2**self.bits - 1
        return torch.round(x.clamp(0, 1) * levels) / levels

    def params(self) -> dict[str, Any]:
        return {"bits": self.bits}
