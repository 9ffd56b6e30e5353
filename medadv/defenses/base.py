"""What every preprocessing defense shares: the base class, the registry and the defended-model wrapper.

A preprocessing defense maps stored pixels in [0, 1] (N×C×H×W) to pixels in [0, 1] of the same shape,
before the model's own resize and normalization. :class:`DefendedModel` puts it in front of a
:class:`~medadv.models.wrapper.MedicalClassifier`; the result is still a model (N×2 logits, the same
``spec`` and ``threshold``), so every registered attack applies to the whole pipeline unchanged.

Gradients (Athalye, Carlini and Wagner 2018). A differentiable defense is simply part of the graph. A
non-differentiable one (rounding, JPEG through PIL, histogram equalization through scikit-image) has no
useful gradient; the wrapper makes that explicit with two ``torch.autograd.Function`` paths:

* ``adaptive=False`` (what a naive attacker sees): the backward returns zeros, the masked gradient
  that makes such defenses look strong;
* ``adaptive=True`` (BPDA): the forward is the real defense, the backward is the vector-Jacobian
  product of :meth:`Preprocessor.approximation` (the identity unless a defense supplies a smoother
  stand-in), so gradient attacks see through the defense.

Adding a defense is one file: a :class:`Preprocessor` subclass decorated with :func:`register`.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from medadv.errors import MedadvError
from medadv.models.interface import ModelBase


class Preprocessor(nn.Module):
    """One preprocessing step: ``transform(x)`` for x N×C×H×W float in [0, 1] -> same shape in [0, 1].

    ``differentiable``: True when ``transform`` is built from differentiable torch ops whose gradient is
    informative (it is then used as is); False when the wrapper must supply the gradient (see the module
    docstring). ``params()`` returns the JSON-able settings that rebuild the defense by name.
    """

    name: ClassVar[str]
    differentiable: ClassVar[bool]
    description: ClassVar[str] = ""

    @abstractmethod
    def transform(self, x: torch.Tensor) -> torch.Tensor:
        ...

    def approximation(self, x: torch.Tensor) -> torch.Tensor:
        """A differentiable stand-in for :meth:`transform` used by BPDA's backward (default: identity,
        right for defenses that change the image little, e.g. JPEG at high quality or bit-depth reduction)."""
        return x

    def params(self) -> dict[str, Any]:
        return {}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "differentiable": self.differentiable, **self.params()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transform(x)


PREPROCESSORS: dict[str, type[Preprocessor]] = {}


def register(cls: type[Preprocessor]) -> type[Preprocessor]:
    """Class decorator: make ``cls`` buildable by its ``name`` (CLI flags, checkpoints, study plans)."""
    if cls.name in PREPROCESSORS and PREPROCESSORS[cls.name] is not cls:
        raise MedadvError(f"two defenses are named '{cls.name}'.", "give each registered defense its own name.")
    PREPROCESSORS[cls.name] = cls
    return cls


def build_preprocessor(name: str, **params: Any) -> Preprocessor:
    """The registered defense ``name`` with ``params`` (the keys of its ``params()``)."""
    cls = PREPROCESSORS.get(name)
    if cls is None:
        raise MedadvError(f"unknown defense '{name}'.", f"choose one of {', '.join(sorted(PREPROCESSORS))}.")
    try:
        return cls(**params)
    except TypeError as exc:
        raise MedadvError(f"bad settings for defense '{name}' ({exc}).",
                          f"pass only the settings {name} takes.") from None


class _MaskedGradient(torch.autograd.Function):
    """Forward: the defense. Backward: zeros, exactly what autograd gives through a rounding step or
    nothing at all through NumPy code; kept explicit so a naive attack runs (and fails) instead of erroring."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pre: Preprocessor) -> torch.Tensor:  # type: ignore[override]
        with torch.no_grad():
            return pre.transform(x.detach())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        return torch.zeros_like(grad_out), None


class _BPDA(torch.autograd.Function):
    """Backward pass differentiable approximation: forward the defense, backward through ``approximation``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pre: Preprocessor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.pre = pre
        with torch.no_grad():
            return pre.transform(x.detach())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        pre: Preprocessor = ctx.pre
        if type(pre).approximation is Preprocessor.approximation:
            return grad_out, None  # identity: no second graph needed
        with torch.enable_grad():
            xa = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(pre.approximation(xa), xa, grad_out)
        return grad, None


def apply_preprocessor(pre: Preprocessor, x: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """``pre(x)`` with the gradient the evaluation calls for (see the module docstring)."""
    if pre.differentiable:
        return pre.transform(x)
    if not x.requires_grad:
        with torch.no_grad():
            return pre.transform(x)
    return (_BPDA if adaptive else _MaskedGradient).apply(x, pre)


class ModelWrapper(ModelBase):
    """A module around ``self.model`` that is still a model (:class:`medadv.models.interface.Model`):
    ``spec``, ``threshold``, ``kind`` and ``differentiable`` are the wrapped model's; ``probabilities`` and
    ``predict`` are computed through this wrapper's ``forward`` (:class:`~medadv.models.interface.ModelBase`),
    so code written for a ``MedicalClassifier`` (attacks, battery, clinical metrics) runs on it.
    Subclasses set ``self.model`` and define ``forward``."""

    model: nn.Module

    @property
    def spec(self):
        return self.model.spec

    @property
    def threshold(self) -> float:
        return float(getattr(self.model, "threshold", 0.5))


class DefendedModel(ModelWrapper):
    """A model behind preprocessing defenses; still a model: ``forward(x)`` N×C×H×W in [0, 1] -> N×2 logits.

    ``model``: the :class:`MedicalClassifier` (or any module with ``spec``). ``defenses``: applied in
    order. ``adaptive``: gradients through non-differentiable defenses by BPDA (True) or masked (False).
    ``spec``, ``threshold``, ``probabilities`` and ``predict`` are the model's, so code written for a
    ``MedicalClassifier`` (the attacks, the battery, clinical metrics) runs on the defended one.

    Deliberately not a ``MedicalClassifier`` subclass: code that special-cases that class (e.g. the
    attacks' accelerated copy, which rebuilds the wrapper around ``.network``) would silently drop the
    defense; as a plain module the whole pipeline is kept.
    """

    def __init__(self, model: nn.Module, defenses: Preprocessor | list[Preprocessor], adaptive: bool = False) -> None:
        super().__init__()
        self.model = model
        self.defenses = nn.ModuleList([defenses] if isinstance(defenses, Preprocessor) else list(defenses))
        if not len(self.defenses):
            raise MedadvError("a defended model needs at least one defense.", "pass a registered defense.")
        self.adaptive = adaptive

    @property
    def fully_differentiable(self) -> bool:
        """True when every defense is differentiable (no BPDA needed for an adaptive attack)."""
        return all(d.differentiable for d in self.defenses)

    def with_adaptive(self, adaptive: bool) -> DefendedModel:
        """The same model and defenses (shared, not copied) with the other gradient path."""
        return DefendedModel(self.model, list(self.defenses), adaptive)

    def with_inner(self, model: nn.Module) -> DefendedModel:
        """The same defenses (shared) and gradient path in front of another model, e.g. the attacks'
        accelerated copy of this one's network (:func:`medadv.attacks.pgd.crafting_model`)."""
        return DefendedModel(model, list(self.defenses), self.adaptive)

    def purify(self, x: torch.Tensor) -> torch.Tensor:
        for d in self.defenses:
            x = apply_preprocessor(d, x, self.adaptive)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.purify(x))

    def to_json(self) -> dict[str, Any]:
        """What a checkpoint or results.json records about the defense."""
        return {"kind": "preprocessing", "adaptive": self.adaptive, "defenses": [d.to_json() for d in self.defenses]}


def defend(model: nn.Module, names: str | list[str | dict[str, Any]], adaptive: bool = False) -> DefendedModel:
    """``model`` behind the named defenses: names, or dicts ``{"name": ..., **params}`` (``to_json`` form)."""
    items = [names] if isinstance(names, str) else list(names)
    pres = []
    for item in items:
        if isinstance(item, str):
            pres.append(build_preprocessor(item))
        else:
            params = {k: v for k, v in item.items() if k not in ("name", "differentiable")}
            pres.append(build_preprocessor(item["name"], **params))
    return DefendedModel(model, pres, adaptive)
