"""Labeled image folders: ``labels.csv`` (``path,label`` and optional ``patient_id,split``) beside
PNG, JPEG or DICOM files of any size, grey or colour.

``label`` is the binary task label (0 healthy, 1 disease). Without a ``split`` column the folder is split
70/10/20 by :func:`medadv.data.splits.patient_split`, seeded, stratified and patient-level.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medadv.data.dicom import read_dicom
from medadv.errors import MedadvError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
DICOM_SUFFIXES = {".dcm", ".dicom", ""}


@dataclass
class Row:
    path: Path
    label: int
    patient_id: str | None
    split: str | None


def read_labels(folder: Path) -> list[Row]:
    csv_path = folder / "labels.csv"
    if not csv_path.is_file():
        raise MedadvError(f"{csv_path} does not exist.", "give the folder a labels.csv with columns path,label.")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or ())
            if not {"path", "label"} <= fields:
                raise MedadvError(f"{csv_path} has columns {sorted(fields)}; it needs 'path' and 'label'.",
                                  "add a header line: path,label[,patient_id,split].")
            raw = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MedadvError(f"{csv_path} is not a readable CSV file ({exc}).", "save it as UTF-8 CSV.") from exc
    rows = []
    for line, r in enumerate(raw, start=2):
        label = (r.get("label") or "").strip()
        if label not in ("0", "1"):
            raise MedadvError(f"{csv_path} line {line}: label '{label}' is out of range; labels are 0 (healthy) or 1 (disease).",
                              "fix the label column.")
        split = (r.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLIT_NAMES:
            raise MedadvError(f"{csv_path} line {line}: split '{split}' is not train, val or test.", "fix the split column.")
        rows.append(Row(folder / r["path"].strip(), int(label), (r.get("patient_id") or "").strip() or None,
                        SPLIT_NAMES.get(split) if split else None))
    if not rows:
        raise MedadvError(f"{csv_path} lists no images.", "add one row per image.")
    return rows


def read_image(path: Path) -> tuple[np.ndarray, int]:
    """One image file as float64 C×H×W in [0, 1] and its storage levels (255 or 65535)."""
    if not path.is_file():
        raise MedadvError(f"image {path} does not exist.", "fix its row in labels.csv or add the file.")
    if path.suffix.lower() in DICOM_SUFFIXES or _is_dicom(path):
        return read_dicom(path), 65535
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)[None]
                return np.clip(arr / 65535.0, 0, 1), 65535
            if im.mode in ("1", "LA"):
                im = im.convert("L")
            elif im.mode != "L":
                im = im.convert("RGB")  # RGBA, palette, CMYK, YCbCr
            arr = np.asarray(im, dtype=np.float64) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MedadvError(f"image {path} is corrupt or not an image ({type(exc).__name__}).",
                          "replace the file or remove its row from labels.csv.") from exc
    return (arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)), 255


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear, antialiased resize of N×C×H×W float images to size×size (the model wrapper's resize)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(0, 1)


def load_images(paths: list[Path], size: int | None, source: str) -> tuple[np.ndarray, int]:
    """Decode, unify channels and size, and quantize to one storage grid: N×C×H×W uint8 or uint16.

    Images are quantized one at a time (memory stays at the stored size); grey images among colour
    ones get their channel repeated, and 8-bit images among 16-bit ones are scaled by 257 (exact).
    """
    stored = []
    for p in paths:
        x, levels = read_image(p)
        t = torch.from_numpy(x)[None].float()
        if size is not None:
            t = resize(t, size)
        dtype = np.uint8 if levels == 255 else np.uint16
        stored.append(torch.round(t[0] * levels).numpy().astype(dtype))
    if size is None and len({a.shape[1:] for a in stored}) > 1:
        raise MedadvError(f"images in {source} come in {len({a.shape[1:] for a in stored})} different sizes.",
                          "pass --image-size N to resize them on load.")
    channels = 3 if any(a.shape[0] == 3 for a in stored) else 1
    wide = any(a.dtype == np.uint16 for a in stored)
    out = np.empty((len(stored), channels, *stored[0].shape[1:]), dtype=np.uint16 if wide else np.uint8)
    for i, a in enumerate(stored):
        a = a.astype(out.dtype) * (257 if wide and a.dtype == np.uint8 else 1)
        out[i] = np.repeat(a, channels, axis=0) if a.shape[0] != channels else a
    return out, 65535 if wide else 255
