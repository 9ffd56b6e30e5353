"""Square attack (Andriushchenko et al. 2020), L-inf: random search over square patches at the corners of
the eps-ball, accepting a change only if it lowers the margin loss.

Every candidate lies at x ± radius (clipped to [0, 1]) on each pixel it touches; with x on the storage
grid and radius a whole number of levels (``ThreatModel.radius``), every image queried is one the grid
can store, so the returned image is exactly the one judged. Query accounting per image: 1 for the clean
image, 1 for the stripe initialization, then 1 per iteration until success.
"""

from __future__ import annotations

import math

import torch

from medadv.attacks._query import QueryBudget, check_budget, margin, score_success, wanted_class
from medadv.attacks.base import Attack, AttackResult, ProbabilityOracle
from medadv.errors import MedadvError

# The paper's schedule (its reference code): p is halved past each of these iterations of 10,000.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_RESAMPLES = 16  # tries to draw a square that changes the image (the paper's while-loop, bounded)


def p_schedule(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of the image the square covers at iteration ``it`` of ``n_iters`` (the schedule is the
    paper's for 10,000 iterations, rescaled to the budget)."""
    i = int(it / n_iters * 10000)
    return p_init / 2 ** sum(i > t for t in _HALVINGS)


class Square(Attack):
    """Score-based Square attack under an L-inf budget. ``p_init``: initial fraction of the image a square
    covers; ``threshold``: the victim's operating point on P(disease)."""

    name = "square"
    access = "score"

    def __init__(self, threat, seed: int = 0, *, max_queries: int = 1000, p_init: float = 0.1,
                 threshold: float = 0.5) -> None:
        if threat.norm != "linf":
            raise MedadvError("medadv's Square attack is L-inf only (the L2 variant is not implemented).",
                              "use --norm linf, or nes / hsja for an L2 budget.")
        if not 0 < p_init <= 1:
            raise MedadvError(f"p_init must be in (0, 1]; got {p_init}.", "pass e.g. p_init=0.1.")
        check_budget(max_queries, 2, "Square")
        super().__init__(threat, seed)
        self.max_queries, self.p_init, self.threshold = max_queries, p_init, threshold

    def run(self, oracle: ProbabilityOracle, x: torch.Tensor, y: torch.Tensor,
            generator: torch.Generator) -> AttackResult:
        threat, (n, c, h, w), dev = self.threat, x.shape, x.device
        eps = threat.radius
        mask = threat.mask_for(x)
        mask = torch.ones_like(x) if mask is None else mask
        budget = QueryBudget(oracle, n, self.max_queries, dev)
        want = wanted_class(threat, y)

        def loss_and_success(xq: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            probs = budget(xq, idx)
            return margin(probs, want[idx], self.threshold), score_success(probs, y[idx], threat, self.threshold)

        all_idx = torch.arange(n, device=dev)
        _, done = loss_and_success(x, all_idx)
        x_best = x.clone()
        idx = all_idx[~done]
        if len(idx) == 0:
            return AttackResult(x_best, budget.used)

        # vertical stripes: one random sign per channel and column (the paper's L-inf init)
        signs = torch.randint(0, 2, (len(idx), c, 1, w), generator=generator, device=dev).to(x.dtype) * 2 - 1
        x_best[idx] = (x[idx] + eps * signs * mask[idx]).clamp(0.0, 1.0)
        loss = torch.full((n,), float("inf"), device=dev)
        loss[idx], ok = loss_and_success(x_best[idx], idx)
        idx = idx[~ok]

        n_iters = self.max_queries - 2
        for it in range(n_iters):
            if len(idx) == 0:
                break
            k = len(idx)
            p = p_schedule(self.p_init, it, n_iters)
            s = min(max(int(round(math.sqrt(p * h * w))), 1), h - 1, w - 1) if min(h, w) > 1 else 1
            xi, xb, mi = x[idx], x_best[idx], mask[idx]
            cand = xb.clone()
            redo = torch.ones(k, dtype=torch.bool, device=dev)
            for _ in range(_RESAMPLES):
                r = redo.nonzero()[:, 0]
                top = torch.randint(0, h - s + 1, (len(r),), generator=generator, device=dev)
                left = torch.randint(0, w - s + 1, (len(r),), generator=generator, device=dev)
                new_sign = torch.randint(0, 2, (len(r), c, 1, 1), generator=generator, device=dev).to(x.dtype) * 2 - 1
                window = _window(len(r), h, w, top, left, s, dev)  # r×1×H×W, True inside the square
                proposal = torch.where(window, (xi[r] + eps * new_sign * mi[r]).clamp(0.0, 1.0), xb[r])
                cand[r] = proposal
                redo[r] = (proposal == xb[r]).flatten(1).all(1)  # resample squares that change nothing
                if not bool(redo.any()):
                    break
            new_loss, ok = loss_and_success(cand, idx)
            better = new_loss < loss[idx]
            x_best[idx[better]] = cand[better]
            loss[idx[better]] = new_loss[better]
            idx = idx[~(ok & better) & (budget.left(idx) > 0)]
        return AttackResult(x_best, budget.used)


def _window(k: int, h: int, w: int, top: torch.Tensor, left: torch.Tensor, s: int,
            device: torch.device) -> torch.Tensor:
    rows = torch.arange(h, device=device)[None, :, None]
    cols = torch.arange(w, device=device)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < top[:, None, None] + s)
              & (cols >= left[:, None, None]) & (cols < left[:, None, None] + s))
    return inside[:, None]
