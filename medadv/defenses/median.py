"""Median filter (Xu et al. 2017, feature squeezing's spatial smoothing), per channel, reflect padding.

Computed in torch (unfold + median), so it is differentiable in autograd's sense: the gradient flows to
the pixel each window's median came from. That gradient is exact almost everywhere (the filter is
piecewise linear), so attacks use it as is and no BPDA is needed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from medadv.defenses.base import Preprocessor, register
from medadv.errors import MedadvError


@register
class Median(Preprocessor):
    """x (N×C×H×W) -> the median of each ``size``×``size`` window (odd size; border reflected)."""

    name = "median"
    differentiable = True
    description = "median filter over size×size windows"

    def __init__(self, size: int = 3) -> None:
        super().__init__()
        if not isinstance(size, int) or size < 1 or size % 2 == 0:
            raise MedadvError(f"median filter size must be an odd whole number >= 1; got {size!r}.", "pass e.g. size=3.")
        self.size = size

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        n, c, h, w = x.shape
        r = self.size // 2
        padded = F.pad(x, (r, r, r, r), mode="reflect")
        windows = F.unfold(padded, self.size)  # N × (C·k²) × (H·W)
        windows = windows.view(n, c, self.size * self.size, h * w)
        return windows.median(dim=2).values.view(n, c, h, w)

    def params(self) -> dict[str, Any]:
        return {"size": self.size}
