"""What the query (black-box) attacks share: success and margin at the victim's operating threshold, and
per-image query bookkeeping against a budget.

Score attacks see N×K probabilities. A binary victim's decision is P(disease) >= threshold (its operating
point, not argmax), so success and the margin loss are both measured against that threshold; a K-class
victim's decision is the most probable class, and the margin is in log-probabilities against the best
other class.
"""

from __future__ import annotations

import math

import torch

from medadv.attacks.threat_model import ThreatModel
from medadv.errors import MedadvError


def wanted_class(threat: ThreatModel, y: torch.Tensor) -> torch.Tensor:
    """The class each image must be predicted as to count as a success (binary task: untargeted means
    the class that is not its label). For a K-class untargeted threat there is no single such class:
    the label to leave is returned, and :func:`margin` is told ``untargeted``."""
    goal = threat.goal(y)
    return goal if threat.targeted or threat.classes > 2 else 1 - goal


def predicted(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """The victim's labels: binary, 1 where P(disease) >= threshold; K classes, the most probable."""
    return (probs[:, 1] >= threshold).long() if probs.shape[1] == 2 else probs.argmax(1)


def score_success(probs: torch.Tensor, y: torch.Tensor, threat: ThreatModel, threshold: float) -> torch.Tensor:
    """Per image: does the victim's thresholded decision meet the threat model's goal?"""
    return threat.succeeded(predicted(probs, threshold), y)


def log_odds(probs: torch.Tensor) -> torch.Tensor:
    """log P(disease) - log P(healthy), from the two probabilities separately: a confident softmax keeps
    the small one precise where 1 - p would round to 0, so the margin does not saturate."""
    tiny = torch.finfo(probs.dtype).tiny
    return probs[:, 1].clamp_min(tiny).log() - probs[:, 0].clamp_min(tiny).log()


def margin(probs: torch.Tensor, want: torch.Tensor, threshold: float, untargeted: bool = False) -> torch.Tensor:
    """Margin loss to minimize, in log-odds: how far each image is from being predicted ``want``.

    Binary: <= 0 on the wanted side of logit(threshold) (< 0 for ``want`` = healthy, where ties go to
    disease). K classes: log P(want) against the best other class (``untargeted``: ``want`` is the label
    to leave, and the margin is how far the label still leads).
    """
    if probs.shape[1] > 2:
        tiny = torch.finfo(probs.dtype).tiny
        logp = probs.clamp_min(tiny).log()
        own = logp.gather(1, want[:, None])[:, 0]
        best_other = logp.scatter(1, want[:, None], -float("inf")).amax(1)
        return own - best_other if untargeted else best_other - own
    if not 0.0 < threshold < 1.0:
        raise MedadvError(f"operating threshold {threshold} is not inside (0, 1).", "pass the victim's threshold.")
    s = log_odds(probs) - math.log(threshold / (1.0 - threshold))
    return torch.where(want == 1, -s, s)


class QueryBudget:
    """Wraps an oracle so that every image sent is charged to the image it attacks, capped at ``limit``.

    ``used`` is the per-image count returned as ``AttackResult.queries``. Exceeding the cap is a bug in
    the attack, not a user error, so it raises ``RuntimeError``.
    """

    def __init__(self, oracle, n: int, limit: int, device: torch.device) -> None:
        self.oracle = oracle
        self.limit = limit
        self.used = torch.zeros(n, dtype=torch.long, device=device)

    def left(self, index: torch.Tensor) -> torch.Tensor:
        return self.limit - self.used[index]

    def __call__(self, x: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Query the oracle on x (non-empty; rows may share an owner); row i is charged to image ``owner[i]``."""
        self.used += torch.bincount(owner, minlength=len(self.used))
        if bool((self.used > self.limit).any()):
            raise RuntimeError("query attack exceeded its per-image budget")
        return self.oracle(x)


def check_budget(max_queries: int, least: int, attack: str) -> None:
    if not isinstance(max_queries, int) or max_queries < least:
        raise MedadvError(f"{attack} needs max_queries >= {least}; got {max_queries}.",
                          f"pass --max-queries {least} or more.")
