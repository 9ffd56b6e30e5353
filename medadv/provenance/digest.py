"""The canonical content digest: SHA-256 over what an image *shows*, not over how its file is encoded.

A digest is ``sha256(header + b"\\n" + pixels)`` where

* ``pixels`` are the decoded values in C order, little-endian, laid out as H×W×C (F×H×W×C for a
  multi-frame DICOM; C = 1 for grey), in the dtype the decoder gives (uint8, uint16, int16, ...);
* ``header`` is canonical JSON (sorted keys, no spaces) of the format version, the shape, the dtype
  name, the photometric interpretation, the DICOM pixel-interpretation attributes and the DICOM
  identity tags (both empty for PNG/JPEG/npz).

So a lossless re-encoding (PNG compression level, DICOM transfer syntax: implicit/explicit, big/little
endian, RLE, JPEG 2000 lossless, deflate) keeps the digest, and a change of any pixel by one grey level,
of the shape, of the bit depth or of how the pixels are displayed does not.

Photometric interpretation: for PNG/JPEG the Pillow mode after making palettes explicit (``1`` -> ``L``,
``P`` -> ``RGB``/``RGBA``; ``I;16*`` -> ``I;16``), so a palette PNG re-saved as true colour keeps its
digest; for npz members ``L``/``RGB``/``I;16`` by shape and dtype, so a MedMNIST member exported
losslessly to PNG keeps its digest; for DICOM the PhotometricInterpretation after pydicom's decoding
(``YBR_*`` -> ``RGB``).

DICOM attributes in the digest, and why:

* *pixel interpretation*: BitsStored, PixelRepresentation, RescaleSlope/Intercept (absent = 1/0),
  WindowCenter/Width, VOILUTFunction, PresentationLUTShape and the Modality/VOI LUT sequences' data.
  medadv's reader renders stored values through exactly this chain, so changing a window or a rescale
  changes what the model sees as surely as editing a pixel.
* *identity*: StudyInstanceUID and SeriesInstanceUID. They bind the pixels to one study of one
  patient, so a signed image moved into another patient's study no longer verifies. They survive a
  lossless re-encoding and de-identification under DICOM PS3.15's "Retain UIDs" option.

Deliberately left out: SOPInstanceUID (lossless re-encoders, pydicom's ``compress``/``decompress`` by
default, assign a new one, and a copy of a signed image inside its own series shows nothing new);
PatientID, PatientName and every other descriptive tag (PHI that every de-identification profile
replaces and that routine patient merges rewrite; a study keeps its patient through the Study UID).
Residual risk, documented: rewriting PatientID while keeping the Study UID is not caught by the
digest; systems should key patients on the Study UID they verified. De-identification that replaces
the UIDs breaks verification by design: the de-identification service registers its output with its
own device key.

Caveats: JPEG digests are over Pillow's decoded pixels (libjpeg-turbo's integer IDCT); a different
JPEG decoder may differ by a grey level, which reads as "modified" (fail safe). 16-bit colour PNGs are
refused because Pillow decodes them to 8 bits, where a one-level change could hide.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medadv.errors import MedadvError

FORMAT = "medadv-digest/1"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
NPZ_SPLITS = ("train", "val", "test")
_MEMBER = re.compile(r"^(?P<file>.+\.npz)#(?P<split>[A-Za-z0-9_]+)/(?P<index>\d+)$")


@dataclass(frozen=True)
class ImageDigest:
    """One image's canonical digest and the names the ledger can find it by.

    ``name`` is the file's base name (``<file>.npz#<split>/<index>`` for an npz member): paths differ
    between the device and the PACS, base names usually do not. ``uid``/``series_uid`` are the DICOM
    SOPInstanceUID and SeriesInstanceUID (None otherwise). ``meta`` is JSON-able and goes into the
    signed record (format, shape, dtype, photometric, study UID).
    """

    digest: str
    name: str
    uid: str | None = None
    series_uid: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, ASCII only."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def pixel_digest(
    pixels: np.ndarray,
    photometric: str,
    *,
    interpretation: Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
) -> str:
    """SHA-256 (hex) of decoded pixels (H×W, H×W×C or F×H×W×C) plus how to read them.

    Byte order and memory layout do not matter (the values are hashed little-endian, C order); the
    dtype, shape, photometric interpretation and every value do.
    """
    arr = np.asarray(pixels)
    if arr.dtype.kind not in "uif" or arr.ndim not in (2, 3, 4):
        raise MedadvError(f"cannot digest pixels of dtype {arr.dtype} and shape {arr.shape}.",
                          "pass H×W, H×W×C or F×H×W×C integer or float pixels.")
    if arr.ndim == 2:
        arr = arr[..., None]
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    header = {
        "format": FORMAT,
        "shape": [int(s) for s in arr.shape],
        "dtype": arr.dtype.name,
        "photometric": photometric,
        "interpretation": dict(interpretation or {}),
        "identity": dict(identity or {}),
    }
    h = hashlib.sha256(canonical_json(header))
    h.update(b"\n")
    h.update(arr.tobytes())
    return h.hexdigest()


def array_photometric(pixels: np.ndarray) -> str:
    """Pillow-style mode for an in-memory array: ``L``/``I;16`` grey, ``RGB``, ``RGBA``; else the dtype."""
    arr = np.asarray(pixels)
    channels = 1 if arr.ndim == 2 else arr.shape[-1]
    if channels == 1:
        return {"uint8": "L", "uint16": "I;16"}.get(arr.dtype.name, f"GREY-{arr.dtype.name}")
    if channels in (3, 4) and arr.dtype == np.uint8:
        return "RGB" if channels == 3 else "RGBA"
    return f"{channels}CH-{arr.dtype.name}"


def digest_array(pixels: np.ndarray, name: str, *, photometric: str | None = None) -> ImageDigest:
    """Digest of an in-memory image (H×W or H×W×C), e.g. one MedMNIST member, named ``name``."""
    arr = np.asarray(pixels)
    photometric = photometric or array_photometric(arr)
    meta = {"format": "array", "shape": list(arr.shape), "dtype": arr.dtype.name, "photometric": photometric}
    return ImageDigest(pixel_digest(arr, photometric), name, meta=meta)


# ---------------------------------------------------------------------------------------------- files


def digest_file(path: str | Path) -> ImageDigest:
    """Digest of one PNG, JPEG or DICOM file. Raises MedadvError for a missing, corrupt or unsupported file."""
    path = Path(path)
    if not path.is_file():
        raise MedadvError(f"image {path} does not exist.", "check the path.")
    if path.suffix.lower() in (".dcm", ".dicom") or _is_dicom(path):
        return _digest_dicom(path)
    return _digest_pillow(path)


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:] == b"DICM"


def _png_depth_and_colour(path: Path) -> tuple[int, int]:
    """Bit depth and colour type from a PNG's IHDR chunk (always the first chunk, at byte 16)."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[12:16] != b"IHDR":
        raise MedadvError(f"image {path} is a corrupt PNG (no IHDR chunk).", "replace the file.")
    return head[24], head[25]


def _digest_pillow(path: Path) -> ImageDigest:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt = im.format
            if fmt not in ("PNG", "JPEG", "MPO"):
                raise MedadvError(f"image {path} is {fmt or 'an unknown format'}; provenance covers PNG, JPEG "
                                  "and DICOM.", "convert it to PNG (lossless) before registering it.")
            if fmt == "PNG":
                depth, colour = _png_depth_and_colour(path)
                if depth == 16 and colour in (2, 4, 6):
                    raise MedadvError(f"image {path} is a 16-bit colour PNG, which Pillow decodes to 8 bits.",
                                      "store it as 16-bit greyscale PNG or as DICOM.")
                if getattr(im, "n_frames", 1) > 1:
                    raise MedadvError(f"image {path} is an animated PNG.", "save the frame you mean as its own PNG.")
            im.load()
            mode = im.mode
            decoded: Image.Image = im
            if mode == "1":
                decoded, mode = im.convert("L"), "L"
            elif mode in ("P", "PA"):  # the palette is content: hash the colours, not the indices
                mode = "RGBA" if mode == "PA" or "transparency" in im.info else "RGB"
                decoded = im.convert(mode)
            arr = np.asarray(decoded)
    except MedadvError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MedadvError(f"image {path} is corrupt or not an image ({type(exc).__name__}: {str(exc)[:80]}).",
                          "replace the file with an intact copy.") from exc
    if mode.startswith("I;16") or (mode == "I" and fmt == "PNG"):
        arr, mode = arr.astype("<u2"), "I;16"  # 16-bit grey PNG, whatever Pillow calls it
    fmt = "JPEG" if fmt == "MPO" else fmt
    meta = {"format": fmt.lower(), "shape": list(arr.shape), "dtype": arr.dtype.name, "photometric": mode}
    return ImageDigest(pixel_digest(arr, mode), path.name, meta=meta)


def _ds_floats(value: Any) -> list[float] | None:
    """A DS/IS attribute (one value or several) as floats, so "1", "1.0" and "1.00" read the same."""
    if value is None or value == "":
        return None
    from pydicom.multival import MultiValue

    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [float(v) for v in values]


def _lut_hashes(ds: Any, keyword: str) -> list[str] | None:
    if keyword not in ds:
        return None
    out = []
    for item in ds[keyword].value:
        h = hashlib.sha256(canonical_json([int(v) for v in item.get("LUTDescriptor", [])]))
        data = item.get("LUTData")
        h.update(b"" if data is None else np.asarray(data, dtype=np.int64).astype("<i8").tobytes())
        out.append(h.hexdigest())
    return out


def dicom_interpretation(ds: Any) -> dict[str, Any]:
    """The attributes that decide how stored DICOM values are displayed (and read by medadv)."""
    slope = _ds_floats(ds.get("RescaleSlope"))
    intercept = _ds_floats(ds.get("RescaleIntercept"))
    return {
        "BitsStored": int(ds.get("BitsStored", 0) or 0),
        "PixelRepresentation": int(ds.get("PixelRepresentation", 0) or 0),
        "RescaleSlope": slope[0] if slope else 1.0,
        "RescaleIntercept": intercept[0] if intercept else 0.0,
        "WindowCenter": _ds_floats(ds.get("WindowCenter")),
        "WindowWidth": _ds_floats(ds.get("WindowWidth")),
        "VOILUTFunction": str(ds.get("VOILUTFunction", "") or "LINEAR").upper(),
        "PresentationLUTShape": str(ds.get("PresentationLUTShape", "") or "") or None,
        "ModalityLUT": _lut_hashes(ds, "ModalityLUTSequence"),
        "VOILUT": _lut_hashes(ds, "VOILUTSequence"),
    }


def dicom_identity(ds: Any) -> dict[str, str]:
    """The identity tags in the digest: the study and series the image belongs to."""
    return {k: str(ds.get(k, "") or "").strip() for k in ("StudyInstanceUID", "SeriesInstanceUID")}


def _digest_dicom(path: Path) -> ImageDigest:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise MedadvError(f"{path} is not a readable DICOM file ({type(exc).__name__}: {str(exc)[:80]}).",
                          "replace it with an intact copy from the PACS.") from exc
    if "PixelData" not in ds:
        raise MedadvError(f"{path} holds no image (no PixelData).", "register image files only.")
    try:
        arr = np.asarray(ds.pixel_array)  # pydicom decodes compressed syntaxes and converts YBR_* to RGB
        interpretation = dicom_interpretation(ds)
    except Exception as exc:  # missing codec, damaged pixel data or malformed attributes
        raise MedadvError(
            f"cannot decode the pixels of {path} ({type(exc).__name__}: {str(exc)[:100]}).",
            "install the codecs with `pip install 'medadv[dicom-codecs]'`, or replace the file with an intact copy.",
        ) from exc
    photometric = str(ds.get("PhotometricInterpretation", "") or "").upper()
    if photometric.startswith("YBR"):
        photometric = "RGB"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1 and samples == 1:
        arr = arr[..., None]  # F×H×W -> F×H×W×1, so grey never looks like colour
    identity = dicom_identity(ds)
    uid = str(ds.get("SOPInstanceUID", "") or "").strip() or None
    meta = {"format": "dicom", "shape": list(arr.shape), "dtype": arr.dtype.name, "photometric": photometric,
            "study_uid": identity["StudyInstanceUID"]}
    digest = pixel_digest(arr, photometric, interpretation=interpretation, identity=identity)
    return ImageDigest(digest, path.name, uid=uid, series_uid=identity["SeriesInstanceUID"] or None, meta=meta)


# ----------------------------------------------------------------------------------------- npz members


def parse_member(image_id: str) -> tuple[str, str, int]:
    """``"<file>.npz#<split>/<index>"`` -> (file name, split, index)."""
    m = _MEMBER.match(image_id)
    if not m:
        raise MedadvError(f"'{image_id}' is not an npz member id.", "npz members are named <file>.npz#<split>/<index>.")
    return m["file"], m["split"], int(m["index"])


def _npz_arrays(path: Path) -> Iterator[tuple[str, Any]]:
    """(split, lazily loaded images array) for each ``<split>_images`` key present; never unpickles."""
    try:
        with np.load(path, allow_pickle=False) as z:
            splits = [k[: -len("_images")] for k in z.files if k.endswith("_images")]
            if not splits:
                raise MedadvError(f"{path} holds no <split>_images array (it has {', '.join(sorted(z.files))}).",
                                  "use a MedMNIST-style .npz with train_/val_/test_images.")
            order = sorted(splits, key=lambda s: (NPZ_SPLITS.index(s) if s in NPZ_SPLITS else 99, s))
            for split in order:
                yield split, z[f"{split}_images"]
    except MedadvError:
        raise
    except FileNotFoundError as exc:
        raise MedadvError(f"{path} does not exist.", "check the path.") from exc
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise MedadvError(f"{path} is not a readable .npz file ({type(exc).__name__}: {str(exc)[:80]}).",
                          "replace it with an intact copy.") from exc


def _check_images(path: Path, split: str, images: np.ndarray) -> None:
    if images.ndim not in (3, 4) or images.dtype.kind not in "uif":
        raise MedadvError(f"{path}: {split}_images has shape {images.shape} and dtype {images.dtype}.",
                          "npz images must be N×H×W or N×H×W×C numbers.")


def digest_npz(path: str | Path, members: Sequence[tuple[str, int]] | None = None) -> list[ImageDigest]:
    """Digests of an npz's images, named ``<file>.npz#<split>/<index>``: all of them in file order, or
    those of ``members`` (``(split, index)`` pairs) in the order given."""
    path = Path(path)
    want: dict[str, set[int]] | None = None
    if members is not None:
        want = {}
        for split, index in members:
            want.setdefault(split, set()).add(index)
    done: dict[tuple[str, int], ImageDigest] = {}
    for split, images in _npz_arrays(path):
        if want is not None and split not in want:
            continue
        _check_images(path, split, images)
        for i in range(len(images)) if want is None else sorted(want[split]):
            if not 0 <= i < len(images):
                raise MedadvError(f"{path}: {split}_images has no image {i} (it has {len(images)}).",
                                  "check the image id.")
            done[(split, i)] = digest_array(images[i], f"{path.name}#{split}/{i}")
    if want is None:
        return list(done.values())
    missing = sorted({s for s, _ in members or []} - {s for s, _ in done})
    if missing:
        raise MedadvError(f"{path} has no {', '.join(missing)} images.", "check the image ids.")
    return [done[(s, i)] for s, i in members or []]


# -------------------------------------------------------------------------------------------- inputs


def expand_inputs(paths: Iterable[str | Path]) -> list[Path]:
    """Files to digest: each path as given; a folder contributes its images and .npz files, recursively, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES | {".npz"})
            if not found:
                raise MedadvError(f"folder {p} holds no PNG, JPEG, DICOM or .npz files.", "check the folder.")
            out.extend(found)
        else:
            out.append(p)
    return out


def digest_path(path: Path) -> list[ImageDigest]:
    """One file's digests: one for an image, one per member for an .npz."""
    return digest_npz(path) if path.suffix.lower() == ".npz" else [digest_file(path)]
