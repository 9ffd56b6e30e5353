"""Saving images as a real attacker must: on the storage grid, as PNG (8- or 16-bit, lossless) or, for
DICOM sources, into a copy of the source DICOM at its bit depth with a new SOPInstanceUID, marked DERIVED.

Images attacked at another size than stored (a model's square input) are not saved at that size: the
change is mapped back onto the original geometry (:meth:`medadv.data.folder.Layout.from_square`) and
added to the original file's pixels, so the adversarial file has the original's size and format and can
replace it. L-inf bounds survive the mapping (bilinear weights are a convex combination)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medadv.data.dicom import write_dicom_like
from medadv.data.folder import DICOM_SUFFIXES, Layout, _is_dicom, decode, load_images_full
from medadv.data.imageset import ImageSet, apply_window
from medadv.errors import MedadvError
from medadv.io import atomic_path


def output_names(data: ImageSet) -> list[str]:
    """File stems for saved images: the source file's stem (so provenance ties an edited copy to its
    original), else the image id made file-safe; made unique with a numeric suffix."""
    names, seen = [], set()
    for i, image_id in enumerate(data.ids):
        if data.files:
            stem = data.files[i].stem
        elif data.names:  # the npz's own image ids (e.g. 00000013_005.png): the original's name
            stem = re.sub(r"[^A-Za-z0-9-]+", "_", Path(data.names[i]).stem)[-80:]
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


def save_images(folder: Path, data: ImageSet, pixels: np.ndarray, derivation: str | None = None) -> list[Path]:
    """Write ``pixels`` (N×C×H×W, ``data``'s dtype) under ``folder``: DICOM sources into copies of their
    DICOM files (``derivation`` becomes the DerivationDescription), other files as PNG; images loaded at
    another size than stored go back to their original size. Returns the written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (name, chw) in enumerate(zip(output_names(data), pixels)):
        source = data.files[i] if data.files else None
        if source is None:
            written.append(write_png(folder / f"{name}.png", chw))
            continue
        x, levels = _original_geometry(source, data, i, chw)
        if is_dicom_source(source):
            written.append(write_dicom_like(source, x, folder / f"{name}.dcm", space="stored", derivation=derivation))
        else:
            written.append(write_png(folder / f"{name}.png",
                                     np.rint(x * levels).astype(np.uint8 if levels == 255 else np.uint16)))
    return written


def _original_geometry(source: Path, data: ImageSet, i: int, chw: np.ndarray) -> tuple[np.ndarray, int]:
    """The adversarial image at its source file's size, C×H×W float in [0, 1] (stored values for DICOM):
    the original plus the attack's change, mapped back from the square the model saw when sizes differ."""
    import torch

    original = decode(source)
    new = chw.astype(np.float64) / data.levels
    if original.x.shape == chw.shape:
        return new, data.levels
    delta = torch.from_numpy(new - data.pixels[i].astype(np.float64) / data.levels)[None]
    channels = original.x.shape[0]
    if delta.shape[1] != channels:  # a grey file among colour ones was repeated on load
        delta = delta.mean(1, keepdim=True)
    hw = tuple(original.x.shape[-2:])
    fit = data.meta.get("fit") or "letterbox"
    if hw[0] == hw[1]:
        back = torch.nn.functional.interpolate(delta, size=hw, mode="bilinear", align_corners=False, antialias=True)
    else:
        back = Layout.of(hw, data.size[0], fit).from_square(delta, hw)
    return np.clip(original.x + back[0].numpy(), 0.0, 1.0), original.levels


def reload_images(paths: list[Path]) -> np.ndarray:
    """Read saved images back exactly as a victim's pipeline would (N×C×H×W on their storage grid)."""
    return load_images_full(paths, None, str(paths[0].parent) if paths else "").pixels


def reload_for_model(paths: list[Path], size: int | None, fit: str = "letterbox"):
    """Saved images as the model sees them (float N×C×H×W, windowed; fitted to ``size`` as on load)."""
    import torch

    loaded = load_images_full(paths, size, str(paths[0].parent) if paths else "", fit)
    x = torch.from_numpy(loaded.pixels.astype(np.float32) / loaded.levels)
    return apply_window(x, None if loaded.window is None else torch.from_numpy(loaded.window).float())
