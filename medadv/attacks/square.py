"""Square attack (Andriushchenko et al. 2020), L-inf and L2: random search over square patches, accepting a
change only if it lowers the margin loss.

Every candidate lies at x ± radius (clipped to [0, 1]) on each pixel it touches; with x on the storage
grid and radius a whole number of levels (``ThreatModel.radius``), every image queried is one the grid
can store, so the returned image is exactly the one judged. Query accounting per image: 1 for the clean
image, 1 for the stripe initialization, then 1 per iteration until success.

L2 (the paper's Algorithm 3): the perturbation is a sum of pseudo-Gaussian squares with norm eps; each
step redraws one window and moves into it the budget of a second window (zeroed) and what the image has
left. Candidates are rounded onto the storage grid (L2 rounding never leaves eps) before they are
queried, so here too the returned image is exactly the one judged. Same query accounting.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from medadv.attacks._query import QueryBudget, check_budget, margin, score_success, wanted_class
from medadv.attacks.base import Attack, AttackResult, ProbabilityOracle
from medadv.attacks.registry import Access, per_query, register
from medadv.errors import MedadvError

# The paper's schedule (its reference code): p is halved past each of these iterations of 10,000.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_RESAMPLES = 16  # tries to draw a square that changes the image (the paper's while-loop, bounded)


def p_schedule(p_init: float, it: int, n_iters: int) -> float:
    """Fraction of the image the square covers at iteration ``it`` of ``n_iters`` (the schedule is the
    paper's for 10,000 iterations, rescaled to the budget)."""
    i = int(it / n_iters * 10000)
    return p_init / 2 ** sum(i > t for t in _HALVINGS)


@register("square", kind=Access.SCORE, title="Square", battery=True, cost=per_query(1000))
class Square(Attack):
    """Score-based Square attack, L-inf or L2 by the threat model's norm. ``p_init``: initial fraction of
    the image a square covers; ``threshold``: the victim's operating point (P(disease); a multi-label reader's per finding)."""

    name = "square"
    access = "score"
    _STRATEGIES = {"linf": ("_init_linf", "_propose_linf"), "l2": ("_init_l2", "_propose_l2")}
    norms = tuple(_STRATEGIES)

    def __init__(self, threat, seed: int = 0, *, max_queries: int = 1000, p_init: float = 0.1,
                 threshold: float | tuple[float, ...] = 0.5) -> None:
        if not 0 < p_init <= 1:
            raise MedadvError(f"p_init must be in (0, 1]; got {p_init}.", "pass e.g. p_init=0.1.")
        check_budget(max_queries, 2, "Square")
        super().__init__(threat, seed)
        self.max_queries, self.p_init, self.threshold = max_queries, p_init, threshold

    @classmethod
    def describe(cls, threat: dict[str, Any], params: dict[str, Any]) -> list[str]:
        return [f"{params.get('max_queries', 1000)} queries"]

    def run(self, oracle: ProbabilityOracle, x: torch.Tensor, y: torch.Tensor,
            generator: torch.Generator) -> AttackResult:
        threat, n, dev = self.threat, len(x), x.device
        init_name, propose_name = self._STRATEGIES[threat.geometry.name]
        init, propose = getattr(self, init_name), getattr(self, propose_name)
        mask = threat.mask_for(x)
        mask = torch.ones_like(x) if mask is None else mask
        budget = QueryBudget(oracle, n, self.max_queries, dev)
        want = wanted_class(threat, y)

        def loss_and_success(xq: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            probs = budget(xq, idx)
            return (margin(probs, want[idx], self.threshold, not threat.targeted, threat),
                    score_success(probs, y[idx], threat, self.threshold))

        all_idx = torch.arange(n, device=dev)
        _, done = loss_and_success(x, all_idx)
        x_best = x.clone()
        idx = all_idx[~done]
        if len(idx) == 0:
            return AttackResult(x_best, budget.used)

        x_best[idx] = init(x[idx], mask[idx], generator)
        loss = torch.full((n,), float("inf"), device=dev)
        loss[idx], ok = loss_and_success(x_best[idx], idx)
        idx = idx[~ok]

        n_iters = self.max_queries - 2
        for it in range(n_iters):
            if len(idx) == 0:
                break
            p = p_schedule(self.p_init, it, n_iters)
            cand = propose(x[idx], x_best[idx], mask[idx], p, generator)
            new_loss, ok = loss_and_success(cand, idx)
            better = new_loss < loss[idx]
            x_best[idx[better]] = cand[better]
            loss[idx[better]] = new_loss[better]
            idx = idx[~(ok & better) & (budget.left(idx) > 0)]
        return AttackResult(x_best, budget.used)

    # -- L-inf: squares at the corners of the ball ---------------------------------------------------

    def _init_linf(self, x: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Vertical stripes: one random sign per channel and column (the paper's L-inf init)."""
        k, c, _, w = x.shape
        signs = torch.randint(0, 2, (k, c, 1, w), generator=generator, device=x.device).to(x.dtype) * 2 - 1
        return (x + self.threat.radius * signs * mask).clamp(0.0, 1.0)

    def _propose_linf(self, xi: torch.Tensor, xb: torch.Tensor, mi: torch.Tensor, p: float,
                      generator: torch.Generator) -> torch.Tensor:
        """One random square per image set to x ± radius (a fresh sign per channel); on the grid."""
        k, c, h, w = xi.shape
        dev, eps = xi.device, self.threat.radius
        s = min(max(int(round(math.sqrt(p * h * w))), 1), h - 1, w - 1) if min(h, w) > 1 else 1
        cand = xb.clone()
        redo = torch.ones(k, dtype=torch.bool, device=dev)
        for _ in range(_RESAMPLES):
            r = redo.nonzero()[:, 0]
            top = torch.randint(0, h - s + 1, (len(r),), generator=generator, device=dev)
            left = torch.randint(0, w - s + 1, (len(r),), generator=generator, device=dev)
            new_sign = torch.randint(0, 2, (len(r), c, 1, 1), generator=generator, device=dev).to(xi.dtype) * 2 - 1
            window = _window(len(r), h, w, top, left, s, dev)  # r×1×H×W, True inside the square
            proposal = torch.where(window, (xi[r] + eps * new_sign * mi[r]).clamp(0.0, 1.0), xb[r])
            cand[r] = proposal
            redo[r] = (proposal == xb[r]).flatten(1).all(1)  # resample squares that change nothing
            if not bool(redo.any()):
                break
        return cand

    # -- L2: pseudo-Gaussian squares that move budget from one window to another ---------------------

    def _init_l2(self, x: torch.Tensor, mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A grid of pseudo-Gaussian squares (side about a fifth of the image) with random signs per image
        and channel, scaled to norm eps inside the mask, then rounded onto the storage grid."""
        k, c, h, w = x.shape
        s = max(min(h, w) // 5, 1)
        delta = torch.zeros_like(x)
        top0, left0 = (h - s * (h // s)) // 2, (w - s * (w // s)) // 2
        for i in range(h // s):
            for j in range(w // s):
                pattern = _pseudo_gaussian(s, generator, x)
                sign = torch.randint(0, 2, (k, c, 1, 1), generator=generator, device=x.device).to(x.dtype) * 2 - 1
                delta[:, :, top0 + i * s:top0 + (i + 1) * s, left0 + j * s:left0 + (j + 1) * s] += pattern * sign
        return self._to_ball_l2(x, delta * mask)

    def _to_ball_l2(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """x + delta rescaled to norm eps, clipped to [0, 1] and rounded onto the grid (within eps)."""
        geo, eps = self.threat.geometry, self.threat.radius
        x_new = (x + geo.normalize(delta) * eps).clamp(0.0, 1.0)
        return self.threat.to_grid(x_new, x)

    def _propose_l2(self, xi: torch.Tensor, xb: torch.Tensor, mi: torch.Tensor, p: float,
                    generator: torch.Generator) -> torch.Tensor:
        """The paper's L2 step (one window pair per iteration, shared by the batch): window 1 gets a fresh
        pseudo-Gaussian square plus its old content, carrying the budget of window 2 (zeroed) and what
        the image has left; the whole delta is then rescaled to norm eps."""
        k, c, h, w = xi.shape
        dev, eps = xi.device, self.threat.radius
        s = max(int(round(math.sqrt(p * h * w))), 3)
        s += 1 - s % 2  # odd
        s = max(min(s, h - 1, w - 1), 1)
        t1, t2 = (int(v) for v in torch.randint(0, h - s + 1, (2,), generator=generator, device=dev))
        l1, l2 = (int(v) for v in torch.randint(0, w - s + 1, (2,), generator=generator, device=dev))
        w1 = (slice(None), slice(None), slice(t1, t1 + s), slice(l1, l1 + s))
        w2 = (slice(None), slice(None), slice(t2, t2 + s), slice(l2, l2 + s))
        delta = xb - xi
        union = torch.zeros((1, 1, h, w), dtype=torch.bool, device=dev)
        union[w1] = True
        union[w2] = True

        def window_norm(t: torch.Tensor) -> torch.Tensor:  # per image and channel
            return t.pow(2).sum((2, 3), keepdim=True).sqrt()

        image_norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        union_norm = window_norm(delta * union)
        sign = torch.randint(0, 2, (k, c, 1, 1), generator=generator, device=dev).to(xi.dtype) * 2 - 1
        new = _pseudo_gaussian(s, generator, xi) * sign + delta[w1] / (1e-10 + window_norm(delta[w1]))
        new = new * mi[w1]
        room = ((eps ** 2 - image_norm ** 2).clamp_min(0) / c + union_norm ** 2).sqrt()
        new = new / window_norm(new).clamp_min(1e-12) * room
        cand = delta.clone()
        cand[w2] = 0.0
        cand[w1] = new
        return self._to_ball_l2(xi, cand)


def _pseudo_gaussian_rectangle(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """Nested centred rectangles with weights 1/(r+1)^2 (a peaked, roughly Gaussian bump), unit L2 norm."""
    out = torch.zeros((rows, cols), dtype=like.dtype, device=like.device)
    r0, c0 = rows // 2, cols // 2
    for r in range(max(r0, c0) + 1):
        out[max(r0 - r, 0):min(r0 + r + 1, rows), max(c0 - r, 0):min(c0 + r + 1, cols)] += 1.0 / (r + 1) ** 2
    return out / out.norm().clamp_min(1e-12)


def _pseudo_gaussian(s: int, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """The L2 Square attack's s×s perturbation: a bump in each half with opposite signs, unit norm,
    transposed with probability 1/2."""
    out = torch.zeros((s, s), dtype=like.dtype, device=like.device)
    half = s // 2
    if half:
        out[:half] = _pseudo_gaussian_rectangle(half, s, like)
    out[half:] = -_pseudo_gaussian_rectangle(s - half, s, like)
    out = out / out.norm().clamp_min(1e-12)
    if bool(torch.rand((), generator=generator, device=like.device) < 0.5):
        out = out.t()
    return out


def _window(k: int, h: int, w: int, top: torch.Tensor, left: torch.Tensor, s: int,
            device: torch.device) -> torch.Tensor:
    rows = torch.arange(h, device=device)[None, :, None]
    cols = torch.arange(w, device=device)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < top[:, None, None] + s)
              & (cols >= left[:, None, None]) & (cols < left[:, None, None] + s))
    return inside[:, None]
