"""Medical images in, tensors in [0, 1] and binary labels out: MedMNIST .npz files, labeled image
folders (PNG, JPEG, DICOM) and the task registry that binarizes their labels.

Sources are named by a string:

* ``medmnist:<flag>``: ``<data root>/medmnist/<flag>[_<size>].npz``, downloaded when missing;
* ``folder:<name>``: ``<data root>/<name>/labels.csv`` and its images;
* a path to a ``.npz`` file with MedMNIST's keys, or to a folder with a ``labels.csv``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medadv.data import medmnist
from medadv.data.checksums import sha256_file, sha256_files
from medadv.data.folder import load_images, read_labels
from medadv.data.imageset import ImageSet, to_storage
from medadv.data.splits import patient_split
from medadv.data.tasks import EXCLUDED, TASKS, Task, get_task
from medadv.errors import MedadvError

__all__ = ["ImageSet", "Task", "TASKS", "get_task", "load_split", "resolve_data_root", "resolve_source",
           "to_storage"]


def resolve_data_root(data_root: str | os.PathLike[str] | None = None) -> Path:
    """``data_root``, else ``$MEDADV_DATA``, else the user cache folder (``~/.cache/medadv``)."""
    if data_root:
        return Path(data_root).expanduser()
    if os.environ.get("MEDADV_DATA"):
        return Path(os.environ["MEDADV_DATA"]).expanduser()
    import pooch

    return Path(pooch.os_cache("medadv"))


def resolve_source(task: Task, source: str | None, data_root: Path) -> str:
    """The source string to read: ``source`` if given, else the task's first source present here."""
    if source:
        return source
    for candidate in task.sources:
        kind, _, name = candidate.partition(":")
        if kind == "folder" and (data_root / name / "labels.csv").is_file():
            return candidate
        if kind == "medmnist" and (data_root / "medmnist" / medmnist.file_name(name)).is_file():
            return candidate
    return task.sources[-1]


def _medmnist_size(size: int | None) -> int:
    if size is None:
        return 28
    return next((s for s in medmnist.SIZES if s >= size), medmnist.SIZES[-1])


def load_split(
    task: str | Task,
    split: str,
    *,
    data_root: str | os.PathLike[str] | None = None,
    source: str | None = None,
    size: int | None = None,
    split_seed: int = 0,
    download: bool = True,
    file_size: int | None = None,
) -> ImageSet:
    """Load one split of a task's images at ``size``×``size`` (None: as stored) with binary labels.

    file_size: for MedMNIST sources, the official resolution to read (default: the smallest one >=
    ``size``); the images are then resized to ``size`` (e.g. 28 px files upsampled for a 64 px network).

    MedMNIST files keep their official split; folders use their ``split`` column, else a seeded,
    stratified, patient-level 70/10/20 split (``split_seed``, independent of any training seed).
    """
    task = get_task(task) if isinstance(task, str) else task
    if split not in medmnist.SPLITS:
        raise MedadvError(f"unknown split '{split}'.", f"use one of {', '.join(medmnist.SPLITS)}.")
    root = resolve_data_root(data_root)
    spec = resolve_source(task, source, root)
    kind, _, name = spec.partition(":")
    if kind == "medmnist" and name:
        path = medmnist.locate(name, file_size or _medmnist_size(size), root, download=download)
        out = _from_npz(task, split, path, size)
    elif kind == "folder" and name:
        out = _from_folder(task, split, root / name, size, split_seed)
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".npz":
            out = _from_npz(task, split, path, size)
        elif path.is_dir():
            out = _from_folder(task, split, path, size, split_seed)
        else:
            raise MedadvError(f"data source '{spec}' is neither a .npz file nor a folder.",
                              "pass medmnist:<flag>, folder:<name>, a .npz path or a folder with labels.csv.")
    if len(out) == 0:
        raise MedadvError(f"split '{split}' of {out.source} has no images for task {task.name}.",
                          "choose another split or source.")
    return out


def _from_npz(task: Task, split: str, path: Path, size: int | None) -> ImageSet:
    if not path.is_file():
        raise MedadvError(f"{path} does not exist.", "check the path, or use medmnist:<flag> to download it.")
    images, raw = medmnist.read_npz(path, split)
    labels = task.binarize(raw)
    keep = np.flatnonzero(labels != EXCLUDED)
    images, labels = images[keep], labels[keep]
    if size is not None and images.shape[-1] != size:
        import torch

        from medadv.data.folder import resize

        images = to_storage(resize(torch.from_numpy(images).float().div_(255), size), 255)
    return ImageSet(
        pixels=np.ascontiguousarray(images), labels=labels, ids=[f"{path.name}#{split}/{i}" for i in keep],
        task=task.name, split=split, source=str(path), checksum=sha256_file(path),
        meta={"kind": "npz", "excluded": int(len(raw) - len(keep))},
    )


def _from_folder(task: Task, split: str, folder: Path, size: int | None, split_seed: int) -> ImageSet:
    rows = read_labels(folder)
    given = [r.split for r in rows]
    if all(s is None for s in given):
        splits = patient_split(np.array([r.label for r in rows]), [r.patient_id for r in rows], split_seed)
        how = f"patient-level 70/10/20, seed {split_seed}"
    elif any(s is None for s in given):
        raise MedadvError(f"{folder / 'labels.csv'} gives a split for some rows but not all.",
                          "fill the split column for every row, or leave it empty everywhere.")
    else:
        splits, how = np.array(given), "labels.csv"
    picked = [r for r, s in zip(rows, splits) if s == split]
    if not picked:
        return ImageSet(np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), [], task.name, split,
                        str(folder), "")
    files = [r.path for r in picked]
    pixels, _ = load_images(files, size, str(folder))
    return ImageSet(
        pixels=pixels, labels=np.array([r.label for r in picked], dtype=np.int64),
        ids=[f.relative_to(folder).as_posix() for f in files], task=task.name, split=split, source=str(folder),
        checksum=sha256_files([folder / "labels.csv", *files], folder),
        patient_ids=[r.patient_id for r in picked] if any(r.patient_id for r in picked) else None,
        files=files, meta={"kind": "folder", "split_from": how},
    )
