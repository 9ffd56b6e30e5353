"""Task kinds: what a model's outputs mean, in one object per kind.

A kind owns everything that depends on the output: how many logits the head has, the training targets
and loss, the scores the rest of medadv carries around (binary: P(disease), N floats; multi-class: the
N×K class probabilities), the decision at the operating point, the clinical metrics, the attack
objectives ("targeted" toward what) and the per-image success. 2D or 3D is a property of the data and the
network, never of the kind.

Adding a kind (segmentation) is one new module with a :class:`TaskKind` subclass and one
:func:`register_kind` call here; nothing else names kinds.
"""

from __future__ import annotations

from medadv.errors import MedadvError
from medadv.kinds.base import TaskKind, Target, parse_target
from medadv.kinds.binary import Binary
from medadv.kinds.multiclass import MultiClass
from medadv.kinds.multilabel import MultiLabel
from medadv.kinds.segmentation import Segmentation

KINDS: dict[str, TaskKind] = {}


def register_kind(kind: TaskKind, *, replace: bool = False) -> TaskKind:
    """Make ``kind`` known by its name (for checkpoints, tasks and the CLI)."""
    if kind.name in KINDS and not replace:
        raise MedadvError(f"a task kind named '{kind.name}' is already registered.", "pick another name.")
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> TaskKind:
    """The registered kind ``name``; one line naming the choices otherwise."""
    try:
        return KINDS[name]
    except KeyError:
        raise MedadvError(f"unknown task kind '{name}'.", f"use one of {', '.join(KINDS)}.") from None


register_kind(Binary())
register_kind(MultiClass())
register_kind(MultiLabel())
register_kind(Segmentation())

__all__ = ["KINDS", "TaskKind", "Target", "get_kind", "parse_target", "register_kind"]
