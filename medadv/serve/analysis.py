"""One upload's path through the service, without HTTP: check limits, decode, verify provenance (the
served model, its defense and the screening detector are :mod:`medadv.serve.model`'s).

Errors are :class:`ServiceError` (a :class:`MedadvError` with an HTTP status), so the app answers them as
4xx JSON lines and the CLI could print them as one line.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medadv.errors import MedadvError

STATUSES = ("verified", "modified", "unknown-device", "unsigned")
# The ledger's verdicts, as the four statuses the service reports (the ledger's own word is kept as detail).
# Content or identity changed since signing -> modified; signed, but not by a key (and log) the trust root
# vouches for -> unknown-device; no record at all -> unsigned.
_STATUS_MAP = {"verified": "verified", "modified": "modified", "bad-signature": "modified", "corrupt": "modified",
               "name-mismatch": "modified", "label-mismatch": "modified", "duplicate": "modified",
               "unknown-device": "unknown-device", "revoked": "unknown-device", "replayed": "unknown-device",
               "not-logged": "unknown-device", "unregistered": "unsigned"}


class ServiceError(MedadvError):
    """A user error with the HTTP status to answer it with."""

    def __init__(self, status: int, what: str, fix: str | None = None) -> None:
        super().__init__(what, fix)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_side: int = 8192


@dataclass(frozen=True)
class ScreenConfig:
    bits: int = 5  # bit-depth reduction (Xu et al., 2018: 5 bits for natural images)
    median: int = 3  # median filter size (3x3: the defaults of medadv.defenses.detect.FeatureSqueezing)
    threshold: float = 0.5  # on max L1 distance between probability vectors: [0, 2]; a reader's [0, findings]


@dataclass
class Upload:
    name: str
    kind: str  # png, jpeg, dicom
    path: Path
    height: int
    width: int


# ------------------------------------------------------------------------------------------ uploads


def sniff(data: bytes) -> str | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


def safe_name(name: str | None, kind: str) -> str:
    """The upload's base name, kept as sent: verification binds a record to the image's name, and finds a
    modified image by it. Path components are dropped; a name that cannot be a file name (empty, ``..``,
    control characters, over 200 bytes) becomes ``upload.<ext>``, which matches no record (fail safe); a
    non-DICOM named ``.dcm`` gets its content's suffix (same stem), as it could not have been registered so."""
    ext = {"png": ".png", "jpeg": ".jpg", "dicom": ".dcm"}[kind]
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    try:
        size = len(base.encode("utf-8"))
    except UnicodeEncodeError:
        size = 10_000
    if base in ("", ".", "..") or size > 200 or any(ord(c) < 32 or ord(c) == 127 for c in base):
        return f"upload{ext}"
    if kind != "dicom" and base.lower().endswith((".dcm", ".dicom")):
        base = f"{base.rsplit('.', 1)[0]}{ext}"
    return base


def _public(what: str, upload: Upload) -> str:
    """An error message without the server's temporary folder in it."""
    return what.replace(str(upload.path), upload.name).replace(str(upload.path.parent), "(upload)")


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ServiceError(422, "the PNG has no IHDR chunk (truncated or corrupt).", "upload an intact PNG file.")
    w, h = struct.unpack(">II", data[16:24])
    return h, w


def _bomb(upload_name: str) -> ServiceError:
    """PIL's decompression-bomb refusal (a header declaring billions of pixels) as the limit it is: 413."""
    return ServiceError(413, f"{upload_name} declares more pixels than the service decodes (a decompression bomb).",
                        "downsample the image before uploading it.")


def _header_size(path: Path, kind: str, data: bytes) -> tuple[int, int, int]:
    """(height, width, frames) from the header only, before any pixel is decoded."""
    if kind == "png":
        h, w = _png_size(data)
        return h, w, 1
    if kind == "jpeg":
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                w, h = im.size
        except Image.DecompressionBombError as exc:  # PIL refuses at open() past 2x its own pixel limit
            raise _bomb(upload_name=path.name) from exc
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ServiceError(422, f"the JPEG header is unreadable ({type(exc).__name__}).",
                               "upload an intact JPEG file.") from exc
        return h, w, 1
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), int(ds.get("NumberOfFrames", 1) or 1)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ServiceError(422, f"the DICOM header is unreadable ({type(exc).__name__}).",
                           "upload an intact DICOM file from the PACS.") from exc


def save_upload(data: bytes, name: str | None, folder: Path, limits: Limits) -> Upload:
    """Check an upload's size, format and dimensions (from its header), and write it to ``folder``."""
    if len(data) > limits.max_bytes:
        raise ServiceError(413, f"the upload is {len(data)} bytes; the limit is {limits.max_bytes}.",
                           "upload a smaller image.")
    if not data:
        raise ServiceError(422, "the upload is empty.", "attach the image file as the 'file' form field.")
    kind = sniff(data)
    if kind is None:
        raise ServiceError(415, "the upload is not a PNG, JPEG or DICOM file (unknown signature).",
                           "upload a PNG, JPEG or DICOM (Part 10, with the DICM preamble) file.")
    path = folder / safe_name(name, kind)
    path.write_bytes(data)
    h, w, frames = _header_size(path, kind, data)
    if frames != 1:
        raise ServiceError(422, f"the DICOM holds {frames} frames; the service analyses single images.",
                           "upload one frame per request.")
    if h < 1 or w < 1:
        raise ServiceError(422, f"the image claims {h}x{w} pixels.", "upload an intact image.")
    if h > limits.max_side or w > limits.max_side or h * w > limits.max_pixels:
        raise ServiceError(413, f"the image is {h}x{w} pixels; the limits are {limits.max_side} per side and "
                                f"{limits.max_pixels} in all.", "downsample the image before uploading it.")
    return Upload(path.name, kind, path, h, w)


def decode_pixels(upload: Upload) -> np.ndarray:
    """The image as medadv's readers give it to a model: float32 C×H×W in [0, 1] (DICOM windowed)."""
    from PIL import Image

    from medadv.data.folder import read_image

    try:
        x, _ = read_image(upload.path)
    except Image.DecompressionBombError as exc:  # only when --max-pixels lets more through than PIL decodes
        raise _bomb(upload.name) from exc
    except MedadvError as exc:
        raise ServiceError(422, f"the {upload.kind.upper()} upload cannot be decoded: {_public(exc.what, upload)}",
                           f"upload an intact {upload.kind.upper()} file.") from exc
    except Exception as exc:  # a decoder's own failure on hostile input is still bad input
        raise ServiceError(422, f"the {upload.kind.upper()} upload cannot be decoded ({type(exc).__name__}).",
                           f"upload an intact {upload.kind.upper()} file.") from exc
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4) or not np.isfinite(x).all():
        raise ServiceError(422, f"the decoded image has shape {x.shape}.", "upload a grey or colour 2-D image.")
    return x[:3]


# --------------------------------------------------------------------------------------- provenance


def digest_upload(upload: Upload) -> Any:
    """The upload's canonical content digest (:func:`medadv.provenance.digest.digest_file`)."""
    from PIL import Image

    from medadv.provenance.digest import digest_file

    try:
        return digest_file(upload.path)
    except Image.DecompressionBombError as exc:
        raise _bomb(upload.name) from exc
    except MedadvError as exc:
        if isinstance(exc.__cause__, Image.DecompressionBombError):  # the digest wraps PIL's refusal
            raise _bomb(upload.name) from exc
        raise ServiceError(422, f"the upload cannot be digested for provenance: {_public(exc.what, upload)}",
                           "upload an intact, supported image file.") from exc
    except Exception as exc:  # a decoder's own failure on hostile input is still bad input
        raise ServiceError(422, f"the upload cannot be digested for provenance ({type(exc).__name__}).",
                           "upload an intact, supported image file.") from exc


def verify_items(ledger: Any, root: Any, items: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    """Provenance results for ``(name, digest)`` pairs, in one :func:`verify_digests` call (a few queries
    for the whole group): status verified / modified / unknown-device / unsigned, the ledger's own
    verdict, why, and the inclusion proof of a verified record."""
    from sqlalchemy.exc import SQLAlchemyError

    from medadv.provenance.digest import canonical_json
    from medadv.provenance.verify import verify_digests

    # When the ledger cannot be judged at all (an insider's row the checks cannot read, a log that does not
    # match its signed head), no image is verified by it: a verdict, not an error, so that the policy
    # withholds the diagnosis and the refusal is receipted; never a 500.
    try:
        verdicts = verify_digests(ledger, items, root)
    except MedadvError as exc:
        if isinstance(exc.__cause__, SQLAlchemyError):
            raise  # the database did not answer: the app's 503 (retry), not a verdict on the image
        return [unverifiable(item, f"the ledger could not be checked ({' '.join(exc.what.split())})")
                for _, item in items]
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        what = " ".join(f"{type(exc).__name__}: {str(exc)[:120]}".split())
        return [unverifiable(item, f"the ledger could not be checked ({what})") for _, item in items]
    out = []
    for (_, item), v in zip(items, verdicts, strict=True):
        raw = str(getattr(v.status, "value", v.status))
        proof = getattr(v, "proof", None)
        try:
            canonical_json(proof)
        except (TypeError, ValueError):
            proof = None
        out.append({"status": _STATUS_MAP.get(raw, "unsigned"), "ledger_verdict": raw, "detail": v.detail,
                    "digest": item.digest, "record": v.seq, "device": v.device, "inclusion_proof": proof})
    return out


def unverifiable(item: Any, detail: str) -> dict[str, Any]:
    """The provenance result of an image the ledger cannot vouch for because the ledger itself could not be
    judged: ``unknown-device`` (no trusted key and log vouch for it), the ledger's verdict ``unverifiable``."""
    return {"status": "unknown-device", "ledger_verdict": "unverifiable", "detail": detail[:300],
            "digest": item.digest, "record": None, "device": None, "inclusion_proof": None}


def check_provenance(ledger: Any, root: Any, upload: Upload) -> dict[str, Any]:
    """The provenance result of one upload."""
    return verify_items(ledger, root, [(upload.name, digest_upload(upload))])[0]


def temp_folder() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="medadv-serve-")


class ScratchFolders:
    """Where the service's worker threads write uploads: one private folder (0700) per thread, made on its
    first upload and emptied after each one. The file keeps the uploaded name, which provenance binds to
    the ledger record, and no folder is made and removed per request (a ``TemporaryDirectory`` per request
    was 9% of the service's CPU at 32 clients). A thread runs one request at a time, so its folder holds
    one upload at most."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="medadv-serve-"))
        self._local = threading.local()

    @contextlib.contextmanager
    def folder(self) -> Iterator[Path]:
        path = getattr(self._local, "path", None)
        if path is None or not path.is_dir():
            path = self._local.path = Path(tempfile.mkdtemp(dir=self.root))
        try:
            yield path
        finally:
            with os.scandir(path) as entries:  # what the request wrote, even when it failed half-way
                for entry in entries:
                    os.unlink(entry.path)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
