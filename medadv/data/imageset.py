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

    ``pixels`` is N×C×H×W, ``uint8`` (8-bit PNG/JPEG/npz) or ``uint16`` (16-bit PNG, DICOM after
    windowing); :meth:`tensor` maps it to float32 in [0, 1], the unit every attack's eps is in.
    ``labels`` is N ``int64`` in {0, 1}: 0 is the task's healthy class, 1 its disease class.
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

    def __post_init__(self) -> None:
        if self.pixels.ndim != 4:
            raise MedadvError(f"images from {self.source} have shape {self.pixels.shape}; expected N×C×H×W.")
        if self.pixels.dtype not in (np.uint8, np.uint16):
            raise MedadvError(f"images from {self.source} are {self.pixels.dtype}; expected uint8 or uint16.")
        if len(self.labels) != len(self.pixels) or len(self.ids) != len(self.pixels):
            raise MedadvError(f"{self.source}: {len(self.pixels)} images but {len(self.labels)} labels.")

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
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[2]), int(self.pixels.shape[3])

    def tensor(self, index: slice | np.ndarray | list[int] | None = None) -> torch.Tensor:
        """Float32 N×C×H×W in [0, 1] for ``index`` (all images by default)."""
        arr = self.pixels if index is None else self.pixels[index]
        return torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).div_(self.levels)

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
        )

    def counts(self) -> dict[str, int]:
        return {"n": len(self), "healthy": int((self.labels == 0).sum()), "disease": int((self.labels == 1).sum())}


def to_storage(x: torch.Tensor, levels: int) -> np.ndarray:
    """Round float images in [0, 1] (N×C×H×W) to the storage grid: uint8 for 255 levels, else uint16."""
    dtype = np.uint8 if levels == 255 else np.uint16
    q = torch.round(x.detach().clamp(0, 1) * levels).to(torch.int64).cpu().numpy()
    return q.astype(dtype)
