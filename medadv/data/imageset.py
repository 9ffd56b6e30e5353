"""The in-memory dataset every other part of medadv consumes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from medadv.errors import MedadvError


@dataclass
class ImageSet:
    """Images as stored, with binary task labels.

    ``pixels`` is N×C×H×W, ``uint8`` (8-bit PNG/JPEG/npz) or ``uint16`` (16-bit PNG, DICOM's stored
    values over their full BitsStored range); :meth:`stored` maps it to float32 in [0, 1], the unit every
    attack's eps is in, and :meth:`tensor` to what the model sees (DICOM through its VOI ``window``).
    ``labels`` is N ``int64`` in {0, 1}: 0 is the task's healthy class, 1 its disease class (multi-label:
    N×F; segmentation: N×H×W ``uint8`` masks in {0, 1} on the images' own pixel grid).
    """

    pixels: np.ndarray
    labels: np.ndarray
    ids: list[str]
    task: str
    split: str
    source: str
    checksum: str
    patient_ids: list[str] | None = None
    files: list[Path] | None = None
    meta: dict = field(default_factory=dict)
    # The source's own image names (an npz's ``<split>_image_ids``); ``ids`` keep medadv's stable form.
    names: list[str] | None = None
    # DICOM: N×2 (a, b) of each file's VOI window, ``model input = clip(a * x + b, 0, 1)``. ``pixels`` then
    # hold the stored values one-to-one (after rescale), so an attack's eps bounds the change a radiologist
    # sees under any window; the window is only the model's (and the display's) view. None: no window.
    window: np.ndarray | None = None
    # DICOM: each image's stored grid, 2**BitsStored - 1 (0: not DICOM); attacks' outputs are snapped to it
    # so the file written back holds exactly what was measured.
    stored_levels: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.pixels.ndim not in (4, 5):
            raise MedadvError(f"images from {self.source} have shape {self.pixels.shape}; expected N×C×H×W "
                              "(or N×C×D×H×W volumes).")
        if self.pixels.dtype not in (np.uint8, np.uint16):
            raise MedadvError(f"images from {self.source} are {self.pixels.dtype}; expected uint8 or uint16.")
        if len(self.labels) != len(self.pixels) or len(self.ids) != len(self.pixels):
            raise MedadvError(f"{self.source}: {len(self.pixels)} images but {len(self.labels)} labels.")
        if self.window is not None and self.window.shape != (len(self.pixels), 2):
            raise MedadvError(f"{self.source}: window of shape {self.window.shape} for {len(self.pixels)} images.")

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def levels(self) -> int:
        """Number of grey levels minus one on the storage grid (255 or 65535)."""
        return int(np.iinfo(self.pixels.dtype).max)

    @property
    def channels(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def volumes(self) -> bool:
        """True for 3D data: ``pixels`` is N×C×D×H×W (voxels), not N×C×H×W."""
        return self.pixels.ndim == 5

    @property
    def size(self) -> tuple[int, ...]:
        """The stored spatial shape: (H, W) for images, (D, H, W) for volumes."""
        return tuple(int(v) for v in self.pixels.shape[2:])

    def stored(self, index: slice | np.ndarray | list[int] | None = None) -> torch.Tensor:
        """Float32 N×C×H×W in [0, 1]: the stored pixels, the space attacks perturb and eps is measured in."""
        arr = self.pixels if index is None else self.pixels[index]
        return torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(self.levels)

    def window_for(self, index: slice | np.ndarray | list[int] | None = None) -> torch.Tensor | None:
        """N×2 float32 (a, b) of the images' VOI windows, or None when the images have none."""
        if self.window is None:
            return None
        w = self.window if index is None else self.window[index]
        return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)).reshape(-1, 2)

    def tensor(self, index: slice | np.ndarray | list[int] | None = None) -> torch.Tensor:
        """Float32 N×C×H×W in [0, 1] as the model sees it: the stored pixels through their VOI window."""
        return apply_window(self.stored(index), self.window_for(index))

    def subset(self, index: np.ndarray | list[int]) -> ImageSet:
        index = np.asarray(index, dtype=np.int64)
        pick = lambda seq: None if seq is None else [seq[i] for i in index]  # noqa: E731
        return replace(
            self,
            pixels=self.pixels[index],
            labels=self.labels[index],
            ids=pick(self.ids),
            patient_ids=pick(self.patient_ids),
            files=pick(self.files),
            names=pick(self.names),
            window=None if self.window is None else self.window[index],
            stored_levels=None if self.stored_levels is None else self.stored_levels[index],
        )

    def counts(self) -> dict[str, int]:
        if self.labels.ndim == 3:  # segmentation masks: images, and foreground pixels of all pixels
            return {"n": len(self), "foreground_pixels": int(self.labels.sum(dtype=np.int64)),
                    "pixels": int(self.labels.size)}
        if self.labels.ndim == 2:  # multi-label: images with no finding, with any, and unknown labels
            return {"n": len(self), "no_finding": int((self.labels == 0).all(1).sum()),
                    "any_finding": int((self.labels == 1).any(1).sum()), "missing_labels": int((self.labels < 0).sum())}
        return {"n": len(self), "healthy": int((self.labels == 0).sum()), "disease": int((self.labels == 1).sum())}


def apply_window(x: torch.Tensor, window: torch.Tensor | None) -> torch.Tensor:
    """``clip(a * x + b, 0, 1)`` per image (``window`` N×2; x N×C×H×W or N×C×D×H×W), differentiable; x
    unchanged without a window."""
    if window is None:
        return x
    w = window.to(device=x.device, dtype=x.dtype)
    tail = (1,) * (x.ndim - 2)  # one (a, b) per image, broadcast over every pixel or voxel
    return (w[:, :1].view(-1, 1, *tail) * x + w[:, 1:].view(-1, 1, *tail)).clamp(0, 1)


def to_storage(x: torch.Tensor, levels: int) -> np.ndarray:
    """Round float images in [0, 1] (N×C×H×W, or N×C×D×H×W volumes) to the storage grid: uint8 for 255 levels, else uint16."""
    dtype = np.uint8 if levels == 255 else np.uint16
    q = torch.round(x.detach().clamp(0, 1) * levels).to(torch.int64).cpu().numpy()
    return q.astype(dtype)


def snap_to_stored(adv: np.ndarray, clean: np.ndarray, stored_levels: np.ndarray | None) -> np.ndarray:
    """``adv`` (N×C×H×W on the 16-bit grid) moved onto each image's own stored grid (2**BitsStored - 1
    steps; 0: leave as is), each change rounded toward the clean value, so the change never grows and
    the DICOM written back holds exactly these values."""
    if stored_levels is None or adv.dtype != np.uint16:
        return adv
    out = adv.copy()
    for i, L in enumerate(np.asarray(stored_levels)):
        if not L or L == 65535:
            continue
        s0 = np.rint(clean[i].astype(np.float64) * L / 65535)
        k = (adv[i].astype(np.float64) - clean[i].astype(np.float64)) * L / 65535
        s1 = s0 + np.sign(k) * np.floor(np.abs(k) + 1e-6)
        out[i] = np.where(adv[i] == clean[i], clean[i], np.rint(np.clip(s1, 0, L) * 65535 / L)).astype(np.uint16)
    return out
