"""JPEG re-encoding (Dziugaite et al. 2016; Das et al. 2017) through PIL, image by image.

Not differentiable (the codec runs in C on 8-bit images); BPDA uses the identity, the approximation
Athalye et al. (2018) used to break it: at usual qualities the decoded image is close to the input.
Baseline JPEG is 8-bit, so 16-bit images (DICOM) leave the defense on the 8-bit grid.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

from medadv.defenses.base import Preprocessor, register
from medadv.errors import MedadvError


@register
class JPEG(Preprocessor):
    """x (N×C×H×W in [0, 1], C = 1 or 3) -> decoded JPEG at ``quality`` (1-95), as float in [0, 1]."""

    name = "jpeg"
    differentiable = False
    description = "JPEG re-encoding at a quality (PIL)"

    def __init__(self, quality: int = 75) -> None:
        super().__init__()
        if not isinstance(quality, int) or not 1 <= quality <= 95:
            raise MedadvError(f"JPEG quality must be a whole number from 1 to 95; got {quality!r}.", "pass e.g. quality=75.")
        self.quality = quality

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        from PIL import Image

        if x.shape[1] not in (1, 3):
            raise MedadvError(f"JPEG takes 1- or 3-channel images; got {x.shape[1]} channels.", "use another defense.")
        arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        out = np.empty_like(arr)
        for i, img in enumerate(arr):
            pil = Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0))
            buf = io.BytesIO()
            pil.save(buf, format="JPEG", quality=self.quality)
            buf.seek(0)
            dec = np.asarray(Image.open(buf).convert(pil.mode))
            out[i] = dec[None] if dec.ndim == 2 else dec.transpose(2, 0, 1)
        return torch.from_numpy(out).to(device=x.device, dtype=x.dtype) / 255.0

    def params(self) -> dict[str, Any]:
        return {"quality": self.quality}
