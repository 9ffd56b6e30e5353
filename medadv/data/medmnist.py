"""MedMNIST v2/v3 (MedMNIST+) .npz files: the official record, checksums and a safe reader.

Files are named ``<flag>.npz`` (28 px) or ``<flag>_<size>.npz`` (64, 128, 224 px) and live under
``<data root>/medmnist/``. A missing file is downloaded with pooch from the official Zenodo record and
checked against the official MD5; offline, the error names the file, the URL and where to put it.
Arrays are read with ``allow_pickle=False``: a .npz never runs code.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from medadv.errors import MedadvError

RECORD = "https://zenodo.org/records/10519652/files"
SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")

# Official MD5s, from the MedMNIST package's INFO table (medmnist 3.0.2), by flag then size.
MD5: dict[str, dict[int, str]] = {
    "pneumoniamnist": {28: "28209eda62fecd6e6a2d98b1501bb15f", 64: "8f4eceb4ccffa70c672198ea285246c6",
                       128: "05b46931834c231683c68f40c47b2971", 224: "d6a3c71de1b945ea11211b03746c1fe1"},
    "retinamnist": {28: "bd4c0672f1bba3e3a89f0e4e876791e4", 64: "afda852cc34dcda56f86ad2b2457dbcc",
                    128: "e48e916a24454daf90583d4e6efb1a18", 224: "eae7e3b6f3fcbda4ae613ebdcbe35348"},
    "chestmnist": {28: "02c8a6516a18b556561a56cbdd36c4a8", 64: "9de6cd0b934ebb5b7426cfba5efbae16",
                   128: "db107e5590b27930b62dbaf558aebee3", 224: "45bd33e6f06c3e8cdb481c74a89152aa"},
    "dermamnist": {28: "0744692d530f8e62ec473284d019b0c7", 64: "b70a2f5635c6199aeaa28c31d7202e1f",
                   128: "2defd784463fa5243564e855ed717de1", 224: "8974907d8e169bef5f5b96bc506ae45d"},
    # 3D (MedMNIST v2 / MedMNIST+): N×D×H×W volumes, 28 and 64 voxels a side only
    "adrenalmnist3d": {28: "bbd3c5a5576322bc4cdfea780653b1ce", 64: "17721accfe9fb005146a47d33bc54b2f"},
}


def file_name(flag: str, size: int = 28) -> str:
    if size not in SIZES:
        raise MedadvError(f"MedMNIST has no {size} px files.", f"choose one of {', '.join(map(str, SIZES))}.")
    return f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"


def url(flag: str, size: int = 28) -> str:
    return f"{RECORD}/{file_name(flag, size)}?download=1"


def locate(flag: str, size: int, data_root: Path, download: bool = True) -> Path:
    """Path of ``flag`` at ``size`` under ``data_root/medmnist``, downloading it if it is missing."""
    target = Path(data_root) / "medmnist" / file_name(flag, size)
    if target.exists():
        return target
    offline = os.environ.get("MEDADV_OFFLINE", "") not in ("", "0")
    reason = "downloads are off (MEDADV_OFFLINE)" if offline or not download else None
    if reason is None and flag in MD5 and size not in MD5[flag]:
        reason = f"MedMNIST publishes no {size} px file of '{flag}' (sizes {', '.join(map(str, MD5[flag]))})"
    if reason is None and flag in MD5:
        try:
            import pooch

            pooch.retrieve(
                url(flag, size), known_hash=f"md5:{MD5[flag][size]}", fname=target.name,
                path=target.parent, downloader=pooch.HTTPDownloader(timeout=60, progressbar=False),
            )
            return target
        except Exception as exc:  # network, HTTP or checksum failure: say what to do by hand
            reason = f"the download failed: {type(exc).__name__}: {str(exc)[:120]}"
    elif reason is None:
        reason = f"'{flag}' is not an official MedMNIST file medadv knows"
    raise MedadvError(
        f"MedMNIST file {target.name} is not in {target.parent} and {reason}.",
        f"download {url(flag, size)} and place it at {target}, or set --data-root / MEDADV_DATA "
        f"to a folder that holds medmnist/{target.name}.",
    )


def read_npz(path: Path, split: str, volumes: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Images (N×C×H×W uint8) and raw labels (N×K integers) of one split of a MedMNIST .npz; with
    ``volumes`` (a 3D file, N×D×H×W), N×1×D×H×W."""
    if split not in SPLITS:
        raise MedadvError(f"unknown split '{split}'.", f"use one of {', '.join(SPLITS)}.")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            want = {f"{split}_images", f"{split}_labels"}
            if not want <= keys:
                raise MedadvError(
                    f"{path} has no {' / '.join(sorted(want - keys))} array (it has {', '.join(sorted(keys))}).",
                    "use an official MedMNIST .npz with train_/val_/test_ images and labels.",
                )
            images = z[f"{split}_images"]
            labels = z[f"{split}_labels"]
    except MedadvError:
        raise
    except FileNotFoundError as exc:
        raise MedadvError(f"{path} does not exist.", "check the path or the data root.") from exc
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise MedadvError(
            f"{path} is not a readable .npz file ({type(exc).__name__}: {str(exc)[:80]}).",
            "download it again; the official file's MD5 is listed in medadv.data.medmnist.MD5.",
        ) from exc
    if images.dtype != np.uint8:
        raise MedadvError(f"{path}: {split}_images is {images.dtype}; MedMNIST stores uint8.", "use an official file.")
    if volumes:
        # a 3D file stores N×D×H×W (one channel); N×D×H×W×1 is accepted too
        if images.ndim == 5 and images.shape[-1] == 1:
            images = images[..., 0]
        if images.ndim != 4:
            raise MedadvError(f"{path}: {split}_images has shape {images.shape}; a 3D task expects N×D×H×W volumes.",
                              "use an official MedMNIST 3D file (e.g. adrenalmnist3d.npz), or a 2D task for 2D images.")
        images = images[:, None]
    elif images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    else:
        raise MedadvError(
            f"{path}: {split}_images has shape {images.shape}; expected N×H×W or N×H×W×3.", "use an official file."
        )
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    if len(labels) != len(images):
        raise MedadvError(f"{path}: {len(images)} {split} images but {len(labels)} labels.", "use an official file.")
    return np.ascontiguousarray(images), check_labels(labels, f"{path}: {split}_labels")


def check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Raw class labels as int64, refused unless they are finite, whole and >= 0: a NaN cast to an
    integer becomes a huge negative number and would be counted as a class."""
    if labels.dtype.kind not in "biuf":
        raise MedadvError(f"{where} are {labels.dtype}, not numbers.", "store integer class labels.")
    if labels.dtype.kind == "f":
        bad = ~np.isfinite(labels) | (labels != np.round(labels))
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise MedadvError(f"{where} hold {int(bad.sum())} NaN, infinite or fractional values (first at row {row}: "
                              f"{labels.reshape(len(labels), -1)[row].tolist()}).",
                              "store whole-number class labels; drop or relabel those images.")
    if (labels < 0).any():
        row = int(np.argwhere(labels < 0)[0][0])
        raise MedadvError(f"{where} hold negative labels (first at row {row}).", "store class labels >= 0.")
    return labels.astype(np.int64)


def read_npz_extra(path: Path, split: str, key: str) -> list[str] | None:
    """An optional per-image string array ``<split>_<key>`` (``image_ids``, ``patient_ids``), or None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if f"{split}_{key}" not in z.files:
                return None
            arr = z[f"{split}_{key}"]
    except (zipfile.BadZipFile, OSError, EOFError):
        return None  # an unreadable file: read_npz says so, with its fix
    except ValueError as exc:  # an object array would need pickle: refuse rather than run code
        raise MedadvError(f"{path}: {split}_{key} is not a plain string array ({exc}).",
                          f"save {split}_{key} as a numpy string array (dtype str), not objects.") from exc
    if arr.dtype.kind not in "USiu":
        raise MedadvError(f"{path}: {split}_{key} is {arr.dtype}; expected strings.", f"save {split}_{key} as strings.")
    return [str(v) for v in arr.ravel()]
