"""Segmentation: one binary foreground mask per image (a chest X-ray's lungs), one logit per pixel.

Shapes and units. Logits are N×1×H×W (one channel, sigmoid: P(foreground) per pixel) at the stored image's
H×W (the model wrapper maps the network's output back onto the stored grid). Labels are the true masks,
N×H×W integers in {0, 1}. Scores are the N×H×W per-pixel probabilities; a pixel is called foreground when
its probability reaches 0.5 (the operating point is fixed: selection is on validation Dice, not a threshold).

Metrics (MONAI's, per image and their mean over images): Dice (:class:`monai.metrics.DiceMetric`), IoU
(:class:`monai.metrics.MeanIoU`) and the 95th-percentile Hausdorff distance (:class:`monai.metrics.
HausdorffDistanceMetric`, in pixels of the stored image; undefined, null, for an image whose predicted or
true mask is empty). The loss is MONAI's Dice + binary cross-entropy on the logits
(:class:`monai.losses.DiceCELoss`, sigmoid).

Attack targets (what an attacker wants the mask to be):

- ``none`` (untargeted, "destroy the mask"): ascend the Dice + BCE loss against the true mask; an image
  succeeds when the attacked prediction's Dice with the true mask falls below :data:`UNTARGETED_DICE` (0.5).
- ``erase-left`` / ``erase-right`` (targeted, in the spirit of Ozbulak et al. 2019's adaptive segmentation
  mask attack: descend the Dice + BCE loss toward a target mask): the target is the true mask with one lung
  removed. The lungs are the true mask's 8-connected components (:func:`scipy.ndimage.label`); a component
  belongs to the side of the image its centroid lies on (column < W/2: the image's left half). Chest X-rays
  are viewed in the radiological convention (PA view, the patient facing the viewer), so the patient's
  **left** lung is on the image's **right**: ``erase-left`` removes every component whose centroid lies in
  the image's right half, ``erase-right`` those in its left half. An image succeeds when the attacked
  prediction's IoU with the target mask reaches :data:`TARGETED_IOU` (0.9).

Which images count (:meth:`Segmentation.eligible`): those the model segmented before the attack (clean Dice
with the truth >= :data:`UNTARGETED_DICE`) and, for an erase target, whose true mask has a component on
that side (the target differs from the truth). The clinical figure beside them is the predicted lung area's
change in percent, attacked against clean prediction.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medadv.errors import MedadvError
from medadv.kinds.base import Point, Target, TaskKind

UNTARGETED_DICE = 0.5  # untargeted success: Dice with the true mask below this after the attack
TARGETED_IOU = 0.9  # targeted success: IoU with the target mask at or above this after the attack
THRESHOLD = 0.5  # a pixel is foreground when P(foreground) >= this
ERASE = {"erase-left": "right", "erase-right": "left"}  # target -> the image half whose components are removed
# the attacks whose per-image objective is the kind's (autograd through the model, per-image masks)
PER_PIXEL_ATTACKS = ("fgsm", "pgd", "pgd-l2", "apgd")


def _masks(t: torch.Tensor | np.ndarray) -> torch.Tensor:
    """N×H×W (or N×1×H×W) masks or decisions as float N×1×H×W in {0, 1}."""
    m = torch.as_tensor(np.asarray(t)) if isinstance(t, np.ndarray) else t
    m = m.float()
    return m[:, None] if m.ndim == 3 else m


def erase_side(masks: np.ndarray, side: str) -> np.ndarray:
    """``masks`` (N×H×W, {0, 1}) with every 8-connected component whose centroid lies in the image's
    ``side`` half (``left``: centroid column < W/2, ``right``: >= W/2) set to 0."""
    from scipy import ndimage

    out = np.array(masks, dtype=np.uint8, copy=True)
    w = out.shape[-1]
    for i in range(len(out)):
        comps, count = ndimage.label(out[i], structure=np.ones((3, 3), dtype=np.int64))
        if count == 0:
            continue
        cols = ndimage.center_of_mass(out[i], comps, range(1, count + 1))
        for k, (_, col) in enumerate(cols, start=1):
            if (col < w / 2) == (side == "left"):
                out[i][comps == k] = 0
    return out


def overlap(pred: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray, hd95: bool = True) -> dict[str, np.ndarray]:
    """Per image Dice, IoU and (``hd95``) HD95 in pixels of binary masks ``pred`` against ``ref`` (N×H×W or
    N×1×H×W), by MONAI's metrics; float64 arrays of N, NaN where a metric is undefined (an empty mask)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU

    p, r = _masks(pred).cpu(), _masks(ref).cpu()
    if len(p) == 0:
        empty = np.zeros(0)
        return {"dice": empty, "iou": empty, "hd95": empty}
    # both empty: the prediction is right (Dice and IoU 1), as MONAI's ignore_empty=False says
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p, r)
    iou = MeanIoU(include_background=True, reduction="none", ignore_empty=False)(p, r)
    out = {"dice": dice.double()[:, 0].numpy(), "iou": iou.double()[:, 0].numpy()}
    if not hd95:  # the attack loop's success test: Dice and IoU only (HD95's distance transforms are slow)
        return out
    with warnings.catch_warnings():  # MONAI warns (and returns nan/inf) for empty masks: null here
        warnings.simplefilter("ignore")
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(p, r)
    distance = hd.double()[:, 0].numpy()
    empty = ((p.flatten(1).sum(1) == 0) | (r.flatten(1).sum(1) == 0)).numpy()
    distance[empty | ~np.isfinite(distance)] = np.nan
    return out | {"hd95": distance}


def _mean(values: np.ndarray) -> float | None:
    v = values[np.isfinite(values)]
    return float(v.mean()) if len(v) else None


def _listed(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


class Segmentation(TaskKind):
    """One logit per pixel (binary foreground mask); see the module docstring for labels, metrics, targets,
    objectives and success."""

    name = "segmentation"
    title = "segmentation model"
    selection_rule = "validation mean Dice"
    spatial = True
    class_names_range = (2, 2)
    default_target = "none"
    details_key = "segmentation"
    fixed_rule = f"per pixel: foreground where P(foreground) >= {THRESHOLD}"

    # -- training ---------------------------------------------------------------------------------------

    def outputs(self, classes: int) -> int:
        return 1  # one sigmoid channel: P(foreground)

    def soft_targets(self, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """N×H×W masks -> N×1×H×W float targets."""
        return _masks(labels)

    def _loss_fn(self):
        from monai.losses import DiceCELoss

        return DiceCELoss(sigmoid=True)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """MONAI's Dice + BCE (sigmoid) of N×1×H×W logits against N×1×H×W targets, mean over the batch."""
        return self._loss_fn()(logits, targets.to(logits.dtype))

    def hard_labels(self, targets: torch.Tensor) -> torch.Tensor:
        return targets[:, 0].round().long()

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits[:, 0])

    def predict(self, scores, threshold: float) -> np.ndarray:
        return (np.asarray(scores) >= THRESHOLD).astype(np.uint8)

    def operating_point(self, labels: np.ndarray, scores: np.ndarray, rule: str = "youden") -> float:
        if rule != "youden":
            raise MedadvError(f"a segmentation model calls a pixel foreground at P >= {THRESHOLD}; --threshold-rule "
                              f"{rule} has no threshold to set.", "leave --threshold-rule out.")
        return THRESHOLD

    def metrics(self, labels, scores, threshold, *, class_names=None, graded=False, positive_from=None) -> dict[str, Any]:
        """Dice, IoU, HD95 per image and mean, pixel accuracy (``accuracy``), mean confidence and the
        predicted foreground area (pixels, mean over images)."""
        s = np.asarray(scores)
        pred = self.predict(s, THRESHOLD)
        m = overlap(pred, np.asarray(labels))
        n = len(s)
        confidence = np.where(pred == 1, s, 1 - s)
        return {
            "n": n, "threshold": THRESHOLD,
            "dice": _mean(m["dice"]), "iou": _mean(m["iou"]), "hd95": _mean(m["hd95"]),
            "hd95_undefined": int((~np.isfinite(m["hd95"])).sum()),
            "accuracy": float((pred == np.asarray(labels)).mean()) if n else None,
            "mean_confidence": float(confidence.mean()) if n else None,
            "mean_area": float(pred.reshape(n, -1).sum(1).mean()) if n else None,
            "per_image": {"dice": _listed(m["dice"]), "iou": _listed(m["iou"]), "hd95": _listed(m["hd95"])},
        }

    def selection_score(self, labels, scores, *, graded=False) -> float:
        value = _mean(overlap(self.predict(scores, THRESHOLD), np.asarray(labels), hd95=False)["dice"])
        return float(value) if value is not None else -1.0

    def summary(self, metrics: dict[str, Any]) -> list[tuple[str, Any]]:
        return [("Dice", metrics.get("dice")), ("IoU", metrics.get("iou")), ("HD95 (px)", metrics.get("hd95"))]

    def check_labels(self, labels: np.ndarray, classes: int, where: str) -> None:
        y = np.asarray(labels)
        if y.ndim != 3 or not np.isin(y, (0, 1)).all():
            raise MedadvError(f"{where}: segmentation labels must be N×H×W masks of 0 and 1; got shape {y.shape}.",
                              "give one binary mask per image.")

    def label_shape(self, x: torch.Tensor, classes: int) -> tuple[int, ...] | None:
        return (len(x), *x.shape[-2:])

    # -- attacks ----------------------------------------------------------------------------------------

    def check_target(self, target: Target, classes: int) -> None:
        if target.name not in ("none", *ERASE):
            raise MedadvError(f"target '{target}' means a class; a segmentation model's targets are masks.",
                              "use --target none (destroy the mask), erase-left or erase-right.")

    def check_attack(self, name: str, access: str, needs_fit: bool) -> None:
        if name in PER_PIXEL_ATTACKS:
            return
        why = ("it queries class scores or labels, which a mask does not have" if access in ("score", "label") else
               "it is fitted to a class objective over training images" if needs_fit else
               "it mixes in a score-based attack (Square) that needs class scores" if name == "autoattack" else
               "its objective is not defined per pixel")
        raise MedadvError(f"attack {name} cannot attack a segmentation model: {why}.",
                          f"use one of {', '.join(PER_PIXEL_ATTACKS)}.")

    def goal(self, target: Target, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """The mask each image is pushed toward (erase targets) or away from (``none``: the true mask),
        N×H×W on the labels' device and dtype."""
        self.check_target(target, classes)
        if target.name == "none":
            return labels
        erased = erase_side(labels.detach().cpu().numpy(), ERASE[target.name])
        return torch.from_numpy(erased).to(device=labels.device, dtype=labels.dtype)

    def succeeded(self, target: Target, predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """Per image: Dice with the truth < 0.5 (``none``) or IoU with the target mask >= 0.9 (erase)."""
        goal = self.goal(target, labels, classes)
        m = overlap(predicted, goal, hd95=False)
        hit = m["dice"] < UNTARGETED_DICE if target.name == "none" else m["iou"] >= TARGETED_IOU
        return torch.from_numpy(hit).to(predicted.device)

    def success_definition(self, target: Target) -> str:
        if target.name == "none":
            return (f"images segmented before the attack (Dice with the true mask >= {UNTARGETED_DICE}) whose "
                    f"attacked prediction has Dice < {UNTARGETED_DICE} with the true mask (the mask destroyed)")
        side = ERASE[target.name]
        lung = "left" if target.name == "erase-left" else "right"
        return (f"images segmented before the attack (Dice >= {UNTARGETED_DICE}) whose true mask has a component in "
                f"the image's {side} half (the patient's {lung} lung, radiological convention), whose attacked "
                f"prediction has IoU >= {TARGETED_IOU} with the target mask: the true mask without the 8-connected "
                f"components whose centroid lies in the image's {side} half (column {'>=' if side == 'right' else '<'} W/2)")

    def decide(self, logits: torch.Tensor, point: Point) -> torch.Tensor:
        return (torch.sigmoid(logits[:, 0]) >= THRESHOLD).long()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits[:, 0])

    def decide_probs(self, probs: torch.Tensor, point: Point) -> torch.Tensor:
        return (probs >= THRESHOLD).long()

    def per_image_loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, loss: str,
                       point: Point = 0.5) -> torch.Tensor:
        """N values to ascend: the Dice + BCE loss against the true mask ``y`` (``target`` None), or its
        negative against the target mask. Dice by MONAI's :class:`~monai.losses.DiceLoss` per image (the
        Dice half of DiceCELoss), BCE averaged over each image's pixels: their batch mean is DiceCELoss."""
        from monai.losses import DiceLoss

        if loss != "ce":
            raise MedadvError(f"loss '{loss}' is a classifier's margin; a segmentation model's objective is Dice + BCE.",
                              "leave the loss at ce.")
        want = _masks(y if target is None else target).to(logits.dtype)
        dice = DiceLoss(sigmoid=True, reduction="none")(logits, want).flatten(1).mean(1)
        bce = F.binary_cross_entropy_with_logits(logits, want, reduction="none").flatten(1).mean(1)
        per = dice + bce
        return per if target is None else -per

    def objective(self, logits: torch.Tensor, goal: torch.Tensor, targeted: bool, loss: str = "ce",
                  point: Point = 0.5) -> torch.Tensor:
        return self.per_image_loss(logits, goal, goal if targeted else None, loss, point).sum()

    def margin_targets(self, logits: torch.Tensor, y: torch.Tensor, count: int) -> list[torch.Tensor]:
        raise MedadvError("a margin loss has no meaning for a segmentation model.", "leave the loss at ce.")

    # -- what the runner counts -------------------------------------------------------------------------

    def eligible(self, target: Target, labels: np.ndarray, decisions: np.ndarray) -> np.ndarray:
        ok = overlap(decisions, labels, hd95=False)["dice"] >= UNTARGETED_DICE
        if target.name != "none":
            erased = erase_side(labels, ERASE[target.name])
            ok &= (erased != np.asarray(labels)).reshape(len(labels), -1).any(1)
        return ok

    def attack_details(self, target: Target, labels: np.ndarray, before: np.ndarray, after: np.ndarray,
                       class_names: Sequence[str]) -> dict[str, Any]:
        """Dice, IoU and HD95 clean vs attacked (against the truth; with a target, also IoU with the target
        mask) and the predicted area's change, attacked against clean prediction, in percent."""
        truth = np.asarray(labels)
        clean, adv = overlap(before, truth), overlap(after, truth)
        n = len(truth)
        area_before = np.asarray(before).reshape(n, -1).sum(1).astype(np.float64)
        area_after = np.asarray(after).reshape(n, -1).sum(1).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            change = np.where(area_before > 0, 100.0 * (area_after - area_before) / area_before, np.nan)
        out: dict[str, Any] = {
            "n": n, "threshold": THRESHOLD,
            "dice_clean": _mean(clean["dice"]), "dice_adversarial": _mean(adv["dice"]),
            "iou_clean": _mean(clean["iou"]), "iou_adversarial": _mean(adv["iou"]),
            "hd95_clean": _mean(clean["hd95"]), "hd95_adversarial": _mean(adv["hd95"]),
            "hd95_units": "pixels of the stored image; images with an empty mask are left out (hd95_undefined)",
            "hd95_undefined": {"clean": int((~np.isfinite(clean["hd95"])).sum()),
                               "adversarial": int((~np.isfinite(adv["hd95"])).sum())},
            "area_change_percent": _mean(change),
            "area_change_definition": "per image 100 × (attacked − clean predicted foreground pixels) / clean ones, "
                                      "mean over images with a non-empty clean prediction",
            "success_level": {"untargeted_dice_below": UNTARGETED_DICE, "targeted_iou_at_least": TARGETED_IOU},
            "per_image": {"dice_clean": _listed(clean["dice"]), "dice_adversarial": _listed(adv["dice"]),
                          "area_change_percent": _listed(change)},
        }
        if target.name != "none":
            goal = erase_side(truth, ERASE[target.name])
            tc, ta = overlap(before, goal, hd95=False)["iou"], overlap(after, goal, hd95=False)["iou"]
            out |= {"target": str(target), "target_iou_clean": _mean(tc), "target_iou_adversarial": _mean(ta)}
            out["per_image"] |= {"target_iou_clean": _listed(tc), "target_iou_adversarial": _listed(ta)}
        return out
