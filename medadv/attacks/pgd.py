"""Projected gradient descent (Madry et al. 2018), L-inf or L2 by the threat model's norm.

The paper's attack: with ``PAPER`` (eps 0.01, step 0.005 in [0, 1] units, 20 steps, targeted at the
opposite class) it took the paper's three ResNet-50s from 88-95% accuracy to 0%.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medadv.attacks.base import Attack, AttackResult, check_logits, operating_point
from medadv.attacks.threat_model import ThreatModel
from medadv.attacks.fast import PRECISIONS, accelerated
from medadv.attacks.gradient import ascend, autograd_gradient, frozen
from medadv.attacks.registry import Access, per_step, register
from medadv.errors import MedadvError

LOSSES = ("ce", "margin")


def crafting_model(model: nn.Module, fast: str | None) -> nn.Module:
    """The model gradients are taken on: ``model`` itself, or its cached accelerated copy (fast.py)."""
    if fast is None or isinstance(getattr(model, "network", model), torch.jit.ScriptModule):
        return model  # a TorchScript export is run as given: its graph cannot be rewritten here
    if fast not in PRECISIONS:
        raise MedadvError(f"unknown fast path '{fast}'.", "use fast=None, 'fp32' or 'bf16'.")
    with_inner = getattr(model, "with_inner", None)
    if with_inner is not None:  # a wrapper (a defense's pipeline) is kept whole; only the model inside is accelerated
        return with_inner(crafting_model(model.model, fast))
    return accelerated(model, fast)


def check_schedule(attack: str, steps: int | None = None, step_size: float | None = None,
                   restarts: int | None = None) -> None:
    """Raise MedadvError for a schedule an attack cannot run (each attack checks its own, at construction)."""
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise MedadvError(f"{attack} needs steps >= 1; got {steps}.", "pass --steps 1 or more.")
    if step_size is not None and not (isinstance(step_size, (int, float)) and step_size > 0):
        raise MedadvError(f"{attack} step size must be > 0; got {step_size}.", "pass a positive --step-size.")
    if restarts is not None and (not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 1):
        raise MedadvError(f"{attack} needs restarts >= 1; got {restarts}.", "pass restarts=1 or more.")


def decided(model: nn.Module, x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """The model's decisions on x at its operating point, as the threat model's task kind reads them
    (binary: P(disease) >= threshold; K classes: argmax; multi-label: each finding at its threshold)."""
    with torch.no_grad():
        logits = check_logits(model(x), len(x), None, spatial=threat.task_kind.spatial)
    return threat.decide(logits, operating_point(model))


@register("pgd-l2", kind=Access.WHITE_BOX, title="PGD (L2)", norm="l2")
@register("pgd", kind=Access.WHITE_BOX, title="PGD", battery=("pgd_white", "pgd_black"), cost=per_step)
class PGD(Attack):
    """``loss``: ce or margin. ``fast``: None (the model as given), ``fp32`` (an equivalent copy with
    BatchNorm folded and channels_last: same result up to float rounding, faster) or ``bf16``
    (the network in bfloat16: faster still on CPUs with AMX/AVX512-BF16, but a different gradient).

    Schedule (None: the threat model's): ``steps``, ``step_size`` (in [0, 1] units), ``random_start``;
    ``restarts``: further random starts for the images a run leaves unbroken (judged on the stored image
    at the model's operating threshold)."""

    name = "pgd"
    access = "white-box"

    def __init__(self, threat, seed: int = 0, loss: str = "ce", fast: str | None = None, *,
                 steps: int | None = None, step_size: float | None = None, random_start: bool | None = None,
                 restarts: int = 1) -> None:
        if fast is not None and fast not in PRECISIONS:
            raise MedadvError(f"unknown fast path '{fast}'.", "use fast=None, 'fp32' or 'bf16'.")
        if loss not in LOSSES:
            raise MedadvError(f"unknown PGD loss '{loss}'.", f"use {' or '.join(LOSSES)}.")
        check_schedule("PGD", steps, step_size, restarts)
        super().__init__(threat, seed)
        self.loss = loss
        self.fast = fast
        self.steps = threat.steps if steps is None else steps
        self.step_size = None if step_size is None else float(step_size)  # None: the threat model's (eps-relative)
        self.random_start = threat.random_start if random_start is None else bool(random_start)
        self.restarts = restarts

    @classmethod
    def describe(cls, threat: dict[str, Any], params: dict[str, Any]) -> list[str]:
        steps = params.get("steps") or threat.get("steps")
        out = [f"{steps} steps"] if steps else []
        if params.get("restarts", 1) > 1:
            out.append(f"{params['restarts']} restarts")
        if params.get("loss", "ce") != "ce":
            out.append(f"{params['loss']} loss")
        return out

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> AttackResult:
        crafter = crafting_model(model, self.fast)
        goal = self.threat.goal(y)
        schedule = {"steps": self.steps, "step_size": self.step_size or self.threat.alpha, "start": self.random_start}
        with frozen(crafter):  # eval mode, no parameter gradients; restored afterwards
            gradient = autograd_gradient(crafter, self.threat.targeted, self.loss, self.threat)
            x_adv, _ = ascend(x, goal, gradient, self.threat, generator, **schedule)
            todo = torch.arange(len(x), device=x.device)
            for _ in range(self.restarts - 1):
                ok = self.threat.succeeded(decided(crafter, self.threat.to_grid(x_adv[todo], x[todo]), self.threat), y[todo])
                todo = todo[~ok]
                if len(todo) == 0:
                    break
                sub = self.threat.with_(mask=None if self.threat.mask is None else self.threat.mask_for(x)[todo])
                x_adv[todo], _ = ascend(x[todo], goal[todo], gradient, sub, generator, **{**schedule, "start": True})
        return AttackResult(x_adv.detach())
