"""Projected gradient descent (Madry et al. 2018), L-inf or L2 by the threat model's norm.

The paper's attack: with ``PAPER`` (eps 0.01, step 0.005 in [0, 1] units, 20 steps, targeted at the
opposite class) it took the paper's three ResNet-50s from 88-95% accuracy to 0%.
"""

from __future__ import annotations

import torch
from torch import nn

from medadv.attacks.base import Attack, AttackResult
from medadv.attacks.fast import PRECISIONS, accelerated
from medadv.attacks.gradient import ascend, autograd_gradient, frozen
from medadv.errors import MedadvError


def crafting_model(model: nn.Module, fast: str | None) -> nn.Module:
    """The model gradients are taken on: ``model`` itself, or its cached accelerated copy (fast.py)."""
    if fast is None or isinstance(getattr(model, "network", model), torch.jit.ScriptModule):
        return model  # a TorchScript export is run as given: its graph cannot be rewritten here
    if fast not in PRECISIONS:
        raise MedadvError(f"unknown fast path '{fast}'.", "use fast=None, 'fp32' or 'bf16'.")
    return accelerated(model, fast)


class PGD(Attack):
    """``loss``: ce or margin. ``fast``: None (the model as given), ``fp32`` (an equivalent copy with
    BatchNorm folded and channels_last: same result up to float rounding, faster) or ``bf16``
    (the network in bfloat16: faster still on CPUs with AMX/AVX512-BF16, but a different gradient)."""

    name = "pgd"
    access = "white-box"

    def __init__(self, threat, seed: int = 0, loss: str = "ce", fast: str | None = None) -> None:
        if fast is not None and fast not in PRECISIONS:
            raise MedadvError(f"unknown fast path '{fast}'.", "use fast=None, 'fp32' or 'bf16'.")
        super().__init__(threat, seed)
        self.loss = loss
        self.fast = fast

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> AttackResult:
        crafter = crafting_model(model, self.fast)
        with frozen(crafter):  # eval mode, no parameter gradients; restored afterwards
            gradient = autograd_gradient(crafter, self.threat.targeted, self.loss)
            x_adv, _ = ascend(x, self.threat.goal(y), gradient, self.threat, generator)
        return AttackResult(x_adv.detach())
