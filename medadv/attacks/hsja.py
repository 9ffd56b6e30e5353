"""HopSkipJump (Chen et al. 2020): a label-only attack that walks along the decision boundary.

From an adversarial start it alternates a binary search to the boundary, a gradient-direction estimate
from the signs of label flips around the boundary point (``init_evals``·sqrt(t) queries at iteration t,
capped at ``max_evals``) and a geometric step-size search, as in the authors' reference code (theta,
delta and step sizes included). L-inf and L2.

HSJA minimizes the perturbation; medadv's threat model bounds it by eps. An image counts as done once a
point it reached (its start, each accepted step, the best boundary point), projected into the eps-ball
(and the mask) and rounded onto the storage grid, is adversarial by a label query (one query per try);
that query settles it, so the stored image is exactly the one judged. An image that never gets there is
returned clean. One query per image is held back for the final try of the best boundary point.

Initialization tries, in order: the nearest image of the batch that the victim already puts in the
wanted class (blended inside the mask), uniform noise of growing size around the image, then uniform
random images (the reference's init); one label query each, ``init_tries`` at most.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from medadv.attacks._query import QueryBudget, check_budget
from medadv.attacks.base import Attack, AttackResult, LabelOracle
from medadv.attacks.geometry import L2_BALL
from medadv.attacks.registry import Access, per_query, register
from medadv.errors import MedadvError

_HALVINGS = 30  # step-size search: at most this many halvings before the point stays where it is
_CHUNK = 1 << 24  # gradient-estimate probes held in memory at once (elements)


@register("hsja", kind=Access.LABEL, title="HopSkipJump", battery=True, cost=per_query(1000))
class HopSkipJump(Attack):
    """Label-only HopSkipJump. ``max_queries`` per image (the clean image's query included);
    ``init_evals``/``max_evals``: probes per gradient estimate at the first iteration / at most;
    ``gamma``: the reference's binary-search precision knob (theta = gamma/d^1.5 for L2, gamma/d² for
    L-inf, d = pixels that may change); ``init_tries``: label queries spent finding a start."""

    name = "hsja"
    access = "label"

    def __init__(self, threat, seed: int = 0, *, max_queries: int = 1000, init_evals: int = 100,
                 max_evals: int = 10000, gamma: float = 1.0, init_tries: int = 100) -> None:
        if init_evals < 1 or max_evals < init_evals:
            raise MedadvError(f"need 1 <= init_evals <= max_evals; got {init_evals}, {max_evals}.",
                              "pass e.g. init_evals=100, max_evals=10000.")
        if not gamma > 0 or init_tries < 1:
            raise MedadvError(f"gamma must be > 0 and init_tries >= 1; got {gamma}, {init_tries}.",
                              "pass e.g. gamma=1.0, init_tries=100.")
        check_budget(max_queries, 3, "HopSkipJump")
        super().__init__(threat, seed)
        self.max_queries, self.init_evals, self.max_evals = max_queries, init_evals, max_evals
        self.gamma, self.init_tries = gamma, init_tries

    @classmethod
    def describe(cls, threat: dict[str, Any], params: dict[str, Any]) -> list[str]:
        q = params.get("max_queries")
        return [f"{q} queries" if q else "1000 queries"]

    def run(self, oracle: LabelOracle, x: torch.Tensor, y: torch.Tensor,
            generator: torch.Generator) -> AttackResult:
        threat, n, dev = self.threat, len(x), x.device
        geo = threat.geometry
        mask = threat.mask_for(x)
        mask = torch.ones_like(x) if mask is None else mask
        d = mask.flatten(1).sum(1).clamp_min(1)
        theta = self.gamma / (d * geo.dual_of_ones(d))  # the reference's gamma/d² (L-inf), gamma/d^1.5 (L2)
        budget = QueryBudget(oracle, n, self.max_queries, dev)
        shape = (-1,) + (1,) * (x.ndim - 1)

        def adversarial(xq: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return threat.succeeded(budget(xq, idx), y[idx])

        def spare(idx: torch.Tensor) -> torch.Tensor:  # queries left to spend, the final check held back
            return budget.left(idx) - 1

        def dist(p: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return geo.distance(p - x[idx])

        def boundary(p: torch.Tensor, idx: torch.Tensor, blend: bool = False) -> torch.Tensor:
            """Binary search from adversarial p toward x; returns points on the adversarial side. The line is
            the norm's (a shrinking box for L-inf, the blend for L2), or the blend when ``blend``."""
            line = L2_BALL if blend else geo
            hi = line.span(p, x[idx])
            lo = torch.zeros_like(hi)
            thr = torch.full_like(hi, 1e-3) if blend else torch.minimum(hi * theta[idx], theta[idx])
            while True:
                act = ((hi - lo) > thr) & (spare(idx) > 0)
                if not bool(act.any()):
                    break
                a = act.nonzero()[:, 0]
                mid = (hi[a] + lo[a]) / 2
                ok = adversarial(line.toward(p[a], x[idx[a]], mid), idx[a])
                hi[a] = torch.where(ok, mid, hi[a])
                lo[a] = torch.where(ok, lo[a], mid)
            return line.toward(p, x[idx], hi)

        x_out = x.clone()
        everyone = torch.arange(n, device=dev)
        clean_label = budget(x, everyone)
        done = threat.succeeded(clean_label, y)
        p, found = self._initialize(x, mask, y, clean_label, everyone[~done], adversarial, spare, generator)
        idx = everyone[found]
        if len(idx) == 0:
            return AttackResult(x_out, budget.used, {"started": 0})
        done_inner = torch.zeros(n, dtype=torch.bool, device=dev)

        def settle(points: torch.Tensor, ids: torch.Tensor, reserve: int = 1) -> None:
            """Project points into the ball, round them onto the grid, and keep those still adversarial."""
            ok_budget = budget.left(ids) > reserve
            points, ids = points[ok_budget], ids[ok_budget]
            if len(ids) == 0:
                return
            stored = threat.to_grid(threat.project(points, x[ids], mask[ids]), x[ids])
            ok = adversarial(stored, ids)
            x_out[ids[ok]] = stored[ok]
            done_inner[ids[ok]] = True

        # A point deeper inside the adversarial side often survives projection where the boundary point
        # does not, so each start and each accepted step is tried projected (one query each) as well.
        settle(p[idx], idx)
        idx = idx[~done_inner[idx]]
        cur = x.clone()
        best = x.clone()
        best_d = torch.full((n,), float("inf"), device=dev, dtype=x.dtype)
        if len(idx):
            cur[idx] = boundary(boundary(p[idx], idx, blend=True), idx)
            best[idx] = cur[idx]
            best_d[idx] = dist(cur[idx], idx)
            near = idx[best_d[idx] <= threat.radius + 1e-6]
            settle(best[near], near, reserve=0)
            idx = idx[~done_inner[idx]]
        dist_post = best_d.clone()
        for it in range(10 ** 9):
            idx = idx[spare(idx) > 0]
            if len(idx) == 0:
                break
            # gradient-direction estimate at the boundary point
            delta = (torch.full((len(idx),), 0.1, device=dev, dtype=x.dtype) if it == 0
                     else geo.dual_of_ones(d[idx]) * theta[idx] * dist_post[idx])
            evals = min(int(self.init_evals * math.sqrt(it + 1)), self.max_evals)
            update = self._direction(cur, idx, mask, delta, torch.clamp(spare(idx), max=evals), adversarial,
                                     generator)
            update = geo.normalize(update)  # the reference's sign step for L-inf (the L2 estimate is unit already)
            # geometric step-size search: the largest dist/sqrt(t)·2^-k step that stays adversarial
            step = dist(cur[idx], idx) / math.sqrt(it + 1)
            moved = torch.zeros(len(idx), dtype=torch.bool, device=dev)
            cand = cur[idx].clone()
            for _ in range(_HALVINGS):
                act = ~moved & (spare(idx) > 0)
                if not bool(act.any()):
                    break
                a = act.nonzero()[:, 0]
                trial = (cur[idx[a]] + step[a].view(shape) * update[a]).clamp(0.0, 1.0)
                ok = adversarial(trial, idx[a])
                cand[a[ok]] = trial[ok]
                moved[a[ok]] = True
                step[a[~ok]] /= 2
            m = idx[moved]
            settle(cand[moved], m)
            cand, m = cand[moved][~done_inner[m]], m[~done_inner[m]]
            if len(m):
                cur[m] = boundary(cand, m)
                dist_post[m] = dist(cur[m], m)
                closer = dist_post[m] < best_d[m]
                best[m[closer]] = cur[m[closer]]
                best_d[m[closer]] = dist_post[m[closer]]
                near = m[closer & (dist_post[m] <= threat.radius + 1e-6)]
                settle(best[near], near, reserve=0)
            idx = idx[~done_inner[idx]]
        rest = everyone[found & ~done_inner]
        rest = rest[best_d[rest] > threat.radius + 1e-6]  # points inside the ball were checked when found
        settle(best[rest], rest, reserve=0)  # the query held back
        return AttackResult(x_out, budget.used, {"started": int(found.sum())})

    def _initialize(self, x, mask, y, clean_label, idx, adversarial, spare, generator):
        """An adversarial starting point per image (``found`` says which got one)."""
        n, dev = len(x), x.device
        p = x.clone()
        found = torch.zeros(n, dtype=torch.bool, device=dev)
        if len(idx) == 0:
            return p, found
        flat = x.flatten(1)
        far = torch.cdist(flat[idx], flat)  # nearest image whose decision would already be a success for this one
        usable = self.threat.succeeded(clean_label[None, :], y[idx][:, None])  # [i, j]: image j's decision for image i
        far = far.masked_fill(~usable, float("inf"))
        near = torch.full((n,), -1, dtype=torch.long, device=dev)
        near[idx] = torch.where(torch.isfinite(far.amin(1)), far.argmin(1), -1)
        scale = self.threat.geometry.per_pixel(self.threat.radius, x[0].numel())
        for t in range(self.init_tries):
            idx = idx[spare(idx) > 0]
            if len(idx) == 0:
                break
            x0, m0 = x[idx], mask[idx]
            u = torch.rand(x0.shape, generator=generator, device=dev, dtype=x.dtype)
            s = scale * 2 ** t
            trial = (x0 + m0 * s * (2 * u - 1)).clamp(0, 1) if s < 1 else x0 + m0 * (u - x0)
            if t == 0:
                j = near[idx]
                trial = torch.where((j >= 0).view(-1, 1, 1, 1), x0 + m0 * (x[j.clamp_min(0)] - x0), trial)
            ok = adversarial(trial, idx)
            p[idx[ok]] = trial[ok]
            found[idx[ok]] = True
            idx = idx[~ok]
        return p, found

    def _direction(self, cur, idx, mask, delta, evals, adversarial, generator):
        """Unit-L2 estimate of the direction into the adversarial side at each point cur[idx], from
        ``evals[i]`` label queries around it (the reference's baseline-subtracted sign average)."""
        out = torch.empty_like(cur[idx])
        per = cur[0].numel()
        k = int(evals.max())
        chunk = max(1, _CHUNK // max(1, k * per))
        for c0 in range(0, len(idx), chunk):
            sl = slice(c0, c0 + chunk)
            ids, p, m, dl, e = idx[sl], cur[idx[sl]], mask[idx[sl]], delta[sl], evals[sl]
            tail = (1,) * (p.ndim - 1)  # broadcasts a per-image or per-probe scalar over C×H×W
            shape = (len(ids), k, *p.shape[1:])
            rv = self.threat.geometry.noise(shape, generator, p.device, p.dtype)
            rv = rv * m[:, None]
            rv = rv / rv.flatten(2).norm(dim=2).clamp_min(1e-12).view(len(ids), k, *tail)
            probes = (p[:, None] + dl.view(-1, 1, *tail) * rv).clamp(0.0, 1.0)
            rv = (probes - p[:, None]) / dl.view(-1, 1, *tail)
            valid = torch.arange(k, device=p.device)[None, :] < e[:, None]  # each image's own budget
            owner = ids[:, None].expand(-1, k)[valid]
            f = torch.zeros(len(ids), k, device=p.device, dtype=p.dtype)
            f[valid] = adversarial(probes[valid], owner).to(p.dtype) * 2 - 1
            count = e.clamp_min(1).to(p.dtype)
            mean = f.sum(1) / count
            # all probes on one side: the reference falls back to the mean probe direction
            centred = torch.where((mean.abs() == 1)[:, None], mean[:, None].expand_as(f), f - mean[:, None])
            centred = centred * valid
            grad = (centred.view(*centred.shape, *tail) * rv).sum(1) / count.view(-1, *tail)
            out[sl] = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *tail)
        return out
