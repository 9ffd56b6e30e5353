"""DICOM in and out with pydicom: stored integers <-> float images in [0, 1].

Reading (:func:`read_dicom`) applies, in DICOM's order, the modality LUT (RescaleSlope/Intercept), the
VOI window (WindowCenter/Width, LINEAR or LINEAR_EXACT, first window when several) when present, else
the full range of BitsStored, and inverts MONOCHROME1 so that bright always means dense. Colour images
(RGB, YBR_* decoded by pydicom to RGB) map by BitsStored. For grey images every step of that chain is
affine, so the whole map is ``x = clip(a * stored + b, 0, 1)`` and :func:`write_dicom_like` can invert
it exactly.

Attacks do not work on that windowed view: a window that covers only part of the stored values clips
the rest, and an edit there would move a pixel to the window's edge, far more than eps in the file.
:func:`read_dicom_stored` gives the stored values themselves (after the modality LUT) mapped one-to-one
and linearly onto [0, 1] over the full BitsStored range (MONOCHROME1 inverted, so bright still means
dense), plus the window as an affine ``(a, b)`` that the model applies (``clip(a * x + b, 0, 1)``).

Malformed headers fail with one line naming the file, the tag (keyword and (gggg,eeee)) and the value
as stored; only a missing decoder is met with "install the codecs". pydicom's own warnings are kept off
the console (:func:`quiet`): what they foretell is raised as that one line.

Writing puts an edited image back into a copy of its source file at the source's bit depth and
representation, with a new SOPInstanceUID. Unchanged pixels keep their stored value bit for bit; a
changed pixel is rounded toward its original stored value, so the saved change is never larger than the
requested one (an attack's eps budget survives the write).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medadv.errors import MedadvError

# Half a step of the 16-bit grid that ImageSet holds DICOM images on: closer than this is "unchanged".
_SAME = 0.5 / 65535


@dataclass(frozen=True)
class DicomMap:
    """The affine map ``x = clip(a * stored + b, 0, 1)`` from stored integers to [0, 1]."""

    a: float
    b: float
    stored_min: int
    stored_max: int
    photometric: str

    def forward(self, stored: np.ndarray) -> np.ndarray:
        return np.clip(self.a * stored.astype(np.float64) + self.b, 0.0, 1.0)


@contextlib.contextmanager
def quiet() -> Iterator[list]:
    """pydicom's warnings (an invalid value for a VR, a deprecated option) kept off the console: every
    failure they foretell is raised as one line naming the file and the tag (:func:`bad_element`)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


# The image-header elements medadv and pydicom's decoder read: pydicom keeps a malformed value of these as
# a raw string with only a warning, and the failure would come later and nameless.
USED = frozenset({"Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                  "PixelRepresentation", "PlanarConfiguration", "PhotometricInterpretation", "WindowCenter",
                  "WindowWidth", "RescaleSlope", "RescaleIntercept", "VOILUTFunction"})


def bad_element(ds, groups: tuple[int, ...] = (0x0028,)) -> tuple[str, str, str, str] | None:
    """The first element of ``groups`` (the image header) whose value cannot be read, or (for the ones
    medadv uses, :data:`USED`) that pydicom warns is invalid for its VR: (keyword, "(gggg,eeee)", the raw
    value as stored, pydicom's complaint); None when all read."""
    from pydicom.datadict import keyword_for_tag

    for tag in list(ds.keys()):
        if tag.group not in groups:
            continue
        keyword = keyword_for_tag(tag) or "private tag"
        why = None
        try:
            with quiet() as caught:
                ds[tag].value  # noqa: B018 -- converting the raw bytes is what fails on a malformed value
            if keyword in USED and caught:
                why = str(caught[0].message).split(". Please see")[0][:80]
        except Exception as exc:  # pydicom raises ValueError, TypeError or its own errors here
            why = f"{type(exc).__name__}: {str(exc)[:60]}"
        if why is not None:
            raw = ds.get_item(tag).value
            text = raw.decode("latin-1", "replace").strip() if isinstance(raw, bytes) else str(raw)
            return keyword, f"({tag.group:04X},{tag.element:04X})", text[:40], why
    return None


def _header_error(path: Path, bad: tuple[str, str, str, str]) -> MedadvError:
    keyword, tag, raw, why = bad
    return MedadvError(f"{path}: DICOM tag {keyword} {tag} holds an invalid value {raw!r} ({why}).",
                       f"correct {keyword} {tag} in the header (e.g. with dcmodify) or re-export the file from the "
                       "PACS; installing codecs will not help.")


def _read(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with quiet():
            ds = pydicom.dcmread(path)
    except FileNotFoundError as exc:
        raise MedadvError(f"DICOM file {path} does not exist.", "check the path in labels.csv.") from exc
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
        raise MedadvError(
            f"{path} is not a readable DICOM file ({type(exc).__name__}: {str(exc)[:80]}).",
            "re-export it from the PACS or remove it from labels.csv.",
        ) from exc
    bad = bad_element(ds)  # a malformed image-header value, named here rather than failing deep in decoding
    if bad is not None:
        raise _header_error(path, bad)
    return ds


def _stored(ds, path: Path) -> np.ndarray:
    if "PixelData" not in ds:
        raise MedadvError(f"{path} holds no image (no PixelData).", "remove it from the dataset.")
    frames = int(_num(ds, "NumberOfFrames", path, 1) or 1)
    if frames != 1:
        raise MedadvError(f"{path} has {frames} frames; medadv classifies single 2D images.",
                          "export the frame you want as its own DICOM file.")
    try:
        with quiet():
            arr = ds.pixel_array  # pydicom converts YBR_* to RGB here
    except Exception as exc:  # missing codec, malformed header or damaged pixel data
        raise pixel_error(path, exc, ds) from exc
    return np.asarray(arr)


# Words pydicom uses when no installed plugin can decode a transfer syntax (the one case codecs fix).
_NO_CODEC = ("plugin", "handler", "decoder", "no available", "not installed", "missing dependencies")


def pixel_error(path: Path, exc: Exception, ds=None) -> MedadvError:
    """One line for a failed ``pixel_array``: a missing codec gets "install the codecs"; a malformed
    header (a missing or invalid group 0028 element, pixel data shorter than Rows×Columns says) gets
    the tag to fix, because codecs cannot help there."""
    text = str(exc)
    syntax = ""
    if ds is not None and "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        syntax = f" ({ds.file_meta.TransferSyntaxUID.name})"
    if any(w in text.lower() for w in _NO_CODEC) and not isinstance(exc, AttributeError):
        return MedadvError(f"cannot decode the compressed pixels of {path}{syntax}: {text[:100]}.",
                           "install the codecs with `pip install 'medadv[dicom-codecs]'`.")
    import re

    tag = re.search(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)\s*'([^']+)'", text)
    bad = None if tag or ds is None else bad_element(ds)
    if bad is not None:  # the message did not name the tag, but one image-header value is unreadable
        return _header_error(path, bad)
    what = f"tag {tag.group(3)} ({tag.group(1)},{tag.group(2)})" if tag else "its image header (group 0028) or pixel data"
    return MedadvError(f"{path} has a malformed DICOM header: {what} does not fit the pixel data "
                       f"({type(exc).__name__}: {text[:120]}).",
                       f"fix {what} (e.g. with dcmodify) or re-export the file from the PACS; "
                       "installing codecs will not help.")


def _num(ds, keyword: str, path: Path, default: float | None = None) -> float | None:
    """A numeric header value (first of several), or one line naming the tag when it is not a number."""
    try:
        value = ds.get(keyword, default)
        if value is None or (isinstance(value, str) and not value.strip()):
            return default
        out = _first(value)
    except (ValueError, TypeError, OverflowError, IndexError) as exc:
        tag = _tag_text(keyword)
        raise MedadvError(f"{path}: DICOM tag {keyword} {tag} holds an invalid value ({str(exc)[:60]}).",
                          f"correct {keyword} in the header (e.g. with dcmodify) or re-export the file "
                          "from the PACS; installing codecs will not help.") from exc
    if not np.isfinite(out):
        raise MedadvError(f"{path}: DICOM tag {keyword} {_tag_text(keyword)} is {out}.",
                          f"correct {keyword} in the header or re-export the file from the PACS.")
    return out


def _tag_text(keyword: str) -> str:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    return "" if tag is None else f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _first(value) -> float:
    """First value of a DS element that may hold several (one window per VOI preset)."""
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def _bits(ds, path: Path) -> int:
    bits = _num(ds, "BitsStored", path)
    if bits is None or not 1 <= bits <= 16 or bits != int(bits):
        raise MedadvError(f"{path}: DICOM tag BitsStored {_tag_text('BitsStored')} is {bits}; medadv reads 1 to 16 bits.",
                          "correct BitsStored in the header or re-export the file from the PACS.")
    return int(bits)


def _grey_map(ds, photometric: str, path: Path = Path("?"), window: bool = True) -> DicomMap:
    bits = _bits(ds, path)
    signed = _num(ds, "PixelRepresentation", path, 0) == 1
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    slope = _num(ds, "RescaleSlope", path, 1.0) or 1.0
    intercept = _num(ds, "RescaleIntercept", path, 0.0) or 0.0
    center, width = _num(ds, "WindowCenter", path), _num(ds, "WindowWidth", path)
    if window and center is not None and width is not None:
        func = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        if func == "LINEAR_EXACT":
            if width <= 0:
                raise MedadvError(f"{path}: DICOM tag WindowWidth (0028,1051) is {width}, invalid (<= 0).",
                                  "correct WindowWidth in the header or re-export the file from the PACS.")
            a, b = slope / width, (intercept - center) / width + 0.5
        elif func == "LINEAR":
            if width < 1:
                raise MedadvError(f"{path}: DICOM tag WindowWidth (0028,1051) is {width}, invalid (< 1) for a LINEAR window.",
                                  "correct WindowWidth in the header or re-export the file from the PACS.")
            a = slope / max(width - 1, 1e-12)
            b = (intercept - (center - 0.5)) / max(width - 1, 1e-12) + 0.5
        else:
            raise MedadvError(f"VOI LUT function {func} is not supported.", "re-export with a LINEAR window.")
    else:
        m_lo, m_hi = sorted((slope * lo + intercept, slope * hi + intercept))
        a = slope / (m_hi - m_lo)
        b = (intercept - m_lo) / (m_hi - m_lo)
    if photometric == "MONOCHROME1":  # invert so that bright means dense, as on MONOCHROME2
        a, b = -a, 1.0 - b
    return DicomMap(a, b, lo, hi, photometric)


def dicom_map(ds, path: Path = Path("?"), window: bool = True) -> DicomMap:
    """The map from stored integers to [0, 1]: through the VOI window (the display), or with
    ``window=False`` over the full stored range (one-to-one: the space attacks perturb)."""
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return _grey_map(ds, photometric, path, window)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"):
        bits = _bits(ds, path)
        return DicomMap(1.0 / ((1 << bits) - 1), 0.0, 0, (1 << bits) - 1, "RGB")
    raise MedadvError(f"photometric interpretation {photometric or '(missing)'} is not supported.",
                      "convert the image to MONOCHROME2 or RGB.")


def read_dicom(path: str | Path) -> np.ndarray:
    """Decode one DICOM image into float64 C×H×W in [0, 1] (C = 1 grey, 3 colour)."""
    path = Path(path)
    ds = _read(path)
    stored = _stored(ds, path)
    if "VOILUTSequence" in ds and "WindowCenter" not in ds:
        raise MedadvError(f"{path} uses a VOI LUT table, which medadv does not invert.",
                          "re-export it with a linear window (WindowCenter/WindowWidth).")
    x = dicom_map(ds, path).forward(stored)
    return x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)


@dataclass(frozen=True)
class StoredImage:
    """A DICOM image in its stored values: ``x`` C×H×W in [0, 1], one-to-one with the stored integers;
    ``window`` the (a, b) with which ``clip(a * x + b, 0, 1)`` is the windowed view (None: x is the view);
    ``levels`` = 2**BitsStored - 1, the stored grid's steps over [0, 1]; ``bits`` BitsStored."""

    x: np.ndarray
    window: tuple[float, float] | None
    levels: int
    bits: int


def read_dicom_stored(path: str | Path) -> StoredImage:
    """Decode one DICOM image into its stored values on [0, 1] and the VOI window as an affine map."""
    path = Path(path)
    ds = _read(path)
    stored = _stored(ds, path)
    if "VOILUTSequence" in ds and "WindowCenter" not in ds:
        raise MedadvError(f"{path} uses a VOI LUT table, which medadv does not invert.",
                          "re-export it with a linear window (WindowCenter/WindowWidth).")
    full, view = dicom_map(ds, path, window=False), dicom_map(ds, path)
    x = full.forward(stored)
    x = x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)
    # full: x = A*s + B; view: v = a*s + b  =>  v = (a/A) * x + (b - a*B/A), exactly affine in x
    window = None
    if (view.a, view.b) != (full.a, full.b):
        k = view.a / full.a
        window = (k, view.b - k * full.b)
    return StoredImage(x, window, full.stored_max - full.stored_min, int(ds.BitsStored))


def write_dicom_like(source: str | Path, image: np.ndarray, out: str | Path, *, space: str = "display",
                     derivation: str | None = None) -> Path:
    """Write ``image`` (C×H×W in [0, 1], the source's size and channels) into a copy of ``source``.

    ``space``: ``display`` (the windowed view :func:`read_dicom` gives) or ``stored`` (the one-to-one
    view :func:`read_dicom_stored` gives, in which an attack's eps bounds the change of the stored values).
    The copy keeps the source's bit depth, signedness and photometric interpretation (a compressed
    source is written uncompressed, colour as RGB), gets a new SOPInstanceUID and is marked DERIVED,
    with ``derivation`` (e.g. "medadv 0.1: pgd adversarial perturbation") as its DerivationDescription.
    """
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from medadv.io import atomic_path

    source = Path(source)
    ds = _read(source)
    stored = _stored(ds, source)
    if space not in ("display", "stored"):
        raise ValueError(f"space must be 'display' or 'stored', not {space!r}")
    m = dicom_map(ds, source, window=space == "display")
    image = np.asarray(image, dtype=np.float64)
    chw = stored[None] if stored.ndim == 2 else np.moveaxis(stored, -1, 0)
    if image.shape != chw.shape:
        raise MedadvError(f"image of shape {image.shape} does not fit {source} ({chw.shape}).",
                          "write at the source's size and channels.")
    if not np.isfinite(image).all():
        raise MedadvError("image to write holds NaN or infinite values.", "check the attack output.")
    x_old = m.forward(chw)
    x_new = np.clip(image, 0.0, 1.0)
    target = (x_new - m.b) / m.a  # continuous stored value that maps to x_new
    step = target - chw
    # Round toward the original stored value: the saved change never exceeds the requested one.
    moved = chw + np.sign(step) * np.floor(np.abs(step) + 1e-6)
    new = np.where(np.abs(x_new - x_old) <= _SAME, chw, moved)
    new = np.clip(new, m.stored_min, m.stored_max).astype(stored.dtype)
    new = new[0] if stored.ndim == 2 else np.moveaxis(new, 0, -1)

    with quiet():  # pydicom's notes on the source's other elements stay off the console
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress(as_rgb=True, generate_instance_uid=False)
        if m.photometric == "RGB":
            ds.PhotometricInterpretation = "RGB"
            ds.PlanarConfiguration = 0
        ds.PixelData = np.ascontiguousarray(new).astype(new.dtype.newbyteorder("<")).tobytes()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        _mark_derived(ds, derivation or "medadv: edited pixel data")
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        out = Path(out)
        with atomic_path(out, suffix=".dcm") as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    return out


def _mark_derived(ds, description: str) -> None:
    """ImageType DERIVED\\SECONDARY (values 3+ kept) and a DerivationDescription naming what changed the
    pixels; any lossy-compression wording from the source's decompression is replaced, not appended to."""
    old = list(ds.get("ImageType", []) or [])
    ds.ImageType = ["DERIVED", "SECONDARY", *old[2:]]
    ds.DerivationDescription = description[:1024]
