"""NES (Ilyas et al. 2018): PGD on a gradient estimated from probabilities alone.

The gradient of the margin loss is estimated with antithetic Gaussian finite differences
(``samples`` queries per estimate, ``sigma`` in [0, 1] pixel units) and fed to the same projected
ascent loop as PGD (:func:`medadv.attacks.gradient.ascend`), L-inf or L2 by the threat model's norm.
Each step costs ``samples`` + 1 queries (the estimate, then a success check of the stored image);
an image stops at its first success.
"""

from __future__ import annotations

from typing import Any

import torch

from medadv.attacks._query import QueryBudget, check_budget, margin, score_success, wanted_class
from medadv.attacks.base import Attack, AttackResult, ProbabilityOracle
from medadv.attacks.registry import Access, per_query, register
from medadv.attacks.gradient import ascend
from medadv.errors import MedadvError


@register("nes", kind=Access.SCORE, title="NES", cost=per_query(1000))
class NES(Attack):
    """Score-based NES. ``samples`` (even) antithetic samples per gradient estimate; as many steps of
    ``threat.alpha`` as fit in ``max_queries`` per image (the first query scores the clean image);
    ``threshold`` is the victim's operating point on P(disease)."""

    name = "nes"
    access = "score"

    def __init__(self, threat, seed: int = 0, *, max_queries: int = 1000, samples: int = 20, sigma: float = 0.001,
                 threshold: float | tuple[float, ...] = 0.5) -> None:
        if samples < 2 or samples % 2:
            raise MedadvError(f"NES needs an even number of samples >= 2; got {samples}.", "pass e.g. samples=20.")
        if not sigma > 0:
            raise MedadvError(f"NES sigma must be > 0; got {sigma}.", "pass e.g. sigma=0.001 (in [0, 1] units).")
        check_budget(max_queries, samples + 2, "NES")
        super().__init__(threat, seed)
        self.max_queries, self.samples, self.sigma, self.threshold = max_queries, samples, sigma, threshold

    @classmethod
    def describe(cls, threat: dict[str, Any], params: dict[str, Any]) -> list[str]:
        q = params.get("max_queries")
        return [f"{q} queries" if q else "1000 queries"]

    def run(self, oracle: ProbabilityOracle, x: torch.Tensor, y: torch.Tensor,
            generator: torch.Generator) -> AttackResult:
        threat, n = self.threat, len(x)
        budget = QueryBudget(oracle, n, self.max_queries, x.device)
        want = wanted_class(threat, y)
        done = score_success(budget(x, torch.arange(n, device=x.device)), y, threat, self.threshold)
        todo = (~done).nonzero()[:, 0]
        x_adv = x.clone()
        if len(todo) == 0:
            return AttackResult(x_adv, budget.used)

        mask = threat.mask_for(x)
        sub = threat.with_(mask=None if mask is None else mask[todo])  # ascend sees only the images left
        x0, m0 = x[todo], None if mask is None else mask[todo]
        # ascend passes the gradient only the active images; stop() tells us which those are
        active = torch.arange(len(todo), device=x.device)
        half = self.samples // 2

        def gradient(xa: torch.Tensor, _goal: torch.Tensor) -> torch.Tensor:
            k = len(xa)
            u = torch.randn((k, half, *xa.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
            if m0 is not None:  # noise outside the mask only adds variance: those pixels never move
                u = u * m0[active][:, None]
            u = torch.cat([u, -u], dim=1)  # antithetic pairs halve the estimate's variance
            # queries stay valid images: clipping to [0, 1] biases pixels at 0/1 a little, never the sign
            probes = (xa[:, None] + self.sigma * u).clamp(0.0, 1.0).flatten(0, 1)
            owner = todo[active].repeat_interleave(self.samples)
            loss = -margin(budget(probes, owner), want[owner], self.threshold, not threat.targeted, threat).view(k, self.samples)
            return (loss.view(k, self.samples, *([1] * (xa.ndim - 1))) * u).mean(1) / self.sigma

        def stop(xa: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            nonlocal active
            stored = threat.to_grid(xa, x0[index])  # judge the image the caller will get, rounded
            ok = score_success(budget(stored, todo[index]), y[todo[index]], threat, self.threshold)
            active = index[~ok]
            return ok

        steps = (self.max_queries - 1) // (self.samples + 1)
        out, _ = ascend(x0, want[todo], gradient, sub, generator, steps=steps, stop=stop)
        x_adv[todo] = out
        return AttackResult(x_adv, budget.used, {"steps": steps})
