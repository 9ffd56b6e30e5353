"""``medadv wrap`` as a library call: a checkpoint saved behind preprocessing defenses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medadv.errors import MedadvError


@dataclass
class WrapJob:
    """Put ``defenses`` (each ``{"name": registered defense, **settings}``, applied in order) in front of
    the network in ``model`` and save the defended checkpoint to ``out``."""

    model: Path
    out: Path
    defenses: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class WrapResult:
    out: Path
    defenses: tuple[str, ...]  # the registered names, in the order they are applied


def wrap(job: WrapJob) -> WrapResult:
    """Write the defended checkpoint (the network's weights plus the defenses in medadv.json)."""
    from medadv.defenses import defend  # the package registers every defense
    from medadv.defenses.checkpoint import save_defended
    from medadv.models import load_checkpoint

    net, meta = load_checkpoint(job.model)
    from medadv.models.interface import refuse_dense_or_volume

    refuse_dense_or_volume(net, "medadv wrap (preprocessing defenses)")
    recorded = meta.get("defense") or {}
    if recorded.get("kind") == "preprocessing":
        raise MedadvError(f"{job.model} is already behind preprocessing defenses.",
                          "wrap the undefended checkpoint, listing every defense in one command.")
    defended = defend(net, job.defenses)
    # a robustly trained network keeps its training record beside the preprocessing one
    save_defended(defended, job.out, {**meta, **({"training_defense": recorded} if recorded else {})})
    return WrapResult(job.out, tuple(d.name for d in defended.defenses))
