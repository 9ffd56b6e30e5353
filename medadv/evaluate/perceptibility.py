"""How visible a perturbation is: L-inf and L2 distances in [0, 1] units, PSNR and SSIM (scikit-image).

Distances are computed from the stored integer levels when the images lie on a storage grid, so that
``linf_max <= eps`` can be checked exactly (no float32 rounding noise).
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def perturbation_stats(x: torch.Tensor, x_adv: torch.Tensor, levels: int | None = 255) -> dict[str, float]:
    """Summary over N images (N×C×H×W in [0, 1]); PSNR of an unchanged image is reported as inf -> None."""
    xs = x.detach().cpu().double().numpy()
    xa = x_adv.detach().cpu().double().numpy()
    if levels is not None:  # exact: integer level differences divided by the level count
        delta = (np.rint(xa * levels) - np.rint(xs * levels)) / levels
    else:
        delta = xa - xs
    flat = delta.reshape(len(delta), -1)
    linf = np.abs(flat).max(axis=1) if flat.size else np.zeros(0)
    l2 = np.linalg.norm(flat, axis=1)
    psnr, ssim = [], []
    for a, b in zip(xs, xa):
        if np.array_equal(a, b):
            psnr.append(np.inf)
            ssim.append(1.0)
            continue
        psnr.append(peak_signal_noise_ratio(a, b, data_range=1.0))
        side = min(a.shape[-2:])
        win = min(7, side if side % 2 else side - 1)
        ssim.append(structural_similarity(a, b, data_range=1.0, channel_axis=0, win_size=win))
    psnr_arr = np.array(psnr)
    finite = psnr_arr[np.isfinite(psnr_arr)]
    return {
        "linf_max": float(linf.max()) if len(linf) else 0.0,
        "linf_mean": float(linf.mean()) if len(linf) else 0.0,
        "l2_mean": float(l2.mean()) if len(l2) else 0.0,
        "l2_max": float(l2.max()) if len(l2) else 0.0,
        "psnr_mean": float(finite.mean()) if len(finite) else None,
        "ssim_mean": float(np.mean(ssim)) if ssim else 1.0,
        "changed_images": int((linf > 0).sum()),
        "levels": levels,
    }


def flips(pred_clean: np.ndarray, pred_adv: np.ndarray, classes: int = 2) -> dict[str, int]:
    """Decisions that changed, by direction, at the operating point (0 healthy, 1 disease).

    For K > 2 classes (class 0 healthy, higher classes more severe when graded), also every changed
    decision (``total``), those moved up (``up``: toward the last class) and down, and those that
    crossed between class 0 and any other (healthy_to_disease / disease_to_healthy)."""
    pc, pa = np.asarray(pred_clean), np.asarray(pred_adv)
    if pc.ndim == 2:  # a multi-label reader's N×F decisions: per image, "no finding" against "some finding"
        before, after = pc.any(1), pa.any(1)
        return {"healthy_to_disease": int((~before & after).sum()), "disease_to_healthy": int((before & ~after).sum()),
                "total": int((pc != pa).any(1).sum()), "findings_changed": int((pc != pa).sum()),
                "up": int(((pc == 0) & (pa == 1)).sum()), "down": int(((pc == 1) & (pa == 0)).sum())}
    if classes <= 2:
        h2d = int(((pc == 0) & (pa == 1)).sum())
        d2h = int(((pc == 1) & (pa == 0)).sum())
        return {"healthy_to_disease": h2d, "disease_to_healthy": d2h, "total": h2d + d2h}
    return {"healthy_to_disease": int(((pc == 0) & (pa > 0)).sum()), "disease_to_healthy": int(((pc > 0) & (pa == 0)).sum()),
            "up": int((pa > pc).sum()), "down": int((pa < pc).sum()), "total": int((pa != pc).sum())}
