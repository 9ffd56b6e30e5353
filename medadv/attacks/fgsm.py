"""Fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size eps from the clean image."""

from __future__ import annotations

import torch
from torch import nn

from medadv.attacks.base import Attack, AttackResult
from medadv.attacks.gradient import ascend, autograd_gradient, frozen
from medadv.errors import MedadvError


class FGSM(Attack):
    name = "fgsm"
    access = "white-box"

    def __init__(self, threat, seed: int = 0) -> None:
        if threat.norm != "linf":
            raise MedadvError("FGSM is an L-inf attack.", "use --norm linf, or pgd-l2 for an L2 budget.")
        super().__init__(threat, seed)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> AttackResult:
        with frozen(model):
            gradient = autograd_gradient(model, self.threat.targeted)
            x_adv, _ = ascend(x, self.threat.goal(y), gradient, self.threat, generator,
                           steps=1, step_size=self.threat.radius, start=False)
        return AttackResult(x_adv.detach())
