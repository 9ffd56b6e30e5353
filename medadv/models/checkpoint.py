"""Checkpoints: a folder with ``model.safetensors`` (weights) and ``medadv.json`` (metadata).

Loading never unpickles: safetensors holds only tensors, the metadata is JSON. The metadata holds the
model spec (architecture, input size and channels, normalization, task, class names, operating
threshold), the training configuration and seed, the data checksum, the hashed keys of the images it was
trained and validated on (``trained_on``) and the package versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medadv.data.imageset import ImageSet
from medadv.errors import MedadvError
from medadv.io import atomic_dir, to_json
from medadv.models.wrapper import MedicalClassifier, ModelSpec
from medadv.models.zoo import build_network

FORMAT = "medadv-checkpoint/1"
WEIGHTS = "model.safetensors"
META = "medadv.json"


def save_checkpoint(model: MedicalClassifier, out: str | Path, meta: dict[str, Any],
                    trained_on: tuple[ImageSet, ImageSet] | None = None) -> Path:
    """Write ``out/`` atomically: the folder appears complete or not at all.

    ``trained_on``: the (train, val) ImageSets the model was fitted and selected on; their hashed image
    and patient keys go into the metadata (``trained_on``, :mod:`medadv.data.trained_on`), so every later
    evaluation can refuse a split that holds them."""
    from safetensors.torch import save_model

    from medadv.runinfo import environment

    record = {"format": FORMAT, "spec": model.spec.to_json(), **meta}
    if trained_on is not None:
        from medadv.data.trained_on import record as trained_on_record

        record["trained_on"] = trained_on_record(*trained_on)
    record.setdefault("environment", environment())
    with atomic_dir(out) as tmp:
        save_model(model.network, str(tmp / WEIGHTS))
        (tmp / META).write_text(to_json(record))
    return Path(out)


def read_metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    meta_file = path / META
    if not path.is_dir() or not meta_file.is_file():
        raise MedadvError(f"{path} is not a medadv checkpoint (no {META}).",
                          "pass the folder written by `medadv train --out`.")
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedadvError(f"{meta_file} is not valid JSON ({exc}).", "train the model again.") from exc
    if meta.get("format") != FORMAT:
        raise MedadvError(f"{meta_file} has format {meta.get('format')!r}; expected {FORMAT}.",
                          "train the model again with this medadv.")
    return meta


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[MedicalClassifier, dict[str, Any]]:
    """The wrapped model (eval mode, on ``device``) and its metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    meta = read_metadata(path)
    try:
        spec = ModelSpec.from_json(meta["spec"])
    except (KeyError, TypeError) as exc:
        raise MedadvError(f"{Path(path) / META} has an incomplete model spec ({exc}).", "train the model again.") from exc
    from medadv.kinds import get_kind

    network = build_network(spec.arch, spec.net_channels, spec.input_size, stem=spec.stem,
                            outputs=get_kind(spec.kind).outputs(spec.classes))
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise MedadvError(f"{weights} is missing.", "copy the whole checkpoint folder.")
    try:
        load_model(network, str(weights), strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise MedadvError(f"{weights} is corrupt or does not fit {spec.arch} ({str(exc)[:120]}).",
                          "train the model again or copy the checkpoint folder intact.") from exc
    model = MedicalClassifier(network, spec).to(device).eval()
    return model, meta


def set_class_names(path: str | Path, names: tuple[str, str]) -> None:
    """Rename a checkpoint's two classes (label 0, label 1) in its metadata, atomically: the task's
    defaults ("normal", "pneumonia") are wrong for data that calls them e.g. normal/abnormal."""
    from medadv.io import write_json

    if len(names) != 2 or not all(isinstance(n, str) and n.strip() for n in names):
        raise MedadvError(f"class names {names!r} are not two non-empty names.", "pass e.g. --class-names normal,abnormal.")
    meta = read_metadata(path)
    meta["spec"]["class_names"] = [n.strip() for n in names]
    write_json(Path(path) / META, meta)
