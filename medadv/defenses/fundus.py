"""Fundus field-of-view masking with local contrast normalization: the dataset-specific preprocessing
for retinal photographs.

A fundus camera images the retina through a circular aperture: every photograph is a bright disc (the
field of view, FOV; sometimes clipped at the top and bottom) on a uniform background, and that standard
capture is what a defender can exploit (Finlayson et al.: "standardized image capture procedures in
biomedical imaging could provide an opportunity for defenders"). This defense

1. estimates the FOV per image and sets everything outside it to 0, so whatever an attacker writes
   outside the retina (a perturbation's energy, a patch in the corner) never reaches the model, and
   backgrounds of different cameras (black, or white in some RetinaMNIST images) become one;
2. inside the FOV, applies local contrast normalization as in Graham's winning Kaggle diabetic
   retinopathy preprocessing: ``x' = clamp(gain · (x − G_σ * x) + 0.5, 0, 1)`` per channel, which
   subtracts the local mean colour (uneven illumination, pigmentation, camera colour balance) and keeps
   the local structure the grader looks at (vessels, microaneurysms, haemorrhages, exudates).

FOV estimate (NumPy/SciPy, per image, no gradient): smooth each channel (Gaussian, σ = 2 % of the
shorter side, at least 0.5 px); take the background colour as the median over the four corner patches
(a circular aperture never reaches the corners); measure each pixel's colour distance from it; keep the
pixels above ``threshold`` × the image's 99th-percentile distance (a robust maximum: hot pixels and
burnt-in corner marks do not set the scale); keep the largest connected region (drops corner marks and
specks); fill its holes and take its convex hull (the aperture is convex, so dark lesions, a dark
macula or a dim rim do not notch the mask); finally drop a rim of ``margin`` × the shorter side
(default 0.05, Graham's mask at 90 % of the radius: the aperture's edge has a bright halo and pixels
that are part background; the frame's edges are not eroded, since a disc clipped by the frame has no
rim there). Using the distance to the corners' colour, not brightness alone, handles black and white
backgrounds alike. An image whose corners look like the rest of it (robust maximum distance below
0.02: no aperture visible, e.g. a crop inside the retina) is left unmasked.

Local mean: a normalized convolution, ``G_σ * (x·m) / G_σ * m`` (zero padding; computed as a matrix
product per axis), i.e. the Gaussian mean over FOV pixels only, so the background does not leak into
the rim's local mean. σ is ``sigma`` ×
the shorter image side (default 0.05: 11 px at 224 px, as the common Kaggle/APTOS setting of 10 px at
200-224 px; 1.4 px at MedMNIST's 28 px). Graham filled the outside with mid-grey; here it is 0, as
asked of a FOV mask, so mask-only (``lcn=False``) and mask+LCN outputs share it.

Gradient: the transform is differentiable torch code given the mask, and the mask is used as a constant
(computed on a detached copy). That is the true gradient almost everywhere, not an approximation: the
mask is a piecewise-constant function of the input (a threshold), so its derivative is zero wherever
it is defined, and a perturbation of a few grey levels does not move a camera aperture. Hence
``differentiable = True`` and no BPDA: an adaptive attacker gets the exact vector-Jacobian product
``gain · m · (I − normalized blur)`` (zero outside the FOV and on pixels the clamp saturates). Note the
high-pass gain amplifies an in-FOV perturbation as much as the image detail: the defensive value is the
mask and the standardization (a model trained on these images sees one input distribution), not
purification.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from medadv.defenses.base import Preprocessor, register
from medadv.errors import MedadvError

MASK_SMOOTH = 0.02  # σ of the smoothing before thresholding, as a fraction of the shorter side (>= 0.5 px)
CORNER = 0.1  # side of each corner patch that samples the background, as a fraction of the shorter side
MIN_CONTRAST = 0.02  # below this robust FOV-to-background distance no aperture is visible: no mask


def _gaussian_matrix(n: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """n×n ``exp(-(i-j)²/2σ²)``: ``A @ img`` is a 1-D Gaussian blur along that axis with zero padding.

    Unnormalized on purpose: the local mean divides by the blurred mask, so the scale cancels. Two
    matrix products are exact and, on CPU, several times faster than a depthwise convolution with the
    ±3σ kernels of a 224 px image (69 taps)."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.exp(-0.5 * ((i[:, None] - i[None, :]) / sigma) ** 2).to(dtype=dtype, device=device)


def fov_mask_numpy(img: np.ndarray, threshold: float, margin: float = 0.0) -> np.ndarray:
    """One image's field of view: C×H×W float in [0, 1] -> H×W bool (see the module docstring)."""
    from scipy import ndimage as ndi
    from skimage.morphology import convex_hull_image

    c, h, w = img.shape
    side = min(h, w)
    smooth = np.stack([ndi.gaussian_filter(ch, max(0.5, MASK_SMOOTH * side)) for ch in img])
    k = max(1, round(CORNER * side))
    corners = np.concatenate([smooth[:, :k, :k], smooth[:, :k, -k:], smooth[:, -k:, :k], smooth[:, -k:, -k:]], axis=2)
    background = np.median(corners.reshape(c, -1), axis=1)
    distance = np.sqrt(((smooth - background[:, None, None]) ** 2).mean(axis=0))
    scale = float(np.percentile(distance, 99))
    if scale < MIN_CONTRAST:
        return np.ones((h, w), dtype=bool)
    mask = distance > threshold * scale
    labels, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = labels == 1 + int(np.argmax(sizes))
    mask = ndi.binary_fill_holes(mask)
    if not mask.any():
        return mask
    mask = convex_hull_image(mask)
    if margin > 0:
        # keep pixels farther than the margin from the background; the frame is not the aperture's rim,
        # so outside the image counts as FOV (a disc clipped by the frame is not eroded along the cut)
        inside = ndi.distance_transform_edt(np.pad(mask, 1, constant_values=True))[1:-1, 1:-1]
        mask = inside > margin * side
    return mask


@register
class FundusFOV(Preprocessor):
    """x (N×C×H×W in [0, 1]) -> 0 outside each image's field of view; inside it, Graham's local contrast
    normalization ``clamp(gain·(x − local mean) + 0.5)`` over a Gaussian of ``sigma`` × the shorter side
    (``lcn=False``: the masked image itself). ``threshold``: the FOV is where the colour differs from the
    corners' by more than this fraction of the image's robust maximum difference; ``margin``: the rim
    dropped from it, as a fraction of the shorter side (0.05: Graham's 90 % of the radius)."""

    name = "fundus-fov"
    differentiable = True
    description = "fundus field-of-view mask and local contrast normalization (Graham, Kaggle DR)"

    def __init__(self, threshold: float = 0.1, margin: float = 0.05, gain: float = 4.0, sigma: float = 0.05,
                 lcn: bool = True) -> None:
        super().__init__()

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not number(threshold) or not 0 < threshold < 1:
            raise MedadvError(f"FOV threshold must be a fraction in (0, 1); got {threshold!r}.",
                              "pass e.g. threshold=0.1.")
        if not number(margin) or not 0 <= margin < 0.5:
            raise MedadvError(f"FOV margin must be a fraction of the image side in [0, 0.5); got {margin!r}.",
                              "pass e.g. margin=0.05 (0: no erosion of the rim).")
        if not number(gain) or not 0 < gain <= 100:
            raise MedadvError(f"contrast gain must be in (0, 100]; got {gain!r}.", "pass e.g. gain=4.0.")
        if not number(sigma) or not 0 < sigma <= 1:
            raise MedadvError(f"local-mean sigma must be a fraction of the image side in (0, 1]; got {sigma!r}.",
                              "pass e.g. sigma=0.05.")
        if not isinstance(lcn, bool):
            raise MedadvError(f"lcn must be true or false; got {lcn!r}.", "pass lcn=True or lcn=False.")
        self.threshold, self.margin = float(threshold), float(margin)
        self.gain, self.sigma, self.lcn = float(gain), float(sigma), lcn

    @torch.no_grad()
    def fov_mask(self, x: torch.Tensor) -> torch.Tensor:
        """N×1×H×W of 0/1 in ``x``'s dtype and device: each image's field of view."""
        arr = x.detach().float().cpu().numpy()
        masks = np.stack([fov_mask_numpy(img, self.threshold, self.margin) for img in arr])[:, None]
        return torch.from_numpy(masks).to(device=x.device, dtype=x.dtype)

    def normalize(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The transform for a given N×1×H×W ``mask`` (differentiable in ``x``)."""
        if not self.lcn:
            return x * mask
        sigma = self.sigma * min(x.shape[-2:])
        rows = _gaussian_matrix(x.shape[-2], sigma, x.dtype, x.device)
        cols = _gaussian_matrix(x.shape[-1], sigma, x.dtype, x.device)
        # the FOV's weight in each pixel's neighbourhood: >= 1 wherever mask is 1 (its own centre tap);
        # elsewhere the output is multiplied by 0, the floor only keeps the division finite
        weight = rows @ mask @ cols.T
        local_mean = (rows @ (x * mask) @ cols.T) / weight.clamp_min(1e-6)
        return (self.gain * (x - local_mean) + 0.5).clamp(0, 1) * mask

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        # The mask is a constant of the input (estimated without gradient): its true derivative is zero
        # almost everywhere (a threshold) and a small perturbation does not move the camera's aperture,
        # so the gradient through ``normalize`` with the mask fixed is exact, not a BPDA stand-in.
        return self.normalize(x, self.fov_mask(x))

    def params(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "margin": self.margin, "gain": self.gain, "sigma": self.sigma,
                "lcn": self.lcn}
