"""Mahalanobis detector (Lee, Lee, Lee and Shin 2018, "A simple unified framework for detecting
out-of-distribution samples and adversarial attacks"), on the network's penultimate features.

Fit: the penultimate features f(x) (:meth:`MedicalClassifier.features`, the pooled input of the final
linear layer) of clean training images, one Gaussian per class with mean μ_c and one covariance Σ
shared by the classes (tied, as in Lee et al.), estimated by scikit-learn from the class-centred features:
Ledoit-Wolf shrinkage by default (well conditioned when there are fewer images than feature dimensions,
as with a few hundred images and 512 ResNet-18 features), or the plain empirical covariance.

Score: the Mahalanobis distance to the nearest class mean, ``min_c sqrt((f - μ_c)ᵀ Σ⁻¹ (f - μ_c))``, N
floats >= 0; higher is more suspicious. It is a differentiable torch function of the stored pixels, so
:func:`~medadv.defenses.detect.adaptive_attack` attacks it directly (no BPDA needed).

Input preprocessing (Lee et al., Sec. 2, off by default: ``noise=0``): score ``x̂ = clip(x - noise·sign(∇ₓ
score(x)), 0, 1)`` instead of x, a small step that pulls clean images closer to their class than
adversarial ones. ``noise`` is in stored-pixel [0, 1] units. The sign is piecewise constant, so the
gradient of the preprocessed score is that of the score at x̂ (exact almost everywhere).

Only the penultimate layer is used; Lee et al.'s ensemble over intermediate layers with a logistic
regression on top is not implemented. Calibration, flags, detection AUC and the adaptive attack are
shared with feature squeezing (:mod:`medadv.defenses.detect`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from medadv.defenses.detect import Detector, adaptive_attack, detection_auc, register_detector
from medadv.errors import MedadvError

__all__ = ["COVARIANCES", "Mahalanobis", "adaptive_attack", "detection_auc"]

COVARIANCES = ("ledoit-wolf", "empirical")


@register_detector("mahalanobis", title="Mahalanobis", needs_fit=True)
class Mahalanobis(Detector):
    """Detector around ``model``, a :class:`~medadv.models.wrapper.MedicalClassifier` (anything with
    ``features(x) -> N×D`` and ``forward(x) -> N×2 logits``). ``covariance``: ``ledoit-wolf`` or
    ``empirical`` (scikit-learn's estimators). ``noise``: Lee et al.'s input-preprocessing step in [0, 1]
    pixel units (0: off). ``threshold``: flag above it (set it with :meth:`calibrate`). Call :meth:`fit`
    on clean training images before anything else."""

    def __init__(self, model: nn.Module, *, covariance: str = "ledoit-wolf", noise: float = 0.0,
                 threshold: float | None = None) -> None:
        if not callable(getattr(model, "features", None)):
            raise MedadvError(f"the Mahalanobis detector needs the model's penultimate features; "
                              f"{type(model).__name__} has no features().",
                              "pass a MedicalClassifier (the model itself, not a defended or exported wrapper).")
        if covariance not in COVARIANCES:
            raise MedadvError(f"unknown covariance estimator '{covariance}'.", f"use {' or '.join(COVARIANCES)}.")
        if not isinstance(noise, (int, float)) or not 0 <= noise < 1:
            raise MedadvError(f"input-preprocessing noise must be in [0, 1) pixel units; got {noise!r}.",
                              "pass noise=0 (off) or a small step such as 0.002.")
        super().__init__(model, threshold)
        self.covariance = covariance
        self.noise = float(noise)
        self.register_buffer("classes", torch.zeros(0, dtype=torch.long))
        self.register_buffer("means", torch.zeros(0, 0))
        self.register_buffer("precision", torch.zeros(0, 0))

    @property
    def fitted(self) -> bool:
        return self.means.numel() > 0

    @torch.no_grad()
    def _features(self, x: torch.Tensor, batch_size: int) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        device = self._device()
        try:
            return torch.cat([self.model.features(x[i:i + batch_size].to(device)).double().cpu()
                              for i in range(0, len(x), batch_size)])
        finally:
            self.model.train(was)

    def fit(self, x_train: torch.Tensor, y_train: torch.Tensor, batch_size: int = 256) -> Mahalanobis:
        """Class means and the tied covariance of the penultimate features of clean images x_train
        (N×C×H×W in [0, 1]) with labels y_train (N); returns self."""
        from sklearn.covariance import EmpiricalCovariance, LedoitWolf

        y = torch.as_tensor(y_train).long().cpu()
        if x_train.ndim != 4 or len(x_train) != len(y):
            raise MedadvError(f"fitting needs N×C×H×W images and N labels; got {tuple(x_train.shape)} and "
                              f"{tuple(y.shape)}.", "pass clean training images with one label each.")
        classes, counts = torch.unique(y, return_counts=True)
        if len(classes) < 2 or int(counts.min()) < 2:
            raise MedadvError(f"fitting needs at least 2 images of each of at least 2 classes; got "
                              f"{dict(zip(classes.tolist(), counts.tolist()))}.", "pass more clean training images.")
        f = self._features(x_train, batch_size)
        means = torch.stack([f[y == c].mean(0) for c in classes])
        centred = (f - means[torch.searchsorted(classes, y)]).numpy()
        estimator = LedoitWolf if self.covariance == "ledoit-wolf" else EmpiricalCovariance
        precision = estimator(assume_centered=True).fit(centred).precision_
        if not np.all(np.isfinite(precision)):
            raise MedadvError("the feature covariance could not be inverted.",
                              "use covariance='ledoit-wolf' or fit on more training images.")
        device = self._device()
        self.classes = classes.to(device)
        self.means = means.float().to(device)
        self.precision = torch.from_numpy(np.ascontiguousarray(precision)).float().to(device)
        return self

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """N×K Mahalanobis distances of the features of x to the K class means (differentiable in x)."""
        if not self.fitted:
            raise MedadvError("the Mahalanobis detector is not fitted.",
                              "call fit(x_train, y_train) on clean training images first.")
        diff = self.model.features(x)[:, None, :] - self.means[None]  # N×K×D
        d2 = ((diff @ self.precision) * diff).sum(-1)
        return d2.clamp_min(1e-12).sqrt()

    def _min_distance(self, x: torch.Tensor) -> torch.Tensor:
        return self.distances(x).min(dim=1).values

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """N scores: distance to the nearest class Gaussian, after the input-preprocessing step if ``noise``."""
        if self.noise == 0:
            return self._min_distance(x)
        with torch.enable_grad():  # the step needs ∇ₓ even when scoring under no_grad
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self._min_distance(xg).sum(), xg)
        return self._min_distance((x - self.noise * g.sign()).clamp(0, 1))
