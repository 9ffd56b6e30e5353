"""Labeled image folders: ``labels.csv`` (``path,label`` and optional ``patient_id,split``) beside
PNG, JPEG or DICOM files of any size, grey or colour.

``label`` is the binary task label (0 healthy, 1 disease). A multi-label task reads one column per finding
instead (named by the task, e.g. NIH ChestX-ray14's 14): 1 present, 0 absent, blank (or ``nan``) unknown,
and -1 "uncertain" as CheXpert writes it, read by a stated policy (:data:`UNCERTAIN_POLICIES`; default:
unknown). An unknown label is never read as absent. Without a ``split`` column the folder is split
70/10/20 by :func:`medadv.data.splits.patient_split`, seeded, stratified and patient-level.

A file listed twice is one image: identical rows are kept once; rows that give it different labels,
splits or patients are refused (naming the file and both lines).

Paths are relative to the folder and must stay inside it: ``..`` that climbs out, or an absolute path,
is refused unless the caller allows outside paths (``--allow-outside-paths``), so a labels.csv from
elsewhere cannot make medadv read (and report on) arbitrary files.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medadv.data.dicom import read_dicom, read_dicom_stored
from medadv.errors import MedadvError

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
DICOM_SUFFIXES = {".dcm", ".dicom", ""}


MISSING = -1  # an unknown finding label (medadv.metrics.MISSING)
# what a finding's -1 ("uncertain", CheXpert's convention) becomes: unknown (left out of the loss and of
# every figure), absent, or present (Irvin et al. 2019's U-Ignore, U-Zeros and U-Ones)
UNCERTAIN_POLICIES = {"ignore": MISSING, "zeros": 0, "ones": 1}
_PRESENT, _ABSENT, _UNCERTAIN, _BLANK = ("1", "1.0"), ("0", "0.0"), ("-1", "-1.0"), ("", "nan", "NaN")


@dataclass
class Row:
    path: Path
    label: int | tuple[int, ...]  # binary: 0/1; multi-label: one 0/1/MISSING per finding
    patient_id: str | None
    split: str | None
    mask: Path | None = None  # a segmentation task's mask file (labels.csv's mask column)


def _finding_label(text: str | None, finding: str, uncertain: str, csv_path: Path, line: int, image: str) -> int:
    value = (text or "").strip()
    if value in _PRESENT:
        return 1
    if value in _ABSENT:
        return 0
    if value in _BLANK:
        return MISSING
    if value in _UNCERTAIN:
        return UNCERTAIN_POLICIES[uncertain]
    raise MedadvError(f"{csv_path} line {line} ({image}): finding {finding} is '{value}'; a finding is 1 (present), "
                      "0 (absent), -1 (uncertain) or blank (unknown).", f"fix the {finding} value on line {line}.")


def _inside(folder: Path, text: str, csv_path: Path, line: int, allow_outside: bool) -> Path:
    """The image path of one row, refused when it leaves ``folder`` (unless ``allow_outside``)."""
    if not text:
        raise MedadvError(f"{csv_path} line {line}: the path is empty.", "give every row an image path.")
    raw = Path(text)
    path = raw if raw.is_absolute() else folder / raw
    if allow_outside:
        return path
    if raw.is_absolute():
        raise MedadvError(f"{csv_path} line {line}: path '{text}' is absolute; paths must be relative to {folder}.",
                          "make the path relative to the dataset folder, or pass --allow-outside-paths.")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise MedadvError(f"{csv_path} line {line}: path '{text}' resolves outside the dataset folder {folder}.",
                          "move the image into the dataset folder, or pass --allow-outside-paths.")
    return path


def mask_path(folder: Path, text: str, csv_path: Path, line: int, allow_outside: bool = False) -> Path:
    """The mask file a row names, refused when it is empty or leaves ``folder`` (unless ``allow_outside``)."""
    if not text:
        raise MedadvError(f"{csv_path} line {line}: the mask path is empty.", "give every row a mask path.")
    raw = Path(text)
    path = raw if raw.is_absolute() else folder / raw
    if allow_outside:
        return path
    if raw.is_absolute() or not path.resolve().is_relative_to(folder.resolve()):
        raise MedadvError(f"{csv_path} line {line}: mask path '{text}' leaves the dataset folder {folder}.",
                          "make the mask path relative to the dataset folder and inside it, or pass --allow-outside-paths.")
    return path


def read_labels(folder: Path, allow_outside: bool = False, findings: tuple[str, ...] | None = None,
                uncertain: str = "ignore", masks: bool = False) -> list[Row]:
    """The rows of ``folder/labels.csv``: binary labels, or with ``findings`` one 0/1/unknown label per
    finding column (``uncertain``: the policy for -1, a key of :data:`UNCERTAIN_POLICIES`). ``masks``: a
    segmentation task's rows, each with its ``mask`` path (:mod:`medadv.data.masks`); a ``label`` column is
    then optional (0 where absent) and only stratifies the seeded split."""
    csv_path = folder / "labels.csv"
    if uncertain not in UNCERTAIN_POLICIES:
        raise MedadvError(f"uncertain-label policy '{uncertain}' is not one of {', '.join(UNCERTAIN_POLICIES)}.",
                          "pass --uncertain ignore, zeros or ones.")
    if not csv_path.is_file():
        want = "path and one column per finding" if findings else "path,label"
        raise MedadvError(f"{csv_path} does not exist.", f"give the folder a labels.csv with columns {want}.")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or ())
            if findings:
                absent = [c for c in ("path", *findings) if c not in fields]
                if absent:
                    raise MedadvError(f"{csv_path} has no column{'s' if len(absent) > 1 else ''} {', '.join(absent)}; "
                                      f"this multi-label task reads path and {', '.join(findings)}.",
                                      "add the columns (blank where a finding is unknown), or pick the task the file belongs to.")
            elif masks:
                if not {"path", "mask"} <= fields:
                    raise MedadvError(f"{csv_path} has columns {sorted(fields)}; a segmentation task needs 'path' and "
                                      "'mask'.", "add a header line: path,mask[,label,patient_id,split].")
            elif not {"path", "label"} <= fields:
                raise MedadvError(f"{csv_path} has columns {sorted(fields)}; it needs 'path' and 'label'.",
                                  "add a header line: path,label[,patient_id,split].")
            raw = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise MedadvError(f"{csv_path} is not a readable CSV file ({exc}).", "save it as UTF-8 CSV.") from exc
    rows: list[Row] = []
    seen: dict[Path, tuple[Row, int]] = {}
    for line, r in enumerate(raw, start=2):
        if findings:
            image = (r.get("path") or "").strip() or "(no path)"
            label: str | tuple[int, ...] = tuple(_finding_label(r.get(f), f, uncertain, csv_path, line, image)
                                                 for f in findings)
        else:
            label = (r.get("label") or "").strip()
            if masks and "label" not in fields:
                label = "0"
        if not findings and label not in ("0", "1"):
            image = (r.get("path") or "").strip() or "(no path)"
            shown = ("the label is empty (a missing value; pandas writes NaN so)" if not label
                     else f"label '{label}' is out of range")
            raise MedadvError(f"{csv_path} line {line} ({image}): {shown}; labels are 0 (healthy) or 1 (disease).",
                              f"give line {line} a label of 0 or 1, or remove the row.")
        split = (r.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLIT_NAMES:
            raise MedadvError(f"{csv_path} line {line}: split '{split}' is not train, val or test.", "fix the split column.")
        row = Row(_inside(folder, (r.get("path") or "").strip(), csv_path, line, allow_outside),
                  label if isinstance(label, tuple) else int(label),
                  (r.get("patient_id") or "").strip() or None, SPLIT_NAMES.get(split) if split else None)
        if masks:
            row.mask = mask_path(folder, (r.get("mask") or "").strip(), csv_path, line, allow_outside)
        key = row.path.resolve()
        if key in seen:  # the same file twice: one image, so the rows must agree (it is then kept once)
            first, first_line = seen[key]
            _same_or_refuse(csv_path, first, first_line, row, line)
            continue
        seen[key] = (row, line)
        rows.append(row)
    if not rows:
        raise MedadvError(f"{csv_path} lists no images.", "add one row per image.")
    return rows


def _same_or_refuse(csv_path: Path, a: Row, line_a: int, b: Row, line_b: int) -> None:
    """Two rows naming one file: identical rows are one image listed twice (kept once, so it is neither
    counted twice nor split across train and test); rows that disagree on its label, split or patient
    are refused, naming the file and both lines, since either could be the wrong one."""
    for field, name in (("label", "label"), ("split", "split"), ("patient_id", "patient_id")):
        va, vb = getattr(a, field), getattr(b, field)
        if va != vb:
            raise MedadvError(f"{csv_path}: image {b.path.name} is listed twice with different {name}s: line {line_a} "
                              f"says {va if va is not None else '(empty)'}, line {line_b} says "
                              f"{vb if vb is not None else '(empty)'}.",
                              f"keep one row for {b.path.name} with the right {name}.")


@dataclass
class Decoded:
    """One decoded image: ``x`` C×H×W in [0, 1] as stored, its storage grid (255 or 65535) and, for
    DICOM, the VOI window (a, b) and the stored values' own grid (2**BitsStored - 1)."""

    x: np.ndarray
    levels: int
    window: tuple[float, float] | None = None
    stored_levels: int | None = None


def decode(path: Path) -> Decoded:
    """One image file; DICOM in its stored values (one-to-one) with its window kept aside."""
    if not path.is_file():
        raise MedadvError(f"image {path} does not exist.", "fix its row in labels.csv or add the file.")
    if path.suffix.lower() in DICOM_SUFFIXES or _is_dicom(path):
        d = read_dicom_stored(path)
        return Decoded(d.x, 65535, d.window, d.levels)
    return Decoded(*read_image(path))


def read_image(path: Path) -> tuple[np.ndarray, int]:
    """One image file as float64 C×H×W in [0, 1] and its storage levels (255 or 65535); DICOM windowed.
    An RGB file whose three channels are equal everywhere is read as one gray channel (the same values)."""
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
            raw = np.asarray(im)
            if raw.ndim == 3 and (raw[..., 0] == raw[..., 1]).all() and (raw[..., 1] == raw[..., 2]).all():
                raw = raw[..., 0]  # a gray image saved as RGB (X-rays often are): one channel, exactly
            arr = raw.astype(np.float64) / 255.0
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


FITS = ("letterbox", "crop")


@dataclass(frozen=True)
class Layout:
    """Where an H×W image sits in a size×size square: scaled to ``inner`` (h, w), its top-left at
    ``offset`` (negative: cropped). Letterbox keeps all of the image (padding with 0 = black); crop
    fills the square and cuts the longer side's ends."""

    inner: tuple[int, int]
    offset: tuple[int, int]
    size: int

    @classmethod
    def of(cls, hw: tuple[int, int], size: int, fit: str = "letterbox") -> Layout:
        if fit not in FITS:
            raise MedadvError(f"fit '{fit}' is not letterbox or crop.", "pass --fit letterbox or --fit crop.")
        h, w = hw
        scale = size / (max(h, w) if fit == "letterbox" else min(h, w))
        ih, iw = max(1, round(h * scale)), max(1, round(w * scale))
        return cls((ih, iw), ((size - ih) // 2, (size - iw) // 2), size)

    def _scaled(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        if tuple(x.shape[-2:]) == hw:
            return x
        return F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)

    def to_square(self, x: torch.Tensor) -> torch.Tensor:
        """N×C×H×W -> N×C×size×size (aspect ratio kept)."""
        t = self._scaled(x, self.inner)
        out = t.new_zeros((*t.shape[:2], self.size, self.size))
        (top, left), (ih, iw) = self.offset, self.inner
        src = t[..., max(0, -top):max(0, -top) + min(ih, self.size), max(0, -left):max(0, -left) + min(iw, self.size)]
        out[..., max(0, top):max(0, top) + src.shape[-2], max(0, left):max(0, left) + src.shape[-1]] = src
        return out.clamp_(0, 1)

    def from_square(self, delta: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """A change made on the square (N×C×size×size) mapped back onto the original H×W geometry.

        Bilinear weights are non-negative and sum to one, so the mapped change is nowhere larger than
        the largest change on the square: an L-inf eps survives the mapping (an L2 one scales with area).
        Pixels a crop cut off are not changed."""
        (top, left), (ih, iw) = self.offset, self.inner
        full = delta.new_zeros((*delta.shape[:2], ih, iw))
        src = delta[..., max(0, top):max(0, top) + min(ih, self.size), max(0, left):max(0, left) + min(iw, self.size)]
        full[..., max(0, -top):max(0, -top) + src.shape[-2], max(0, -left):max(0, -left) + src.shape[-1]] = src
        if (ih, iw) == tuple(hw):
            return full
        return F.interpolate(full, size=tuple(hw), mode="bilinear", align_corners=False, antialias=True)


@dataclass
class Loaded:
    """Images on one storage grid with, for DICOM, their windows and stored grids (None when absent)."""

    pixels: np.ndarray
    levels: int
    window: np.ndarray | None
    stored_levels: list[int | None]
    shapes: list[tuple[int, int]]  # each image's stored H×W before fitting to ``size``


def load_images(paths: list[Path], size: int | None, source: str, fit: str = "letterbox") -> tuple[np.ndarray, int]:
    """Decode, unify channels and size, and quantize to one storage grid: N×C×H×W uint8 or uint16."""
    out = load_images_full(paths, size, source, fit)
    return out.pixels, out.levels


def load_images_full(paths: list[Path], size: int | None, source: str, fit: str = "letterbox",
                     fit_size: int | None = None) -> Loaded:
    """Decode, unify channels and size, and quantize to one storage grid: N×C×H×W uint8 or uint16.

    Images are quantized one at a time (memory stays at the stored size); grey images among colour
    ones get their channel repeated, and 8-bit images among 16-bit ones are scaled by 257 (exact).
    With ``size``, a square image is resized and a non-square one letterboxed (``fit='crop'``: centre-
    cropped) into size×size, never squashed. Without ``size``, images stay at their stored size when they
    all share one square size (attacks then perturb the stored pixels themselves), and are fitted to
    ``fit_size`` (a model's input) when their sizes differ or are not square. DICOM images come in their
    stored values (one-to-one) with their VOI windows aside.
    """
    stored, windows, grids, shapes = [], [], [], []
    for p in paths:
        d = decode(p)
        t = torch.from_numpy(d.x)[None].float()
        shapes.append(tuple(d.x.shape[-2:]))
        if size is not None:
            t = Layout.of(shapes[-1], size, fit).to_square(t) if shapes[-1][0] != shapes[-1][1] else resize(t, size)
        dtype = np.uint8 if d.levels == 255 else np.uint16
        stored.append(torch.round(t[0] * d.levels).numpy().astype(dtype))
        windows.append(d.window)
        grids.append(d.stored_levels)
    uneven = len({a.shape[1:] for a in stored}) > 1 or any(h != w for h, w in shapes)
    if size is None and fit_size is not None and uneven:
        for i, a in enumerate(stored):  # from the quantized arrays: the stored values, exactly
            levels = int(np.iinfo(a.dtype).max)
            t = torch.from_numpy(a.astype(np.float32) / levels)[None]
            t = Layout.of(shapes[i], fit_size, fit).to_square(t) if shapes[i][0] != shapes[i][1] else resize(t, fit_size)
            stored[i] = torch.round(t[0] * levels).numpy().astype(a.dtype)
    if size is None and len({a.shape[1:] for a in stored}) > 1:
        raise MedadvError(f"images in {source} come in {len({a.shape[1:] for a in stored})} different sizes.",
                          "pass --image-size N to fit them to one size on load (models default to their input size).")
    channels = 3 if any(a.shape[0] == 3 for a in stored) else 1
    wide = any(a.dtype == np.uint16 for a in stored)
    out = np.empty((len(stored), channels, *stored[0].shape[1:]), dtype=np.uint16 if wide else np.uint8)
    for i, a in enumerate(stored):
        a = a.astype(out.dtype) * (257 if wide and a.dtype == np.uint8 else 1)
        out[i] = np.repeat(a, channels, axis=0) if a.shape[0] != channels else a
    window = None
    if any(w is not None for w in windows):
        window = np.array([w if w is not None else (1.0, 0.0) for w in windows], dtype=np.float64)
    return Loaded(out, 65535 if wide else 255, window, grids, shapes)
