"""Medical images in, tensors in [0, 1] and binary labels out: MedMNIST .npz files, labeled image
folders (PNG, JPEG, DICOM) and the task registry that binarizes their labels.

Sources are named by a string:

* ``medmnist:<flag>``: ``<data root>/medmnist/<flag>[_<size>].npz``, downloaded when missing;
* ``folder:<name>``: ``<data root>/<name>/labels.csv`` and its images;
* a path to a ``.npz`` file with MedMNIST's keys, or to a folder with a ``labels.csv``;
* ``resplit:<any of the above>``: the same images re-split 70/10/20 by patient (``--resplit-by-patient``;
  recorded in a checkpoint's source, so evaluate and attack read the same split).

Every load checks the splits for patient leakage when patient ids are known (:mod:`medadv.data.leakage`)
and records the result in ``ImageSet.meta["leakage"]``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medadv.data import medmnist
from medadv.data import leakage
from medadv.data.checksums import sha256_arrays, sha256_file, sha256_files
from medadv.data.decoded import cached_decode
from medadv.data.folder import FITS, Layout, load_images_full, read_labels, resize
from medadv.data.imageset import ImageSet, apply_window, to_storage
from medadv.data.splits import VAL_FRACTION, patient_split, val_from_train
from medadv.data.tasks import EXCLUDED, FULL_RESOLUTION_FROM, TASKS, Task, get_task, with_findings
from medadv.errors import MedadvError

__all__ = ["ImageSet", "Task", "TASKS", "apply_window", "get_task", "load_split", "parse_findings",
           "resolve_data_root", "resolve_source", "to_storage", "with_findings"]

RESPLIT = "resplit:"


def resolve_data_root(data_root: str | os.PathLike[str] | None = None) -> Path:
    """``data_root``, else ``$MEDADV_DATA``, else the user cache folder (``~/.cache/medadv``)."""
    if data_root:
        return Path(data_root).expanduser()
    if os.environ.get("MEDADV_DATA"):
        return Path(os.environ["MEDADV_DATA"]).expanduser()
    import pooch

    return Path(pooch.os_cache("medadv"))


def resolve_source(task: Task, source: str | None, data_root: Path, size: int | None = None) -> str:
    """The source string to read: ``source`` if given, else (for a network input ``size`` above
    FULL_RESOLUTION_FROM px) the task's first full-resolution folder present here, else its first source
    present here, else its last (an official file, downloaded)."""
    if source:
        return source
    large = task.full_resolution if size is not None and size > FULL_RESOLUTION_FROM else ()
    for candidate in (*large, *task.sources):
        kind, _, name = candidate.partition(":")
        if kind == "folder" and (data_root / name / "labels.csv").is_file():
            return candidate
        if kind == "medmnist" and (data_root / "medmnist" / medmnist.file_name(name)).is_file():
            return candidate
    return task.sources[-1]


@dataclass(frozen=True)
class Source:
    """A resolved source string, parsed once: ``kind`` medmnist, folder or path; ``path`` the folder or
    file it names (None for a MedMNIST flag); ``resplit``: whether it asks for a patient-level re-split."""

    spec: str  # without the resplit prefix
    kind: str
    name: str
    path: Path | None
    resplit: bool


def parse_source(task: Task, source: str | None, root: Path, size: int | None = None) -> Source:
    """The source to read for ``task`` (see :func:`resolve_source`), parsed."""
    spec = resolve_source(task, source, root, size)
    resplit = spec.startswith(RESPLIT)
    spec = spec[len(RESPLIT):] if resplit else spec
    kind, _, name = spec.partition(":")
    if kind == "medmnist" and name:
        return Source(spec, "medmnist", name, None, resplit)
    if kind == "folder" and name:
        return Source(spec, "folder", name, root / name, resplit)
    return Source(spec, "path", spec, Path(spec).expanduser(), resplit)


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
    resplit_by_patient: bool = False,
    patient_pattern: str | None = None,
    allow_outside_paths: bool = False,
    fit: str = "letterbox",
    fit_size: int | None = None,
) -> ImageSet:
    """Load one split of a task's images at ``size``×``size`` (None: as stored) with binary labels.

    file_size: for MedMNIST sources, the official resolution to read (default: the smallest one >=
    ``size``); the images are then resized to ``size`` (e.g. 28 px files upsampled for a 64 px network).
    Non-square images are letterboxed (``fit='crop'``: centre-cropped) into the square, never squashed.

    MedMNIST files keep their official split; folders use their ``split`` column, else a seeded,
    stratified, patient-level 70/10/20 split (``split_seed``, independent of any training seed).
    ``resplit_by_patient`` (or a ``resplit:`` source) pools the given splits and makes that patient-level
    split instead. ``patient_pattern``: how an npz's image ids name the patient (see :mod:`.leakage`).
    ``allow_outside_paths``: let labels.csv name images outside its folder. ``fit_size`` (with
    ``size`` None): the size to fit images to when they are not all one square size (a model's input).
    """
    task = get_task(task) if isinstance(task, str) else task
    if split not in medmnist.SPLITS:
        raise MedadvError(f"unknown split '{split}'.", f"use one of {', '.join(medmnist.SPLITS)}.")
    if fit not in FITS:
        raise MedadvError(f"--fit {fit!r} is not letterbox or crop.", "pass --fit letterbox or --fit crop.")
    root = resolve_data_root(data_root)
    src = parse_source(task, source, root, size)
    opts = dict(resplit=resplit_by_patient or src.resplit, split_seed=split_seed, pattern=patient_pattern, fit=fit,
                fit_size=fit_size)
    if src.path is None:
        path = medmnist.locate(src.name, file_size or task.file_size or _medmnist_size(size), root, download=download)
        out = _from_npz(task, split, path, size, **opts)
    elif src.kind == "folder":
        out = _from_folder(task, split, src.path, size, allow_outside=allow_outside_paths, **opts)
    else:
        path, spec = src.path, src.spec
        if path.suffix == ".npz":
            out = _from_npz(task, split, path, size, **opts)
        elif path.is_dir():
            out = _from_folder(task, split, path, size, allow_outside=allow_outside_paths, **opts)
        else:
            raise MedadvError(f"data source '{spec}' is neither a .npz file nor a folder.",
                              "pass medmnist:<flag>, folder:<name>, a .npz path or a folder with labels.csv.")
    if len(out) == 0:
        raise MedadvError(f"split '{split}' of {out.source} has no images for task {task.name}.",
                          "choose another split or source.")
    return out


def split_leakage(task: str | Task, source: str | None = None, *, data_root: str | os.PathLike[str] | None = None,
                  split_seed: int = 0, patient_pattern: str | None = None, allow_outside_paths: bool = False) -> dict:
    """The patient-leakage record of a source's splits, from ids alone (no image is decoded)."""
    task = get_task(task) if isinstance(task, str) else task
    root = resolve_data_root(data_root)
    src = parse_source(task, source, root)
    if src.path is None:
        return leakage.unchecked("MedMNIST files carry no patient ids")
    path, resplit = src.path, src.resplit
    if path.suffix == ".npz":
        if resplit:
            return leakage.unchecked("re-split by patient: no patient is in two splits")
        patients, how, _ = _npz_patients(path, patient_pattern)
        return leakage.split_overlap(patients, how) if patients else leakage.unchecked("no patient ids")
    rows = read_labels(path, allow_outside_paths, findings_of(task), task.uncertain, masks=task.masks)
    if resplit or all(r.split is None for r in rows):
        return leakage.unchecked("split by medadv at patient level: no patient is in two splits")
    if not any(r.patient_id for r in rows):
        return leakage.unchecked("labels.csv has no patient_id column")
    return folder_members(path, "train", split_seed=split_seed, allow_outside=allow_outside_paths, task=task)[1]


def data_class_names(task: str | Task, source: str | None = None, *,
                     data_root: str | os.PathLike[str] | None = None) -> tuple[str, str] | None:
    """The names the data itself gives its two classes, or None: an npz's ``class_names`` array (two
    strings, for labels 0 and 1) or labels.csv's optional ``class_name`` column (one name per label)."""
    task = get_task(task) if isinstance(task, str) else task
    root = resolve_data_root(data_root)
    path = parse_source(task, source, root).path
    if path is None:
        return None
    if path.suffix == ".npz" and path.is_file():
        names = medmnist.read_npz_extra(path, "class", "names")
        if names is not None and len(names) != 2:
            raise MedadvError(f"{path}: class_names holds {len(names)} names; a binary task needs 2 (label 0, label 1).",
                              "store class_names as two strings.")
        return None if names is None else (names[0], names[1])
    if path.is_dir():
        import csv

        with open(path / "labels.csv", newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        named = {(r.get("label") or "").strip(): (r.get("class_name") or "").strip() for r in rows if r.get("class_name")}
        if {"0", "1"} <= set(named):
            return named["0"], named["1"]
    return None


def _binary(task: Task, raw: np.ndarray, where: str) -> np.ndarray:
    """The task's labels for ``raw``, refused when a raw class falls outside what the task knows."""
    labels = task.binarize(raw)
    if labels.ndim == 2:  # multi-label: one 0/1/unknown (-1) label per finding
        if labels.shape[1] != task.classes:
            raise MedadvError(f"{where}: {labels.shape[1]} label columns for task {task.name}'s {task.classes} findings.",
                              "use the file the task reads, or the task the file belongs to.")
        bad = ~np.isin(labels, (0, 1, EXCLUDED))
        if bad.any():
            row = int(np.nonzero(bad)[0][0])
            raise MedadvError(f"{where}: labels {raw[row].tolist()} at row {row} are not 0, 1 or -1 (unknown) for task "
                              f"{task.name}.", "fix the labels, or pick the task these labels belong to.")
        return labels.astype(np.int64)
    bad = ~np.isin(labels, (*range(task.classes), EXCLUDED))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        allowed = " or ".join(f"{i} ({n})" for i, n in enumerate(task.class_names)) if task.classes <= 3 else \
            f"0 ({task.class_names[0]}) to {task.classes - 1} ({task.class_names[-1]})"
        raise MedadvError(f"{where}: label {raw[row].tolist()} at row {row} is out of range for task {task.name} "
                          f"({int(bad.sum())} such rows); labels are {allowed}.",
                          "fix the labels, or pick the task these labels belong to.")
    return labels


def _kept(labels: np.ndarray) -> np.ndarray:
    """Per image: part of the task (a binary task excludes other classes; a multi-label task keeps every
    image, its unknown labels marked per finding)."""
    return labels != EXCLUDED if labels.ndim == 1 else np.ones(len(labels), dtype=bool)


def parse_findings(text: str | None, task: str | Task, source: str | None = None, *,
                   data_root: str | os.PathLike[str] | None = None) -> tuple[str, ...] | None:
    """``--findings`` as names: comma-separated column names, or ``all`` for every labels.csv column that
    is not reserved (path, split, patient_id, ...; :data:`medadv.data.tasks.RESERVED_COLUMNS`), in the
    file's order. None (the task's own findings) when ``text`` is None."""
    import csv

    from medadv.data.tasks import RESERVED_COLUMNS

    if text is None:
        return None
    if text.strip().lower() != "all":
        return tuple(n.strip() for n in text.split(","))
    task = get_task(task) if isinstance(task, str) else task
    path = parse_source(task, source, resolve_data_root(data_root)).path
    if path is None or not (path / "labels.csv").is_file():
        raise MedadvError("--findings all reads the columns of a folder's labels.csv; this source has none.",
                          "name the findings, e.g. --findings Effusion,Pneumothorax, or pass a folder --source.")
    with open(path / "labels.csv", newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    names = tuple(c.strip() for c in header if c.strip().lower() not in RESERVED_COLUMNS)
    if not names:
        raise MedadvError(f"{path / 'labels.csv'} has no finding columns (only {', '.join(header)}).",
                          "add one 0/1 column per finding.")
    return names


def findings_of(task: Task) -> tuple[str, ...] | None:
    """The finding columns a multi-label task reads from labels.csv (None: a binary or multi-class task
    reads ``label``)."""
    return task.class_names if task.kind == "multilabel" else None


def _npz_patients(path: Path, pattern: str | None) -> tuple[dict[str, list[str | None]] | None, str, dict]:
    """Patient ids of every split of an npz (from ``*_patient_ids``, else ``*_image_ids`` by pattern)."""
    names = {s: medmnist.read_npz_extra(path, s, "image_ids") for s in medmnist.SPLITS}
    given = {s: medmnist.read_npz_extra(path, s, "patient_ids") for s in medmnist.SPLITS}
    if all(v is not None for v in given.values()):
        return given, "the npz's *_patient_ids arrays", names
    if all(v is not None for v in names.values()):
        found = {s: leakage.patients_from_names(v, pattern) for s, v in names.items()}
        if all(ids is not None for ids, _ in found.values()):
            how = {how for _, how in found.values()}.pop()
            return {s: ids for s, (ids, _) in found.items()}, f"image ids by pattern {how}", names
    elif pattern is not None:
        raise MedadvError(f"{path} has no *_image_ids arrays for --patient-pattern to read.",
                          "store train_/val_/test_image_ids string arrays in the npz, or drop --patient-pattern.")
    return None, "", names


def _fit_square(images: np.ndarray, size: int | None, fit: str) -> np.ndarray:
    if size is None or images.shape[-2:] == (size, size):
        return images
    import torch

    x = torch.from_numpy(images).float().div_(255)
    h, w = images.shape[-2:]
    x = resize(x, size) if h == w else Layout.of((h, w), size, fit).to_square(x)
    return to_storage(x, 255)


def _from_npz(task: Task, split: str, path: Path, size: int | None, *, resplit: bool, split_seed: int,
              pattern: str | None, fit: str, fit_size: int | None = None) -> ImageSet:
    if not path.is_file():
        raise MedadvError(f"{path} does not exist.", "check the path, or use medmnist:<flag> to download it.")
    patients, how, names = _npz_patients(path, pattern)
    if resplit:
        if patients is None:
            raise MedadvError(f"--resplit-by-patient: {path} does not say which patient each image is from.",
                              "add *_patient_ids arrays, or *_image_ids with --patient-pattern.")
        parts = [medmnist.read_npz(path, s, task.volumes) for s in medmnist.SPLITS]
        images = np.concatenate([im for im, _ in parts])
        raw = np.concatenate([r for _, r in parts])
        all_patients = [p for s in medmnist.SPLITS for p in patients[s]]
        all_names = None if any(names[s] is None for s in medmnist.SPLITS) else [n for s in medmnist.SPLITS for n in names[s]]
        labels = _binary(task, raw, f"{path}")
        assigned = patient_split(labels, all_patients, split_seed)
        record = leakage.split_overlap({s: [p for p, a in zip(all_patients, assigned) if a == s]
                                        for s in medmnist.SPLITS}, how)
        pick = np.flatnonzero((assigned == split) & _kept(labels))
        # ids keep each image's place in the file (split and index), which provenance checks re-read
        members = [(s, i) for s, (im, _) in zip(medmnist.SPLITS, parts) for i in range(len(im))]
        ids = [f"{path.name}#{members[i][0]}/{members[i][1]}" for i in pick]
        split_from = f"patient-level 70/10/20 resplit of all splits, seed {split_seed}"
        names_out = None if all_names is None else [all_names[i] for i in pick]
        pids = [all_patients[i] for i in pick]
    else:
        images, raw = medmnist.read_npz(path, split, task.volumes)
        labels = _binary(task, raw, f"{path}: {split}_labels")
        if names[split] is not None and len(names[split]) != len(images):
            raise MedadvError(f"{path}: {len(images)} {split} images but {len(names[split])} {split}_image_ids.",
                              "store one id per image.")
        record = leakage.split_overlap(patients, how) if patients else leakage.unchecked(
            "no patient ids (no *_patient_ids arrays, and *_image_ids match no known pattern)")
        pick = np.flatnonzero(_kept(labels))
        ids = [f"{path.name}#{split}/{i}" for i in pick]
        split_from = "the npz's own splits"
        names_out = None if names[split] is None else [names[split][i] for i in pick]
        pids = None if not patients else [patients[split][i] for i in pick]
    if size is None and fit_size is not None and images.shape[-2] != images.shape[-1] and not task.volumes:
        size = fit_size  # non-square arrays are fitted to the model's input, never squashed by it
    # volumes are kept as stored: the model wrapper resizes them to its input (trilinear, inside the gradient
    # path), so an attack perturbs the file's own voxels
    fitted = images[pick] if task.volumes else _fit_square(images[pick], size, fit)
    images, labels = fitted, labels[pick]
    return ImageSet(
        pixels=np.ascontiguousarray(images), labels=labels, ids=ids, task=task.name, split=split, source=str(path),
        checksum=sha256_arrays(images, labels, names_out or []), patient_ids=pids, names=names_out,
        meta={"kind": "npz", "excluded": int(len(raw) - len(pick)) if not resplit else None,
              "checksum_of": f"the {split} split's arrays (images, labels, ids)", "file_checksum": sha256_file(path),
              "split_from": split_from, "leakage": record, "fit": fit},
    )


def folder_source(task: str | Task, source: str | None, data_root: str | os.PathLike[str] | None = None
                  ) -> tuple[Path, bool] | None:
    """The folder a source names and whether it is re-split, or None when it is not a folder source."""
    task = get_task(task) if isinstance(task, str) else task
    root = resolve_data_root(data_root)
    src = parse_source(task, source, root)
    return (src.path, src.resplit) if src.path is not None and src.path.is_dir() else None


def folder_members(folder: Path, split: str, *, resplit: bool = False, split_seed: int = 0,
                   allow_outside: bool = False, task: Task | None = None):
    """The labels.csv rows of one split of a folder, as :func:`load_split` picks them, without decoding
    an image; and the leakage record of the folder's splits. ``task``: a multi-label task reads its
    finding columns (None: the ``label`` column)."""
    rows = read_labels(folder, allow_outside, findings_of(task) if task else None, task.uncertain if task else "ignore",
                       masks=bool(task and task.masks))
    given = [r.split for r in rows]
    has_patients = any(r.patient_id for r in rows)
    if resplit and not has_patients:
        raise MedadvError(f"--resplit-by-patient: {folder / 'labels.csv'} has no patient_id column values.",
                          "add a patient_id column, or drop --resplit-by-patient.")
    if resplit or all(s is None for s in given):
        splits = patient_split(np.array([r.label for r in rows]), [r.patient_id for r in rows], split_seed)
        how = f"patient-level 70/10/20, seed {split_seed}" + (" (resplit of labels.csv)" if resplit else "")
    elif any(s is None for s in given):
        raise MedadvError(f"{folder / 'labels.csv'} gives a split for some rows but not all.",
                          "fill the split column for every row, or leave it empty everywhere.")
    elif "val" not in given and (carved := _val_from_train(rows, given, split_seed)) is not None:
        splits, how = carved, f"labels.csv; val: {VAL_FRACTION} of train's patients, stratified, seed {split_seed}"
    else:
        splits, how = np.array(given), "labels.csv"
    record = leakage.unchecked("labels.csv has no patient_id column") if not has_patients else \
        leakage.split_overlap({s: [r.patient_id for r, a in zip(rows, splits) if a == s] for s in medmnist.SPLITS},
                              "labels.csv's patient_id column")
    return [r for r, s in zip(rows, splits) if s == split], record, how


def _val_from_train(rows, given: list, split_seed: int) -> np.ndarray | None:
    """Given splits with a validation split carved from train (e.g. Kermany's chest X-rays ship official
    train and test only), or None when train is absent or too small to carve from."""
    splits = np.array(given, dtype=object)
    train = np.flatnonzero(splits == "train")
    carved = val_from_train(np.array([rows[i].label for i in train]), [rows[i].patient_id for i in train], split_seed)
    if carved is None:
        return None
    splits[train] = carved
    return splits.astype(str)


def _from_folder(task: Task, split: str, folder: Path, size: int | None, *, resplit: bool, split_seed: int,
                 pattern: str | None, fit: str, allow_outside: bool = False, fit_size: int | None = None) -> ImageSet:
    picked, record, how = folder_members(folder, split, resplit=resplit, split_seed=split_seed,
                                         allow_outside=allow_outside, task=task)
    if task.volumes and picked:  # a 3D task's folder holds NIfTI volumes (medadv.data.nifti)
        from medadv.data.nifti import volume_set

        return volume_set(task, split, folder, picked, record, how, size)
    if not picked:
        shape = (0, 1, 1) if task.masks else (0,) if findings_of(task) is None else (0, task.classes)
        return ImageSet(np.zeros((0, 1, 1, 1), np.uint8), np.zeros(shape, np.int64), [], task.name, split,
                        str(folder), "")
    files = [r.path for r in picked]
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:  # named before hashing, as the decoder would name it
        raise MedadvError(f"image {missing} does not exist.", "fix its row in labels.csv or add the file.")
    mask_files = [r.mask for r in picked if r.mask is not None]
    checksum = sha256_files([folder / "labels.csv", *files, *mask_files], folder)
    loaded = cached_decode(checksum, len(files), {"size": size, "fit": fit, "fit_size": fit_size},
                           lambda: load_images_full(files, size, str(folder), fit, fit_size))
    grids = loaded.stored_levels
    if task.masks:  # a segmentation task's labels: each image's mask on its loaded grid, N×H×W in {0, 1}
        from medadv.data.masks import load_masks

        labels = load_masks(mask_files, loaded.shapes, tuple(loaded.pixels.shape[-2:]), fit)
    else:
        labels = np.array([r.label for r in picked], dtype=np.int64)
    return ImageSet(
        pixels=loaded.pixels, labels=labels,
        ids=[f.relative_to(folder).as_posix() if f.is_relative_to(folder) else f.as_posix() for f in files],
        task=task.name, split=split, source=str(folder),
        checksum=checksum,
        patient_ids=[r.patient_id for r in picked] if any(r.patient_id for r in picked) else None,
        files=files, window=loaded.window,
        stored_levels=None if all(g is None for g in grids) else np.array([g or 0 for g in grids], dtype=np.int64),
        meta={"kind": "folder", "split_from": how, "leakage": record, "fit": fit,
              **({"missing_labels": {"count": int(sum(v == -1 for r in picked for v in r.label)),
                                     "uncertain_policy": task.uncertain,
                                     "rule": "blank is unknown; -1 (uncertain) is "
                                             + {"ignore": "unknown", "zeros": "absent", "ones": "present"}[task.uncertain]
                                             + "; unknown labels are left out of the loss and of every figure"}}
                 if findings_of(task) else {}),
              "bits_stored": sorted({int(g).bit_length() for g in grids if g}) or None,
              "stored_shapes": sorted({f"{h}x{w}" for h, w in loaded.shapes})},
    )
