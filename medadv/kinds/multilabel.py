"""Multi-label: one decision per finding (a chest X-ray reader's 14 findings), each against its own threshold.

Labels are N×F integers: 1 present, 0 absent, :data:`MISSING` (-1) unknown; an unknown label is left out of
the loss and of every figure of its finding, never read as absent. Scores are the N×F sigmoid probabilities;
a finding is called present when its probability reaches its threshold (Youden's J per finding on
validation). ``classes`` is the number of findings F wherever the kind interface asks for it.

Attack targets (what an attacker wants the report to say):

- ``hide``: every finding below its threshold: the image reads "no finding" (the dangerous miss);
- ``finding:<f>=<v>``: finding f added (v = 1) or removed (v = 0) while every other finding stays on the
  side of its threshold the model put it before the attack (what changes anyway is the *collateral*);
- ``opposite``: every finding to the other side of its threshold;
- ``none`` (untargeted): as many findings as possible to the wrong side of the truth.

An attack is handed, as its labels, the model's own decisions before the attack for the targets defined
relative to them (``finding``, ``opposite``) and the true labels otherwise (:meth:`MultiLabel.attack_labels`).
Objectives are written on s = logit - logit(threshold), one term per finding, so the decision boundary of
each finding is s = 0: ``ce`` is the binary cross-entropy of s toward the wanted states, ``margin`` the sum of
min(±s, 0) (zero once a finding is on its wanted side, so APGD's margin loss and its checks carry over).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medadv.errors import MedadvError
from medadv.kinds.base import Point, Target, TaskKind
from medadv.metrics import MISSING, multilabel_metrics, youden_thresholds

_EDGE = 1e-6  # thresholds of exactly 0 or 1 (a finding Youden could not separate) kept finite in logit space


def _logit_thresholds(point: Point, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(point, dtype=np.float64).clip(_EDGE, 1 - _EDGE), device=like.device,
                        dtype=like.dtype)
    return torch.log(t) - torch.log1p(-t)


class MultiLabel(TaskKind):
    """F logits, one per finding; see the module docstring for labels, scores, targets and objectives."""

    name = "multilabel"
    title = "multi-label reader"
    selection_rule = "validation macro AUC over findings"

    # -- training ---------------------------------------------------------------------------------------

    def soft_targets(self, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """N×F labels -> N×F float targets, NaN where unknown (the loss leaves those out)."""
        t = labels.float()
        return t.masked_fill(labels == MISSING, float("nan"))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Binary cross-entropy per finding, averaged over the known labels of the batch. ``pos_weight``
        (F values): each finding's positive term weighted, e.g. by its negatives per positive in the
        training split (:func:`positive_weights`), so rare findings are not learned as always absent."""
        known = ~torch.isnan(targets)
        per = F.binary_cross_entropy_with_logits(logits, targets.nan_to_num(0.0), reduction="none",
                                                 pos_weight=None if pos_weight is None else pos_weight.to(logits))
        return (per * known).sum() / known.sum().clamp_min(1)

    def hard_labels(self, targets: torch.Tensor) -> torch.Tensor:
        """The labels an attack in a training step moves away from: the N×F targets, unknown kept as MISSING."""
        return targets.round().nan_to_num(float(MISSING)).long()

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def predict(self, scores, threshold: Point) -> np.ndarray:
        s = np.asarray(scores)
        return (s >= np.asarray(threshold, dtype=s.dtype if s.dtype.kind == "f" else np.float64)).astype(np.int64)

    def operating_point(self, labels: np.ndarray, scores: np.ndarray,  # type: ignore[override]
                        rule: str = "youden") -> tuple[float, ...]:
        return youden_thresholds(labels, scores, rule)

    def point_of(self, spec: Any) -> tuple[float, ...]:
        thresholds = tuple(getattr(spec, "thresholds", ()) or ())
        if len(thresholds) != len(spec.class_names):
            raise MedadvError(f"the multi-label model's spec has {len(thresholds)} thresholds for "
                              f"{len(spec.class_names)} findings.", "retrain or fix the checkpoint's thresholds.")
        return thresholds

    def metrics(self, labels, scores, threshold, *, class_names=None, graded=False, positive_from=None) -> dict[str, Any]:
        return multilabel_metrics(labels, scores, threshold, finding_names=class_names)

    def selection_score(self, labels, scores, *, graded=False) -> float:
        t = youden_thresholds(labels, scores)
        value = multilabel_metrics(labels, scores, t)["macro_auc"]
        return float(value) if value is not None else -1.0

    def summary(self, metrics: dict[str, Any]) -> list[tuple[str, Any]]:
        anyf = metrics.get("any_finding") or {}
        return [("exact-match accuracy", metrics.get("accuracy")), ("macro AUC", metrics.get("macro_auc")),
                ("micro AUC", metrics.get("micro_auc")), ("any-finding sensitivity", anyf.get("sensitivity")),
                ("any-finding specificity", anyf.get("specificity"))]

    def check_labels(self, labels: np.ndarray, classes: int, where: str) -> None:
        y = np.asarray(labels)
        if y.ndim != 2 or y.shape[1] != classes:
            raise MedadvError(f"{where}: multi-label labels must be N×{classes} (one column per finding); got "
                              f"shape {y.shape}.", "give one 0/1 column per finding.")
        bad = ~np.isin(y, (0, 1, MISSING))
        if bad.any():
            row, col = (int(v[0]) for v in np.nonzero(bad))
            raise MedadvError(f"{where}: label {y[row, col]} at row {row}, finding {col} is not 0, 1 or missing "
                              f"({int(bad.sum())} such labels).", "use 0 (absent), 1 (present) or blank (unknown).")

    # -- attacks ----------------------------------------------------------------------------------------

    def check_target(self, target: Target, classes: int) -> None:
        if target.name in ("erase-left", "erase-right"):
            raise MedadvError(f"target '{target}' is for segmentation models; this model is a {self.title}.",
                              "use hide, finding:<name>=<0|1>, opposite or none.")
        if target.name in ("healthy", "disease", "class"):
            raise MedadvError(f"target '{target}' means a class; a multi-label reader has findings.",
                              "use hide, finding:<name>=<0|1>, opposite or none.")
        if target.name == "finding" and not 0 <= int(target.index) < classes:
            raise MedadvError(f"target {target} names finding {target.index}, but the model reads {classes} findings.",
                              f"use a finding's name or a column 0 to {classes - 1}.")

    def goal(self, target: Target, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """The wanted state of each finding (…×F, -1 where unconstrained); for ``none`` the true labels
        (the states to leave)."""
        self.check_target(target, classes)
        if target.name == "hide":
            return torch.zeros_like(labels)
        if target.name == "opposite":
            return torch.where(labels == MISSING, labels, 1 - labels)
        if target.name == "finding":
            goal = labels.clone()
            goal[..., int(target.index)] = int(target.value)
            return goal
        return labels

    def succeeded(self, target: Target, predicted: torch.Tensor, labels: torch.Tensor, classes: int) -> torch.Tensor:
        """Per image (the last axis is the findings): see :meth:`success_definition`."""
        self.check_target(target, classes)
        known = labels != MISSING
        if target.name == "hide":
            return (predicted == 0).all(-1)
        if target.name == "finding":
            return predicted[..., int(target.index)] == int(target.value)
        if target.name == "opposite":
            return ((predicted != labels) | ~known).all(-1)
        return ((predicted != labels) | ~known).all(-1) & known.any(-1)  # none: every known finding wrong

    def success_definition(self, target: Target) -> str:
        if target.name == "hide":
            return ("truly abnormal images the reader flagged before the attack (some finding at or above its "
                    "threshold) on which no finding reaches its threshold after it (the image reads 'no finding')")
        if target.name == "finding":
            verb = "present" if target.value == 1 else "absent"
            return (f"images whose finding {target.index} was truly and correctly {'absent' if target.value == 1 else 'present'} "
                    f"before the attack and is called {verb} after it; every other finding that changed side is "
                    "collateral (counted in per_finding and collateral)")
        if target.name == "opposite":
            return ("images with every known finding right before the attack on which every finding is on the other "
                    "side of its threshold after it")
        return ("images with every known finding right before the attack on which every known finding is wrong after "
                "it; per_finding counts the findings each attack turned wrong")

    def decide(self, logits: torch.Tensor, point: Point) -> torch.Tensor:
        return self.decide_probs(torch.sigmoid(logits), point)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def decide_probs(self, probs: torch.Tensor, point: Point) -> torch.Tensor:
        return (probs >= torch.as_tensor(np.asarray(point, dtype=np.float64), device=probs.device,
                                         dtype=probs.dtype)).long()

    def _wanted(self, goal: torch.Tensor, targeted: bool) -> torch.Tensor:
        """The state each finding is pushed to (-1: unconstrained): the goal, or away from the truth."""
        return goal if targeted else torch.where(goal == MISSING, goal, 1 - goal)

    def per_image_loss(self, logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, loss: str,
                       point: Point = 0.5) -> torch.Tensor:
        want = self._wanted(target, True) if target is not None else self._wanted(y, False)
        s = logits - _logit_thresholds(point, logits)
        constrained = want != MISSING
        if loss == "margin":  # zero on a finding's wanted side, the distance to it otherwise
            term = torch.clamp((2 * want - 1).to(s.dtype) * s, max=0.0)
        else:  # ce: binary cross-entropy toward the wanted states, negated (ascended)
            term = -F.binary_cross_entropy_with_logits(s, want.clamp_min(0).to(s.dtype), reduction="none")
        return (term * constrained).sum(1)

    def objective(self, logits: torch.Tensor, goal: torch.Tensor, targeted: bool, loss: str = "ce",
                  point: Point = 0.5) -> torch.Tensor:
        return self.per_image_loss(logits, goal, goal if targeted else None, loss, point).sum()

    def margin_targets(self, logits: torch.Tensor, y: torch.Tensor, count: int) -> list[torch.Tensor]:
        return [self._wanted(y, False)]  # every finding away from the truth, in one pass

    def query_goal(self, target: Target, labels: torch.Tensor, classes: int) -> torch.Tensor:
        return self.goal(target, labels, classes)

    def query_margin(self, probs: torch.Tensor, want: torch.Tensor, point: Point, untargeted: bool = False
                     ) -> torch.Tensor:
        """To minimize: the summed distance, in log-odds, of each constrained finding from its wanted side
        (0 when all are there; ``untargeted``: ``want`` holds the true labels to leave)."""
        tiny = torch.finfo(probs.dtype).tiny
        s = probs.clamp_min(tiny).log() - (1 - probs).clamp_min(tiny).log() - _logit_thresholds(point, probs)
        wanted = self._wanted(want, not untargeted)
        term = torch.relu(-(2 * wanted - 1).to(s.dtype) * s)
        return (term * (wanted != MISSING)).sum(1)

    # -- what the runner counts -------------------------------------------------------------------------

    def needs_decisions(self, target: Target) -> bool:
        return target.name in ("finding", "opposite")

    def attack_labels(self, target: Target, labels: np.ndarray, decisions: np.ndarray) -> np.ndarray:
        return decisions if target.name in ("finding", "opposite") else labels

    def eligible(self, target: Target, labels: np.ndarray, decisions: np.ndarray) -> np.ndarray:
        known = labels != MISSING
        if target.name == "hide":
            return (labels == 1).any(1) & (decisions == 1).any(1)
        if target.name == "finding":
            f, was = int(target.index), 1 - int(target.value)
            return (labels[:, f] == was) & (decisions[:, f] == was)
        return ((decisions == labels) | ~known).all(1) & known.any(1)

    def attack_details(self, target: Target, labels: np.ndarray, before: np.ndarray, after: np.ndarray,
                       class_names: Sequence[str]) -> dict[str, Any]:
        """Per finding: decisions that changed side (up: absent -> present), and findings right before and
        wrong after; for a ``finding`` target the collateral on its eligible images (other findings that
        changed side), for ``hide`` the findings still called present."""
        known = labels != MISSING
        right_before = (before == labels) & known
        per = []
        for f, name in enumerate(class_names):
            per.append({"finding": name, "up": int(((before[:, f] == 0) & (after[:, f] == 1)).sum()),
                        "down": int(((before[:, f] == 1) & (after[:, f] == 0)).sum()),
                        "right_before": int(right_before[:, f].sum()),
                        "made_wrong": int((right_before[:, f] & (after[:, f] != labels[:, f])).sum())})
        eligible = self.eligible(target, labels, before)
        out: dict[str, Any] = {"per_finding": per, "n_eligible": int(eligible.sum()),
                               "findings_made_wrong": int(sum(r["made_wrong"] for r in per)),
                               "findings_right_before": int(right_before.sum())}
        if target.name == "finding":
            f = int(target.index)
            changed = (before != after)
            changed[:, f] = False
            c = changed[eligible]
            out["collateral"] = {
                "images": int(eligible.sum()),
                "mean_other_findings_changed": float(c.sum(1).mean()) if len(c) else None,
                "images_with_collateral": int(c.any(1).sum()),
                "by_finding": {name: int(c[:, g].sum()) for g, name in enumerate(class_names) if g != f},
                "definition": "other findings whose decision changed side, on the images the target counts",
            }
        if target.name == "hide":
            still = after[eligible] == 1
            out["still_present"] = {"images": int(eligible.sum()),
                                    "mean_findings_present_after": float(still.sum(1).mean()) if len(still) else None,
                                    "mean_findings_present_before": float((before[eligible] == 1).sum(1).mean())
                                    if eligible.any() else None}
        return out


MAX_POS_WEIGHT = 100.0  # a finding with 1 positive in 10,000 images is weighted 100, not 10,000


def positive_weights(labels: np.ndarray) -> np.ndarray:
    """Per finding: negatives per positive among the known training labels, clipped to [1, MAX_POS_WEIGHT]
    (1 where a finding has no positive: there is nothing to up-weight)."""
    y = np.asarray(labels)
    pos, neg = (y == 1).sum(0), (y == 0).sum(0)
    return np.where(pos > 0, np.clip(neg / np.maximum(pos, 1), 1.0, MAX_POS_WEIGHT), 1.0).astype(np.float32)


def finding_margin(logits: torch.Tensor, point: Point) -> torch.Tensor:
    """s = logit - logit(threshold) per finding: >= 0 where the finding is called present."""
    return logits - _logit_thresholds(point, logits)


__all__ = ["MISSING", "MultiLabel", "finding_margin", "positive_weights"]
