"""APGD and AutoAttack (Croce & Hein 2020), made to work on binary medical models.

APGD is PGD without a step-size to tune: momentum 0.75, a step of 2·eps halved at checkpoints (at 0%,
22%, ... of the budget) where the loss rose in fewer than 75% of the steps since the last one, or where
neither the step nor the best loss changed; a halving restarts from the best point so far. Losses
(maximized): ``ce`` (cross-entropy; targeted: minus the target's) and ``margin``: for two classes the
logit margin toward the wanted class at the victim's operating threshold (log-odds minus
logit(threshold)), which is defined where the DLR loss is not (it needs three classes; auto-attack issue
70); for K >= 3 classes the DLR loss (targeted DLR for K >= 4).

AutoAttack (``autoattack``): APGD-CE, then APGD-margin (targeted at each of the top other classes: for a
binary model, the one other class), then Square (score-based, 5,000 queries; ``version="fast"``: fewer
steps and 1,000 queries), each on the images the previous ones left unbroken, judged per image on the
stored image at the victim's decision rule: the worst case over the ensemble. Flags: ``randomness``
(two forward passes disagree: the victim is stochastic, robust accuracy is optimistic), ``zero_gradients``
(images whose input gradient is exactly zero: gradient masking), ``square_stronger`` (images only the
black-box Square broke: the white-box attacks are being fooled). They are on ``attack.flags``
(accumulated over batches) and in each result's ``info``. FAB-T is not included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from medadv.attacks.base import Attack, AttackResult, ProbabilityOracle, check_logits, operating_point
from medadv.attacks.gradient import CLASSIFICATION, frozen
from medadv.attacks.pgd import check_schedule
from medadv.attacks.registry import Access, per_query, register
from medadv.attacks.square import Square
from medadv.attacks.threat_model import ThreatModel
from medadv.errors import MedadvError

LOSSES = ("ce", "margin")
MOMENTUM, RHO = 0.75, 0.75
VERSIONS = {"standard": {"steps": 100, "max_queries": 5000, "targets": 9},
            "fast": {"steps": 25, "max_queries": 1000, "targets": 3}}


def checkpoints(steps: int) -> list[int]:
    """APGD's checkpoints in iterations, in whole steps: the first after 22% of the budget, then intervals
    shrinking by 3% of it down to 6% (p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06))."""
    first, shrink, least = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at, gap = [], 0, first
    while at + gap <= steps:
        at += gap
        out.append(at)
        gap = max(gap - shrink, least)
    return out


def decide(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """A classifier's decisions: P(disease) >= threshold for two classes, argmax for more (the task kind's
    :meth:`~medadv.kinds.TaskKind.decide`; the attack itself asks its threat model's kind)."""
    return CLASSIFICATION.decide(logits, threshold)


def per_image_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, loss: str,
                   threshold: float = 0.5) -> torch.Tensor:
    """A classifier's per-image objective APGD ascends (:meth:`~medadv.kinds.TaskKind.per_image_loss`).
    ``target`` None: untargeted (away from y)."""
    return CLASSIFICATION.per_image_loss(logits, y, target, loss, threshold)


# price: steps per restart (an upper bound: restarts run only on the images still unbroken)
@register("apgd", kind=Access.WHITE_BOX, title="APGD",
          cost=lambda threat, p: float(p.get("steps") or 100) * (p.get("restarts") or 1))
class APGD(Attack):
    """Auto-PGD, L-inf or L2. ``loss``: ce or margin (two classes: logit margin at the threshold; K >= 3:
    DLR). ``steps``: iterations per restart (default 100); ``restarts``: random restarts for the images
    still unbroken; ``targets``: margin loss on an untargeted threat, the number of other classes to
    target in turn (top logits first; binary: 1). Success is judged at the model's operating threshold."""

    name = "apgd"
    access = "white-box"

    def __init__(self, threat: ThreatModel, seed: int = 0, *, loss: str = "ce", steps: int = 100,
                 restarts: int = 1, targets: int = 9) -> None:
        if loss not in LOSSES:
            raise MedadvError(f"unknown APGD loss '{loss}'.", f"use {' or '.join(LOSSES)}.")
        check_schedule("APGD", steps, None, restarts)
        check_schedule("APGD", targets, None, None)
        super().__init__(threat, seed)
        self.loss, self.steps, self.restarts, self.targets = loss, steps, restarts, targets
        self.zero_gradients = 0

    @classmethod
    def describe(cls, threat: dict[str, Any], params: dict[str, Any]) -> list[str]:
        return [f"{params.get('loss', 'ce')} loss", f"{params.get('steps', 100)} steps"]

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> AttackResult:
        with frozen(model):
            x_adv, ok = self.attack(model, x, y, generator)
        return AttackResult(x_adv.detach(), info={"success": ok, "zero_gradients": self.zero_gradients})

    # the loop, usable by AutoAttack on a subset ---------------------------------------------------------

    def attack(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Adversarial images (continuous, inside the ball) and which of them succeed once stored."""
        threat, thr = self.threat, operating_point(model)
        with torch.no_grad():
            clean_logits = check_logits(model(x), len(x), None, spatial=threat.task_kind.spatial)
        if clean_logits.shape[1] != threat.classes and not threat.task_kind.spatial:
            threat = self.threat = threat.with_(classes=clean_logits.shape[1])  # targets mean K-class goals
        mask_full = threat.mask_for(x)
        x_out = x.clone()
        ok = threat.succeeded(threat.decide(clean_logits, thr), y)
        for target in self._target_plan(clean_logits, y):
            for _ in range(self.restarts):
                todo = (~ok).nonzero()[:, 0]
                if len(todo) == 0:
                    return x_out, ok
                sub = threat.with_(mask=None if mask_full is None else mask_full[todo])
                t = None if target is None else target[todo]
                cand = self._ascend(model, x[todo], y[todo], t, sub, generator, thr)
                stored = sub.to_grid(cand, x[todo])
                with torch.no_grad():
                    hit = threat.succeeded(threat.decide(model(stored), thr), y[todo])
                x_out[todo] = cand
                ok[todo] = hit
        return x_out, ok

    def _target_plan(self, clean_logits: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
        """Per pass, the class each image's loss is targeted at (None: untargeted)."""
        threat = self.threat
        if threat.targeted:
            return [threat.goal(y)]
        if self.loss == "ce":
            return [None]
        return threat.task_kind.margin_targets(clean_logits, y, self.targets)

    def _ascend(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
                threat: ThreatModel, generator: torch.Generator, thr) -> torch.Tensor:
        """Per image (N×C×H×W in, same out): its first adversarial iterate, else its point of highest loss.

        An image leaves the batch at its first iterate that is adversarial *once stored* (rounded to the
        data's grid), which is what it returns: the first iterate across the boundary usually lies just
        across it, and rounding to 8 bits undoes half a level per pixel, so judging the continuous iterate
        returned points that failed once written (AutoAttack then lost to PGD-40, which keeps stepping).
        Every per-image quantity (loss, step size, checkpoint test) is its own, so the images left follow
        the same path as in the whole batch and no forward or backward pass is spent on a finished image.
        """
        geo, eps, n = threat.geometry, threat.radius, len(x)
        mask = threat.mask_for(x)
        shape = (-1,) + (1,) * (x.ndim - 1)
        x_out = x.clone()
        idx = torch.arange(n, device=x.device)  # the active images, as indices into x
        goal = target

        def loss_grad(xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            xa = xa.detach().requires_grad_(True)
            logits = check_logits(model(xa), len(xa), None, spatial=threat.task_kind.spatial)
            loss = threat.task_kind.per_image_loss(logits, y, goal, self.loss, thr)
            (grad,) = torch.autograd.grad(loss.sum(), xa)
            if mask is not None:
                grad = grad * mask
            adv = threat.succeeded(threat.decide(logits.detach(), thr), y)
            if bool(adv.any()):  # confirm on the stored image (one forward on those few images)
                with torch.no_grad():
                    stored = threat.to_grid(xa.detach()[adv], x[adv])
                    adv[adv.clone()] = threat.succeeded(threat.decide(model(stored), thr), y[adv])
            return loss.detach(), grad, adv

        delta = geo.random_start(x, eps, generator)
        x_cur = threat.project(x + (delta if mask is None else delta * mask), x, mask)
        loss, grad, adv = loss_grad(x_cur)
        self.zero_gradients += int((grad.flatten(1).abs().amax(1) == 0).sum())
        x_prev = x_cur.clone()
        best_loss, x_best, g_best = loss.clone(), x_cur.clone(), grad.clone()
        eta = torch.full((n,), 2 * eps, device=x.device, dtype=x.dtype)
        rises = torch.zeros(n, device=x.device)
        halved_at_mark = torch.zeros(n, dtype=torch.bool, device=x.device)
        best_at_mark = best_loss.clone()
        marks, last_mark = set(checkpoints(self.steps)), 0
        for it in range(self.steps + 1):
            if bool(adv.any()):  # keep the first adversarial iterates, then drop those images
                x_out[idx[adv]] = x_cur[adv]
                keep = ~adv
                idx, x, y, x_cur, x_prev, grad, loss, best_loss, x_best, g_best, eta, rises, halved_at_mark, \
                    best_at_mark = (t[keep] for t in (idx, x, y, x_cur, x_prev, grad, loss, best_loss, x_best,
                                                      g_best, eta, rises, halved_at_mark, best_at_mark))
                goal = None if goal is None else goal[keep]
                mask = None if mask is None else mask[keep]
                if len(idx) == 0:
                    return x_out
            if it == self.steps:
                break
            z = threat.project(x_cur + eta.view(shape) * geo.normalize(grad), x, mask)
            a = 1.0 if it == 0 else MOMENTUM
            x_next = threat.project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x, mask)
            new_loss, new_grad, adv = loss_grad(x_next)
            rises += (new_loss > loss).float()
            better = new_loss > best_loss
            best_loss = torch.where(better, new_loss, best_loss)
            x_best[better], g_best[better] = x_next[better], new_grad[better]
            x_prev, x_cur, loss, grad = x_cur, x_next, new_loss, new_grad
            if it + 1 in marks:
                span = it + 1 - last_mark
                # too few rises since the last checkpoint, or neither a halving there nor any progress since
                halve = (rises < RHO * span) | (~halved_at_mark & (best_loss <= best_at_mark))
                eta = torch.where(halve, eta / 2, eta)
                # an adversarial iterate is kept as is: a halving does not move an image that leaves now
                halve = halve & ~adv
                x_cur = torch.where(halve.view(shape), x_best, x_cur)
                grad = torch.where(halve.view(shape), g_best, grad)
                loss = torch.where(halve, best_loss, loss)
                last_mark, rises = it + 1, torch.zeros_like(rises)
                halved_at_mark, best_at_mark = halve, best_loss.clone()
        # images never adversarial: their point of highest loss (the loss need not peak at an adversarial
        # point: CE ignores the operating threshold)
        x_out[idx] = x_best
        return x_out


# price: APGD-CE and one APGD-T target (two classes) plus Square's queries; an upper bound (each runs on
# the images the previous ones left unbroken)
@register("autoattack", kind=Access.WHITE_BOX, title="AutoAttack", cost=lambda threat, p: (
    2 * float(p.get("steps") or VERSIONS[p.get("version") or "standard"]["steps"]) * (p.get("restarts") or 1)
    + per_query(VERSIONS[p.get("version") or "standard"]["max_queries"])(threat, p)))
class AutoAttack(Attack):
    """APGD-CE, APGD-margin (targeted) and Square, worst case per image. ``version``: standard (100 steps,
    5,000 Square queries, 9 target classes) or fast (25 steps, 1,000 queries, 3 targets); ``steps`` and
    ``max_queries`` override the version's; Square's margin is the task kind's (binary: log-odds at the
    threshold; K classes: log-probability against the best other class). ``flags`` accumulates the checks
    over batches."""

    name = "autoattack"
    access = "white-box"

    def __init__(self, threat: ThreatModel, seed: int = 0, *, version: str = "standard", steps: int | None = None,
                 max_queries: int | None = None, restarts: int = 1) -> None:
        if version not in VERSIONS:
            raise MedadvError(f"unknown AutoAttack version '{version}'.", f"use {' or '.join(VERSIONS)}.")
        v = VERSIONS[version]
        self.version = version
        self.steps = v["steps"] if steps is None else steps
        self.max_queries = v["max_queries"] if max_queries is None else max_queries
        check_schedule("AutoAttack", self.steps, None, restarts)
        if not isinstance(self.max_queries, int) or self.max_queries < 2:
            raise MedadvError(f"AutoAttack's Square needs max_queries >= 2; got {self.max_queries}.",
                              "pass --max-queries 2 or more (5000 is the standard).")
        self.restarts, self.targets = restarts, v["targets"]
        super().__init__(threat, seed)
        self.flags: dict[str, Any] = {"randomness": False, "zero_gradients": 0, "square_stronger": 0,
                                      "broken_by": {"apgd-ce": 0, "apgd-margin": 0, "square": 0}}

    @classmethod
    def describe(cls, threat: dict[str, Any], params: dict[str, Any]) -> list[str]:
        version = params.get("version", "standard")
        q = params.get("max_queries") or VERSIONS.get(version, VERSIONS["standard"])["max_queries"]
        return [f"{version}: APGD-CE + APGD-margin + Square {q} queries"]

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> AttackResult:
        threat, thr = self.threat, operating_point(model)
        flags = {"randomness": False, "zero_gradients": 0, "square_stronger": 0,
                 "broken_by": {"apgd-ce": 0, "apgd-margin": 0, "square": 0}}
        queries = None
        with frozen(model):
            with torch.no_grad():
                a, b = model(x), model(x)
                logits = check_logits(a, len(x), None)
            flags["randomness"] = not torch.allclose(a, b, rtol=1e-5, atol=1e-6)
            if logits.shape[1] != threat.classes:  # targets and Square's margin mean K-class goals
                threat = self.threat = threat.with_(classes=logits.shape[1])
            x_out = x.clone()
            ok = threat.succeeded(threat.decide(logits, thr), y)
            for stage, loss in (("apgd-ce", "ce"), ("apgd-margin", "margin")):
                todo = (~ok).nonzero()[:, 0]
                if len(todo) == 0:
                    break
                apgd = APGD(self._sub(x, todo), self.seed, loss=loss, steps=self.steps, restarts=self.restarts,
                            targets=self.targets)
                cand, hit = apgd.attack(model, x[todo], y[todo], generator)
                flags["zero_gradients"] = max(flags["zero_gradients"], apgd.zero_gradients)
                # keep the first attack's point for images nobody breaks; later ones replace it only on success
                keep = hit | torch.full_like(hit, stage == "apgd-ce")
                x_out[todo[keep]] = cand[keep]
                ok[todo] = hit
                flags["broken_by"][stage] = int(hit.sum())
            todo = (~ok).nonzero()[:, 0]
            if len(todo):
                sub = self._sub(x, todo)
                square = Square(sub, self.seed, max_queries=self.max_queries, threshold=thr)
                oracle = ProbabilityOracle.from_model(model)
                result = square(oracle, x[todo], y[todo])
                queries = torch.zeros(len(x), dtype=torch.long, device=x.device)
                queries[todo] = result.queries
                with torch.no_grad():
                    hit = threat.succeeded(threat.decide(model(result.x_adv), thr), y[todo])
                x_out[todo[hit]] = result.x_adv[hit]
                ok[todo] = hit
                flags["broken_by"]["square"] = flags["square_stronger"] = int(hit.sum())
        self._accumulate(flags)
        return AttackResult(x_out.detach(), queries, {"flags": flags, "success": ok})

    def _sub(self, x: torch.Tensor, todo: torch.Tensor) -> ThreatModel:
        mask = self.threat.mask_for(x)
        return self.threat.with_(mask=None if mask is None else mask[todo])

    def _accumulate(self, flags: dict[str, Any]) -> None:
        self.flags["randomness"] = self.flags["randomness"] or flags["randomness"]
        for key in ("zero_gradients", "square_stronger"):
            self.flags[key] += flags[key]
        for key, v in flags["broken_by"].items():
            self.flags["broken_by"][key] += v
