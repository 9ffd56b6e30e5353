"""The ledger's rows: :class:`Record` (one stored row, validated on read), :class:`Entry` (what a signer
appends) and :class:`RowError` (a row medadv did not write: a ``corrupt`` row named by its seq).

A record's hash chains it to the one before: ``record_hash = sha256(SIGN_DOMAIN + canonical_json(fields
but the signature and the log's time) + "\n" + signature)`` (:func:`medadv.db.row_digest`), and the
fields include ``seq`` and ``prev_hash``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medadv import strictjson
from medadv.db import is_hex, row_digest
from medadv.errors import MedadvError
from medadv.provenance.digest import ImageDigest, canonical_json
from medadv.provenance.keys import PublicKey
from medadv.provenance.merkle import leaf_hash
from medadv.provenance.trust import TRUST_KINDS

SIGN_DOMAIN = b"medadv-provenance-record/2\n"  # domain separation: a record signature signs nothing else
LEAF_DOMAIN = b"medadv-log-leaf/1\n"
KINDS = ("image", *TRUST_KINDS)
META_MAX_BYTES = 1 << 20  # a record's meta: format, shape, tags, a label; far below this
META_MAX_DEPTH = 16


def _text(v: Any, limit: int = 4096) -> bool:
    return isinstance(v, str) and 0 < len(v) <= limit


def load_meta(raw: Any) -> Any:
    """A stored meta column, strictly and bounded (a NaN or a 100,000-deep meta is refused, never a crash)."""
    return strictjson.loads(raw, max_bytes=META_MAX_BYTES, max_depth=META_MAX_DEPTH) if isinstance(raw, str) else None


class RowError(Exception):
    """A row whose values are not what medadv wrote (wrong types, lengths or JSON): a ``corrupt`` row."""

    def __init__(self, seq: Any, reason: str) -> None:
        self.seq = seq
        self.reason = reason
        super().__init__(f"row {seq!r}: {reason}")

    @property
    def label(self) -> str:
        return f"#{self.seq}" if isinstance(self.seq, int) and not isinstance(self.seq, bool) else repr(self.seq)[:40]


@dataclass(frozen=True)
class Record:
    """One ledger row. ``signature`` is hex; ``meta`` is the decoded JSON. ``kind`` is ``image`` (signed
    by a device) or a trust entry (``enroll``, ``revoke``, ``log-key``: signed by the root).
    ``created_at`` is the signer's clock; ``logged_at`` the log's (monotone, set at append)."""

    seq: int
    prev_hash: str
    kind: str
    digest: str
    view_digest: str | None
    name: str
    stem: str
    uid: str | None
    series_uid: str | None
    device: str
    key_id: str
    ledger_id: str
    created_at: str
    meta: dict[str, Any]
    signature: str = ""
    record_hash: str = ""
    logged_at: str = ""

    def _content(self) -> bytes:
        """Every field but the signature, the hash and the log's time, canonical JSON."""
        return canonical_json({
            "seq": self.seq, "prev_hash": self.prev_hash, "kind": self.kind, "digest": self.digest,
            "view_digest": self.view_digest, "name": self.name, "stem": self.stem, "uid": self.uid,
            "series_uid": self.series_uid, "device": self.device, "key_id": self.key_id,
            "ledger_id": self.ledger_id, "created_at": self.created_at, "meta": self.meta,
        })

    def signed_bytes(self) -> bytes:
        """What the signer signs: the domain and the content (:meth:`_content`)."""
        return SIGN_DOMAIN + self._content()

    def signature_bytes(self) -> bytes | None:
        try:
            return bytes.fromhex(self.signature)
        except ValueError:
            return None

    def compute_hash(self) -> str:
        """The chain hash: the signed bytes, a newline and the hex signature (seq and prev_hash are in them)."""
        return row_digest(SIGN_DOMAIN, self._content(), b"\n", self.signature.encode())

    def leaf(self) -> bytes:
        """The Merkle leaf hash: the record hash and the log's time."""
        return leaf_hash(LEAF_DOMAIN + canonical_json({"record_hash": self.record_hash, "logged_at": self.logged_at}))

    def signature_ok(self, key: PublicKey) -> bool:
        sig = self.signature_bytes()
        return sig is not None and len(sig) == 64 and key.verify(sig, self.signed_bytes())

    @classmethod
    def from_row(cls, row: Any) -> Record:
        """A validated record; raises :class:`RowError` naming what is wrong with the row."""
        seq = row.seq
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise RowError(seq, f"its seq is {type(seq).__name__} {str(seq)[:20]!r}, not a positive integer")
        for col in ("prev_hash", "record_hash", "digest"):
            if not is_hex(getattr(row, col), 64):
                raise RowError(seq, f"its {col} is not 64 lowercase hex characters")
        if row.view_digest is not None and not is_hex(row.view_digest, 64):
            raise RowError(seq, "its view_digest is not 64 lowercase hex characters")
        if row.kind not in KINDS:
            raise RowError(seq, f"its kind {str(row.kind)[:20]!r} is not one of {', '.join(KINDS)}")
        for col in ("name", "stem", "device", "ledger_id", "created_at", "logged_at"):
            if not _text(getattr(row, col)):
                raise RowError(seq, f"its {col} is not text")
        for col in ("uid", "series_uid"):
            if getattr(row, col) is not None and not _text(getattr(row, col), 128):
                raise RowError(seq, f"its {col} is not text")
        if not is_hex(row.key_id, 32):
            raise RowError(seq, "its key_id is not 32 lowercase hex characters")
        if not is_hex(row.signature, 128):
            raise RowError(seq, "its signature is not 128 lowercase hex characters")
        try:  # strict and bounded: a NaN or a 100,000-deep meta is one corrupt row, never a crash
            meta = load_meta(row.meta)
        except MedadvError as exc:
            raise RowError(seq, f"its meta is not strict JSON ({exc.what.split('(', 1)[-1].rstrip(').')})") from None
        if not isinstance(meta, dict):
            raise RowError(seq, "its meta is not a JSON object")
        return cls(seq, row.prev_hash, row.kind, row.digest, row.view_digest, row.name, row.stem, row.uid,
                   row.series_uid, row.device, row.key_id, row.ledger_id, row.created_at, meta, row.signature,
                   row.record_hash, row.logged_at)

    def row(self) -> dict[str, Any]:
        return {"seq": self.seq, "prev_hash": self.prev_hash, "record_hash": self.record_hash, "kind": self.kind,
                "digest": self.digest, "view_digest": self.view_digest, "name": self.name, "stem": self.stem,
                "uid": self.uid, "series_uid": self.series_uid, "device": self.device, "key_id": self.key_id,
                "ledger_id": self.ledger_id, "created_at": self.created_at, "logged_at": self.logged_at,
                "meta": canonical_json(self.meta).decode(), "signature": self.signature}


@dataclass(frozen=True)
class Entry:
    """What a signer appends (the ledger adds seq, prev_hash, ledger id and times)."""

    kind: str
    digest: str
    name: str
    device: str
    meta: dict[str, Any]
    view_digest: str | None = None
    uid: str | None = None
    series_uid: str | None = None

    @classmethod
    def image(cls, item: ImageDigest, device: str) -> Entry:
        return cls("image", item.digest, item.name, device, dict(item.meta), item.view, item.uid, item.series_uid)

    @classmethod
    def trust(cls, kind: str, device: str, body: dict[str, Any]) -> Entry:
        digest = hashlib.sha256(canonical_json(body)).hexdigest()
        return cls(kind, digest, f"{kind}:{device}:{body.get('subject_key_id', '')}", device, body)


def name_stem(name: str) -> str:
    """A file name without its extension (``ISIC_0000001.jpg`` -> ``ISIC_0000001``); npz member ids as they are.

    Looking images up by stem too finds an edited copy saved in another format (a JPEG's adversarial
    copy saved as PNG) as "modified" rather than "unregistered".
    """
    return name if "#" in name else Path(name).stem


@dataclass
class AppendResult:
    added: int = 0
    skipped: int = 0  # already registered by this device under this name
    first_seq: int | None = None
    last_seq: int | None = None
    head_hash: str | None = None
    head: dict[str, Any] | None = None  # the signed tree head after the last batch
