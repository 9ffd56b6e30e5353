"""Figures in the paper's style, as PNG bytes (matplotlib, Agg backend): Figure 2 (clean image,
amplified perturbation, adversarial image, each with P(disease), green when the model is right and red
when wrong), the appendix-style example grid, and the robustness curves."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

RIGHT, WRONG = "#1a7f37", "#cf222e"


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _show(ax, chw: np.ndarray) -> None:
    img = chw[0] if chw.shape[0] == 1 else np.moveaxis(chw, 0, -1)
    ax.imshow(np.clip(img, 0, 1), cmap="gray" if chw.shape[0] == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _amplified(delta: np.ndarray) -> tuple[np.ndarray, float]:
    """Perturbation mapped to [0, 1] around mid-grey, scaled so its largest change is fully visible."""
    peak = float(np.abs(delta).max())
    gain = 0.5 / peak if peak > 0 else 1.0
    return np.clip(0.5 + delta * gain, 0, 1), gain


def _panel_row(axes, clean, adv, label, p_clean, p_adv, threshold, class_names, titles=True,
               decisions=(None, None)) -> None:
    """Clean, amplified perturbation, adversarial. Binary: ``p_*`` is P(disease) and the decision is
    P >= threshold. Multi-class: ``decisions`` are the predicted classes and ``p_*`` their probabilities."""
    delta = adv - clean
    amp, gain = _amplified(delta)
    for ax, img, p, kind, pred in ((axes[0], clean, p_clean, "clean", decisions[0]),
                                   (axes[2], adv, p_adv, "adversarial", decisions[1])):
        _show(ax, img)
        if pred is None:
            right = int(p >= threshold) == label
            text = f"{kind}\nP({class_names[1]}) = {p:.3f}" if titles else f"P = {p:.3f}"
        else:
            right = int(pred) == label
            text = f"{kind}\n{class_names[int(pred)]} ({p:.2f})" if titles else f"{class_names[int(pred)]} ({p:.2f})"
        ax.set_title(text, color=RIGHT if right else WRONG, fontsize=9)
        for side in ax.spines.values():
            side.set_edgecolor(RIGHT if right else WRONG)
            side.set_linewidth(2.5)
    _show(axes[1], amp)
    linf = np.abs(delta).max()
    axes[1].set_title(f"perturbation ×{gain:.0f}\nL∞ = {linf * 255:.1f}/255" if titles else f"×{gain:.0f}",
                      fontsize=9)


def figure2(clean: np.ndarray, adv: np.ndarray, label: int, p_clean: float, p_adv: float, threshold: float,
            class_names: Sequence[str], title: str = "", decisions=(None, None)) -> bytes:
    """The paper's Figure 2 for one image (C×H×W arrays in [0, 1])."""
    fig, axes = plt.subplots(1, 3, figsize=(7.2, 2.9))
    _panel_row(axes, clean, adv, label, p_clean, p_adv, threshold, class_names, decisions=decisions)
    fig.suptitle(title or f"true class: {class_names[label]}", fontsize=10)
    return to_png(fig)


def example_grid(examples: list[dict[str, Any]], threshold: float, class_names: Sequence[str], title: str) -> bytes:
    """Several examples (dicts with clean, adv, label, p_clean, p_adv), one row each, grouped by class."""
    rows = max(len(examples), 1)
    fig, axes = plt.subplots(rows, 3, figsize=(6.3, 2.0 * rows), squeeze=False)
    for r, ex in enumerate(examples):
        _panel_row(axes[r], ex["clean"], ex["adv"], ex["label"], ex["p_clean"], ex["p_adv"], threshold, class_names,
                   titles=r == 0, decisions=(ex.get("pred_clean"), ex.get("pred_adv")))
        axes[r][0].set_ylabel(class_names[ex["label"]], fontsize=9)
    fig.suptitle(title, fontsize=10)
    return to_png(fig)


def finding_example(ex: dict[str, Any], title: str) -> bytes:
    """A multi-label reader's Figure 2: clean image, amplified perturbation, adversarial image, and each
    finding's probability before (grey) and after (red) the attack with its threshold (black tick); a
    finding's name is bold where it is truly present."""
    fig = plt.figure(figsize=(10.4, 3.4))
    grid = fig.add_gridspec(1, 4, width_ratios=(1, 1, 1, 1.9), wspace=0.55)
    delta = ex["adv"] - ex["clean"]
    amp, gain = _amplified(delta)
    for col, (img, label) in enumerate(((ex["clean"], "clean"), (amp, f"perturbation ×{gain:.0f}\nL∞ = "
                                          f"{np.abs(delta).max() * 255:.1f}/255"), (ex["adv"], "adversarial"))):
        ax = fig.add_subplot(grid[0, col])
        _show(ax, img)
        ax.set_title(label, fontsize=9)
    ax = fig.add_subplot(grid[0, 3])
    names, y = ex["findings"], np.arange(len(ex["findings"]))
    ax.barh(y + 0.2, ex["probs_clean"], height=0.4, color="#8c959f", label="clean")
    ax.barh(y - 0.2, ex["probs_adv"], height=0.4, color=WRONG, label="adversarial")
    ax.scatter(ex["thresholds"], y, marker="|", s=120, color="black", label="threshold", zorder=3)
    ax.set_yticks(y, names, fontsize=7)
    for tick, present in zip(ax.get_yticklabels(), ex["truth"]):
        tick.set_fontweight("bold" if present == 1 else "normal")
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("P(finding)", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    return to_png(fig)


def findings_heatmap(names: Sequence[str], rows: Sequence[str], values: np.ndarray, title: str) -> bytes:
    """Findings × attacks: the fraction of each finding's right decisions the attack made wrong (NaN grey)."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(rows), 0.9 + 0.32 * len(names)))
    shown = np.ma.masked_invalid(np.asarray(values, dtype=float))
    cmap = plt.get_cmap("Reds").with_extremes(bad="#d0d7de")
    im = ax.imshow(shown, cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(rows)), rows, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7, color="white" if v > 0.6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.05, label="right decisions made wrong")
    ax.set_title(title, fontsize=10)
    return to_png(fig)


def robustness_curves(curves: dict[str, list[dict[str, Any]]], title: str) -> bytes:
    """Accuracy and AUC against eps (white and black box), and flips by direction at the threshold."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    styles = {"white": ("#cf222e", "o", "white box (PGD on the victim)"),
              "black": ("#0969da", "s", "black box (PGD transferred from the surrogate)")}
    for kind, points in curves.items():
        if not points:
            continue
        color, marker, name = styles.get(kind, ("gray", "x", kind))
        eps = [p["eps"] * 255 for p in points]
        axes[0].plot(eps, [p["accuracy"] for p in points], marker=marker, color=color, label=name)
        axes[1].plot(eps, [np.nan if p["auc"] is None else p["auc"] for p in points], marker=marker, color=color,
                     label=name)
        axes[2].plot(eps, [p["flips"]["healthy_to_disease"] for p in points], marker=marker, color=color,
                     linestyle="-", label=f"{kind}: healthy → disease")
        axes[2].plot(eps, [p["flips"]["disease_to_healthy"] for p in points], marker=marker, color=color,
                     linestyle="--", label=f"{kind}: disease → healthy")
    for ax, ylabel in zip(axes, ("accuracy", "AUC", "decisions flipped")):
        ax.set_xlabel("eps (×1/255, L∞, [0, 1] pixel units)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return to_png(fig)


def robustness_accuracy(rows: list[dict[str, Any]], eps: float, n_images: int, title: str) -> bytes:
    """The clinician's question as a figure: clean accuracy (x) against robust accuracy at ``eps`` (y), one
    defense per colour; a hollow marker for the non-adaptive attack, a filled one for the adaptive worst case,
    joined by an arrow (a long arrow is false security)."""
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    colors = plt.get_cmap("tab20").colors
    for i, row in enumerate(rows):
        point = next((r for r in row["robust"]["rows"] if abs(r["eps"] - eps) < 1e-9), None)
        if point is None:
            continue
        clean = row["clinical"]["accuracy"]
        c = colors[i % len(colors)]
        ax.scatter([clean], [point["non_adaptive"]], s=60, facecolors="none", edgecolors=[c])
        ax.scatter([clean], [point["adaptive"]], s=60, color=c, label=row["name"])
        if point["non_adaptive"] - point["adaptive"] > 0.01:
            ax.annotate("", xy=(clean, point["adaptive"]), xytext=(clean, point["non_adaptive"]),
                        arrowprops={"arrowstyle": "->", "color": c, "alpha": 0.7})
    ax.set_xlabel(f"clean accuracy ({n_images} test images, operating threshold)")
    ax.set_ylabel(f"robust accuracy at eps {eps * 255:.0f}/255 (L∞)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="hollow: non-adaptive\nfilled: adaptive",
              title_fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return to_png(fig)
