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
                image_size: int | None = None, fit_to_model: bool = False, **options: Any) -> ImageSet:
    """The ``split`` of the data a checkpoint was trained on.

    MedMNIST sources are read from the file of the model's resolution. Other sources are read as stored
    (the model wrapper resizes, and attacks perturb the stored pixels themselves); with ``fit_to_model``,
    images that are not all one square size are fitted to the input size the checkpoint records
    (non-square ones letterboxed, see :func:`medadv.data.load_split`), so a folder of mixed sizes needs
    no ``--image-size``; ``image_size`` fits every image to that size. ``options`` go to :func:`~medadv.data.load_split`
    (resplit_by_patient, patient_pattern, allow_outside_paths, fit).
    """
    data_meta = meta.get("data") or {}
    source = source or data_meta.get("source")
    medmnist_source = bool(source) and source.removeprefix("resplit:").startswith("medmnist:")
    if image_size is None and medmnist_source:
        image_size = data_meta.get("image_size")
    if image_size is None and fit_to_model:
        options["fit_size"] = (meta.get("spec") or {}).get("input_size") or data_meta.get("image_size")
    return load_split(meta["task"], split, data_root=data_root, source=source, size=image_size,
                      split_seed=data_meta.get("split_seed", 0), **options)


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
    # tensor(): the stored pixels through each image's VOI window, as the model was trained to see them
    out = [model.probabilities(data.tensor(slice(i, i + batch_size)).to(device), batch_size)
           for i in range(0, len(data), batch_size)]
    return torch.cat(out).double().numpy()


def evaluate_model(model: MedicalClassifier, data: ImageSet, batch_size: int = 256) -> dict[str, Any]:
    """Clinical metrics at the model's saved threshold, with what was evaluated."""
    p = predict(model, data, batch_size)
    return {
        **clinical_metrics(data.labels, p, model.threshold),
        "task": data.task, "split": data.split, "source": data.source, "data_checksum": data.checksum,
        "image_size": list(data.size), "leakage": data.meta.get("leakage"),
    }
