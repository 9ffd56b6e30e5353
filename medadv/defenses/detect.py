"""Adversarial-example detectors, the adaptive attack on them, and their detection AUC.

A detector scores images (N floats, higher = more suspicious) and flags those above a threshold
calibrated on clean images at a false-positive rate (5% by default). :class:`Detector` holds what every
detector shares (batched scoring, calibration, flags, the model it guards); a detector only supplies a
differentiable :meth:`Detector.score`. Two live here and in :mod:`medadv.defenses.mahalanobis`:

* :class:`FeatureSqueezing` (Xu, Evans and Qi 2017), the detector the paper cites. Score: the largest L1
  distance between the model's class probabilities on an image and on its squeezed versions (default:
  5-bit depth and a 3×3 median), N floats in [0, 2].
* :class:`~medadv.defenses.mahalanobis.Mahalanobis` (Lee et al. 2018): the distance of the penultimate
  features to the nearest class-conditional Gaussian.

Adaptive attack (Carlini and Wagner 2017, "Adversarial examples are not easily detected"): ascend the
classification loss minus ``weight`` times the detector's excess score over its threshold, with BPDA
through whatever the detector computes without a useful gradient (the squeezers), so the attack misleads
the network and stays under the detector at once. :func:`adaptive_attack` runs it on any
:class:`Detector`. Report how many adversarial images it gets past the detector beside the non-adaptive
detection rate, and :func:`detection_auc` for the threshold-free picture.

Detectors register themselves where they are defined (:func:`register_detector`, like attacks and
preprocessing defenses); :data:`DETECTORS` is what the defenses study offers and builds
(:func:`build_detector`), so adding a detector is one file plus its import in ``medadv.defenses``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from medadv.defenses.base import Preprocessor, apply_preprocessor
from medadv.errors import MedadvError


class Detector(nn.Module):
    """A detector guarding ``model`` (N×C×H×W in [0, 1] -> N×2 logits). ``threshold``: flag above it
    (set it with :meth:`calibrate`).

    Subclasses implement :meth:`score` (N floats, differentiable in x where it can be, so that it can be
    attacked) and, when some of it has no useful gradient, :meth:`for_attack` (the BPDA version the
    adaptive attack differentiates). :meth:`logits_and_score` may be overridden to share a forward pass.
    """

    def __init__(self, model: nn.Module, threshold: float | None = None) -> None:
        super().__init__()
        self.model = model
        self.threshold = threshold

    def score(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits_and_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's logits (N×2) and the detector's scores (N) on x, both differentiable."""
        return self.model(x), self.score(x)

    def for_attack(self) -> Detector:
        """The detector whose score gradient an adaptive attack follows (itself when fully differentiable)."""
        return self

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @torch.no_grad()
    def scores(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """N scores on the CPU, computed in eval mode in batches."""
        from medadv.models.interface import eval_mode

        device = self._device()
        with eval_mode(self):  # each submodule's own mode back afterwards (see eval_mode)
            out = [self.score(x[i:i + batch_size].to(device)).detach().float().cpu()
                   for i in range(0, len(x), batch_size)]
        return torch.cat(out) if out else torch.zeros(0)

    def calibrate(self, x_clean: torch.Tensor, false_positive_rate: float = 0.05) -> float:
        """Set and return the threshold that flags ``false_positive_rate`` of the clean images x_clean."""
        if not 0 < false_positive_rate < 1 or len(x_clean) < 2:
            raise MedadvError("calibration needs >= 2 clean images and a false-positive rate in (0, 1).",
                              "pass clean validation images and e.g. 0.05.")
        self.threshold = float(torch.quantile(self.scores(x_clean).double(), 1 - false_positive_rate))
        return self.threshold

    def flags(self, x: torch.Tensor) -> torch.Tensor:
        """N booleans: score above the calibrated threshold."""
        if self.threshold is None:
            raise MedadvError("the detector has no threshold.", "call calibrate() on clean validation images first.")
        return self.scores(x) > self.threshold


D = TypeVar("D", bound=type[Detector])


@dataclass(frozen=True)
class DetectorSpec:
    """One registered detector: ``name`` (what a plan says) -> class, the report's title, and whether it
    is fitted on clean training images (``cls(model).fit(x, y)``) before calibration."""

    name: str
    cls: type[Detector]
    title: str
    needs_fit: bool = False

    def build(self, model: nn.Module, x_fit: torch.Tensor | None = None, y_fit: torch.Tensor | None = None,
              **params: Any) -> Detector:
        """The detector around ``model``, fitted on x_fit (N×C×H×W in [0, 1]) / y_fit (N) if it needs it."""
        detector = self.cls(model, **params)
        if self.needs_fit:
            if x_fit is None or y_fit is None:
                raise MedadvError(f"the {self.name} detector is fitted on clean training images.",
                                  "pass x_fit and y_fit.")
            detector = detector.fit(x_fit, y_fit)
        return detector


DETECTORS: dict[str, DetectorSpec] = {}


def register_detector(name: str, *, title: str, needs_fit: bool = False,
                      replace: bool = False) -> Callable[[D], D]:
    """Class decorator: register a :class:`Detector` under ``name`` (``replace``: tests, plugins)."""
    def decorate(cls: D) -> D:
        if name in DETECTORS and not replace and DETECTORS[name].cls is not cls:
            raise MedadvError(f"a detector named '{name}' is already registered.", "pick another name, or pass replace=True.")
        DETECTORS[name] = DetectorSpec(name, cls, title, needs_fit)
        return cls
    return decorate


def unregister_detector(name: str) -> None:
    DETECTORS.pop(name, None)


def detector_names() -> tuple[str, ...]:
    """Every registered detector, in registration order."""
    return tuple(DETECTORS)


def detector_spec(name: str) -> DetectorSpec:
    try:
        return DETECTORS[name]
    except KeyError:
        raise MedadvError(f"unknown detector '{name}'.", f"choose from {', '.join(DETECTORS)}.") from None


def build_detector(name: str, model: nn.Module, x_fit: torch.Tensor | None = None,
                   y_fit: torch.Tensor | None = None) -> Detector:
    """The registered detector ``name`` around ``model``, fitted where it needs clean training images."""
    return detector_spec(name).build(model, x_fit, y_fit)


def default_squeezers() -> list[Preprocessor]:
    from medadv.defenses.bitdepth import BitDepth
    from medadv.defenses.median import Median

    return [BitDepth(5), Median(3)]


@register_detector("feature-squeezing", title="Feature squeezing")
class FeatureSqueezing(Detector):
    """Detector around ``model`` (N×C×H×W in [0, 1] -> N×2 logits). ``threshold``: flag above it (set it
    with :meth:`calibrate`). ``adaptive``: gradients through the squeezers by BPDA (True) or masked."""

    def __init__(self, model: nn.Module, squeezers: list[Preprocessor] | None = None, threshold: float | None = None,
                 adaptive: bool = False) -> None:
        super().__init__(model, threshold)
        self.squeezers = nn.ModuleList(squeezers if squeezers is not None else default_squeezers())
        self.adaptive = adaptive

    def _score_from(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        from medadv.attacks.base import _kind_of

        # the kind's probabilities: a classifier's softmax (L1 in 0 to 2), a reader's per-finding sigmoids
        # (L1 in 0 to F: each finding's probability may move by up to 1)
        prob = _kind_of(self.model).probabilities
        p = prob(logits)
        dists = [(p - prob(self.model(apply_preprocessor(s, x, self.adaptive)))).abs().sum(1)
                 for s in self.squeezers]
        return torch.stack(dists, dim=1).max(dim=1).values

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """N scores: max over squeezers of ||p(x) - p(squeeze(x))||_1 (differentiable when x requires grad)."""
        return self._score_from(x, self.model(x))

    def logits_and_score(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)  # one pass serves the loss and the unsqueezed probabilities
        return logits, self._score_from(x, logits)

    def for_attack(self) -> FeatureSqueezing:
        """The same model, squeezers and threshold (shared, not copied), with BPDA through the squeezers."""
        return FeatureSqueezing(self.model, list(self.squeezers), self.threshold, adaptive=True)


def detection_auc(detector: Detector, x_clean: torch.Tensor, x_adv: torch.Tensor) -> float:
    """ROC AUC of the detector's scores separating adversarial (positive) from clean (negative) images:
    0.5 is chance, 1 perfect detection at some threshold (threshold-free, unlike :meth:`Detector.flags`)."""
    from sklearn.metrics import roc_auc_score

    if len(x_clean) == 0 or len(x_adv) == 0:
        raise MedadvError("detection AUC needs at least one clean and one adversarial image.",
                          "pass non-empty clean and adversarial batches.")
    s = torch.cat([detector.scores(x_clean), detector.scores(x_adv)]).double().numpy()
    truth = np.r_[np.zeros(len(x_clean)), np.ones(len(x_adv))]
    return float(roc_auc_score(truth, s))


def adaptive_attack(detector: Detector, x: torch.Tensor, y: torch.Tensor, threat, *, weight: float = 10.0,
                    seed: int = 0) -> torch.Tensor:
    """Untargeted L-inf/L2 PGD on CE(model, y) - weight·relu(score - threshold) against any :class:`Detector`
    (BPDA where the detector needs it, e.g. through feature squeezing's squeezers).

    x: N×C×H×W in [0, 1]; y: N labels (a reader's N×F); ``threat``: a :class:`~medadv.attacks.ThreatModel` (its eps, steps,
    step size, norm and grid are used; its target is not: the attack is untargeted). Returns x' on the grid.
    """
    from medadv.attacks.base import _kind_of, operating_point
    from medadv.attacks.gradient import ascend, frozen

    if detector.threshold is None:
        raise MedadvError("the detector has no threshold.", "call calibrate() before attacking it.")
    attacked = detector.for_attack()
    threshold = float(attacked.threshold)
    generator = torch.Generator(device=x.device).manual_seed(seed)

    def gradient(x_adv: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        x_adv = x_adv.detach().requires_grad_(True)
        logits, score = attacked.logits_and_score(x_adv)
        if goal.ndim == 2:  # a reader (N×F labels): its untargeted objective, every finding off the truth
            ce = _kind_of(attacked.model).objective(logits, goal, False, "ce", operating_point(attacked.model))
        else:
            ce = F.cross_entropy(logits, goal, reduction="sum")
        excess = F.relu(score - threshold).sum()
        return torch.autograd.grad(ce - weight * excess, x_adv)[0]

    with frozen(attacked):
        x_adv, _ = ascend(x, y, gradient, threat, generator)
    x_adv = threat.project(x_adv, x, threat.mask_for(x))
    return threat.to_grid(x_adv, x)
