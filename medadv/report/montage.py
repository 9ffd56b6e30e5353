"""Slice montages of attacked volumes: one PNG per volume, axial slices of the clean volume, the
adversarial one and the perturbation amplified, plus the slice where the change is largest."""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_MONTAGES = 16  # volumes drawn per attack (each figure costs ~0.3 s; a test split has hundreds)
SLICES = 4  # evenly spaced axial slices, beside the slice of largest change


def axial_axis(affine: np.ndarray | None) -> int:
    """The array axis (0, 1 or 2 of D×H×W) that runs closest to the world's z (head-foot) axis: axial
    slices are cut across it. An npz volume has no affine: its first axis (MedMNIST 3D's depth)."""
    if affine is None:
        return 0
    return int(np.argmax(np.abs(np.asarray(affine)[2, :3])))


def montage_png(clean: np.ndarray, adv: np.ndarray, title: str, axis: int = 0) -> bytes:
    """A PNG: rows clean, adversarial, perturbation (amplified to the full grey range, grey = 0); columns
    ``SLICES`` evenly spaced slices across ``axis`` and the slice of largest summed |change|.

    ``clean`` and ``adv``: D×H×W floats in [0, 1] (the stored values)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    delta = adv - clean
    depth = clean.shape[axis]
    per_slice = np.abs(delta).sum(axis=tuple(a for a in range(3) if a != axis))
    worst = int(per_slice.argmax())
    picks = [int(round(v)) for v in np.linspace(0, depth - 1, SLICES + 2)[1:-1]] + [worst]
    amp = float(np.abs(delta).max()) or 1.0  # the largest change maps to full white/black
    fig, axes = plt.subplots(3, len(picks), figsize=(1.6 * len(picks), 5.2), dpi=80)
    for c, k in enumerate(picks):
        for r, (img, lo, hi) in enumerate(((clean, 0, 1), (adv, 0, 1), (delta / (2 * amp) + 0.5, 0, 1))):
            ax = axes[r, c]
            ax.imshow(np.take(img, k, axis=axis), cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"slice {k}" + (" (max change)" if c == len(picks) - 1 else ""), fontsize=7)
        if c == 0:
            for r, name in enumerate(("clean", "adversarial", f"change ×{0.5 / amp:.0f}")):
                axes[r, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(title, fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_montages(folder: Path, names: list[str], clean: np.ndarray, adv: np.ndarray, levels: int,
                   affines: list[np.ndarray | None], captions: list[str]) -> list[Path]:
    """``folder/<name>.png`` for the first :data:`MAX_MONTAGES` volumes (``clean``, ``adv``: N×1×D×H×W on
    the ``levels`` grid)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(min(MAX_MONTAGES, len(clean))):
        c = clean[i, 0].astype(np.float32) / levels
        a = adv[i, 0].astype(np.float32) / levels
        path = folder / (names[i].removesuffix(".gz").removesuffix(".nii") + ".png")
        path.write_bytes(montage_png(c, a, captions[i], axial_axis(affines[i])))
        out.append(path)
    return out
