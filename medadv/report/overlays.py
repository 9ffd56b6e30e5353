"""A segmentation attack's pictures: predicted masks over the image, clean and attacked, beside the amplified
perturbation (matplotlib, Agg), and the small HTML page that shows them with Dice before and after.

Per example row: the clean image with the true mask's outline (white) and the clean prediction (green fill),
the perturbation amplified to full contrast (its gain in the title), and the attacked image with the attacked
prediction (red fill); titles give each prediction's Dice with the true mask. Images are the stored pixels
([0, 1], C×H×W), masks H×W in {0, 1} on the same grid.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from medadv.report.figures import _amplified, _show, plt, to_png

CLEAN, ATTACKED = "#1a7f37", "#cf222e"


def _overlay(ax, image: np.ndarray, pred: np.ndarray, truth: np.ndarray, color: str, title: str) -> None:
    from matplotlib.colors import ListedColormap

    _show(ax, image)
    ax.imshow(np.ma.masked_where(pred == 0, pred), cmap=ListedColormap([color]), alpha=0.4, vmin=0, vmax=1,
              interpolation="nearest")
    if truth.any():
        ax.contour(truth, levels=[0.5], colors="white", linewidths=0.8)
    ax.set_title(title, fontsize=8)


def overlay_figure(clean: np.ndarray, adversarial: np.ndarray, truth: np.ndarray, pred_clean: np.ndarray,
                   pred_adv: np.ndarray, dice_clean: list, dice_adv: list, title: str) -> bytes:
    """PNG bytes: one row per image (N×C×H×W images in [0, 1], N×H×W masks, N Dice values each side)."""
    n = len(clean)
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n + 0.4), squeeze=False)
    fmt = lambda d: "n/a" if d is None else f"{d:.3f}"  # noqa: E731
    for i in range(n):
        amp, gain = _amplified(adversarial[i] - clean[i])
        _overlay(axes[i][0], clean[i], pred_clean[i], truth[i], CLEAN, f"clean prediction\nDice {fmt(dice_clean[i])}")
        _show(axes[i][1], amp)
        axes[i][1].set_title(f"perturbation ×{gain:.0f}", fontsize=8)
        _overlay(axes[i][2], adversarial[i], pred_adv[i], truth[i], ATTACKED, f"attacked prediction\nDice {fmt(dice_adv[i])}")
    fig.suptitle(title, fontsize=9)
    return to_png(fig)


def attack_pictures(results: dict[str, Any], clean: np.ndarray, adversarial: np.ndarray, truth: np.ndarray,
                    pred_clean: np.ndarray, pred_adv: np.ndarray, count: int = 4) -> bytes:
    """The overlay figure of the first ``count`` images of an attack (stored pixels scaled to [0, 1])."""
    seg = results["segmentation"]
    k = min(count, len(clean))
    a = results["attack"]
    eps = a["threat_model"].get("eps")
    budget = "" if eps is None else f", eps {eps * 255:.3g}/255"
    title = (f"{a['name']} ({a['threat_model']['target']}{budget}): first {k} of {results['n_images']} images; "
             "white outline: true mask")
    return overlay_figure(clean[:k], adversarial[:k], truth[:k], pred_clean[:k], pred_adv[:k],
                          seg["per_image"]["dice_clean"][:k], seg["per_image"]["dice_adversarial"][:k], title)


def attack_page(results: dict[str, Any], png_name: str) -> str:
    """A self-contained HTML page: Dice, IoU, HD95 and the area change before and after, the success rule
    and counts, and the overlay figure (``png_name``, beside the page)."""
    seg, succ = results["segmentation"], results.get("success") or {}
    fmt = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    rows = [("Dice", seg["dice_clean"], seg["dice_adversarial"]), ("IoU", seg["iou_clean"], seg["iou_adversarial"]),
            ("HD95 (px)", seg["hd95_clean"], seg["hd95_adversarial"])]
    if "target_iou_clean" in seg:
        rows.append((f"IoU with the {seg['target']} target", seg["target_iou_clean"], seg["target_iou_adversarial"]))
    body = "".join(f"<tr><td>{html.escape(k)}</td><td>{fmt(c)}</td><td>{fmt(v)}</td></tr>" for k, c, v in rows)
    a = results["attack"]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>medadv segmentation attack</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}td,th{{padding:2px 10px;text-align:right}}
td:first-child{{text-align:left}}</style></head><body>
<h1>{html.escape(a['name'])} on a segmentation model ({seg['n']} images)</h1>
<p>Target {html.escape(str(a['threat_model']['target']))}; {html.escape(a['threat_model']['norm'])} eps
{fmt(a['threat_model'].get('eps'), 5)} in [0, 1] units; means over the {seg['n']} attacked images.</p>
<table><tr><th></th><th>clean</th><th>attacked</th></tr>{body}</table>
<p>Predicted lung area change: {fmt(seg['area_change_percent'], 1)}% ({html.escape(seg['area_change_definition'])}).</p>
<p>Success: {succ.get('succeeded')} of {succ.get('correct_before')} eligible images: {html.escape(str(succ.get('definition')))}.</p>
<img src="{html.escape(png_name)}" alt="clean and attacked predicted masks" style="max-width:100%">
</body></html>
"""
