"""Projected gradient descent (Madry et al. 2018), L-inf or L2 by the threat model's norm.

The paper's attack: with ``PAPER`` (eps 0.01, step 0.005 in [0, 1] units, 20 steps, targeted at the
opposite class) it took the paper's three ResNet-50s from 88-95% accuracy to 0%.
"""

from __future__ import annotations

import torch
from torch import nn

from medadv.attacks.base import Attack, AttackResult
from medadv.attacks.gradient import ascend, autograd_gradient, frozen


class PGD(Attack):
    name = "pgd"
    access = "white-box"

    def __init__(self, threat, seed: int = 0, loss: str = "ce") -> None:
        super().__init__(threat, seed)
        self.loss = loss

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> AttackResult:
        with frozen(model):
            gradient = autograd_gradient(model, self.threat.targeted, self.loss)
            x_adv, _ = ascend(x, self.threat.goal(y), gradient, self.threat, generator)
        return AttackResult(x_adv.detach())
