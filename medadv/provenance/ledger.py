"""The ledger: an append-only, hash-chained, signed record of every registered image (SQLAlchemy).

One schema, two engines: a SQLite file (the embedded default; WAL journal, synchronous=FULL) or a
PostgreSQL database named by a URL (a hospital-wide ledger). Tables:

* ``records``: one row per registration. ``seq`` (1, 2, ...), ``prev_hash`` (the ``record_hash`` of
  record ``seq - 1``; 64 zeros for the first), ``digest`` (the canonical content digest), ``name``
  (file base name or npz member id), ``stem`` (the name without its extension), ``uid``/``series_uid``
  (DICOM SOP instance and series UIDs), ``device`` and ``key_id`` (who signed), ``created_at`` (UTC,
  ISO 8601, microseconds), ``meta`` (canonical JSON: format, shape, dtype, photometric, study UID),
  ``signature`` (Ed25519, hex) and ``record_hash``.
* ``devices``: the public key of every registered device key (PEM), by key id.
* ``ledger_meta``: the schema version.

What is signed: the device signs the canonical JSON of *all* record fields, ``seq`` and ``prev_hash``
included, so a record cannot be moved, and a deleted record cannot be bridged by re-chaining the rest
without every later device's private key. ``record_hash = sha256(signed bytes + "\\n" + hex signature)``.
:meth:`Ledger.check` walks the chain: sequence gaps (deleted rows), ``prev_hash`` links (reordered or
deleted rows), ``record_hash`` (edited rows) and signatures (forged rows). Deleting the newest rows
leaves a valid shorter chain: note the head that ``check`` prints and pass it back as an ``anchor``.

Append-only is enforced by the database too (triggers refuse UPDATE, DELETE and, on PostgreSQL,
TRUNCATE of ``records`` and ``devices``), so mistakes fail loudly; someone who drops the triggers is
still caught by the chain.

Concurrent writers never fork the chain: an append reads the head and inserts inside one transaction
that holds the ledger's write lock from its first statement: ``BEGIN IMMEDIATE`` on SQLite (the
database-wide write lock, waited for up to 60 s), ``pg_advisory_xact_lock`` on PostgreSQL (released at
commit or rollback, also when the client dies). Belt and braces: ``seq`` is the primary key and
``prev_hash`` is UNIQUE, so two records can never claim the same place. Records are appended in
batches, one transaction each; a writer killed mid-batch loses only its open transaction.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import (
    DDL,
    BigInteger,
    Column,
    Connection,
    Engine,
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

SCHEMA = "medadv-ledger/1"
GENESIS = "0" * 64
SIGN_DOMAIN = b"medadv-provenance-record/1\n"  # domain separation: a record signature signs nothing else
SQLITE_BUSY_TIMEOUT_S = 60.0
# One advisory lock key per database, derived from a fixed label so every medadv writer agrees on it.
PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"medadv-ledger-append").digest()[:8], "big", signed=True)
_CHUNK = 500  # values per IN (...) query

metadata = MetaData()
ledger_meta = Table(
    "ledger_meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)
devices = Table(
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
    Column("digest", String(64), nullable=False, index=True),
    Column("name", Text, nullable=False, index=True),
    Column("stem", Text, nullable=False, index=True),
    Column("uid", String(128), nullable=True, index=True),
    Column("series_uid", String(128), nullable=True, index=True),
    Column("device", String(64), nullable=False),
    Column("key_id", String(32), nullable=False),
    Column("created_at", String(40), nullable=False),
    Column("meta", Text, nullable=False),
    Column("signature", String(128), nullable=False),
)

for _table in ("records", "devices"):
    for _op in ("UPDATE", "DELETE"):
        event.listen(metadata, "after_create", DDL(
            f"CREATE TRIGGER {_table}_no_{_op.lower()} BEFORE {_op} ON {_table} "
            "BEGIN SELECT RAISE(ABORT, 'the medadv ledger is append-only'); END"
        ).execute_if(dialect="sqlite"))
event.listen(metadata, "after_create", DDL(
    "CREATE OR REPLACE FUNCTION medadv_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$fn$ BEGIN RAISE EXCEPTION 'the medadv ledger is append-only'; END $fn$"
).execute_if(dialect="postgresql"))
for _table in ("records", "devices"):
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


@dataclass(frozen=True)
class Record:
    """One ledger row. ``signature`` is hex; ``meta`` is the decoded JSON."""

    seq: int
    prev_hash: str
    digest: str
    name: str
    stem: str
    uid: str | None
    series_uid: str | None
    device: str
    key_id: str
    created_at: str
    meta: dict[str, Any]
    signature: str = ""
    record_hash: str = ""

    def signed_bytes(self) -> bytes:
        """What the device signs: every field but the signature and the hash, as canonical JSON."""
        return SIGN_DOMAIN + canonical_json({
            "seq": self.seq, "prev_hash": self.prev_hash, "digest": self.digest, "name": self.name,
            "stem": self.stem, "uid": self.uid, "series_uid": self.series_uid, "device": self.device,
            "key_id": self.key_id, "created_at": self.created_at, "meta": self.meta,
        })

    def signature_bytes(self) -> bytes | None:
        try:
            return bytes.fromhex(self.signature)
        except ValueError:
            return None

    def compute_hash(self) -> str:
        return hashlib.sha256(self.signed_bytes() + b"\n" + self.signature.encode()).hexdigest()

    def signature_ok(self, key: PublicKey) -> bool:
        sig = self.signature_bytes()
        return sig is not None and len(sig) == 64 and key.verify(sig, self.signed_bytes())

    @classmethod
    def signed(cls, seq: int, prev_hash: str, item: ImageDigest, signer: DeviceKey, created_at: str) -> Record:
        unsigned = cls(seq, prev_hash, item.digest, item.name, name_stem(item.name), item.uid, item.series_uid,
                       signer.device, signer.key_id, created_at, dict(item.meta))
        rec = _replace(unsigned, signature=signer.sign(unsigned.signed_bytes()).hex())
        return _replace(rec, record_hash=rec.compute_hash())

    @classmethod
    def from_row(cls, row: Any) -> Record:
        try:
            meta = json.loads(row.meta)
        except (TypeError, ValueError):
            meta = {"unreadable_meta": str(row.meta)[:200]}  # check() then reports a hash mismatch
        return cls(int(row.seq), row.prev_hash, row.digest, row.name, row.stem, row.uid, row.series_uid, row.device,
                   row.key_id, row.created_at, meta, row.signature, row.record_hash)

    def row(self) -> dict[str, Any]:
        return {"seq": self.seq, "prev_hash": self.prev_hash, "record_hash": self.record_hash,
                "digest": self.digest, "name": self.name, "stem": self.stem, "uid": self.uid,
                "series_uid": self.series_uid, "device": self.device, "key_id": self.key_id,
                "created_at": self.created_at, "meta": canonical_json(self.meta).decode(), "signature": self.signature}


def name_stem(name: str) -> str:
    """A file name without its extension (``ISIC_0000001.jpg`` -> ``ISIC_0000001``); npz member ids as they are.

    Looking images up by stem too finds an edited copy saved in another format (a JPEG's adversarial
    copy saved as PNG) as "modified" rather than "unregistered".
    """
    return name if "#" in name else Path(name).stem


def _replace(rec: Record, **changes: Any) -> Record:
    from dataclasses import replace

    return replace(rec, **changes)


@dataclass
class AppendResult:
    added: int = 0
    skipped: int = 0  # already registered by this device under this name
    first_seq: int | None = None
    last_seq: int | None = None
    head_hash: str | None = None


@dataclass(frozen=True)
class Problem:
    seq: int | None
    reason: str


@dataclass
class ChainReport:
    """What :meth:`Ledger.check` found. ``ok`` is True when the chain is intact and every signature verifies."""

    ledger: str
    records: int = 0
    devices: int = 0
    head_seq: int = 0
    head_hash: str = GENESIS
    problems: list[Problem] = field(default_factory=list)
    more_problems: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"ledger": self.ledger, "ok": self.ok, "records": self.records, "devices": self.devices,
                "head_seq": self.head_seq, "head_hash": self.head_hash,
                "problems": [{"seq": p.seq, "reason": p.reason} for p in self.problems],
                "more_problems": self.more_problems}


def _chunks(seq: Sequence[Any], n: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:160]


class Ledger:
    """An open ledger. Make one with :func:`open_ledger`; close it (or use ``with``) when done."""

    def __init__(self, engine: Engine, display: str) -> None:
        self.engine = engine
        self.display = display  # path, or URL with the password hidden
        self.dialect = engine.dialect.name

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
                                                   {"key": "created_at", "value": utc_now()}])

    def _validate(self) -> None:
        with self._read("opening") as conn:
            names = set(inspect(conn).get_table_names())
            missing = {"records", "devices", "ledger_meta"} - names
            if missing:
                raise MedadvError(
                    f"{self.display} is not a medadv ledger (it has no {', '.join(sorted(missing))} table).",
                    "point --ledger at a ledger made by `medadv provenance keygen`, or create one with it.",
                )
            version = conn.execute(select(ledger_meta.c.value).where(ledger_meta.c.key == "schema")).scalar()
        if version != SCHEMA:
            raise MedadvError(f"ledger {self.display} has schema '{version}', not '{SCHEMA}'.",
                              "use the medadv version that wrote it.")

    # ---------------------------------------------------------------- devices

    def add_device(self, device: str, public_key: Any) -> str:
        """Register a device's public key (idempotent). Returns its key id."""
        check_device_name(device)
        kid = key_id(public_key)
        with self._write("registering a device") as conn:
            row = conn.execute(select(devices.c.device).where(devices.c.key_id == kid)).first()
            if row is not None:
                if row.device != device:
                    raise MedadvError(f"key {kid} is already registered in {self.display} for device {row.device}.",
                                      f"register it as {row.device}, or make a new key for {device}.")
                return kid
            conn.execute(insert(devices).values(key_id=kid, device=device, public_key=public_pem(public_key),
                                                added_at=utc_now()))
        return kid

    def device_keys(self) -> dict[str, PublicKey]:
        """Every registered public key, by key id."""
        with self._read("reading devices") as conn:
            rows = conn.execute(select(devices)).all()
        return {r.key_id: PublicKey(r.device, load_public_pem(r.public_key,
                                                              f"ledger {self.display}, device {r.device}"))
                for r in rows}

    def require_device(self, signer: DeviceKey) -> None:
        """Fail before writing anything when ``signer``'s public key is not registered under its device name."""
        keys = self.device_keys()
        known = keys.get(signer.key_id)
        pub = signer.path.with_suffix(".pub") if signer.path else f"{signer.device}.pub"
        if known is None:
            others = sorted({k.device for k in keys.values()})
            raise MedadvError(
                f"the key of device {signer.device} (key id {signer.key_id}) is not registered in ledger {self.display}"
                + (f" (it knows {', '.join(others)})." if others else " (it knows no devices)."),
                f"register it with `medadv provenance add-device {pub} --ledger {self.display}`, "
                "or pass the right --device / --keys.",
            )
        if known.device != signer.device:
            raise MedadvError(f"key {signer.key_id} is registered for device {known.device}, not {signer.device}.",
                              f"use --device {known.device}.")

    # ---------------------------------------------------------------- append

    def append(self, items: Sequence[ImageDigest], signer: DeviceKey, *, batch_size: int = 256,
               monitor: Monitor = SILENT) -> AppendResult:
        """Sign and append ``items`` in transactions of ``batch_size`` records.

        An item this device already registered under the same name (same digest) is skipped, so an
        interrupted registration can simply be run again.
        """
        if batch_size < 1:
            raise MedadvError(f"batch size {batch_size} is not positive.", "pass --batch-size 1 or more.")
        self.require_device(signer)
        result = AppendResult()
        batches = list(_chunks(items, batch_size))
        for batch in monitor.track(batches, "appending to the ledger", total=len(batches)):
            with self._write("appending records") as conn:
                head = conn.execute(select(records.c.seq, records.c.record_hash)
                                    .order_by(records.c.seq.desc()).limit(1)).first()
                seq, prev = (int(head.seq), head.record_hash) if head else (0, GENESIS)
                present = {(r.digest, r.name) for r in conn.execute(
                    select(records.c.digest, records.c.name)
                    .where(records.c.digest.in_({i.digest for i in batch}), records.c.device == signer.device))}
                rows = []
                for item in batch:
                    if (item.digest, item.name) in present:
                        result.skipped += 1
                        continue
                    present.add((item.digest, item.name))
                    seq += 1
                    rec = Record.signed(seq, prev, item, signer, utc_now())
                    rows.append(rec.row())
                    prev = rec.record_hash
                    result.first_seq = result.first_seq or seq
                    result.last_seq, result.head_hash = seq, prev
                if rows:
                    try:
                        conn.execute(insert(records), rows)
                    except IntegrityError as exc:  # cannot happen under the lock; refuse rather than fork
                        raise MedadvError(f"ledger {self.display} refused a record that would fork the chain "
                                          f"({_first_line(exc)}).", "retry; if it persists, run check-ledger.") from exc
                result.added += len(rows)
        return result

    # ---------------------------------------------------------------- lookups

    def count(self) -> int:
        with self._read("counting records") as conn:
            return int(conn.execute(select(func.count()).select_from(records)).scalar() or 0)

    def head(self) -> tuple[int, str]:
        """(seq, record_hash) of the newest record; (0, GENESIS) when empty."""
        with self._read("reading the head") as conn:
            row = conn.execute(select(records.c.seq, records.c.record_hash)
                               .order_by(records.c.seq.desc()).limit(1)).first()
        return (int(row.seq), row.record_hash) if row else (0, GENESIS)

    def by_digest(self, digests: Iterable[str]) -> dict[str, list[Record]]:
        """Records per digest, oldest first."""
        digests = sorted(set(digests))
        out: dict[str, list[Record]] = {}
        with self._read("looking up digests") as conn:
            for chunk in _chunks(digests, _CHUNK):
                for row in conn.execute(select(records).where(records.c.digest.in_(chunk)).order_by(records.c.seq)):
                    out.setdefault(row.digest, []).append(Record.from_row(row))
        return out

    def by_identity(self, names: Iterable[str], uids: Iterable[str],
                    series: Iterable[str]) -> dict[str, dict[str, Record]]:
        """The newest record per name, per name stem, per DICOM SOP instance UID and per series UID asked for."""
        names = set(names)
        want = {"name": sorted(names), "stem": sorted({name_stem(n) for n in names}), "uid": sorted(set(uids)),
                "series_uid": sorted(set(series))}
        out: dict[str, dict[str, Record]] = {k: {} for k in want}
        with self._read("looking up names") as conn:
            for column, values in want.items():
                col = records.c[column]
                for chunk in _chunks(values, _CHUNK):
                    for row in conn.execute(select(records).where(col.in_(chunk)).order_by(records.c.seq)):
                        out[column][getattr(row, column)] = Record.from_row(row)
        return out

    def iter_records(self, batch: int = 2000) -> Iterator[Record]:
        """Every record in sequence order, read in pages (constant memory)."""
        last = 0
        while True:
            with self._read("reading records") as conn:
                rows = conn.execute(select(records).where(records.c.seq > last)
                                    .order_by(records.c.seq).limit(batch)).all()
            if not rows:
                return
            for row in rows:
                yield Record.from_row(row)
            last = int(rows[-1].seq)

    # ---------------------------------------------------------------- check

    def check(self, *, trusted: dict[str, PublicKey] | None = None, anchor: str | None = None,
              max_problems: int = 50, monitor: Monitor = SILENT) -> ChainReport:
        """Walk the whole chain; report every break (up to ``max_problems``) with its sequence number.

        ``trusted``: public keys to check signatures with instead of the ledger's own ``devices`` table.
        ``anchor``: a record hash noted earlier that must still be in the chain (catches truncation).
        """
        keys = trusted if trusted is not None else self.device_keys()
        report = ChainReport(self.display, devices=len(keys))
        problems: list[Problem] = []
        expected, prev, anchor_seen = 1, GENESIS, anchor is None
        total = self.count()
        for rec in monitor.track(self.iter_records(), "checking the chain", total=total):
            if rec.seq != expected:
                gap = f"record {expected} is missing" if rec.seq == expected + 1 else \
                    f"records {expected}-{rec.seq - 1} are missing"
                problems.append(Problem(rec.seq, f"{gap} (deleted)"))
            if rec.prev_hash != prev:
                problems.append(Problem(rec.seq, "its prev_hash does not match the record before it "
                                                 "(a record was deleted, reordered or replaced)"))
            if rec.compute_hash() != rec.record_hash:
                problems.append(Problem(rec.seq, "its content does not match its record_hash (the row was edited)"))
            key = keys.get(rec.key_id)
            if key is None:
                problems.append(Problem(rec.seq, f"it is signed by unknown device {rec.device} (key {rec.key_id})"))
            elif key.device != rec.device:
                problems.append(Problem(rec.seq, f"key {rec.key_id} belongs to device {key.device}, "
                                                 f"but the record names {rec.device}"))
            elif not rec.signature_ok(key):
                problems.append(Problem(rec.seq, f"its signature does not verify with device {rec.device}'s key "
                                                 "(forged or edited)"))
            anchor_seen = anchor_seen or rec.record_hash == anchor
            prev, expected = rec.record_hash, rec.seq + 1
            report.records += 1
            report.head_seq, report.head_hash = rec.seq, rec.record_hash
        if not anchor_seen:
            problems.append(Problem(None, f"anchor {anchor} is not in the chain "
                                          "(the ledger was truncated or rewritten)"))
        report.problems = problems[:max_problems]
        report.more_problems = max(0, len(problems) - max_problems)
        return report


# -------------------------------------------------------------------------------------------- opening


def _sqlite_engine(path: Path, create: bool) -> Engine:
    uri = f"file:{urllib.parse.quote(str(path))}?mode={'rwc' if create else 'rw'}"

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
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


def open_ledger(where: str | os.PathLike[str], *, create: bool = False) -> Ledger:
    """Open the ledger at a path (SQLite) or a ``postgresql+psycopg://`` URL.

    ``create``: make the file/schema when missing (keygen and add-device do); otherwise a missing
    ledger is an error, and nothing is created as a side effect.
    """
    kind, loc = resolve_location(where)
    if kind == "sqlite":
        path = Path(loc).absolute()
        if not create and not path.is_file():
            raise MedadvError(f"ledger {path} does not exist.",
                              "create it with `medadv provenance keygen --device NAME --ledger PATH`, "
                              "or pass --ledger / set MEDADV_LEDGER to an existing ledger.")
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        ledger = Ledger(_sqlite_engine(path, create), str(path))
    else:
        try:
            # READ COMMITTED whatever the server's default: after the lock, the head read must see the
            # latest commit (under REPEATABLE READ the snapshot would predate the lock).
            engine = create_engine(str(loc), pool_size=1, max_overflow=4, isolation_level="READ COMMITTED")
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
