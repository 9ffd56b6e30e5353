"""The one model wrapper: stored pixels in [0, 1] -> resize -> channels -> normalize -> network -> logits.

What the logits mean (two for a binary task, K for a multi-class grader) is the task kind's
(:mod:`medadv.kinds`), named in the spec: ``model.kind`` turns logits into scores, decisions and metrics.

Because the wrapper owns the whole preprocessing path, every attack perturbs the pixels a file actually
stores (at the stored size, in [0, 1]) and the gradient flows through the resize and normalization, as it
would for a real attacker who edits the file.
"""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medadv.errors import MedadvError
from medadv.models.interface import ModelBase
from medadv.models.zoo import spatial_dims_of


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
    class_names: tuple[str, ...]  # one name per class, label order (binary: healthy, disease)
    threshold: float = 0.5  # binary: operating point on P(disease); predictions are P >= threshold
    stem: str = "standard"
    pretrained: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "binary"  # the task kind (medadv.kinds); checkpoints from before kinds are binary
    thresholds: tuple[float, ...] = ()  # multi-label: one operating point per finding (class_names order)

    @property
    def classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelSpec:
        """The spec from a checkpoint's JSON, validated against its schema and bounds first: metadata is
        user input (a hand-edited or hostile file must not reach the network builder, e.g. an input size
        that would allocate tens of GiB)."""
        if not isinstance(d, dict):
            raise MedadvError("the model spec is not a JSON object.", "train the model again.")
        d = dict(d)
        _check_spec(d)
        for k in ("mean", "std", "class_names", "thresholds"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


MAX_INPUT_SIZE = 1024  # px: a 1024² input is already 3 GiB per 256-image batch of float32 activations


def _check_spec(d: dict[str, Any]) -> None:
    """Types and bounds of every spec field, one line naming the first that is wrong."""
    def bad(field_: str, want: str) -> MedadvError:
        return MedadvError(f"the checkpoint's spec.{field_} is {d.get(field_)!r}; it must be {want}.",
                           "restore medadv.json from the checkpoint as written, or train the model again.")

    known = {f for f in ModelSpec.__dataclass_fields__}
    unknown = set(d) - known
    if unknown:
        raise MedadvError(f"the checkpoint's spec has unknown fields: {', '.join(sorted(unknown))}.",
                          "restore medadv.json from the checkpoint as written, or train the model again.")
    for name in ("arch", "input_size", "data_channels", "net_channels", "mean", "std", "task", "class_names"):
        if name not in d:
            raise MedadvError(f"the checkpoint's spec has no {name}.", "train the model again.")

    def integer(field_: str, lo: int, hi: int) -> None:
        v = d.get(field_)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise bad(field_, f"a whole number from {lo} to {hi}")

    integer("input_size", 8, MAX_INPUT_SIZE)
    integer("data_channels", 1, 4)
    integer("net_channels", 1, 4)
    for name in ("arch", "task"):
        if not isinstance(d[name], str) or not d[name] or len(d[name]) > 100:
            raise bad(name, "a non-empty name")
    for name in ("mean", "std"):
        v = d[name]
        if (not isinstance(v, (list, tuple)) or len(v) != d["net_channels"]
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            raise bad(name, f"a list of {d['net_channels']} finite numbers")
    if any(x <= 0 for x in d["std"]):
        raise bad("std", "positive")
    kind = d.get("kind", "binary")
    from medadv.kinds import KINDS

    if not isinstance(kind, str) or kind not in KINDS:
        raise bad("kind", f"one of {', '.join(KINDS)}")
    names = d["class_names"]
    want = KINDS[kind].class_names_range or {"binary": (2, 2), "multilabel": (1, 1000)}.get(kind, (3, 1000))
    if (not isinstance(names, (list, tuple)) or not want[0] <= len(names) <= want[1]
            or not all(isinstance(x, str) for x in names)):
        raise bad("class_names", {"binary": "two names", "multilabel": "one name per finding"}.get(
            kind, "two names (background, foreground)" if want == (2, 2) else "3 or more names"))
    thresholds = d.get("thresholds", ())
    if kind == "multilabel":
        # a reader's operating points are part of what it is: none may silently become 0.5
        if (not isinstance(thresholds, (list, tuple)) or len(thresholds) != len(names)
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0.0 <= x <= 1.0 for x in thresholds)):
            raise bad("thresholds", f"{len(names)} numbers in [0, 1], one per finding")
    elif thresholds not in ((), []):
        raise bad("thresholds", "empty (per-finding thresholds are for multi-label models)")
    if kind == "binary" and "threshold" not in d:
        # a missing operating point must not silently become 0.5: every binary checkpoint records one
        raise MedadvError("the checkpoint's spec has no threshold (the binary model's operating point).",
                          "restore medadv.json from the checkpoint as written, or train the model again.")
    t = d.get("threshold", 0.5)
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
        raise bad("threshold", "a number in [0, 1]")
    if not isinstance(d.get("stem", "standard"), str):
        raise bad("stem", "a name")
    if d.get("pretrained") is not None and not isinstance(d["pretrained"], str):
        raise bad("pretrained", "a name or null")
    if not isinstance(d.get("extra", {}), dict):
        raise bad("extra", "a JSON object")


class MedicalClassifier(ModelBase):
    """A medical classifier over stored pixels.

    ``forward(x)``: x is N×C×H×W float in [0, 1] with C = ``spec.data_channels`` and any H×W; returns
    N×K logits (binary: K = 2, class 1 = disease); a segmentation network, N×C×H×W logit maps at x's H×W. The network sees ``spec.input_size``² after a bilinear,
    antialiased resize, channel repeat/average, and per-channel normalization.
    """

    def __init__(self, network: nn.Module, spec: ModelSpec) -> None:
        super().__init__()
        self.network = network
        self.spec = spec
        # 2: images, N×C×H×W; 3: volumes, N×C×D×H×W (the architecture says which)
        self.spatial_dims = spatial_dims_of(spec.arch)
        tail = (1,) * self.spatial_dims
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, *tail), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, *tail), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 + self.spatial_dims or x.shape[1] != self.spec.data_channels:
            what = "volumes (N×C×D×H×W)" if self.spatial_dims == 3 else "images (N×C×H×W)"
            raise MedadvError(
                f"the model takes {self.spec.data_channels}-channel {what}; got shape {tuple(x.shape)}.",
                "use data with the channels and dimensions the model was trained on (a 3D model reads a 3D task).",
            )
        size = self.spec.input_size
        if self.spatial_dims == 3:
            if x.shape[-3:] != (size,) * 3:
                # trilinear (no antialias for 3D in torch): inside the gradient path, like the 2D resize
                x = F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)
        elif x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        if self.spec.net_channels != self.spec.data_channels:
            x = x.expand(-1, self.spec.net_channels, *x.shape[2:]) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(self.preprocess(x))
        if out.ndim == 4 and out.shape[-2:] != x.shape[-2:]:
            # a segmentation network's logit maps go back onto the stored pixels' grid (bilinear, the inverse of
            # the input's resize), so masks, metrics and attacks are all at the stored image's size
            out = F.interpolate(out, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return out

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, N×D: stored pixels -> preprocess -> the network up to the input of its
        final linear layer (the pooled features: 512 for ResNet-18, 1024 for DenseNet-121, 1280 for
        EfficientNet-Lite). Differentiable in x, like ``forward``.

        The final layer is found generically as the last ``nn.Linear`` the network registers (``fc``,
        ``class_layers.out``, ``_fc`` in the zoo); a forward pre-hook on it captures its input during
        one ordinary forward pass, so the features are exactly what the logits are computed from.
        """
        linears = [m for m in self.network.modules() if isinstance(m, nn.Linear)]
        if not linears or isinstance(self.network, torch.jit.ScriptModule):
            raise MedadvError(f"cannot find the final linear layer of the {self.spec.arch} network.",
                              "use a native (not exported) checkpoint whose network ends in an nn.Linear.")
        captured: list[torch.Tensor] = []
        handle = linears[-1].register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            self.network(self.preprocess(x))
        finally:
            handle.remove()
        if len(captured) != 1:
            raise MedadvError(f"the final linear layer of the {self.spec.arch} network ran {len(captured)} times "
                              "in one pass.", "use a network whose last nn.Linear is its classification head.")
        return captured[0].flatten(1)


class Windowed(ModelBase):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((self.a * x + self.b).clamp(0, 1))
