"""The ledger: an append-only, hash-chained, signed record of every registered image, backed by a Merkle
tree log in the manner of RFC 9162 with signed tree heads (SQLAlchemy: SQLite or PostgreSQL).

Tables:

* ``records``: one row per entry. ``kind`` is ``image`` (a device's registration) or a trust entry
  (``enroll``, ``revoke``, ``log-key``: signed by the organisation's root key, see :mod:`.trust`).
  ``seq`` (1, 2, ...), ``prev_hash`` (the ``record_hash`` of record ``seq - 1``; 64 zeros for the
  first), ``digest`` (the canonical content digest), ``view_digest`` (the pixels as medadv's readers
  hand them to a model), ``name``/``stem``/``uid``/``series_uid`` (what the record is *of*),
  ``device``/``key_id`` (who signed), ``ledger_id`` (which ledger: a record replayed into another
  ledger is refused), ``created_at`` (the signer's clock), ``logged_at`` (the log's clock, monotone,
  set at append), ``meta`` (canonical JSON: format, shape, identity tags, the optional label),
  ``signature`` (Ed25519, hex) and ``record_hash``.
* ``nodes``: the Merkle log's perfect subtrees (leaf = ``H(0x00 || record_hash, logged_at)``), so an
  inclusion or consistency proof reads O(log n) rows.
* ``heads``: a tree head signed by the log key after every append transaction.
* ``devices``: public keys noted by :meth:`Ledger.add_device`; informational, *never* trusted.
* ``ledger_meta``: schema version and the ledger's random id.

Nothing in the database is trusted because it is there: verification starts from the configured
trust root (a public key), accepts the device keys the root enrolled (root-signed entries) for
records after their enrollment and before their revocation, and the log keys it enrolled for heads.
A database administrator who rewrites rows cannot make them verify without a device key enrolled by
the root; one who deletes or rewrites history is caught by anyone who kept an old signed head
(``check-ledger --head``: RFC 9162 consistency proof).

Append-only is enforced by the database too (triggers refuse UPDATE, DELETE and, on PostgreSQL,
TRUNCATE), so mistakes fail loudly; someone who drops the triggers is still caught by the chain and
the log. Concurrent writers never fork the chain: an append reads the head and inserts inside one
transaction that holds the ledger's write lock from its first statement (``BEGIN IMMEDIATE`` on
SQLite, ``pg_advisory_xact_lock`` on PostgreSQL). Rows are validated on read: a row of wrong types is
a ``corrupt`` row named by its seq, never a traceback or a loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DDL,
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.pool import QueuePool

from medadv.errors import MedadvError
from medadv.progress import SILENT, Monitor
from medadv.provenance.digest import ImageDigest, canonical_json
from medadv.provenance.keys import (
    DeviceKey,
    PublicKey,
    check_device_name,
    key_id,
    load_public_pem,
    public_pem,
)
from medadv.provenance.merkle import (
    StreamingTree,
    consistency_path,
    frontier,
    leaf_hash,
    needed_nodes,
    root_hash,
    verify_consistency,
)
from medadv.provenance.trust import TRUST_KINDS, Enrollment, TrustRoot, TrustState, head_problem, sign_head

SCHEMA = "medadv-ledger/2"
GENESIS = "0" * 64
SIGN_DOMAIN = b"medadv-provenance-record/2\n"  # domain separation: a record signature signs nothing else
LEAF_DOMAIN = b"medadv-log-leaf/1\n"
SQLITE_BUSY_TIMEOUT_S = 60.0
# One advisory lock key per database, derived from a fixed label so every medadv writer agrees on it.
PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"medadv-ledger-append").digest()[:8], "big", signed=True)
_CHUNK = 500  # values per IN (...) query
KINDS = ("image", *TRUST_KINDS)

metadata = MetaData()
ledger_meta = Table(
    "ledger_meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
devices = Table(  # informational only: public keys noted by add_device; never trusted for verification
    "devices", metadata,
    Column("key_id", String(32), primary_key=True),
    Column("device", String(64), nullable=False, index=True),
    Column("public_key", Text, nullable=False),
    Column("added_at", String(40), nullable=False),
)
records = Table(
    "records", metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("prev_hash", String(64), nullable=False, unique=True),
    Column("record_hash", String(64), nullable=False, unique=True),
    Column("kind", String(16), nullable=False, index=True),
    Column("digest", String(64), nullable=False, index=True),
    Column("view_digest", String(64), nullable=True, index=True),
    Column("name", Text, nullable=False, index=True),
    Column("stem", Text, nullable=False, index=True),
    Column("uid", String(128), nullable=True, index=True),
    Column("series_uid", String(128), nullable=True, index=True),
    Column("device", String(64), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("ledger_id", String(64), nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("logged_at", String(40), nullable=False),
    Column("meta", Text, nullable=False),
    Column("signature", String(128), nullable=False),
)
nodes = Table(  # the Merkle log's perfect subtrees, (level, idx) -> hash: proofs in O(log n) reads
    "nodes", metadata,
    Column("level", Integer, primary_key=True, autoincrement=False),
    Column("idx", BigInteger, primary_key=True, autoincrement=False),
    Column("hash", String(64), nullable=False),
)
heads = Table(  # signed tree heads, one per append transaction
    "heads", metadata,
    Column("size", BigInteger, primary_key=True, autoincrement=False),
    Column("body", Text, nullable=False),
)
_GUARDED = ("records", "devices", "nodes", "heads")

for _table in _GUARDED:
    for _op in ("UPDATE", "DELETE"):
        event.listen(metadata, "after_create", DDL(
            f"CREATE TRIGGER {_table}_no_{_op.lower()} BEFORE {_op} ON {_table} "
            "BEGIN SELECT RAISE(ABORT, 'the medadv ledger is append-only'); END"
        ).execute_if(dialect="sqlite"))
event.listen(metadata, "after_create", DDL(
    "CREATE OR REPLACE FUNCTION medadv_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$fn$ BEGIN RAISE EXCEPTION 'the medadv ledger is append-only'; END $fn$"
).execute_if(dialect="postgresql"))
for _table in _GUARDED:
    event.listen(metadata, "after_create", DDL(
        f"CREATE TRIGGER {_table}_append_only BEFORE UPDATE OR DELETE ON {_table} "
        "FOR EACH ROW EXECUTE FUNCTION medadv_append_only()"
    ).execute_if(dialect="postgresql"))
    event.listen(metadata, "after_create", DDL(
        f"CREATE TRIGGER {_table}_no_truncate BEFORE TRUNCATE ON {_table} "
        "FOR EACH STATEMENT EXECUTE FUNCTION medadv_append_only()"
    ).execute_if(dialect="postgresql"))


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class RowError(Exception):
    """A row whose values are not what medadv wrote (wrong types, lengths or JSON): a ``corrupt`` row."""

    def __init__(self, seq: Any, reason: str) -> None:
        self.seq = seq
        self.reason = reason
        super().__init__(f"row {seq!r}: {reason}")

    @property
    def label(self) -> str:
        return f"#{self.seq}" if isinstance(self.seq, int) and not isinstance(self.seq, bool) else repr(self.seq)[:40]


_HEX = frozenset("0123456789abcdef")


def _is_hex(v: Any, n: int) -> bool:
    return isinstance(v, str) and len(v) == n and set(v) <= _HEX


def _text(v: Any, limit: int = 4096) -> bool:
    return isinstance(v, str) and 0 < len(v) <= limit


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

    def signed_bytes(self) -> bytes:
        """What the signer signs: every field but the signature, the hash and the log's time."""
        return SIGN_DOMAIN + canonical_json({
            "seq": self.seq, "prev_hash": self.prev_hash, "kind": self.kind, "digest": self.digest,
            "view_digest": self.view_digest, "name": self.name, "stem": self.stem, "uid": self.uid,
            "series_uid": self.series_uid, "device": self.device, "key_id": self.key_id,
            "ledger_id": self.ledger_id, "created_at": self.created_at, "meta": self.meta,
        })

    def signature_bytes(self) -> bytes | None:
        try:
            return bytes.fromhex(self.signature)
        except ValueError:
            return None

    def compute_hash(self) -> str:
        return hashlib.sha256(self.signed_bytes() + b"\n" + self.signature.encode()).hexdigest()

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
            if not _is_hex(getattr(row, col), 64):
                raise RowError(seq, f"its {col} is not 64 lowercase hex characters")
        if row.view_digest is not None and not _is_hex(row.view_digest, 64):
            raise RowError(seq, "its view_digest is not 64 lowercase hex characters")
        if row.kind not in KINDS:
            raise RowError(seq, f"its kind {str(row.kind)[:20]!r} is not one of {', '.join(KINDS)}")
        for col in ("name", "stem", "device", "ledger_id", "created_at", "logged_at"):
            if not _text(getattr(row, col)):
                raise RowError(seq, f"its {col} is not text")
        for col in ("uid", "series_uid"):
            if getattr(row, col) is not None and not _text(getattr(row, col), 128):
                raise RowError(seq, f"its {col} is not text")
        if not _is_hex(row.key_id, 32):
            raise RowError(seq, "its key_id is not 32 lowercase hex characters")
        if not _is_hex(row.signature, 128):
            raise RowError(seq, "its signature is not 128 lowercase hex characters")
        try:
            meta = json.loads(row.meta) if isinstance(row.meta, str) else None
        except ValueError:
            meta = None
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


@dataclass(frozen=True)
class Problem:
    seq: int | None
    reason: str


@dataclass
class ChainReport:
    """What :meth:`Ledger.check` found. ``ok`` is True when the chain, the log and every signature hold."""

    ledger: str
    records: int = 0
    devices: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    problems: list[Problem] = field(default_factory=list)
    more_problems: int = 0
    signed_head: dict[str, Any] | None = None
    consistency: dict[str, Any] | None = None
    integrity: str = "not run"

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger, "ok": self.ok, "records": self.records, "devices": self.devices,
                "head_seq": self.head_seq, "head_hash": self.head_hash, "signed_head": self.signed_head,
                "consistency": self.consistency, "integrity_check": self.integrity,
                "problems": [{"seq": p.seq, "reason": p.reason} for p in self.problems],
                "more_problems": self.more_problems}


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:160]


def _as_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


class Ledger:
    """An open ledger. Make one with :func:`open_ledger`; close it (or use ``with``) when done."""

    def __init__(self, engine: Engine, display: str, readonly: bool = False) -> None:
        self.engine = engine
        self.display = display  # path, or URL with the password hidden
        self.dialect = engine.dialect.name
        self.readonly = readonly
        self._ledger_id: str | None = None

    # ---------------------------------------------------------------- plumbing

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn a database failure into one MedadvError naming the ledger and what to do."""
        try:
            yield
        except MedadvError:
            raise
        except SQLAlchemyError as exc:
            msg = _first_line(exc)
            low = msg.lower()
            if "locked" in low or "lock timeout" in low:
                fix = "another process held the ledger's write lock too long; retry."
            elif "not a database" in low or "malformed" in low or "disk image" in low:
                fix = "the ledger file is corrupt: restore it from a backup (check-ledger cannot repair it)."
            elif "does not exist" in low and "database" in low:
                fix = "create the database first (e.g. `createdb NAME`) or fix the name in the URL."
            elif "connect" in low or "refused" in low or "could not translate host" in low:
                fix = "start the PostgreSQL server or fix host, port and credentials in the URL."
            elif "append-only" in low:
                fix = "the ledger refuses changes to existing rows; append new records instead."
            elif "readonly" in low or "read-only" in low:
                fix = "the ledger is read-only here: verify and check-ledger work, appending needs write access."
            else:
                fix = ("check the ledger with `medadv provenance check-ledger`; restore it from a backup if it is "
                       "damaged.")
            raise MedadvError(f"ledger {self.display}: {action} failed ({msg}).", fix) from exc

    @contextlib.contextmanager
    def _write(self, action: str) -> Iterator[Connection]:
        """A write transaction holding the ledger's append lock from its first statement."""
        with self._errors(action), self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_LOCK_KEY})
                yield conn

    @contextlib.contextmanager
    def _read(self, action: str) -> Iterator[Connection]:
        with self._errors(action), self.engine.connect() as conn, conn.begin():
            yield conn

    # ---------------------------------------------------------------- schema

    def _create(self) -> None:
        with self._write("creating the schema") as conn:
            if not inspect(conn).has_table("records"):
                metadata.create_all(conn)
                conn.execute(insert(ledger_meta), [{"key": "schema", "value": SCHEMA},
                                                   {"key": "created_at", "value": utc_now()},
                                                   {"key": "ledger_id", "value": secrets.token_hex(16)}])

    def _validate(self) -> None:
        with self._read("opening") as conn:
            names = set(inspect(conn).get_table_names())
            missing = {"records", "devices", "ledger_meta"} - names
            if missing:
                raise MedadvError(
                    f"{self.display} is not a medadv ledger (it has no {', '.join(sorted(missing))} table).",
                    "point --ledger at a ledger made by `medadv provenance init`, or create one with it.",
                )
            meta = dict(conn.execute(select(ledger_meta.c.key, ledger_meta.c.value)).all())
        version = meta.get("schema")
        if version != SCHEMA:
            raise MedadvError(f"ledger {self.display} has schema '{str(version)[:40]}', not '{SCHEMA}'.",
                              "use the medadv version that wrote it, or start a new ledger with "
                              "`medadv provenance init`.")
        if not {"nodes", "heads"} <= names:
            raise MedadvError(f"ledger {self.display} has no Merkle log tables (nodes, heads).",
                              "restore the ledger from a backup.")
        lid = meta.get("ledger_id")
        if not _text(lid, 64):
            raise MedadvError(f"ledger {self.display} has no valid ledger id.", "restore the ledger from a backup.")
        self._ledger_id = lid

    @property
    def ledger_id(self) -> str:
        assert self._ledger_id is not None
        return self._ledger_id

    # ---------------------------------------------------------------- devices (informational)

    def add_device(self, device: str, public_key: Any) -> str:
        """Note a device's public key in the ``devices`` table (idempotent; confers no trust). Returns its key id."""
        check_device_name(device)
        kid = key_id(public_key)
        with self._write("registering a device") as conn:
            row = conn.execute(select(devices.c.device).where(devices.c.key_id == kid)).first()
            if row is not None:
                if row.device != device:
                    raise MedadvError(f"key {kid} is already noted in {self.display} for device {row.device}.",
                                      f"use {row.device}, or make a new key for {device}.")
                return kid
            conn.execute(insert(devices).values(key_id=kid, device=device, public_key=public_pem(public_key),
                                                added_at=utc_now()))
        return kid

    def device_count(self) -> int:
        with self._read("counting devices") as conn:
            return int(conn.execute(select(func.count()).select_from(devices)).scalar() or 0)

    def require_enrolled(self, signer: DeviceKey) -> None:
        """Fail before writing anything when no enrollment entry names ``signer``'s key (a courtesy check:
        trust is decided at verification, from the root's signature, never here)."""
        with self._read("reading enrollments") as conn:
            rows = conn.execute(select(records.c.device, records.c.meta).where(records.c.kind == "enroll")).all()
        for r in rows:
            try:
                meta = json.loads(r.meta) if isinstance(r.meta, str) else {}
            except ValueError:
                continue
            if isinstance(meta, dict) and meta.get("subject_key_id") == signer.key_id:
                if r.device != signer.device:
                    raise MedadvError(f"key {signer.key_id} is enrolled for device {r.device}, not {signer.device}.",
                                      f"use --device {r.device}.")
                return
        pub = signer.path.with_name(f"{signer.device}.request.json") if signer.path else f"{signer.device}.request.json"
        raise MedadvError(
            f"the key of device {signer.device} (key id {signer.key_id}) is not enrolled in ledger {self.display}.",
            f"have the organisation enrol it: `medadv provenance enroll {pub} --root-key ORG.root.key "
            f"--ledger {self.display}`.")

    # ---------------------------------------------------------------- append

    def _frontier(self, conn: Connection, size: int) -> StreamingTree:
        want = frontier(size)
        got = self._fetch_nodes(conn, set(want))
        missing = [n for n in want if n not in got]
        if missing:
            raise MedadvError(f"ledger {self.display}: the Merkle log has no node {missing[0]} for {size} records.",
                              "run `medadv provenance check-ledger`; restore the ledger from a backup.")
        return StreamingTree(size, [got[n] for n in want])

    def _fetch_nodes(self, conn: Connection, want: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        out: dict[tuple[int, int], bytes] = {}
        by_level: dict[int, list[int]] = {}
        for level, idx in want:
            by_level.setdefault(level, []).append(idx)
        for level, idxs in by_level.items():
            for chunk in _chunks(sorted(idxs), _CHUNK):
                for r in conn.execute(select(nodes.c.idx, nodes.c.hash)
                                      .where(nodes.c.level == level, nodes.c.idx.in_(chunk))):
                    if _as_int(r.idx) is not None and _is_hex(r.hash, 64):
                        out[(level, r.idx)] = bytes.fromhex(r.hash)
        return out

    def append_entries(self, entries: Sequence[Entry], signer: DeviceKey, log_key: DeviceKey, *,
                       batch_size: int = 256, skip_present: bool = False,
                       monitor: Monitor = SILENT) -> AppendResult:
        """Sign and append ``entries`` in transactions of ``batch_size``; each transaction also extends the
        Merkle log and stores a tree head signed by ``log_key``.

        ``skip_present``: an image this key already registered under the same name (same digest) is
        skipped, so an interrupted registration can simply be run again (a rotated key re-registers).
        """
        if not isinstance(batch_size, int) or not 1 <= batch_size <= 100_000:
            raise MedadvError(f"batch size {batch_size} is not between 1 and 100000.", "pass --batch-size 1 or more.")
        result = AppendResult()
        batches = list(_chunks(list(entries), batch_size))
        for batch in monitor.track(batches, "appending to the ledger", total=len(batches)):
            with self._write("appending records") as conn:
                head = conn.execute(select(records.c.seq, records.c.record_hash, records.c.logged_at)
                                    .order_by(records.c.seq.desc()).limit(1)).first()
                if head is not None and (_as_int(head.seq) is None or not _is_hex(head.record_hash, 64)
                                         or not isinstance(head.logged_at, str)):
                    raise MedadvError(f"ledger {self.display}: the newest row is corrupt ({str(head.seq)[:20]!r}).",
                                      "run `medadv provenance check-ledger`; restore the ledger from a backup.")
                seq, prev = (head.seq, head.record_hash) if head else (0, GENESIS)
                last_time = head.logged_at if head else ""
                tree = self._frontier(conn, seq)
                present: set[tuple[str, str]] = set()
                if skip_present:
                    present = {(r.digest, r.name) for r in conn.execute(
                        select(records.c.digest, records.c.name)
                        .where(records.c.digest.in_({e.digest for e in batch}), records.c.key_id == signer.key_id,
                               records.c.kind == "image"))}
                rows, node_rows = [], []
                for e in batch:
                    if skip_present and (e.digest, e.name) in present:
                        result.skipped += 1
                        continue
                    present.add((e.digest, e.name))
                    seq += 1
                    now = utc_now()
                    logged = max(now, last_time)  # the log's clock never runs backwards
                    unsigned = Record(seq, prev, e.kind, e.digest, e.view_digest, e.name, name_stem(e.name), e.uid,
                                      e.series_uid, e.device, signer.key_id, self.ledger_id, now, dict(e.meta))
                    rec = replace(unsigned, signature=signer.sign(unsigned.signed_bytes()).hex())
                    rec = replace(rec, record_hash=rec.compute_hash(), logged_at=logged)
                    rows.append(rec.row())
                    node_rows.extend({"level": lv, "idx": ix, "hash": h.hex()} for lv, ix, h in tree.append(rec.leaf()))
                    prev, last_time = rec.record_hash, logged
                    result.first_seq = result.first_seq or seq
                    result.last_seq, result.head_hash = seq, prev
                if rows:
                    signed = sign_head(log_key, self.ledger_id, tree.size, tree.root(), last_time)
                    try:
                        conn.execute(insert(records), rows)
                        conn.execute(insert(nodes), node_rows)
                        conn.execute(insert(heads).values(size=tree.size, body=canonical_json(signed).decode()))
                    except IntegrityError as exc:  # cannot happen under the lock; refuse rather than fork
                        raise MedadvError(f"ledger {self.display} refused a record that would fork the chain "
                                          f"({_first_line(exc)}).", "retry; if it persists, run check-ledger.") from exc
                    result.head = signed
                result.added += len(rows)
        return result

    def append(self, items: Sequence[ImageDigest], signer: DeviceKey, log_key: DeviceKey, *, batch_size: int = 256,
               monitor: Monitor = SILENT) -> AppendResult:
        """Sign and append image records (skipping ones this key already registered under the same name)."""
        if not isinstance(batch_size, int) or not 1 <= batch_size <= 100_000:
            raise MedadvError(f"batch size {batch_size} is not between 1 and 100000.", "pass --batch-size 1 or more.")
        self.require_enrolled(signer)
        return self.append_entries([Entry.image(i, signer.device) for i in items], signer, log_key,
                                   batch_size=batch_size, skip_present=True, monitor=monitor)

    # ---------------------------------------------------------------- lookups

    def count(self) -> int:
        with self._read("counting records") as conn:
            return int(conn.execute(select(func.count()).select_from(records)).scalar() or 0)

    def head(self) -> tuple[int, str]:
        """(seq, record_hash) of the newest record; (0, GENESIS) when empty."""
        with self._read("reading the head") as conn:
            row = conn.execute(select(records.c.seq, records.c.record_hash)
                               .order_by(records.c.seq.desc()).limit(1)).first()
        if row is None:
            return 0, GENESIS
        return (row.seq, row.record_hash) if _as_int(row.seq) is not None else (0, str(row.record_hash))

    def signed_heads(self) -> list[tuple[Any, Any]]:
        """Every stored head as (size column, decoded body or the raw text), by size."""
        with self._read("reading tree heads") as conn:
            rows = conn.execute(select(heads.c.size, heads.c.body).order_by(heads.c.size)).all()
        out = []
        for r in rows:
            try:
                body = json.loads(r.body) if isinstance(r.body, str) else r.body
            except ValueError:
                body = r.body
            out.append((r.size, body))
        return out

    def latest_head(self, log_keys: dict[str, PublicKey]) -> tuple[dict[str, Any] | None, str | None]:
        """The largest stored head that a trusted log key signed, and why newer ones were passed over."""
        why = None
        for size, body in reversed(self.signed_heads()):
            problem = head_problem(body, log_keys, self.ledger_id)
            if problem is None and body["size"] == size:
                return body, why
            why = why or f"the stored head of size {str(size)[:20]} is invalid: {problem or 'its size differs'}"
        return None, why

    def _lookup(self, column: str, values: Iterable[str], kind: str | None = "image"
                ) -> dict[str, list[Record | RowError]]:
        values = sorted({v for v in values if isinstance(v, str)})
        out: dict[str, list[Record | RowError]] = {}
        col = records.c[column]
        with self._read(f"looking up {column}") as conn:
            for chunk in _chunks(values, _CHUNK):
                q = select(records).where(col.in_(chunk))
                if kind is not None:
                    q = q.where(records.c.kind == kind)
                for row in conn.execute(q):
                    try:
                        item: Record | RowError = Record.from_row(row)
                    except RowError as exc:
                        item = exc
                    out.setdefault(getattr(row, column), []).append(item)
        for v in out.values():
            v.sort(key=lambda r: (0, r.seq) if isinstance(r, Record) else (1, 0))
        return out

    def by_digest(self, digests: Iterable[str]) -> dict[str, list[Record | RowError]]:
        """Image records (or corrupt rows) per content digest, oldest first."""
        return self._lookup("digest", digests)

    def by_view(self, views: Iterable[str]) -> dict[str, list[Record | RowError]]:
        """Image records (or corrupt rows) per view digest (the pixels as medadv loads them), oldest first."""
        return self._lookup("view_digest", views)

    def by_identity(self, names: Iterable[str], uids: Iterable[str],
                    series: Iterable[str]) -> dict[str, dict[str, Record]]:
        """The newest valid image record per name, per name stem, per DICOM SOP instance UID and per series UID."""
        names = set(names)
        want = {"name": names, "stem": {name_stem(n) for n in names}, "uid": set(uids), "series_uid": set(series)}
        out: dict[str, dict[str, Record]] = {}
        for column, values in want.items():
            found = self._lookup(column, values)
            out[column] = {}
            for key, recs in found.items():
                good = [r for r in recs if isinstance(r, Record)]
                if good:
                    out[column][key] = good[-1]
        return out

    def iter_rows(self, batch: int = 2000) -> Iterator[Record | RowError]:
        """Every row in sequence order, validated, read in pages (constant memory). Never loops: paging
        follows the raw ``seq`` values, and stops at values that do not order (text in SQLite)."""
        last: Any = 0
        while True:
            with self._read("reading records") as conn:
                rows = conn.execute(select(records).where(records.c.seq > last)
                                    .order_by(records.c.seq).limit(batch)).all()
            if not rows:
                return
            for row in rows:
                try:
                    yield Record.from_row(row)
                except RowError as exc:
                    yield exc
            raw = rows[-1].seq
            if not isinstance(raw, (int, float)) or isinstance(raw, bool) or not raw > last:
                return
            last = raw

    def iter_records(self, batch: int = 2000) -> Iterator[Record]:
        """Every valid record in sequence order."""
        for r in self.iter_rows(batch):
            if isinstance(r, Record):
                yield r

    # ---------------------------------------------------------------- trust and proofs

    def trust_state(self, root: TrustRoot) -> TrustState:
        """The keys the trust root vouches for in this ledger, from its root-signed entries (only)."""
        state = TrustState(root, self.ledger_id)
        found = self._lookup("kind", ["enroll", "revoke", "log-key"], kind=None)
        rows = sorted((r for v in found.values() for r in v), key=lambda r: r.seq if isinstance(r, Record) else 0)
        for rec in rows:
            if isinstance(rec, RowError):
                state.problems.append((None, f"trust entry {rec.label} is corrupt: {rec.reason}"))
                continue
            why = self._trust_problem(rec, root)
            if why:
                state.problems.append((rec.seq, f"trust entry #{rec.seq} ({rec.kind} {rec.device}) is ignored: {why}"))
                continue
            m = rec.meta
            kid = m["subject_key_id"]
            if rec.kind == "enroll":
                pub = PublicKey(rec.device, load_public_pem(m["public_key"], f"trust entry #{rec.seq}"))
                state.enrolled.setdefault(kid, Enrollment(rec.device, pub, rec.seq, rec))
            elif rec.kind == "log-key":
                state.log_keys[kid] = PublicKey("log", load_public_pem(m["public_key"], f"trust entry #{rec.seq}"))
                state.log_entries[kid] = rec
            else:
                eff = m["effective_seq"]
                state.revoked[kid] = min(state.revoked.get(kid, eff), eff)
        return state

    def _trust_problem(self, rec: Record, root: TrustRoot) -> str | None:
        if rec.key_id != root.key_id:
            return f"it is signed by key {rec.key_id}, not by the trust root ({root.key_id})"
        if not rec.signature_ok(root.public):
            return "its signature does not verify with the trust root"
        if rec.ledger_id != self.ledger_id:
            return f"it was made for ledger {rec.ledger_id} (replayed here)"
        if rec.compute_hash() != rec.record_hash:
            return "its record_hash does not match its content"
        m = rec.meta
        if not _is_hex(m.get("subject_key_id"), 32):
            return "it names no subject key"
        if rec.kind in ("enroll", "log-key"):
            if not isinstance(m.get("public_key"), str):
                return "it carries no public key"
            try:
                if key_id(load_public_pem(m["public_key"], "entry")) != m["subject_key_id"]:
                    return "its public key does not match its key id"
            except MedadvError:
                return "its public key is not a PEM Ed25519 key"
        if rec.kind == "revoke" and (_as_int(m.get("effective_seq")) is None or m["effective_seq"] < 1):
            return "its effective_seq is not a positive integer"
        return None

    def node_reader(self) -> Any:
        """A function (set of nodes) -> {node: hash} over one read transaction per call."""
        def read(want: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
            with self._read("reading the Merkle log") as conn:
                return self._fetch_nodes(conn, want)
        return read

    def proofs(self, builders: dict[Any, Any]) -> dict[Any, Any]:
        """Run proof builders (functions of a perfect-subtree reader) with the nodes they need fetched in bulk.

        A node missing from the log makes that builder's result None."""
        want: set[tuple[int, int]] = set()
        for b in builders.values():
            want |= needed_nodes(b)
        got = self.node_reader()(want)
        out = {}
        for k, b in builders.items():
            try:
                out[k] = b(lambda lv, ix: got[(lv, ix)])
            except KeyError:
                out[k] = None
        return out

    # ---------------------------------------------------------------- check

    def integrity_check(self) -> str:
        """The engine's own integrity check: SQLite ``PRAGMA integrity_check`` ("ok" when sound)."""
        if self.dialect == "postgresql":
            return self._pg_integrity()
        if self.dialect != "sqlite":
            return f"not available ({self.dialect})"
        with self._read("running the integrity check") as conn:
            rows = [str(r[0]) for r in conn.exec_driver_sql("PRAGMA integrity_check").all()]
        return "ok" if rows == ["ok"] else "; ".join(rows)[:300]

    def _pg_integrity(self) -> str:
        """PostgreSQL: amcheck's ``bt_index_check`` on every index of the ledger's tables, when the
        extension is installed in the database (``CREATE EXTENSION amcheck``, by its administrator)."""
        with self._read("running the integrity check") as conn:
            if conn.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'amcheck'")).first() is None:
                return "not available (PostgreSQL: CREATE EXTENSION amcheck to check the indexes)"
            found = conn.execute(text(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                "JOIN pg_class t ON t.oid = i.indrelid JOIN pg_am a ON a.oid = c.relam "
                "WHERE t.relname IN ('records', 'devices', 'nodes', 'heads', 'ledger_meta') AND a.amname = 'btree'"
            )).all()
            bad = []
            for (name,) in found:
                try:
                    with conn.begin_nested():
                        conn.execute(text("SELECT bt_index_check(CAST(:n AS regclass), true)"), {"n": name})
                except SQLAlchemyError as exc:
                    bad.append(f"{name}: {_first_line(exc)}")
        return "ok" if not bad else "; ".join(bad)[:300]

    def check(self, root: TrustRoot, *, old_head: dict[str, Any] | None = None, max_problems: int = 50,
              monitor: Monitor = SILENT) -> ChainReport:
        """Walk the whole log; report every problem (up to ``max_problems``) with its sequence number.

        Checks the engine's integrity, every row's types, the hash chain, every signature against keys
        the trust root vouches for (enrollment position and revocation included), the ledger id, the
        monotone log clock, the Merkle tree against every stored signed head, and with ``old_head`` a
        consistency proof that the current log extends it (catches truncation and rewriting).
        """
        state = self.trust_state(root)
        report = ChainReport(self.display, devices=len(state.enrolled))
        problems: list[Problem] = [Problem(s, p) for s, p in state.problems]
        report.integrity = self.integrity_check()
        if report.integrity != "ok" and not report.integrity.startswith("not available"):
            problems.append(Problem(None, f"the database's integrity check failed: {report.integrity}"))
        stored = self.signed_heads()
        head_at: dict[int, list[Any]] = {}
        for size, body in stored:
            if _as_int(size) is None:
                problems.append(Problem(None, f"a stored tree head has size {str(size)[:20]!r}"))
                continue
            head_at.setdefault(size, []).append(body)
        expected, prev, last_time = 1, GENESIS, ""
        tree = StreamingTree()
        roots: dict[int, bytes] = {0: tree.root()}
        total = self.count()
        for rec in monitor.track(self.iter_rows(), "checking the log", total=total):
            if isinstance(rec, RowError):
                problems.append(Problem(_as_int(rec.seq), f"row {rec.label} is corrupt: {rec.reason}"))
                continue
            if rec.seq != expected:
                gap = f"record {expected} is missing" if rec.seq == expected + 1 else \
                    f"records {expected}-{rec.seq - 1} are missing"
                problems.append(Problem(rec.seq, f"{gap} (deleted)"))
            if rec.prev_hash != prev:
                problems.append(Problem(rec.seq, "its prev_hash does not match the record before it "
                                                 "(a record was deleted, reordered or replaced)"))
            if rec.compute_hash() != rec.record_hash:
                problems.append(Problem(rec.seq, "its content does not match its record_hash (the row was edited)"))
            if rec.ledger_id != self.ledger_id:
                problems.append(Problem(rec.seq, f"it was made for ledger {rec.ledger_id} (replayed)"))
            if rec.logged_at < last_time:
                problems.append(Problem(rec.seq, f"its log time {rec.logged_at} is before the previous record's "
                                                 f"({last_time}): the log clock ran backwards"))
            if rec.kind == "image":
                why = signer_problem(rec, state)
                if why:
                    problems.append(Problem(rec.seq, why[1]))
            elif not any(s == rec.seq for s, _ in state.problems) and self._trust_problem(rec, root):
                problems.append(Problem(rec.seq, f"trust entry: {self._trust_problem(rec, root)}"))
            tree.append(rec.leaf())
            roots[tree.size] = tree.root() if tree.size in head_at else b""
            prev, expected, last_time = rec.record_hash, rec.seq + 1, max(last_time, rec.logged_at)
            report.records += 1
            report.head_seq, report.head_hash = rec.seq, rec.record_hash
        if report.records != total:
            problems.append(Problem(None, f"{total - report.records} rows could not be read in sequence order"))
        latest = None
        for size in sorted(head_at):
            for body in head_at[size]:
                why = head_problem(body, state.log_keys, self.ledger_id)
                if why is None and body["size"] != size:
                    why = "its size differs from its row"
                if why is None and size > tree.size:
                    why = f"it covers {size} records but the log has {tree.size} (records were deleted)"
                if why is None and bytes.fromhex(body["root"]) != roots.get(size):
                    why = "its root does not match the records (the log was rewritten)"
                if why:
                    problems.append(Problem(None, f"signed tree head of size {size}: {why}"))
                else:
                    latest = body
        if latest is None and tree.size:
            problems.append(Problem(None, "no valid signed tree head covers the log"))
        elif latest is not None and latest["size"] != tree.size:
            problems.append(Problem(None, f"records {latest['size'] + 1}-{tree.size} are not covered by a signed "
                                          "tree head"))
        report.signed_head = latest
        if latest is not None:
            got = self.proofs({"root": lambda p: root_hash(latest["size"], p)})["root"]
            if got is None or got.hex() != latest["root"]:
                problems.append(Problem(None, "the stored Merkle nodes do not give the signed head's root "
                                              "(the nodes table was edited)"))
        if old_head is not None:
            problems.extend(self._consistency(old_head, latest, state, report))
        report.problems = problems[:max_problems]
        report.more_problems = max(0, len(problems) - max_problems)
        return report

    def _consistency(self, old: dict[str, Any], new: dict[str, Any] | None, state: TrustState,
                     report: ChainReport) -> list[Problem]:
        why = head_problem(old, state.log_keys, self.ledger_id)
        if why:
            return [Problem(None, f"the kept head is not usable: {why}")]
        if new is None:
            return [Problem(None, "the log has no valid signed head to compare the kept head with "
                                  "(truncated or rewritten)")]
        m, n = old["size"], new["size"]
        if m > n:
            return [Problem(None, f"the kept head covers {m} records but the log now has {n}: the log was "
                                  "truncated")]
        proof = self.proofs({"p": lambda p: consistency_path(m, n, p)})["p"]
        ok = proof is not None and verify_consistency(m, n, bytes.fromhex(old["root"]), bytes.fromhex(new["root"]),
                                                       proof)
        report.consistency = {"old_size": m, "new_size": n, "proof": [h.hex() for h in proof or []], "ok": ok}
        if not ok:
            return [Problem(None, f"the log of {n} records is not an extension of the kept head of {m} records "
                                  "(consistency proof fails): the log was rewritten or truncated")]
        return []


def signer_problem(rec: Record, state: TrustState) -> tuple[str, str] | None:
    """(status, why) when an image record's signer is not vouched for by the trust root at its position;
    None when it is. Status: ``unknown-device``, ``bad-signature`` or ``revoked``."""
    enr = state.enrolled.get(rec.key_id)
    if enr is None:
        return "unknown-device", f"it is signed by key {rec.key_id} ({rec.device}), which the trust root never enrolled"
    if enr.device != rec.device:
        return "unknown-device", f"key {rec.key_id} is enrolled for device {enr.device}, but the record names {rec.device}"
    if rec.seq <= enr.seq:
        return "unknown-device", f"it precedes its key's enrollment (entry #{enr.seq})"
    if not rec.signature_ok(enr.key):
        return "bad-signature", f"its signature does not verify with device {rec.device}'s key (forged or edited)"
    revoked = state.revoked.get(rec.key_id)
    if revoked is not None and rec.seq >= revoked:
        return "revoked", f"it is signed by key {rec.key_id} ({rec.device}), revoked from record #{revoked} on"
    return None


# -------------------------------------------------------------------------------------------- opening


def _writable(path: Path) -> bool:
    """Whether this process may write the ledger file and its folder (where SQLite keeps -wal and -shm)."""
    return os.access(path.parent, os.W_OK) and os.access(path, os.W_OK)


def _sqlite_engine(path: Path, create: bool, readonly: bool = False) -> Engine:
    mode = "rwc" if create else "rw"
    if readonly:
        # A ledger in a folder we cannot write (a read-only mount, an archive): WAL needs a writable -shm
        # beside the file, so read it as immutable; elsewhere read-only mode (sees concurrent commits).
        mode = "ro" if _writable(path) else "ro&immutable=1"
    uri = f"file:{urllib.parse.quote(str(path))}?mode={mode}"

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        if not readonly:
            conn.execute("PRAGMA synchronous=FULL")  # a registered image stays registered after a power cut
        if create:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent in the file: readers never block the writer
        return conn

    engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool, pool_size=1, max_overflow=4)

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:  # pysqlite's own BEGIN is off (isolation_level=None): we choose
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")

    return engine


def resolve_location(where: str | os.PathLike[str]) -> tuple[str, str | Path]:
    """("sqlite", path) or ("postgresql", URL) for a ``--ledger`` value."""
    where = str(where)
    if "://" not in where:
        return "sqlite", Path(where).expanduser()
    url = make_url(where)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise MedadvError(f"ledger URL {where} names no file.",
                              "pass a file path; an in-memory ledger keeps nothing.")
        return "sqlite", Path(url.database).expanduser()
    if url.get_backend_name() == "postgresql":
        if url.drivername in ("postgresql", "postgres"):
            url = url.set(drivername="postgresql+psycopg")  # psycopg 3 (medadv[postgres]), not psycopg2
        return "postgresql", url.render_as_string(hide_password=False)
    raise MedadvError(f"ledger URL {url.render_as_string(hide_password=True)} is neither SQLite nor PostgreSQL.",
                      "pass a file path (SQLite) or postgresql+psycopg://user@host/dbname.")


def open_ledger(where: str | os.PathLike[str], *, create: bool = False, readonly: bool = False) -> Ledger:
    """Open the ledger at a path (SQLite) or a ``postgresql+psycopg://`` URL.

    ``create``: make the file/schema when missing (``provenance init`` does); otherwise a missing
    ledger is an error, and nothing is created as a side effect. ``readonly``: for verification and
    checks; works on a SQLite ledger in a folder this process cannot write.
    """
    kind, loc = resolve_location(where)
    if kind == "sqlite":
        path = Path(loc).absolute()
        if not create and not path.is_file():
            raise MedadvError(f"ledger {path} does not exist.",
                              "create it with `medadv provenance init --org NAME --ledger PATH`, "
                              "or pass --ledger / set MEDADV_LEDGER to an existing ledger.")
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        ledger = Ledger(_sqlite_engine(path, create, readonly and not create), str(path), readonly)
    else:
        try:
            # READ COMMITTED whatever the server's default: after the lock, the head read must see the
            # latest commit (under REPEATABLE READ the snapshot would predate the lock).
            # readonly (verify, check-ledger, the gate): the server itself refuses any write in the session.
            extra = {"connect_args": {"options": "-c default_transaction_read_only=on"}} if readonly and not create \
                else {}
            engine = create_engine(str(loc), pool_size=1, max_overflow=4, isolation_level="READ COMMITTED", **extra)
        except (ImportError, SQLAlchemyError) as exc:
            raise MedadvError(f"cannot use ledger URL {make_url(str(loc)).render_as_string(hide_password=True)} "
                              f"({_first_line(exc)}).", "install the driver: pip install 'medadv[postgres]'.") from exc
        ledger = Ledger(engine, engine.url.render_as_string(hide_password=True))
    try:
        if create:
            ledger._create()
        ledger._validate()
    except BaseException:
        ledger.close()
        raise
    return ledger
