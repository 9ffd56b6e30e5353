"""Clean (unattacked) evaluation of a checkpoint on its task's data: the paper's Table 1."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from medadv.data import ImageSet
from medadv.data.model_split import model_split  # noqa: F401  (re-exported: evaluate's callers import it here)
from medadv.errors import MedadvError
from medadv.models.wrapper import MedicalClassifier


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
    """The model kind's scores for every image of ``data`` (float64): binary P(disease), N; multi-class N×K."""
    check_fit(model, data)
    device = model.device
    # tensor(): the stored pixels through each image's VOI window, as the model was trained to see them
    out = [model.probabilities(data.tensor(slice(i, i + batch_size)).to(device), batch_size)
           for i in range(0, len(data), batch_size)]
    return torch.cat(out).double().numpy()


def evaluate_model(model: MedicalClassifier, data: ImageSet, batch_size: int = 256,
                   scores: np.ndarray | None = None) -> dict[str, Any]:
    """Clinical metrics at the model's saved operating point (the task kind's), with what was evaluated.
    ``scores``: :func:`predict`'s output for ``model`` on ``data`` when the caller already has it (a study
    hands the same scores to the battery, so the test split is predicted once)."""
    p = predict(model, data, batch_size) if scores is None else checked_scores(scores, data)
    return {
        **kind_metrics(model, data.labels, p),
        "task": data.task, "split": data.split, "source": data.source, "data_checksum": data.checksum,
        "image_size": list(data.size), "leakage": data.meta.get("leakage"),
    }


def checked_scores(scores: np.ndarray, data: ImageSet) -> np.ndarray:
    """``scores`` given for ``data``, refused when they cannot be (a count that differs is a caller's bug)."""
    if len(scores) != len(data):
        raise ValueError(f"{len(scores)} scores given for {len(data)} images of {data.source}")
    return scores


def kind_metrics(model, labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """The model's task kind's metrics of ``scores`` at its operating point (binary: the paper's clinical
    metrics at the threshold; multi-class: accuracy, per-class recall, kappa for graded tasks)."""
    from medadv.data import get_task

    spec = model.spec
    task = get_task(spec.task) if getattr(spec, "kind", "binary") != "binary" else None
    return model.kind.metrics(labels, scores, model.operating_point, class_names=tuple(spec.class_names),
                              graded=bool(task and task.graded), positive_from=task.positive_from if task else None)
