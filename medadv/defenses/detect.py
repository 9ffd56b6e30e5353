"""Feature squeezing (Xu, Evans and Qi 2017), the detector the paper cites, and the adaptive attack on it.

Score: the largest L1 distance between the model's class probabilities on an image and on its squeezed
versions (default: 5-bit depth and a 3×3 median), N floats in [0, 2]. An image is flagged when its score
exceeds a threshold calibrated on clean images at a false-positive rate (5% by default).

Adaptive attack (Carlini and Wagner 2017, "Adversarial examples are not easily detected"): ascend the
classification loss minus ``weight`` times the detector's excess score over its threshold, with BPDA
through the non-differentiable squeezers, so the attack misleads the network and stays under the
detector at once. Report how many adversarial images it gets past the detector beside the non-adaptive
detection rate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medadv.defenses.base import Preprocessor, apply_preprocessor
from medadv.errors import MedadvError


def default_squeezers() -> list[Preprocessor]:
    from medadv.defenses.bitdepth import BitDepth
    from medadv.defenses.median import Median

    return [BitDepth(5), Median(3)]


class FeatureSqueezing(nn.Module):
    """Detector around ``model`` (N×C×H×W in [0, 1] -> N×2 logits). ``threshold``: flag above it (set it
    with :meth:`calibrate`). ``adaptive``: gradients through the squeezers by BPDA (True) or masked."""

    def __init__(self, model: nn.Module, squeezers: list[Preprocessor] | None = None, threshold: float | None = None,
                 adaptive: bool = False) -> None:
        super().__init__()
        self.model = model
        self.squeezers = nn.ModuleList(squeezers if squeezers is not None else default_squeezers())
        self.threshold = threshold
        self.adaptive = adaptive

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """N scores: max over squeezers of ||p(x) - p(squeeze(x))||_1 (differentiable when x requires grad)."""
        p = F.softmax(self.model(x), dim=1)
        dists = [(p - F.softmax(self.model(apply_preprocessor(s, x, self.adaptive)), dim=1)).abs().sum(1)
                 for s in self.squeezers]
        return torch.stack(dists, dim=1).max(dim=1).values

    @torch.no_grad()
    def scores(self, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        was = self.training
        self.eval()
        out = torch.cat([self.score(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0)
        self.train(was)
        return out.cpu()

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


def adaptive_attack(detector: FeatureSqueezing, x: torch.Tensor, y: torch.Tensor, threat, *, weight: float = 10.0,
                    seed: int = 0) -> torch.Tensor:
    """Untargeted L-inf/L2 PGD on CE(model, y) - weight·relu(score - threshold), BPDA through the squeezers.

    x: N×C×H×W in [0, 1]; y: N labels; ``threat``: a :class:`~medadv.attacks.ThreatModel` (its eps, steps,
    step size, norm and grid are used; its target is not: the attack is untargeted). Returns x' on the grid.
    """
    from medadv.attacks.gradient import ascend, frozen

    if detector.threshold is None:
        raise MedadvError("the detector has no threshold.", "call calibrate() before attacking it.")
    bpda = FeatureSqueezing(detector.model, list(detector.squeezers), detector.threshold, adaptive=True)
    generator = torch.Generator(device=x.device).manual_seed(seed)

    def gradient(x_adv: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        x_adv = x_adv.detach().requires_grad_(True)
        ce = F.cross_entropy(bpda.model(x_adv), goal, reduction="sum")
        excess = F.relu(bpda.score(x_adv) - bpda.threshold).sum()
        return torch.autograd.grad(ce - weight * excess, x_adv)[0]

    with frozen(bpda):
        x_adv, _ = ascend(x, y, gradient, threat, generator)
    x_adv = threat.project(x_adv, x, threat.mask_for(x))
    return threat.to_grid(x_adv, x)
