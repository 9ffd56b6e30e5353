"""Segmentation masks beside a labeled image folder: ``labels.csv`` with a ``mask`` column.

Each row's ``mask`` is a path relative to the dataset folder (like ``path``), to a gray PNG holding two
values: 0 (background) and one foreground value (1, 255 or 65535). The mask must have its image's stored
H×W. It is brought to the loaded image's geometry exactly as the image was (resized when square, else
letterboxed or cropped; see :class:`medadv.data.folder.Layout`), bilinearly, and thresholded at one half,
so every mask lies on its image's pixel grid: N×H×W ``uint8`` in {0, 1}.

Refused, one line each naming the fix: a mask path that is empty, absolute or leaves the folder (unless
outside paths are allowed), a missing or unreadable file, a colour mask, a mask with a third value, and a
mask whose size differs from its image's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medadv.data.folder import Layout, resize
from medadv.errors import MedadvError


def read_mask(path: Path) -> np.ndarray:
    """One mask file as H×W ``uint8`` in {0, 1} at its stored size."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise MedadvError(f"mask {path} does not exist.", "fix its mask column in labels.csv or add the file.")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "1":
                im = im.convert("L")
            if im.mode not in ("L", "I;16", "I;16B", "I;16L", "I"):
                raise MedadvError(f"mask {path} is a {im.mode} image; a mask is one gray channel.",
                                  "save the mask as a gray PNG of 0 (background) and 255 (foreground).")
            raw = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise MedadvError(f"mask {path} is corrupt or not an image ({type(exc).__name__}).",
                          "replace the file or fix its mask column in labels.csv.") from exc
    values = np.unique(raw)
    foreground = values[values != 0]
    if len(foreground) > 1:
        shown = ", ".join(str(int(v)) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        raise MedadvError(f"mask {path} holds {len(values)} values ({shown}); a mask is binary: 0 and one "
                          "foreground value.", "threshold the mask to 0 and 255 (or 0 and 1).")
    return (raw != 0).astype(np.uint8)


def fit_mask(mask: np.ndarray, out_hw: tuple[int, int], fit: str = "letterbox") -> np.ndarray:
    """``mask`` (H×W in {0, 1}) brought to ``out_hw`` as its image was (square: resized; else into the
    square by ``fit``), bilinearly, then thresholded at 0.5."""
    hw = tuple(mask.shape)
    if hw == tuple(out_hw):
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    size = int(out_hw[0])
    t = resize(t, size) if hw[0] == hw[1] else Layout.of(hw, size, fit).to_square(t)
    return (t[0, 0] >= 0.5).numpy().astype(np.uint8)


def load_masks(paths: list[Path], image_shapes: list[tuple[int, int]], out_hw: tuple[int, int],
               fit: str = "letterbox") -> np.ndarray:
    """Every mask as N×H×W ``uint8`` in {0, 1} on its loaded image's grid (``out_hw``); ``image_shapes``:
    each image's stored H×W, which its mask must have."""
    out = np.zeros((len(paths), *out_hw), dtype=np.uint8)
    for i, (path, shape) in enumerate(zip(paths, image_shapes)):
        m = read_mask(path)
        if tuple(m.shape) != tuple(shape):
            raise MedadvError(f"mask {path} is {m.shape[0]}x{m.shape[1]} px but its image is {shape[0]}x{shape[1]}.",
                              "save each mask at its image's stored size.")
        out[i] = fit_mask(m, out_hw, fit)
    return out
