"""A checkpoint that records its preprocessing defense, and the loader that rebuilds the defended model.

The network is saved as an ordinary medadv checkpoint (safetensors + JSON: never unpickled); the
defense goes into ``medadv.json`` under ``"defense"`` as ``DefendedModel.to_json()`` (kind, names and
settings), so a loader that does not know defenses still loads the bare model, and
:func:`load_defended` rebuilds the whole pipeline from the registry by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from medadv.defenses.base import DefendedModel, defend
from medadv.errors import MedadvError


def save_defended(model: DefendedModel, out: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``out/`` (atomic) with the wrapped model's weights and ``meta`` plus ``"defense"``."""
    from medadv.models.checkpoint import save_checkpoint

    return save_checkpoint(model.model, out, {**meta, "defense": model.to_json()})


def load_defended(path: str | Path, device: str = "cpu", adaptive: bool | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's model, behind its recorded preprocessing defenses when it has any.

    ``adaptive`` overrides the recorded gradient path (True: BPDA for an adaptive evaluation). A
    training defense (adversarial or noise training) is part of the weights: the model is returned as is.
    """
    from medadv.models.checkpoint import load_checkpoint

    model, meta = load_checkpoint(path, device)
    record = meta.get("defense")
    if not record or record.get("kind") != "preprocessing":
        return model, meta
    try:
        names = record["defenses"]
        recorded = bool(record.get("adaptive", False))
    except (KeyError, TypeError) as exc:
        raise MedadvError(f"{path} records a defense without its settings ({exc}).", "save the defended model again.") from None
    return defend(model, names, recorded if adaptive is None else adaptive).to(device), meta
