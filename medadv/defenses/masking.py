"""Checks for gradient masking (Carlini et al. 2019, "On evaluating adversarial robustness"; Athalye et al. 2018).

A defense that only hides its gradient looks robust to gradient attacks and is not. Each check below
runs a few cheap attacks on a batch of correctly labelled images and returns pass or warn:

* ``gradients``: the input gradient of the loss is neither zero nor NaN for most images;
* ``unbounded``: untargeted PGD with an L-inf eps of 1 (the whole pixel range) brings accuracy to about
  0% (at most ``unbounded_tolerance``); a model that keeps accuracy there is not being attacked at all;
* ``eps_monotone``: accuracy does not rise as eps grows;
* ``iterations``: more PGD iterations do not leave accuracy higher than fewer;
* ``black_box``: a score-based black-box attack (Square) is not stronger than white-box PGD at the same
  eps (if it is, the gradient is misleading);
* ``randomness``: two passes over the same input give the same logits; if not, the model is randomized
  and gradient attacks need expectation over transformation (EOT), which these checks do not run.

Placement: the architecture sketch files masking checks under ``evaluate``; they live here for now so the
defenses and their checks land together (they use only the attacks, not the evaluate layer), and the
battery can import them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medadv.errors import MedadvError


@dataclass
class Check:
    name: str
    status: str  # pass | warn
    detail: str
    values: dict = field(default_factory=dict)


@dataclass
class MaskingReport:
    checks: list[Check]

    @property
    def flagged(self) -> bool:
        """True when any check warns: the robustness numbers of this model should not be trusted as they are."""
        return any(c.status == "warn" for c in self.checks)

    def to_json(self) -> dict:
        return {"flagged": self.flagged, "checks": [asdict(c) for c in self.checks]}


def _right(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threshold) -> torch.Tensor:
    """A classifier: per image, is its class at the operating point right (N bools)? A reader: per known
    finding label, is the finding on the right side of its threshold (N×F bools, False where unknown)? A
    segmenter (y N×H×W masks): per image, is its Dice with the mask still at the kind's level (N bools)?"""
    from medadv.attacks.base import _kind_of
    from medadv.metrics import MISSING

    with torch.no_grad():
        logits = model(x)
    if y.ndim == 3:  # a segmenter: per image, is the mask still segmented (Dice >= the kind's success level)?
        from medadv.kinds.segmentation import UNTARGETED_DICE, overlap

        pred = _kind_of(model).decide(logits, threshold)
        return torch.from_numpy(overlap(pred, y, hd95=False)["dice"] >= UNTARGETED_DICE).to(y.device)
    if y.ndim == 2:
        return (_kind_of(model).decide(logits, threshold) == y) & (y != MISSING)
    return (F.softmax(logits, dim=1)[:, 1] >= threshold).long() == y


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threshold) -> float:
    """The share of right decisions: images for a classifier, known finding labels for a reader."""
    from medadv.metrics import MISSING

    right = _right(model, x, y, threshold)
    if y.ndim == 2:
        known = y != MISSING
        return float(right[known].float().mean()) if known.any() else 0.0
    return float(right.float().mean())


def _threat(model: nn.Module, y: torch.Tensor, eps: float, steps: int, **kw):
    from medadv.attacks import ThreatModel
    from medadv.attacks.base import _kind_of

    kind = _kind_of(model).name if y.ndim in (2, 3) else "binary"
    return ThreatModel(norm="linf", eps=eps, steps=steps, target="none", levels=None, kind=kind,
                       **({"classes": y.shape[1]} if y.ndim == 2 else {}), **kw)


def _reader_unbounded(model, x, y, steps: int, seed: int, threshold) -> tuple[float, list[int]]:
    """A reader under margin PGD at eps 1: the share of images whose every known decision is still right,
    counted over the findings some image crossed, and the findings (column indices) none crossed."""
    from medadv.attacks import PGD
    from medadv.attacks.steps import pgd_step
    from medadv.metrics import MISSING

    threat = _threat(model, y, 1.0, steps, step_size=pgd_step(1.0, steps), random_start=True)
    x_adv = PGD(threat, seed=seed, loss="margin")(model, x, y).x_adv
    known = y != MISSING
    right = _right(model, x_adv, y, threshold)
    stuck = [f for f in range(y.shape[1]) if known[:, f].any() and bool((right[:, f] | ~known[:, f]).all())]
    counted = known.clone()
    counted[:, stuck] = False
    has = counted.any(1)
    if not has.any():
        return 1.0, stuck
    return float((right | ~counted)[has].all(1).float().mean()), stuck


def _pgd_accuracy(model, x, y, eps: float, steps: int, seed: int, threshold) -> float:
    from medadv.attacks import PGD
    from medadv.attacks.steps import pgd_step

    threat = _threat(model, y, eps, steps, step_size=pgd_step(eps, steps), random_start=True)
    x_adv = PGD(threat, seed=seed)(model, x, y).x_adv
    return _accuracy(model, x_adv, y, threshold)


def check_gradient_masking(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 4 / 255,
                           eps_grid: tuple[float, ...] = (1 / 255, 4 / 255, 16 / 255), steps: int = 10,
                           seed: int = 0, unbounded_tolerance: float = 0.05, tolerance: float = 0.02,
                           black_box_queries: int = 100) -> MaskingReport:
    """Run the checks on images x (N×C×H×W in [0, 1]) with labels y (N; a multi-label reader's N×F, where
    "accuracy" is the share of finding decisions still right of those right before the attack; a segmenter's
    N×H×W masks, where it is the share of images still segmented, Dice >= 0.5); returns a
    :class:`MaskingReport`.

    Images the model already gets wrong are left out (they say nothing about the attack). ``tolerance``:
    how much accuracy may rise (sampling noise of random starts) before a monotonicity check warns.
    ``black_box_queries``: Square's budget per image (0 skips that check).
    """
    if x.ndim != 4 or len(x) != len(y) or len(x) == 0:
        raise MedadvError(f"masking checks need N×C×H×W images and N labels; got {tuple(x.shape)} and {tuple(y.shape)}.",
                          "pass a batch of images with one label each.")
    reader, segmenter = y.ndim == 2, y.ndim == 3
    if reader:
        from medadv.attacks.base import operating_point

        threshold = operating_point(model)
    else:
        threshold = float(getattr(model, "threshold", 0.5))
    was_training = model.training
    model.eval()
    try:
        correct = _right(model, x, y, threshold)
        if reader:
            # a reader's unit is the finding decision: the ones wrong before the attack become unknown (left
            # out), and images with no right decision are dropped. One flip per image would make an
            # "every finding right" accuracy 0 almost at once and the checks blind.
            from medadv.metrics import MISSING

            y = torch.where(correct, y, torch.full_like(y, MISSING))
            correct = correct.any(1)
        if not correct.any():
            raise MedadvError("the model gets none of these images right, so nothing can be attacked.",
                              "run the masking checks on images the model classifies correctly.")
        x, y = x[correct], y[correct]
        checks = []

        xg = x.detach().clone().requires_grad_(True)
        if reader or segmenter:  # the kind's untargeted objective: every known finding / pixel off the truth
            from medadv.attacks.base import _kind_of

            loss = _kind_of(model).objective(model(xg), y, False, "ce", threshold)
        else:
            loss = F.cross_entropy(model(xg), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg, allow_unused=True)
        grad = torch.zeros_like(x) if grad is None else grad  # no path to the input at all: fully masked
        norms = grad.flatten(1).norm(dim=1)
        nan = int((~torch.isfinite(grad.flatten(1))).any(1).sum())
        zero = float((norms[torch.isfinite(norms)] == 0).float().mean()) if torch.isfinite(norms).any() else 1.0
        ok = nan == 0 and zero < 0.5
        checks.append(Check("gradients", "pass" if ok else "warn",
                            f"{100 * zero:.0f}% of input gradients are zero, {nan} NaN",
                            {"zero_fraction": zero, "nan_images": nan}))

        # a reader: the images with no finding flipped (every finding at once may be out of the network's
        # reach even unbounded, one flip per image is not). The margin loss, not BCE: ascending BCE spends
        # the sign step on findings already flipped (its gradient grows with the error); the margin stops at
        # each finding's threshold and moves the rest.
        if reader:
            acc_unbounded, stuck = _reader_unbounded(model, x, y, max(steps, 10), seed, threshold)
            names = list(getattr(getattr(model, "spec", None), "class_names", ()) or range(y.shape[1]))
            # a finding no image crossed at eps 1 is either beyond the network's reach (a near-constant
            # output under its threshold, e.g. a finding without validation positives) or masked: named,
            # left out of the per-image count, and a warning once it is most of the findings
            stuck_text = (f"; never flipped on any of the {len(x)} images, left out: "
                          f"{', '.join(str(names[f]) for f in stuck)}" if stuck else "")
            ok = acc_unbounded <= unbounded_tolerance and 2 * len(stuck) <= y.shape[1]
            checks.append(Check("unbounded", "pass" if ok else "warn",
                                f"PGD at eps 1 (the whole pixel range) leaves {100 * acc_unbounded:.1f}% of the "
                                f"images with every finding right (expected about 0%){stuck_text}",
                                {"accuracy": acc_unbounded, "stuck_findings": [str(names[f]) for f in stuck]}))
        else:
            acc_unbounded = _pgd_accuracy(model, x, y, 1.0, max(steps, 10), seed, threshold)
            checks.append(Check("unbounded", "pass" if acc_unbounded <= unbounded_tolerance else "warn",
                                f"PGD at eps 1 (the whole pixel range) leaves {100 * acc_unbounded:.1f}% "
                                f"{'of the images still segmented (Dice >= 0.5)' if segmenter else 'accuracy'} "
                                f"(expected about 0%)", {"accuracy": acc_unbounded}))

        accs = [_pgd_accuracy(model, x, y, e, steps, seed, threshold) for e in eps_grid]
        rises = any(b > a + tolerance for a, b in zip(accs, accs[1:]))
        checks.append(Check("eps_monotone", "warn" if rises else "pass",
                            "accuracy " + ("rises" if rises else "does not rise") + " with eps",
                            {"eps": list(eps_grid), "accuracy": accs}))

        few, many = (_pgd_accuracy(model, x, y, eps, s, seed, threshold) for s in (max(1, steps // 5), steps))
        checks.append(Check("iterations", "warn" if many > few + tolerance else "pass",
                            f"accuracy {100 * few:.1f}% after {max(1, steps // 5)} steps, {100 * many:.1f}% after {steps}",
                            {"steps": [max(1, steps // 5), steps], "accuracy": [few, many]}))

        # no score-based attack has a per-pixel objective (Square is refused for segmenters): a segmenter's
        # report has no black_box check, rather than one that did not run
        if black_box_queries > 0 and not segmenter:
            from medadv.attacks import ProbabilityOracle, Square

            threat = _threat(model, y, eps, 1)
            x_bb = Square(threat, seed=seed, max_queries=black_box_queries, threshold=threshold)(
                ProbabilityOracle.from_model(model), x, y).x_adv
            black = _accuracy(model, x_bb, y, threshold)
            checks.append(Check("black_box", "warn" if black < many - tolerance else "pass",
                                f"Square ({black_box_queries} queries) leaves {100 * black:.1f}%, PGD-{steps} "
                                f"{100 * many:.1f}% at eps {eps * 255:.1f}/255", {"square": black, "pgd": many}))

        with torch.no_grad():
            same = torch.equal(model(x), model(x))
        checks.append(Check("randomness", "pass" if same else "warn",
                            "deterministic" if same else "the model is randomized: evaluate it with EOT",
                            {"deterministic": same}))
    finally:
        model.train(was_training)
    return MaskingReport(checks)
