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
* *identity and acquisition* (issue 9): PatientID, StudyInstanceUID, SeriesInstanceUID, Laterality,
  ImageLaterality, ViewPosition, BodyPartExamined and PixelSpacing. They bind the pixels to one
  patient, one study, one side, one view and one scale, so a signed image moved into another
  patient's study, relabelled left for right or given another pixel spacing no longer verifies.

Not in the digest but in the signed record: SOPInstanceUID (lossless re-encoders, pydicom's
``compress``/``decompress`` by default, assign a new one); the record binds the file's name *or* its
SOPInstanceUID, and verification checks that binding. PatientName and other descriptive tags are
left out (PHI that de-identification replaces). De-identification that replaces PatientID or the UIDs
breaks verification by design: the de-identification service registers its output with its own
enrolled device key.

Decompression bombs: an image whose pixel count exceeds :func:`max_pixels` (``$MEDADV_MAX_PIXELS``,
default 100 million) is refused before it is decoded.

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

FORMAT = "medadv-digest/2"
VIEW_FORMAT = "medadv-view/1"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
NPZ_SPLITS = ("train", "val", "test")
IDENTITY_TAGS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Laterality", "ImageLaterality", "ViewPosition",
                 "BodyPartExamined", "PixelSpacing")


def max_pixels() -> int:
    """The largest image (pixels × frames) medadv decodes: ``$MEDADV_MAX_PIXELS``, default 100 million."""
    import os

    try:
        return max(1, int(os.environ.get("MEDADV_MAX_PIXELS", "100000000")))
    except ValueError:
        return 100_000_000


def _check_pixels(path: Path, count: int) -> None:
    if count > max_pixels():
        raise MedadvError(f"image {path} would decode to {count} pixels, over the limit of {max_pixels()} "
                          "(a decompression bomb?).", "set MEDADV_MAX_PIXELS higher if the image is genuine.")


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
    view: str | None = None  # view_digest of the pixels as medadv's readers load them (C×H×W), when known


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


def view_digest(chw: np.ndarray, window: Any = None) -> str:
    """Digest of an image as medadv hands it to a model: C×H×W uint8/uint16 on its storage grid.

    Canonical form first, so the same model input always has the same view digest: a colour image whose
    three channels are equal is its grey image (readers repeat grey among colour), and a 16-bit image
    whose values are all multiples of 257 is its 8-bit image (readers scale 8-bit among 16-bit by 257).
    ``window``: the DICOM VOI window (a, b) the model applies (``clip(a * x + b, 0, 1)``); part of the
    view, so a changed window is another view. None and (1, 0) are no window.
    """
    arr = np.asarray(chw)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.dtype not in (np.uint8, np.uint16):
        raise MedadvError(f"cannot take the view digest of pixels of dtype {arr.dtype} and shape {arr.shape}.",
                          "pass C×H×W uint8 or uint16 pixels.")
    if arr.shape[0] == 3 and np.array_equal(arr[0], arr[1]) and np.array_equal(arr[0], arr[2]):
        arr = arr[:1]
    if arr.dtype == np.uint16 and not np.any(arr % 257):
        arr = (arr // 257).astype(np.uint8)
    ident: dict[str, Any] = {}
    if window is not None:
        a, b = (float(v) for v in np.asarray(window, dtype=np.float64).reshape(-1)[:2])
        if (a, b) != (1.0, 0.0):
            ident["window"] = [repr(a), repr(b)]
    return pixel_digest(np.moveaxis(arr, 0, -1), VIEW_FORMAT, identity=ident)


def loaded_view(path: Path, size: int | None = None, fit: str = "letterbox") -> tuple[np.ndarray, str]:
    """(pixels C×H×W, view digest) of a file as medadv's folder reader loads it, at ``size`` (None: stored)."""
    from medadv.data import folder

    if hasattr(folder, "load_images_full"):
        out = folder.load_images_full([path], size, str(path), fit)
        window = None if out.window is None else out.window[0]
        return out.pixels[0], view_digest(out.pixels[0], window)
    pixels, _ = folder.load_images([path], size, str(path))
    return pixels[0], view_digest(pixels[0])


def file_view(path: Path) -> str | None:
    """The view digest of a file as medadv's folder reader loads it at its stored size (None if it cannot)."""
    try:
        return loaded_view(path)[1]
    except Exception:  # the content digest already vouches for the file; the view is an extra binding
        return None


def member_view(image: np.ndarray) -> str:
    """The view digest of an npz member as medadv's npz reader loads it (H×W -> 1×H×W, H×W×C -> C×H×W)."""
    arr = np.asarray(image)
    return view_digest(arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0))


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
            _check_pixels(path, im.size[0] * im.size[1])
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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError,
            Image.DecompressionBombError) as exc:
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


def dicom_identity(ds: Any) -> dict[str, Any]:
    """The identity and acquisition tags in the digest: patient, study, series, side, view, body part, scale."""
    out: dict[str, Any] = {}
    for k in IDENTITY_TAGS:
        v = ds.get(k, "")
        if k == "PixelSpacing":
            try:
                out[k] = _ds_floats(v)
            except (TypeError, ValueError):
                out[k] = str(v)[:64]
        else:
            out[k] = str(v or "").strip()
    return out


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
        count = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        count = 0
    _check_pixels(path, count)
    try:
        arr = np.asarray(ds.pixel_array)  # pydicom decodes compressed syntaxes and converts YBR_* to RGB
        interpretation = dicom_interpretation(ds)
    except Exception as exc:  # missing codec, damaged pixel data or malformed attributes
        from medadv.data.dicom import pixel_error

        # the fix fits the cause: codecs for a compressed syntax pydicom cannot decode, the tag otherwise
        raise pixel_error(Path(path), exc, ds) from exc
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
            "study_uid": identity["StudyInstanceUID"], "identity": identity, "sop_instance_uid": uid}
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
                shape = _npz_shape(z, f"{split}_images")
                if shape is not None and len(shape) >= 3:
                    _check_pixels(Path(f"{path}#{split}"), int(np.prod(shape[1:], dtype=np.float64)))
                yield split, z[f"{split}_images"]
    except MedadvError:
        raise
    except FileNotFoundError as exc:
        raise MedadvError(f"{path} does not exist.", "check the path.") from exc
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as exc:
        raise MedadvError(f"{path} is not a readable .npz file ({type(exc).__name__}: {str(exc)[:80]}).",
                          "replace it with an intact copy.") from exc


def _npz_shape(z: Any, key: str) -> tuple[int, ...] | None:
    """An npz member's shape from its .npy header, before its data is decompressed (None if unreadable)."""
    try:
        with z.zip.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
        return tuple(int(v) for v in shape)
    except Exception:  # noqa: BLE001 - np.load reports the damage itself
        return None


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
            d = digest_array(images[i], f"{path.name}#{split}/{i}")
            done[(split, i)] = ImageDigest(d.digest, d.name, meta=d.meta, view=member_view(images[i]))
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


def digest_path(path: Path, *, with_view: bool = False) -> list[ImageDigest]:
    """One file's digests: one for an image, one per member for an .npz. ``with_view``: also the view
    digest of each image file (registration does; members always have theirs)."""
    if path.suffix.lower() == ".npz":
        return digest_npz(path)
    d = digest_file(path)
    if with_view:
        from dataclasses import replace

        d = replace(d, view=file_view(path))
    return [d]
