"""What the query (black-box) attacks share: success and margin at the victim's operating threshold, and
per-image query bookkeeping against a budget.

Score attacks see N×K probabilities. A binary victim's decision is P(disease) >= threshold (its operating
point, not argmax), so success and the margin loss are both measured against that threshold; a K-class
victim's decision is the most probable class, and the margin is in log-probabilities against the best
other class; a multi-label reader's probabilities are per finding, each against its own threshold. What
each means is the threat model's task kind's (:mod:`medadv.kinds`).
"""

from __future__ import annotations

import torch

from medadv.attacks.threat_model import ThreatModel
from medadv.errors import MedadvError
from medadv.kinds import get_kind, parse_target


def wanted_class(threat: ThreatModel, y: torch.Tensor) -> torch.Tensor:
    """What each image's margin is measured toward (the threat model's task kind decides,
    :meth:`~medadv.kinds.TaskKind.query_goal`): the goal; for a binary untargeted threat the class that is
    not its label; for a K-class untargeted one the label to leave (:func:`margin` is told ``untargeted``);
    for a multi-label reader the wanted state of every finding."""
    return threat.task_kind.query_goal(parse_target(threat.target), y, threat.classes)


def predicted(probs: torch.Tensor, threshold, threat: ThreatModel | None = None) -> torch.Tensor:
    """The victim's decisions from its probabilities at its operating point (binary: P(disease) >=
    threshold; K classes: the most probable; multi-label: each finding at its own threshold)."""
    kind = threat.task_kind if threat is not None else get_kind("binary")
    return kind.decide_probs(probs, threshold)


def score_success(probs: torch.Tensor, y: torch.Tensor, threat: ThreatModel, threshold) -> torch.Tensor:
    """Per image: does the victim's decision meet the threat model's goal?"""
    return threat.succeeded(predicted(probs, threshold, threat), y)


def margin(probs: torch.Tensor, want: torch.Tensor, threshold, untargeted: bool = False,
           threat: ThreatModel | None = None) -> torch.Tensor:
    """Margin loss to minimize, in log-odds: how far each image is from being predicted ``want``
    (:meth:`~medadv.kinds.TaskKind.query_margin` of the threat model's kind; a classifier's without one).

    Binary: <= 0 on the wanted side of logit(threshold) (< 0 for ``want`` = healthy, where ties go to
    disease). K classes: log P(want) against the best other class (``untargeted``: ``want`` is the label
    to leave, and the margin is how far the label still leads).
    """
    kind = threat.task_kind if threat is not None else get_kind("binary")
    return kind.query_margin(probs, want, threshold, untargeted)


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
