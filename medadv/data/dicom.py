"""DICOM in and out with pydicom: stored integers <-> float images in [0, 1].

Reading (:func:`read_dicom`) applies, in DICOM's order, the modality LUT (RescaleSlope/Intercept), the
VOI window (WindowCenter/Width, LINEAR or LINEAR_EXACT, first window when several) when present, else
the full range of BitsStored, and inverts MONOCHROME1 so that bright always means dense. Colour images
(RGB, YBR_* decoded by pydicom to RGB) map by BitsStored. For grey images every step of that chain is
affine, so the whole map is ``x = clip(a * stored + b, 0, 1)`` and :func:`write_dicom_like` can invert
it exactly.

Writing puts an edited image back into a copy of its source file at the source's bit depth and
representation, with a new SOPInstanceUID. Unchanged pixels keep their stored value bit for bit; a
changed pixel is rounded toward its original stored value, so the saved change is never larger than the
requested one (an attack's eps budget survives the write).
"""

from __future__ import annotations

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


def _read(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except FileNotFoundError as exc:
        raise MedadvError(f"DICOM file {path} does not exist.", "check the path in labels.csv.") from exc
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError) as exc:
        raise MedadvError(
            f"{path} is not a readable DICOM file ({type(exc).__name__}: {str(exc)[:80]}).",
            "re-export it from the PACS or remove it from labels.csv.",
        ) from exc


def _stored(ds, path: Path) -> np.ndarray:
    if "PixelData" not in ds:
        raise MedadvError(f"{path} holds no image (no PixelData).", "remove it from the dataset.")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise MedadvError(f"{path} has {frames} frames; medadv classifies single 2D images.",
                          "export the frame you want as its own DICOM file.")
    try:
        arr = ds.pixel_array  # pydicom converts YBR_* to RGB here
    except Exception as exc:  # missing codec or damaged pixel data
        raise MedadvError(
            f"cannot decode the pixels of {path} ({type(exc).__name__}: {str(exc)[:100]}).",
            "install the codecs with `pip install 'medadv[dicom-codecs]'`, or check the file is complete.",
        ) from exc
    return np.asarray(arr)


def _first(value) -> float:
    """First value of a DS element that may hold several (one window per VOI preset)."""
    from pydicom.multival import MultiValue

    return float(value[0] if isinstance(value, (MultiValue, list, tuple)) else value)


def _grey_map(ds, photometric: str) -> DicomMap:
    bits = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center, width = _first(center), _first(width)
        func = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        if func == "LINEAR_EXACT":
            a, b = slope / width, (intercept - center) / width + 0.5
        elif func == "LINEAR":
            if width < 1:
                raise MedadvError(f"WindowWidth {width} < 1 is invalid for LINEAR VOI.", "fix the DICOM header.")
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


def dicom_map(ds) -> DicomMap:
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        return _grey_map(ds, photometric)
    if photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "YBR_PARTIAL_420"):
        bits = int(ds.BitsStored)
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
    x = dicom_map(ds).forward(stored)
    return x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)


def write_dicom_like(source: str | Path, image: np.ndarray, out: str | Path) -> Path:
    """Write ``image`` (C×H×W in [0, 1], the source's size and channels) into a copy of ``source``.

    The copy keeps the source's bit depth, signedness and photometric interpretation (a compressed
    source is written uncompressed, colour as RGB) and gets a new SOPInstanceUID.
    """
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from medadv.io import atomic_path

    source = Path(source)
    ds = _read(source)
    stored = _stored(ds, source)
    m = dicom_map(ds)
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

    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(as_rgb=True, generate_instance_uid=False)
    if m.photometric == "RGB":
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    ds.PixelData = np.ascontiguousarray(new).astype(new.dtype.newbyteorder("<")).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    out = Path(out)
    with atomic_path(out, suffix=".dcm") as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return out
