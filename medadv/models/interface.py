"""The one model interface: what every model-like object in medadv is (the wrapper around a network, a
model seen through a DICOM window, a defended model, EOT, a detector in front of a model).

:class:`Model` is the protocol code is written against; :class:`ModelBase` implements everything but
``forward`` and ``spec`` once, so the copies cannot drift: scores and decisions come from the task kind
named in ``spec`` (:mod:`medadv.kinds`), computed through the object's own ``forward`` (so a defense in
front of the network acts on them), in eval mode, with the mode restored even on error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from medadv.errors import MedadvError


@runtime_checkable
class Model(Protocol):
    """Stored pixels N×C×H×W in [0, 1] -> N×K logits, plus what gives them meaning."""

    spec: Any  # medadv.models.wrapper.ModelSpec: arch, task, kind, class names, threshold, input geometry

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    @property
    def kind(self) -> Any: ...

    @property
    def threshold(self) -> float: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def differentiable(self) -> bool: ...

    def probabilities(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor: ...

    def predict(self, scores: torch.Tensor | np.ndarray) -> np.ndarray: ...

    def with_adaptive(self, adaptive: bool) -> Model: ...


# Input values per batch (the network's input size squared times its channels) that keep one batch within a
# few GB: a gradient pass holds every activation, about 100 MB per image for EfficientNet-Lite0 at 224 px
# (128 such images took 14 GB), so 32 RGB images at 224 px; a forward pass without gradients twice that
# (64 images: 2.5 GB, as fast per image as 256 at 6 GB). Images of 128 px or less keep the batch given.
GRADIENT_BATCH_VALUES = 32 * 3 * 224 * 224


def memory_batch(model: object, batch_size: int, *, gradients: bool = True) -> int:
    """``batch_size``, capped so one batch stays a few GB whatever the network's input size."""
    spec = getattr(model, "spec", None)
    if spec is None:
        return batch_size
    from medadv.models.zoo import spatial_dims_of

    # values per input: C × size² for an image, C × size³ for a volume
    per_image = max(1, int(spec.net_channels) * int(spec.input_size) ** spatial_dims_of(str(getattr(spec, "arch", ""))))
    budget = GRADIENT_BATCH_VALUES * (1 if gradients else 2)
    return max(1, min(batch_size, budget // per_image))


def refuse_dense_or_volume(model: object, what: str) -> None:
    """Refuse, in one line, a command built for 2D classifiers and readers (``what``: wrap, export, certify,
    audit, serve) on a segmentation model or a 3D model, rather than run it on assumptions that do not hold
    (per-image classes, 2D squeezers and patches, 4D tensors)."""
    spec = getattr(model, "spec", None)
    dense = getattr(spec, "kind", "binary") == "segmentation"
    volume = getattr(model, "spatial_dims", 2) == 3
    if dense or volume:
        words = "a segmentation model" if dense else "a 3D model (volumes)"
        raise MedadvError(f"{what} is not built for {words} yet.",
                          "train, evaluate and attack it with medadv train, evaluate and attack.")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration; afterwards every submodule gets back its own mode. Not
    ``module.train(was)``: that pushes the outer flag down, and a wrapper built in train mode (nn.Module's
    default) around a model in eval mode would leave the model's batch norm on batch statistics."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


class ModelBase(nn.Module):
    """The shared implementation of :class:`Model`. Subclasses provide ``spec`` and ``forward``; a wrapper
    around another model (``self.model``) inherits its differentiability."""

    @property
    def kind(self):
        """The task kind that gives the logits their meaning (binary unless the spec says otherwise)."""
        from medadv.kinds import get_kind

        return get_kind(getattr(self.spec, "kind", "binary"))

    @property
    def threshold(self) -> float:
        return float(self.spec.threshold)

    @property
    def operating_point(self):
        """Where decisions are made: binary, the threshold on P(disease); multi-label, one threshold per
        finding (a tuple); multi-class, unused (argmax). The task kind reads it off the spec."""
        return self.kind.point_of(self.spec)

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def differentiable(self) -> bool:
        """False for networks without gradients (ONNX): white-box attacks cannot run on them."""
        inner = self.__dict__.get("_modules", {}).get("model") or self.__dict__.get("_modules", {}).get("network")
        return getattr(inner, "differentiable", True)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """The kind's scores through this object's ``forward``, in eval mode, in batches of at most
        ``batch_size`` (capped by :func:`memory_batch`): binary P(disease), N floats; multi-class the N×K
        class probabilities."""
        device, kind = self.device, self.kind
        batch_size = memory_batch(self, batch_size, gradients=False)
        with eval_mode(self):
            out = [kind.scores(self(x[i:i + batch_size].to(device))).float().cpu() for i in range(0, len(x), batch_size)]
        if out:
            return torch.cat(out)
        return torch.zeros((0,) if getattr(self.spec, "kind", "binary") == "binary" else (0, len(self.spec.class_names)))

    def predict(self, scores: torch.Tensor | np.ndarray) -> np.ndarray:
        """Decisions at the operating point (binary: 1 where P(disease) >= threshold; multi-class: argmax;
        multi-label: N×F, 1 where a finding reaches its threshold)."""
        return self.kind.predict(scores, self.operating_point)

    def with_adaptive(self, adaptive: bool) -> ModelBase:
        """This model with gradients through its defenses by BPDA (``adaptive``) or masked: a model with no
        non-differentiable defense is the same either way. Defended models override it."""
        return self
