"""Fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size eps from the clean image."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medadv.attacks.base import Attack, AttackResult
from medadv.attacks.fast import PRECISIONS
from medadv.attacks.gradient import ascend, autograd_gradient, frozen
from medadv.attacks.pgd import crafting_model
from medadv.attacks.registry import Access, one_pass, register
from medadv.errors import MedadvError


@register("fgsm", kind=Access.WHITE_BOX, title="FGSM", norm="linf", battery=True, cost=one_pass)
class FGSM(Attack):
    """``fast``: None, ``fp32`` or ``bf16``, as for :class:`~medadv.attacks.pgd.PGD`."""

    name = "fgsm"
    access = "white-box"
    norms = ("linf",)

    def __init__(self, threat, seed: int = 0, fast: str | None = None) -> None:
        if fast is not None and fast not in PRECISIONS:
            raise MedadvError(f"unknown fast path '{fast}'.", "use fast=None, 'fp32' or 'bf16'.")
        super().__init__(threat, seed)
        self.fast = fast

    @classmethod
    def describe(cls, threat: dict[str, Any], params: dict[str, Any]) -> list[str]:
        return ["one step"]

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> AttackResult:
        crafter = crafting_model(model, self.fast)
        with frozen(crafter):  # eval mode, no parameter gradients; restored afterwards
            gradient = autograd_gradient(crafter, self.threat.targeted, threat=self.threat)
            x_adv, _ = ascend(x, self.threat.goal(y), gradient, self.threat, generator,
                              steps=1, step_size=self.threat.radius, start=False)
        return AttackResult(x_adv.detach())
