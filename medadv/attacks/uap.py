"""Universal adversarial perturbation (Moosavi-Dezfooli et al. 2017): one perturbation for every image.

Fitted by minibatch projected gradient ascent over the training images (the SGD form of Shafahi et al.
2020): each step adds the normalized gradient of the batch's summed objective (sign for L-inf, unit L2
for L2) to the one shared delta and projects it back into the eps-ball and the mask. Targeted, this is
the attack of Hirano & Takemoto (2020), whose UAPs forced most unseen chest X-rays, dermoscopy and OCT
images into one chosen class at a few percent of the image norm.
"""

from __future__ import annotations

import torch
from torch import nn

from medadv.attacks.base import AttackResult, check_logits, operating_point
from medadv.attacks.gradient import objective
from medadv.attacks.registry import Access, fit_steps, one_pass, register
from medadv.attacks.threat_model import ThreatModel
from medadv.attacks.universal import UniversalAttack, minibatches
from medadv.errors import MedadvError
from medadv.progress import Monitor


@register("uap", kind=Access.UNIVERSAL, title="Universal adversarial perturbation", battery=True, needs_fit=True,
          cost=one_pass, fit_cost=fit_steps(200))
class UniversalPerturbation(UniversalAttack):
    """One delta (C×H×W, at the stored image size) within eps and the mask, applied as clip(x + delta).

    steps: minibatch ascent steps. batch_size: training images per step. step_size: per-step change in
    [0, 1] pixel units (default: a tenth of the L-inf radius, or of the L2 eps), smaller than a
    per-image PGD step because the sign of a minibatch gradient is noisy from batch to batch.
    """

    name = "uap"
    state_keys = ("delta",)

    def __init__(self, threat: ThreatModel, seed: int = 0, *, steps: int = 200, batch_size: int = 32,
                 step_size: float | None = None) -> None:
        if steps < 1 or batch_size < 1:
            raise MedadvError(f"uap needs steps >= 1 and batch_size >= 1; got {steps} and {batch_size}.",
                              "pass positive steps and batch_size.")
        if step_size is not None and not step_size > 0:
            raise MedadvError(f"uap step_size must be > 0; got {step_size}.", "pass a positive step_size.")
        super().__init__(threat, seed)
        self.steps = steps
        self.batch_size = batch_size
        self.step_size = step_size

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else self.threat.radius / 10

    def _fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator,
             monitor: Monitor) -> dict[str, torch.Tensor]:
        mask = self.threat.mask_for(x[:1])  # 1×C×H×W: one mask for every image
        goal = self.threat.goal(y)
        point = operating_point(model)
        delta = torch.zeros_like(x[:1])
        success = torch.zeros((), device=x.device)
        batches = minibatches(len(x), self.batch_size, self.steps, generator, x.device)
        for idx in monitor.track(batches, f"fitting uap on {len(x)} images", total=self.steps):
            delta.requires_grad_(True)
            logits = check_logits(model((x[idx] + delta).clamp(0.0, 1.0)), len(idx))
            (grad,) = torch.autograd.grad(objective(logits, goal[idx], self.threat.targeted, threat=self.threat, point=point),
                                          delta)
            with torch.no_grad():
                if mask is not None:
                    grad = grad * mask  # normalize over the pixels that may change only
                delta = self._project(delta + self.alpha * self.threat.geometry.normalize(grad), mask)
                success = 0.9 * success + 0.1 * self._success(model, logits, y[idx]).mean()
        self.fit_success = float(success / (1 - 0.9 ** self.steps))  # bias-corrected running mean
        return {"delta": self._quantize(delta)[0]}

    def apply(self, state: dict[str, torch.Tensor], x: torch.Tensor, generator: torch.Generator) -> AttackResult:
        delta = state["delta"]
        if delta.shape != x.shape[1:]:
            raise MedadvError(f"the uap was fitted on {'×'.join(map(str, delta.shape))} images; these are "
                              f"{'×'.join(map(str, x.shape[1:]))}.",
                              "apply it to images of the size and channels it was fitted on (or refit).")
        mask = self.threat.mask_for(x)
        if mask is not None:  # a state loaded under another threat model still respects this one's mask
            delta = delta * mask
        return AttackResult((x + delta).clamp(0.0, 1.0))

    def _project(self, delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """The closest delta inside the mask and the eps-ball (L-inf: the radius on the grid)."""
        if mask is not None:
            delta = delta * mask
        return self.threat.geometry.project_delta(delta, self.threat.radius)

    def _quantize(self, delta: torch.Tensor) -> torch.Tensor:
        """Delta in whole storage levels, so every image gets exactly the same change before clipping.

        L-inf: rounding stays within the radius (a whole number of levels). L2: rounding may lengthen
        it past eps; then round toward zero instead, which never lengthens it.
        """
        L = self.threat.levels
        if L is None:
            return delta
        return self.threat.geometry.grid_steps(delta, self.threat.eps, L, slack=1e-6) / L

    def _check_state(self, state: dict[str, torch.Tensor]) -> None:
        super()._check_state(state)
        if state["delta"].ndim != 3:
            raise MedadvError(f"a uap delta is C×H×W; the saved one has shape {tuple(state['delta'].shape)}.",
                              "load a state saved by UniversalPerturbation.state().")
