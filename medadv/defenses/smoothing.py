"""Randomized smoothing (Cohen, Rosenfeld and Kolter 2019): PREDICT and CERTIFY with Gaussian noise.

The smoothed classifier is ``g(x) = argmax_c P(f(x + δ) = c)``, δ ~ N(0, σ² I), where the base classifier
``f`` is the model's decision at its operating threshold (P(disease) >= threshold), so the certificate is
about the label a clinician is given. Units: images and σ are in stored-pixel [0, 1] units; the noise is
added to the stored pixels (before the model's resize), so the certified L2 radius bounds a change to the
stored file. ``radius × levels`` is the same radius in grey levels of the file (255 for 8-bit).

CERTIFY (Cohen et al., Algorithm 1): guess the top class ĉ from ``n0`` noisy samples, count ĉ in ``n``
fresh samples, take the one-sided Clopper-Pearson lower bound p̲ at level 1 - α; abstain when p̲ < 1/2,
else certify ĉ with radius ``σ·Φ⁻¹(p̲)``. PREDICT (Algorithm 2): count both classes in ``n`` samples and
abstain unless a two-sided binomial test rejects a tie at level α.

Seeding: image i draws its noise from ``torch.Generator().manual_seed(seed·1_000_003 + i)`` where i is
the image's index in the data given, so one image's certificate does not depend on which other images
are certified with it. Noise is drawn in batches of ``batch_size`` samples (results depend on the batch
size only through the generator's stream, which torch keeps fixed for a fixed size).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from medadv.errors import MedadvError

ABSTAIN = -1


def check_smoothing_args(sigma: float, n: int, alpha: float, n0: int = 1, batch_size: int = 1) -> None:
    """Raise a :class:`MedadvError` naming the flag when a smoothing setting is out of range."""
    if not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise MedadvError(f"--sigma must be a noise level > 0 in [0, 1] pixel units; got {sigma}.", "pass e.g. --sigma 0.25.")
    if not isinstance(n, int) or n <= 0:
        raise MedadvError(f"--n must be a number of noise samples > 0; got {n}.", "pass e.g. --n 1000.")
    if not isinstance(n0, int) or n0 <= 0:
        raise MedadvError(f"--n0 must be a number of selection samples > 0; got {n0}.", "pass e.g. --n0 100.")
    if not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise MedadvError(f"--alpha must be a probability strictly between 0 and 1; got {alpha}.", "pass e.g. --alpha 0.001.")
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise MedadvError(f"--batch-size must be > 0; got {batch_size}.", "pass e.g. --batch-size 256.")


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion with k successes in n.

    Equals ``statsmodels.proportion_confint(k, n, alpha=2·alpha, method="beta")[0]`` (Cohen et al.'s code).
    """
    from scipy.stats import beta

    return 0.0 if k <= 0 else float(beta.ppf(alpha, k, n - k + 1))


def certified_radius(p_lower: float, sigma: float) -> float:
    """Cohen et al.'s L2 radius ``σ·Φ⁻¹(p̲)`` for a top-class lower bound p̲ > 1/2 (else 0: abstain)."""
    from scipy.stats import norm

    return float(sigma * norm.ppf(p_lower)) if p_lower > 0.5 else 0.0


@dataclass
class Certificate:
    """One image's CERTIFY result. prediction: 0/1, or -1 (abstain). radius: L2 in [0, 1] pixel units
    (0 when abstaining); radius_levels: the same in grey levels of the stored file. counts: the top
    class's count in the n certification samples."""

    prediction: int
    radius: float
    radius_levels: float
    p_lower: float
    count: int
    n: int

    def to_json(self) -> dict:
        return asdict(self)


class Smoothed:
    """The smoothed version of ``model`` (N×C×H×W in [0, 1] -> N×2 logits) under N(0, σ²) noise.

    ``threshold``: the base classifier's operating point on P(disease) (default: the model's). ``levels``:
    grey levels of the stored file (255 or 65535) for radii in grey levels.
    """

    def __init__(self, model: nn.Module, sigma: float, *, threshold: float | None = None, levels: int = 255,
                 batch_size: int = 256) -> None:
        check_smoothing_args(sigma, 1, 0.5, 1, batch_size)
        self.model = model
        self.sigma = float(sigma)
        self.threshold = float(threshold if threshold is not None else getattr(model, "threshold", 0.5))
        self.levels = levels
        self.batch_size = batch_size

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @torch.no_grad()
    def counts(self, x: torch.Tensor, num: int, generator: torch.Generator) -> np.ndarray:
        """Class counts (2 ints) of the base decision on ``num`` noisy copies of one image x (C×H×W)."""
        device = self._device()
        x = x.to(device)
        counts = np.zeros(2, dtype=np.int64)
        left = num
        while left > 0:
            b = min(self.batch_size, left)
            noise = torch.randn((b, *x.shape), generator=generator, dtype=x.dtype) * self.sigma
            logits = self.model(x[None] + noise.to(device))
            p = torch.softmax(logits.float(), dim=1)[:, 1]
            disease = int((p >= self.threshold).sum())
            counts += (b - disease, disease)
            left -= b
        return counts

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, generator: torch.Generator) -> Certificate:
        """Cohen et al.'s CERTIFY for one image x (C×H×W in [0, 1])."""
        check_smoothing_args(self.sigma, n, alpha, n0, self.batch_size)
        was_training = self.model.training
        self.model.eval()
        try:
            top = int(np.argmax(self.counts(x, n0, generator)))
            k = int(self.counts(x, n, generator)[top])
        finally:
            self.model.train(was_training)
        p_lower = lower_confidence_bound(k, n, alpha)
        if p_lower < 0.5:
            return Certificate(ABSTAIN, 0.0, 0.0, p_lower, k, n)
        radius = certified_radius(p_lower, self.sigma)
        return Certificate(top, radius, radius * self.levels, p_lower, k, n)

    def predict(self, x: torch.Tensor, n: int, alpha: float, generator: torch.Generator) -> int:
        """Cohen et al.'s PREDICT for one image: 0/1, or -1 (abstain) unless a binomial test at level
        alpha rejects that both classes are equally likely under noise."""
        from scipy.stats import binomtest

        check_smoothing_args(self.sigma, n, alpha, 1, self.batch_size)
        was_training = self.model.training
        self.model.eval()
        try:
            c = self.counts(x, n, generator)
        finally:
            self.model.train(was_training)
        top = int(np.argmax(c))
        if binomtest(int(c[top]), int(c.sum()), 0.5).pvalue > alpha:
            return ABSTAIN
        return top


def image_generator(seed: int, index: int) -> torch.Generator:
    """The noise stream of image ``index`` (see the module docstring)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def certify_batch(smoothed: Smoothed, x: torch.Tensor, n0: int, n: int, alpha: float, seed: int,
                  indices: list[int] | None = None, monitor=None) -> list[Certificate]:
    """CERTIFY each image of x (N×C×H×W in [0, 1]); image j uses the stream of ``indices[j]`` (default j)."""
    indices = list(range(len(x))) if indices is None else indices
    items = range(len(x)) if monitor is None else monitor.track(range(len(x)), "certify", total=len(x))
    return [smoothed.certify(x[j], n0, n, alpha, image_generator(seed, indices[j])) for j in items]


def certified_accuracy(certs: list[Certificate], labels: np.ndarray, radii: list[float]) -> list[dict]:
    """Per radius r (in [0, 1] units): the fraction of images certified correct with radius >= r.

    An abstention counts as wrong at every radius, as in Cohen et al.; at r = 0 this is the smoothed
    classifier's (certified) accuracy.
    """
    labels = np.asarray(labels).ravel()
    pred = np.array([c.prediction for c in certs])
    rad = np.array([c.radius for c in certs])
    rows = []
    for r in radii:
        ok = (pred == labels) & (rad >= r)
        rows.append({"radius": float(r), "certified_accuracy": float(ok.mean()) if len(ok) else float("nan")})
    return rows
