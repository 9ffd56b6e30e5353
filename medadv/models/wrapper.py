"""The one model wrapper: stored pixels in [0, 1] -> resize -> channels -> normalize -> network -> 2 logits.

Because the wrapper owns the whole preprocessing path, every attack perturbs the pixels a file actually
stores (at the stored size, in [0, 1]) and the gradient flows through the resize and normalization, as it
would for a real attacker who edits the file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medadv.errors import MedadvError


@dataclass
class ModelSpec:
    """Everything needed to rebuild the wrapper around a network (stored in the checkpoint)."""

    arch: str
    input_size: int  # the network's input, in px (square)
    data_channels: int  # channels of the stored images the wrapper accepts
    net_channels: int  # channels the network takes (gray is repeated for a 3-channel network)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    task: str
    class_names: tuple[str, str]
    threshold: float = 0.5  # operating point on P(disease); predictions are P >= threshold
    stem: str = "standard"
    pretrained: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        for k in ("mean", "std", "class_names"):
            d[k] = tuple(d[k])
        return cls(**d)


class MedicalClassifier(nn.Module):
    """A binary medical classifier over stored pixels.

    ``forward(x)``: x is N×C×H×W float in [0, 1] with C = ``spec.data_channels`` and any H×W; returns
    N×2 logits (class 1 = disease). The network sees ``spec.input_size``² after a bilinear, antialiased
    resize, channel repeat/average, and per-channel normalization.
    """

    def __init__(self, network: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.network = network
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def differentiable(self) -> bool:
        """False for networks without gradients (ONNX): white-box attacks cannot run on them."""
        return getattr(self.network, "differentiable", True)

    @property
    def threshold(self) -> float:
        return self.spec.threshold

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.spec.data_channels:
            raise MedadvError(
                f"the model takes {self.spec.data_channels}-channel images (N×C×H×W); got shape {tuple(x.shape)}.",
                "use data with the channels the model was trained on.",
            )
        size = self.spec.input_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if self.spec.net_channels != self.spec.data_channels:
            x = x.expand(-1, self.spec.net_channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(self.preprocess(x))

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """P(disease) for each image, N floats, computed in eval mode in batches."""
        was_training = self.training
        self.eval()
        device = self.device
        out = [F.softmax(self(x[i:i + batch_size].to(device)), dim=1)[:, 1].float().cpu()
               for i in range(0, len(x), batch_size)]
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    def predict(self, p_disease: torch.Tensor | np.ndarray) -> np.ndarray:
        """Labels at the operating threshold: 1 (disease) where P(disease) >= threshold."""
        return (np.asarray(p_disease) >= self.spec.threshold).astype(np.int64)


class Windowed(nn.Module):
    """``model`` seen through one VOI window: ``model(clip(a * x + b, 0, 1))``.

    DICOM images are attacked in their stored values (so eps bounds the change in the file); the window
    a radiologist's display and the model's training applied is this fixed, differentiable input
    transform. One window per wrapper: callers group images by window.
    """

    def __init__(self, model: nn.Module, window: tuple[float, float]) -> None:
        super().__init__()
        self.model = model
        self.a, self.b = float(window[0]), float(window[1])

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def threshold(self) -> float:
        return self.model.spec.threshold

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def differentiable(self) -> bool:
        return getattr(self.model, "differentiable", True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((self.a * x + self.b).clamp(0, 1))

    def predict(self, p_disease: torch.Tensor | np.ndarray) -> np.ndarray:
        return (np.asarray(p_disease) >= self.spec.threshold).astype(np.int64)
