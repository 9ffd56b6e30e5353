"""Clean (unattacked) evaluation of a checkpoint on its task's data: the paper's Table 1."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medadv.data import ImageSet, load_split
from medadv.errors import MedadvError
from medadv.evaluate.metrics import clinical_metrics
from medadv.models.wrapper import MedicalClassifier


def model_split(meta: dict[str, Any], split: str, *, data_root: str | Path | None = None, source: str | None = None,
                image_size: int | None = None) -> ImageSet:
    """The ``split`` of the data a checkpoint was trained on, as stored.

    MedMNIST sources are read from the file of the model's resolution; folders at their stored size
    (the model wrapper resizes), unless ``image_size`` says otherwise.
    """
    source = source or meta.get("data", {}).get("source")
    if image_size is None and source and source.startswith("medmnist:"):
        image_size = meta.get("data", {}).get("image_size")
    return load_split(meta["task"], split, data_root=data_root, source=source, size=image_size,
                      split_seed=meta.get("data", {}).get("split_seed", 0))


def check_fit(model: MedicalClassifier, data: ImageSet) -> None:
    """Fail early, naming both sides, when a checkpoint does not match the data."""
    spec = model.spec
    if data.channels != spec.data_channels:
        raise MedadvError(
            f"the model ({spec.arch}, task {spec.task}) takes {spec.data_channels}-channel images but {data.source} "
            f"has {data.channels}.", "evaluate it on the data it was trained for, or retrain on this data.")
    if data.task != spec.task:
        raise MedadvError(f"the model was trained for task {spec.task}, the data is labeled for {data.task}.",
                          f"use --task {spec.task} data.")


def predict(model: MedicalClassifier, data: ImageSet, batch_size: int = 256) -> np.ndarray:
    """P(disease) for every image of ``data`` (float64, N)."""
    check_fit(model, data)
    device = model.device
    out = [model.probabilities(data.tensor(slice(i, i + batch_size)).to(device), batch_size)
           for i in range(0, len(data), batch_size)]
    return torch.cat(out).double().numpy()


def evaluate_model(model: MedicalClassifier, data: ImageSet, batch_size: int = 256) -> dict[str, Any]:
    """Clinical metrics at the model's saved threshold, with what was evaluated."""
    p = predict(model, data, batch_size)
    return {
        **clinical_metrics(data.labels, p, model.threshold),
        "task": data.task, "split": data.split, "source": data.source, "data_checksum": data.checksum,
        "image_size": list(data.size),
    }
