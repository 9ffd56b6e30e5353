"""Saving images as a real attacker must: on the storage grid, as PNG (8- or 16-bit, lossless) or, for
DICOM sources, into a copy of the source DICOM at its bit depth with a new SOPInstanceUID."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medadv.data.dicom import write_dicom_like
from medadv.data.folder import DICOM_SUFFIXES, _is_dicom, load_images
from medadv.data.imageset import ImageSet
from medadv.errors import MedadvError
from medadv.io import atomic_path


def output_names(data: ImageSet) -> list[str]:
    """File stems for saved images: the source file's stem (so provenance ties an edited copy to its
    original), else the image id made file-safe; made unique with a numeric suffix."""
    names, seen = [], set()
    for i, image_id in enumerate(data.ids):
        if data.files:
            stem = data.files[i].stem
        else:
            stem = re.sub(r"[^A-Za-z0-9-]+", "_", image_id.replace(".npz", ""))[-80:]
        name, k = stem, 1
        while name in seen:
            k += 1
            name = f"{stem}-{k}"
        seen.add(name)
        names.append(name)
    return names


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """One C×H×W uint8/uint16 image as a lossless PNG (grey or RGB; 16-bit grey as mode I;16)."""
    from PIL import Image

    chw = np.asarray(pixels)
    if chw.dtype == np.uint16:
        if chw.shape[0] != 1:  # Pillow cannot write 16-bit colour PNG
            raise MedadvError("16-bit colour images can only be saved into their source DICOM.",
                              "attack them at their stored size so they are written back as DICOM.")
        im = Image.fromarray(chw[0])  # uint16 -> mode I;16
    else:
        im = Image.fromarray(chw[0] if chw.shape[0] == 1 else np.moveaxis(chw, 0, -1))
    with atomic_path(path, suffix=".png") as tmp:
        im.save(tmp, format="PNG")
    return path


def is_dicom_source(path: Path | None) -> bool:
    return path is not None and path.is_file() and (path.suffix.lower() in DICOM_SUFFIXES or _is_dicom(path))


def save_images(folder: Path, data: ImageSet, pixels: np.ndarray) -> list[Path]:
    """Write ``pixels`` (N×C×H×W, ``data``'s dtype) under ``folder``; DICOM sources at their stored size
    go back into copies of their DICOM files, everything else to PNG. Returns the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (name, chw) in enumerate(zip(output_names(data), pixels)):
        source = data.files[i] if data.files else None
        if is_dicom_source(source) and _same_size(source, chw):
            written.append(write_dicom_like(source, chw.astype(np.float64) / data.levels, folder / f"{name}.dcm"))
        else:
            written.append(write_png(folder / f"{name}.png", chw))
    return written


def _same_size(source: Path, chw: np.ndarray) -> bool:
    from medadv.data.dicom import read_dicom

    return read_dicom(source).shape == chw.shape


def reload_images(paths: list[Path]) -> np.ndarray:
    """Read saved images back exactly as a victim's pipeline would (N×C×H×W on their storage grid)."""
    pixels, _ = load_images(paths, None, str(paths[0].parent) if paths else "")
    return pixels
