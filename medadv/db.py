"""The database layer shared by the provenance ledger and the service store (SQLAlchemy: SQLite or PostgreSQL).

Written once here, used by both:

* **engines** from a path or URL (:func:`resolve_location`, :func:`sqlite_engine`, :func:`postgres_engine`):
  SQLite with ``synchronous=FULL`` (a committed row survives a power cut), WAL when the file is created,
  and medadv's own ``BEGIN`` so a writer can take the write lock at its first statement; PostgreSQL
  through psycopg 3 under READ COMMITTED (after the lock, the head read sees the latest commit).
* **transactions** (:class:`Database`): ``_read``/``_write`` context managers, where a write holds one
  append lock per table family from its first statement (``BEGIN IMMEDIATE`` on SQLite,
  ``pg_advisory_xact_lock`` on PostgreSQL) so concurrent writers never fork a chain;
  :meth:`Database.transact` reruns a write that the database rolled back for a transient reason
  (PostgreSQL serialization failure or deadlock, SQLite busy); every other database failure becomes one
  :class:`~medadv.errors.MedadvError` naming the database and what to do.
* **append-only triggers** (:class:`AppendOnly`): one description -> the SQLite triggers (UPDATE, DELETE)
  and the PostgreSQL ones (UPDATE or DELETE per row, TRUNCATE per statement), all raising the same text.
* **the hash chain** (:func:`row_digest`, :func:`chain_head`, :class:`ChainWalker`): each row stores
  ``prev_hash`` (the previous row's hash; :data:`GENESIS` for the first) and its own hash over its
  content; the walker finds gaps, broken links and edited rows in one pass.

This is a base layer: it imports nothing from medadv but :mod:`medadv.errors`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import DDL, Connection, Engine, MetaData, Table, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import QueuePool

from medadv.errors import MedadvError

GENESIS = "0" * 64  # the prev_hash of a chain's first row
SQLITE_BUSY_TIMEOUT_S = 60.0  # how long a writer waits for another's write lock before failing
_HEX = {n: re.compile(f"[0-9a-f]{{{n}}}") for n in (32, 64, 128)}
T = TypeVar("T")


def utc_now() -> str:
    """Now, UTC, microseconds, ``Z``-suffixed: the one time format both stores write (sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def is_hex(v: Any, n: int) -> bool:
    """Whether ``v`` is ``n`` lowercase hex characters (``n`` in 32, 64, 128)."""
    return isinstance(v, str) and len(v) == n and _HEX[n].fullmatch(v) is not None


def as_int(v: Any) -> int | None:
    """``v`` when it is a true int (not a bool, not text a SQLite column happens to hold), else None."""
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def chunks(seq: Sequence[T], n: int) -> Iterator[Sequence[T]]:
    """``seq`` in slices of ``n`` (IN (...) lists stay under the drivers' parameter limits)."""
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def first_line(exc: BaseException) -> str:
    """The driver's own first line of an error (SQLAlchemy wraps it in several more), at most 160 characters."""
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:160]


def advisory_key(label: bytes) -> int:
    """A PostgreSQL advisory lock key derived from a fixed label, so every medadv writer agrees on it."""
    return int.from_bytes(hashlib.sha256(label).digest()[:8], "big", signed=True)


# -------------------------------------------------------------------------------------------- engines


def resolve_location(where: str | os.PathLike[str]) -> tuple[str, str | Path]:
    """("sqlite", path) or ("postgresql", URL) for a ``--ledger`` value (a path, or a SQLAlchemy URL)."""
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


def _writable(path: Path) -> bool:
    """Whether this process may write the file and its folder (where SQLite keeps -wal and -shm)."""
    return os.access(path.parent, os.W_OK) and os.access(path, os.W_OK)


def sqlite_engine(path: Path, *, create: bool = False, readonly: bool = False, pool_size: int = 1,
                  max_overflow: int = 4) -> Engine:
    """An engine on the SQLite file ``path``. ``create``: make it when missing (and switch it to WAL,
    which persists in the file); ``readonly``: read-only mode (immutable when the folder cannot be
    written). ``with conn.execution_options(sqlite_begin="IMMEDIATE")`` takes the write lock at BEGIN."""
    mode = "rwc" if create else "rw"
    if readonly:
        # A file in a folder we cannot write (a read-only mount, an archive): WAL needs a writable -shm
        # beside the file, so read it as immutable; elsewhere read-only mode (sees concurrent commits).
        mode = "ro" if _writable(path) else "ro&immutable=1"
    uri = f"file:{urllib.parse.quote(str(path))}?mode={mode}"

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        if not readonly:
            conn.execute("PRAGMA synchronous=FULL")  # a committed row stays committed after a power cut
        if create:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent in the file: readers never block the writer
        return conn

    engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool, pool_size=pool_size,
                           max_overflow=max_overflow)

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:  # pysqlite's own BEGIN is off (isolation_level=None): we choose
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")

    return engine


def postgres_engine(url: str, *, readonly: bool = False, pool_size: int = 1, max_overflow: int = 4,
                    what: str = "ledger URL") -> Engine:
    """An engine on a PostgreSQL URL under READ COMMITTED whatever the server's default (under REPEATABLE
    READ the snapshot would predate the append lock). ``readonly``: the server refuses any write in the
    session. A missing driver is a MedadvError naming ``what`` (the password hidden)."""
    try:
        extra = {"connect_args": {"options": "-c default_transaction_read_only=on"}} if readonly else {}
        return create_engine(url, pool_size=pool_size, max_overflow=max_overflow, isolation_level="READ COMMITTED",
                             **extra)
    except (ImportError, SQLAlchemyError) as exc:
        raise MedadvError(f"cannot use {what} {make_url(url).render_as_string(hide_password=True)} "
                          f"({first_line(exc)}).", "install the driver: pip install 'medadv[postgres]'.") from exc


def open_engine(where: str | os.PathLike[str], *, create: bool = False, readonly: bool = False, pool_size: int = 1,
                max_overflow: int = 4, what: str = "ledger", missing_fix: str = "pass an existing file.",
                ) -> tuple[Engine, str]:
    """(engine, name to show) for a path (SQLite) or URL (PostgreSQL): :func:`resolve_location`, then
    :func:`sqlite_engine` or :func:`postgres_engine`. A missing SQLite file is a MedadvError naming
    ``what`` and ``missing_fix`` unless ``create`` (its folder is made then); ``readonly`` is ignored
    with ``create``. The name is the absolute path, or the URL with its password hidden."""
    kind, loc = resolve_location(where)
    readonly = readonly and not create
    if kind == "sqlite":
        path = Path(loc).absolute()
        if not create and not path.is_file():
            raise MedadvError(f"{what} {path} does not exist.", missing_fix)
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        return sqlite_engine(path, create=create, readonly=readonly, pool_size=pool_size,
                             max_overflow=max_overflow), str(path)
    engine = postgres_engine(str(loc), readonly=readonly, pool_size=pool_size, max_overflow=max_overflow,
                             what=f"{what} URL")
    return engine, engine.url.render_as_string(hide_password=True)


# -------------------------------------------------------------------------------------------- transactions

# (substrings of the driver's message, lowercased) -> which fix applies; checked in order
_CAUSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("locked", ("locked", "lock timeout")),
    ("corrupt", ("not a database", "malformed", "disk image")),
    ("no-database", ()),  # "does not exist" and "database" (two words): see _cause
    ("connect", ("connect", "refused", "could not translate host")),
    ("append-only", ("append-only",)),
    ("readonly", ("readonly", "read-only")),
)
_TRANSIENT_PG = {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available


def _cause(msg: str) -> str:
    low = msg.lower()
    for cause, needles in _CAUSES:
        if cause == "no-database":
            if "does not exist" in low and "database" in low:
                return cause
        elif any(n in low for n in needles):
            return cause
    return "other"


def is_transient(exc: BaseException) -> bool:
    """Whether the database rolled the transaction back for a reason a rerun can clear: PostgreSQL
    serialization failure, deadlock or lock timeout; SQLite busy (another writer held the lock past the
    busy timeout). Nothing was written, so the whole transaction may run again."""
    orig = getattr(exc, "orig", None)
    if getattr(orig, "sqlstate", None) in _TRANSIENT_PG:
        return True
    return isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig).lower()


class Database:
    """One open database: its engine, the name to show (a path, or a URL with the password hidden) and
    the transaction helpers. The ledger and the service store are subclasses.

    Class attributes a subclass sets: ``NOUN`` (how errors name it: "ledger"), ``LOCK_LABEL`` (its
    append lock; tables guarded by different labels do not wait for each other) and ``FIXES`` (cause ->
    what to do; causes: locked, corrupt, no-database, connect, append-only, readonly, other)."""

    NOUN = "database"
    LOCK_LABEL = b"medadv-append"
    FIXES: dict[str, str] = {
        "locked": "another process held the write lock too long; retry.",
        "corrupt": "the database file is corrupt: restore it from a backup.",
        "no-database": "create the database first (e.g. `createdb NAME`) or fix the name in the URL.",
        "connect": "start the PostgreSQL server or fix host, port and credentials in the URL.",
        "append-only": "existing rows cannot be changed; append new ones instead.",
        "readonly": "the database is read-only here: appending needs write access.",
        "other": "check that the database is reachable and writable; retry.",
    }
    RETRY_ATTEMPTS = 3
    RETRY_BASE_S = 0.05

    def __init__(self, engine: Engine, display: str, readonly: bool = False) -> None:
        self.engine = engine
        self.display = display  # path, or URL with the password hidden
        self.dialect = engine.dialect.name
        self.readonly = readonly

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn a database failure into one MedadvError naming the database, the action and what to do."""
        try:
            yield
        except MedadvError:
            raise
        except SQLAlchemyError as exc:
            msg = first_line(exc)
            fix = self.FIXES.get(_cause(msg)) or Database.FIXES.get(_cause(msg)) or self.FIXES["other"]
            raise MedadvError(f"{self.NOUN} {self.display}: {action} failed ({msg}).", fix) from exc

    @contextlib.contextmanager
    def _raw_write(self) -> Iterator[Connection]:
        """A write transaction holding this database's append lock from its first statement (no error mapping)."""
        with self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": advisory_key(self.LOCK_LABEL)})
                yield conn

    @contextlib.contextmanager
    def _write(self, action: str) -> Iterator[Connection]:
        """A write transaction holding the append lock from its first statement; commits on leaving."""
        with self._errors(action), self._raw_write() as conn:
            yield conn

    @contextlib.contextmanager
    def _read(self, action: str) -> Iterator[Connection]:
        with self._errors(action), self.engine.connect() as conn, conn.begin():
            yield conn

    def transact(self, action: str, body: Callable[[Connection], T], *, attempts: int | None = None) -> T:
        """``body(conn)`` in one write transaction (:meth:`_write`), run again (after a short, jittered
        back-off) when the database rolled it back for a transient reason (:func:`is_transient`), at
        most ``attempts`` times in all. ``body`` must have no effect outside the transaction until it
        returns: a rerun starts from scratch."""
        attempts = attempts or self.RETRY_ATTEMPTS
        for attempt in range(1, attempts + 1):
            try:
                with self._raw_write() as conn:
                    return body(conn)
            except SQLAlchemyError as exc:
                if attempt < attempts and is_transient(exc):
                    time.sleep(self.RETRY_BASE_S * 2 ** (attempt - 1) * (1 + random.random()))
                    continue
                with self._errors(action):
                    raise
        raise AssertionError("unreachable")  # the loop returns or raises


# -------------------------------------------------------------------------------------------- append-only


@dataclass(frozen=True)
class AppendOnly:
    """Append-only guards for ``tables``, as triggers made with the tables (``metadata.create_all``).

    One description gives both dialects the same refusal text, ``the medadv table <name> is
    append-only``: SQLite triggers ``<table>_no_update`` and ``<table>_no_delete``; PostgreSQL the
    function ``function`` (shared by the tables it guards) and triggers ``<table>_append_only`` (UPDATE
    or DELETE, per row) and ``<table>_no_truncate`` (per statement). Someone with rights to drop
    triggers is not stopped by them; the hash chain catches what they then do."""

    tables: tuple[str, ...]
    function: str = "medadv_append_only"

    @staticmethod
    def message(table: str) -> str:
        return f"the medadv table {table} is append-only"

    def statements(self, dialect: str) -> list[str]:
        """The DDL for ``dialect`` ("sqlite" or "postgresql"), in the order it runs."""
        if dialect == "sqlite":
            return [f"CREATE TRIGGER {t}_no_{op.lower()} BEFORE {op} ON {t} "
                    f"BEGIN SELECT RAISE(ABORT, '{self.message(t)}'); END"
                    for t in self.tables for op in ("UPDATE", "DELETE")]
        if dialect == "postgresql":
            out = [f"CREATE OR REPLACE FUNCTION {self.function}() RETURNS trigger LANGUAGE plpgsql AS "
                   f"$fn$ BEGIN RAISE EXCEPTION '{self.message('%')}', TG_TABLE_NAME; END $fn$"]
            for t in self.tables:
                out.append(f"CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {t} "
                           f"FOR EACH ROW EXECUTE FUNCTION {self.function}()")
                out.append(f"CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {t} "
                           f"FOR EACH STATEMENT EXECUTE FUNCTION {self.function}()")
            return out
        return []

    def attach(self, metadata: MetaData) -> None:
        """Create the triggers right after the tables, whenever ``metadata.create_all`` makes them."""
        for dialect in ("sqlite", "postgresql"):
            for stmt in self.statements(dialect):
                # DDL formats its text with %: the PostgreSQL function's placeholder must be doubled
                event.listen(metadata, "after_create", DDL(stmt.replace("%", "%%")).execute_if(dialect=dialect))


# -------------------------------------------------------------------------------------------- hash chain


def row_digest(domain: bytes, *parts: bytes) -> str:
    """A chain row's hash: SHA-256 (hex) of ``domain`` (what kind of row: a hash of one kind is never
    valid as another) followed by ``parts`` (its canonical content, prev_hash and seq included)."""
    h = hashlib.sha256(domain)
    for p in parts:
        h.update(p)
    return h.hexdigest()


def chain_head(conn: Connection, table: Table, hash_column: str, *extra: str) -> Any:
    """The newest row of a chained ``table`` (columns seq, ``hash_column`` and ``extra``), or None when
    the table is empty. Raises ValueError when that row is not what a writer stored (a seq that is not
    an integer, a hash that is not 64 hex characters): appending after it would fork the chain."""
    cols = [table.c.seq, table.c[hash_column], *(table.c[c] for c in extra)]
    row = conn.execute(select(*cols).order_by(table.c.seq.desc()).limit(1)).first()
    if row is not None and (as_int(row.seq) is None or not is_hex(row[1], 64)):
        raise ValueError(f"the newest row is corrupt ({str(row.seq)[:20]!r})")
    return row


@dataclass(frozen=True)
class Break:
    """One fault in a chain at row ``seq``. ``kind``: ``gap`` (rows ``missing_from``..``seq - 1`` are
    absent), ``link`` (its prev_hash is not the hash of the row before it), ``edited`` (its content does
    not give its stored hash) or ``unreadable`` (its content could not be read to recompute the hash)."""

    seq: int
    kind: str
    missing_from: int = 0


class ChainWalker:
    """Walks a hash chain in seq order, one row at a time, and says what is wrong with each.

    Start it at the position after which rows are read (``seq`` 0 and :data:`GENESIS` for the whole
    chain; an audited prefix's last seq and hash to extend it)."""

    def __init__(self, seq: int = 0, last_hash: str = GENESIS) -> None:
        self.seq = seq  # the last row walked
        self.last_hash = last_hash

    def step(self, seq: int, prev_hash: str, stored_hash: str, recomputed: str | None) -> list[Break]:
        """Walk row ``seq`` (its stored prev_hash and hash; ``recomputed``: the hash of its content, None
        when unreadable). Afterwards the row is the chain's last, whatever was wrong with it."""
        out = []
        if seq != self.seq + 1:
            out.append(Break(seq, "gap", self.seq + 1))
        if prev_hash != self.last_hash:
            out.append(Break(seq, "link"))
        if recomputed is None:
            out.append(Break(seq, "unreadable"))
        elif recomputed != stored_hash:
            out.append(Break(seq, "edited"))
        self.seq, self.last_hash = seq, stored_hash
        return out

    def walk(self, rows: Iterable[tuple[int, str, str, str | None]]) -> list[Break]:
        """Every fault in ``rows`` of (seq, prev_hash, stored hash, recomputed hash or None), in order."""
        return [b for row in rows for b in self.step(*row)]
