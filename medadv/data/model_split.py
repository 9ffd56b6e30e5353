"""The split of the data a checkpoint was trained on, read from its metadata (plain JSON: the data layer
knows checkpoints' records, not models)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medadv.data import ImageSet, Task, get_task, load_split, with_findings


def model_task(meta: dict[str, Any]) -> Task:
    """The task a checkpoint was trained for, as it read it: a reader's own finding columns and
    uncertain-label policy (its ``data`` record, else its spec's class names), so a reader trained with
    ``--findings`` is evaluated and attacked on those columns, not on the task's default ones."""
    task = get_task(meta["task"])
    if task.kind != "multilabel":
        return task
    data, spec = meta.get("data") or {}, meta.get("spec") or {}
    findings = data.get("findings") or spec.get("class_names")
    return with_findings(task, tuple(findings) if findings else None, data.get("uncertain"))


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
    return load_split(model_task(meta), split, data_root=data_root, source=source, size=image_size,
                      split_seed=data_meta.get("split_seed", 0), **options)
