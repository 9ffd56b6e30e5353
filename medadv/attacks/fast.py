"""A faster stand-in for a white-box victim while crafting attacks: same function, cheaper gradient.

:func:`accelerate` returns an eval-mode copy of the model with every BatchNorm that follows a
convolution folded into it (one op fewer forward and backward per layer), parameters frozen, and
optionally the network in bfloat16 with channels_last activations (oneDNN's AMX kernels want NHWC).
The preprocessing of a :class:`MedicalClassifier` (resize, normalization) stays in float32; only the
network changes. The copy is a snapshot: re-accelerate after the weights change (:func:`accelerated`,
the cached form the attacks use, does so by itself).

Numerics (ResNet-18 at 28 and 64 px): ``fp32`` logits differ from the original's by ~1e-6 (a folded
BatchNorm rounds differently; tested below 1e-4), so attacks agree with the eager model up to float
rounding. ``bf16`` logits differ by up to ~1e-2 (8-bit mantissa): gradients, and so attack paths,
change; it is opt-in, and the benchmarks report its success rate next to fp32's. Either way the
attacks clip and round against the original images, so their output stays inside the threat model;
only its strength can change.

Measured on a 2-core Xeon (AVX-512, AMX), one thread, PGD-20 over 20 plain passes of the original:
fp32 ~0.87, bf16 ~0.45 (bench/pgd_overhead.py).
"""

from __future__ import annotations

import copy
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from medadv.errors import MedadvError
from medadv.models.wrapper import MedicalClassifier

Precision = Literal["fp32", "bf16"]
PRECISIONS = ("fp32", "bf16")


class _Fast(nn.Module):
    """The accelerated network: channels_last input, optional bf16 compute, float32 logits out."""

    def __init__(self, network: nn.Module, dtype: torch.dtype, channels_last: bool) -> None:
        super().__init__()
        self.network = network
        self.dtype = dtype
        self.channels_last = channels_last
        self.differentiable = getattr(network, "differentiable", True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)  # a no-op in fp32; in bf16 the cast's backward returns a float32 gradient
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.network(x).float()


class _GrayInputGrad(torch.autograd.Function):
    """A 1-channel convolution whose backward forms only the input's gradient, as one GEMM and a
    col2im (``F.fold``): oneDNN's backward-data kernel for a single input channel ran at ~1/4 of
    its forward's speed (0.40 s vs 0.11 s per 128 images at 64 px, 7×7, one thread)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):  # type: ignore[override]
        ctx.geometry = (x.shape[-2:], weight.shape[-2:], stride, padding)
        ctx.save_for_backward(weight)
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        size, kernel, stride, padding = ctx.geometry
        cols = torch.matmul(weight.flatten(1).t(), grad_out.flatten(2))  # N × k² × H'W'
        return F.fold(cols, tuple(size), tuple(kernel), padding=padding, stride=stride), None, None, None, None


class _GrayConv(nn.Module):
    """Drop-in for a frozen ``Conv2d`` with one input channel (a grayscale stem); same forward."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding = conv.stride, conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)
        return _GrayInputGrad.apply(x, self.weight, self.bias, self.stride, self.padding)


def gray_stems(network: nn.Module) -> int:
    """Swap (in place) each plain 1-input-channel Conv2d for :class:`_GrayConv`; returns the count."""
    swapped = 0
    for name, module in list(network.named_modules()):
        if (type(module) is nn.Conv2d and module.in_channels == 1 and module.groups == 1
                and module.dilation == (1, 1) and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
            parent, _, leaf = name.rpartition(".")
            setattr(network.get_submodule(parent) if parent else network, leaf, _GrayConv(module))
            swapped += 1
    return swapped


def fold_batchnorm(network: nn.Module) -> tuple[nn.Module, int]:
    """``network`` (eval mode) with each Conv→BatchNorm pair fused into one convolution, and the count.

    Uses torch.fx; a network fx cannot trace is returned unchanged (count 0). A BatchNorm whose
    convolution's output is used elsewhere too (DenseNet's pre-activation layout) is left in place.
    """
    from torch.fx.experimental.optimization import fuse

    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())
    try:
        fused = fuse(network.eval(), inplace=False)
    except Exception:  # noqa: BLE001 - untraceable control flow: keep the network as it is
        return network, 0
    after = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    return fused, before - after


def accelerate(model: nn.Module, precision: Precision = "fp32", *, fold: bool = True,
               channels_last: bool | None = None, gray_stem: bool = True, compile: bool = False) -> nn.Module:
    """An equivalent eval-mode copy of ``model`` for crafting attacks (the original is not touched).

    model: a :class:`MedicalClassifier` (its network is accelerated, its preprocessing kept) or any
    module mapping N×C×H×W images in [0, 1] to N×2 logits. precision: ``fp32`` (logits within 1e-4 of
    the original's) or ``bf16`` (the network in bfloat16: about 2× faster on CPUs with AMX/AVX512-BF16,
    logits within ~0.1; opt-in). fold: fuse Conv→BatchNorm pairs. channels_last: NHWC weights and
    activations; None picks what measured faster on a 2-core AVX-512/AMX Xeon: on for bf16 (oneDNN's
    AMX kernels want NHWC) and for networks with depthwise convolutions (EfficientNet-Lite0 PGD: 1.3-1.5x
    at 64-128 px), off for other fp32 networks (a ResNet-18 was up to ~30% slower NHWC). gray_stem (fp32): give
    1-input-channel convolutions a GEMM + col2im input gradient (4× faster than oneDNN's there; 8% of
    a 64 px ResNet-18 pass). compile: ``torch.compile`` the network (off by default: on that CPU it
    compiled for ~80 s and then ran slower than eager).

    Returns a module with frozen parameters (requires_grad False), in eval mode, on the model's
    device, returning float32 N×2 logits; ``.info`` records what was changed.
    """
    if precision not in PRECISIONS:
        raise MedadvError(f"unknown precision '{precision}'.", "use fp32 or bf16.")
    wrapper = model if isinstance(model, MedicalClassifier) else None
    network = copy.deepcopy(wrapper.network if wrapper is not None else model).eval()
    depthwise = any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in network.modules())  # before fx inlines them
    folded = 0
    if fold:
        network, folded = fold_batchnorm(network)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if channels_last is None:  # depthwise convolutions (EfficientNet) run faster NHWC in fp32 too
        channels_last = precision == "bf16" or depthwise
    network = network.to(dtype=dtype)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    for p in network.parameters():
        p.requires_grad_(False)
    gray = gray_stems(network) if gray_stem and precision == "fp32" else 0
    fast: nn.Module = _Fast(network, dtype, channels_last)
    if compile:
        fast.network = torch.compile(network, dynamic=False)
    if wrapper is not None:
        fast = MedicalClassifier(fast, wrapper.spec).to(wrapper.device)
    fast.eval()
    fast.info = {"precision": precision, "folded_batchnorms": folded, "gray_stems": gray,
                 "channels_last": channels_last, "compiled": compile}
    return fast


# model -> {precision: (weights signature, accelerated copy)}; weak keys: a dropped model frees its copies
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _signature(model: nn.Module) -> tuple:
    # in-place updates (optimizer steps, load_state_dict, BatchNorm statistics) bump _version
    return tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))


def accelerated(model: nn.Module, precision: Precision = "fp32") -> nn.Module:
    """:func:`accelerate`, cached per model and precision: rebuilt only when the model's weights or
    buffers changed (checked on every call: one pass over the parameters' version counters)."""
    sig = _signature(model)
    copies = _CACHE.setdefault(model, {})
    hit = copies.get(precision)
    if hit is not None and hit[0] == sig:
        return hit[1]
    fast = accelerate(model, precision)
    copies[precision] = (sig, fast)
    return fast
