"""The service's own tables, in the ledger's database (same URL: SQLite file or PostgreSQL).

* ``serve_analyses``: one row per analysis, hash-chained (``prev_hash`` = the previous row's
  ``entry_hash``; 64 zeros for the first), holding the signed receipt. A row is written in one
  transaction that holds the table's append lock from its first statement (``BEGIN IMMEDIATE`` on
  SQLite, an advisory lock on PostgreSQL), so concurrent writers never fork the chain and a crash
  leaves either the whole row or nothing. Append-only: triggers refuse UPDATE and DELETE.
* ``serve_tokens``: bearer tokens, stored as ``sha256(token)`` only, with a role (submitter, reader,
  admin) and a short public id. The token itself is shown once, when it is made.

The provenance ledger's tables are never written here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
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
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import QueuePool

from medadv.errors import MedadvError
from medadv.provenance.digest import canonical_json
from medadv.provenance.keys import DeviceKey
from medadv.provenance.ledger import resolve_location, utc_now
from medadv.serve.receipts import chain_entry, entry_hash, sign_receipt

ROLES = ("submitter", "reader", "admin")
GENESIS = "0" * 64
TOKEN_PREFIX = "mdv_"
PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"medadv-serve-analyses-append").digest()[:8], "big", signed=True)

metadata = MetaData()
analyses = Table(
    "serve_analyses", metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("id", String(32), nullable=False, unique=True),
    Column("prev_hash", String(64), nullable=False, unique=True),
    Column("entry_hash", String(64), nullable=False, unique=True),
    Column("created_at", String(40), nullable=False, index=True),
    Column("submitter", String(32), nullable=False, index=True),
    Column("image_digest", String(64), nullable=False, index=True),
    Column("model_digest", String(64), nullable=False),
    Column("receipt", Text, nullable=False),
)
tokens = Table(
    "serve_tokens", metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("token_id", String(32), nullable=False, unique=True),
    Column("role", String(16), nullable=False),
    Column("label", Text, nullable=False),
    Column("created_at", String(40), nullable=False),
)
for _op in ("UPDATE", "DELETE"):
    event.listen(metadata, "after_create", DDL(
        f"CREATE TRIGGER serve_analyses_no_{_op.lower()} BEFORE {_op} ON serve_analyses "
        "BEGIN SELECT RAISE(ABORT, 'the medadv analyses table is append-only'); END"
    ).execute_if(dialect="sqlite"))
event.listen(metadata, "after_create", DDL(
    "CREATE OR REPLACE FUNCTION medadv_serve_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$fn$ BEGIN RAISE EXCEPTION 'the medadv analyses table is append-only'; END $fn$"
).execute_if(dialect="postgresql"))
event.listen(metadata, "after_create", DDL(
    "CREATE TRIGGER serve_analyses_append_only BEFORE UPDATE OR DELETE ON serve_analyses "
    "FOR EACH ROW EXECUTE FUNCTION medadv_serve_append_only()"
).execute_if(dialect="postgresql"))


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    role: str
    label: str


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once; only its sha256 is stored
    token_id: str
    role: str


def _sqlite_engine(path: Path) -> Engine:
    uri = f"file:{urllib.parse.quote(str(path))}?mode=rw"

    def connect() -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, timeout=60.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")  # an answered analysis survives a power cut
        return conn

    engine = create_engine("sqlite://", creator=connect, poolclass=QueuePool, pool_size=2, max_overflow=8)

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get('sqlite_begin', 'DEFERRED')}")

    return engine


class ServiceStore:
    """The service's tables in one database. Thread-safe; make it with :func:`open_store`."""

    def __init__(self, engine: Engine, display: str) -> None:
        self.engine = engine
        self.display = display
        self.dialect = engine.dialect.name
        self._append_lock = threading.Lock()  # in-process writers queue here rather than on the DB lock

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> ServiceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except MedadvError:
            raise
        except SQLAlchemyError as exc:
            msg = " ".join(str(exc).split("\n")[0].split())[:200]
            raise MedadvError(f"service database {self.display}: {action} failed ({msg}).",
                              "check that the database is reachable and writable; retry.") from exc

    @contextlib.contextmanager
    def _write(self, action: str) -> Iterator[Connection]:
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

    def create(self) -> None:
        with self._write("creating the service tables") as conn:
            if not inspect(conn).has_table("serve_analyses"):  # the triggers come with the tables, once
                metadata.create_all(conn)

    # ------------------------------------------------------------------------------------------ tokens

    def create_token(self, role: str, label: str = "") -> IssuedToken:
        if role not in ROLES:
            raise MedadvError(f"role {role!r} is not one of {', '.join(ROLES)}.", f"pass --role {' or '.join(ROLES)}.")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)  # 32 random bytes
        token_id = secrets.token_hex(6)
        with self._write("issuing a token") as conn:
            conn.execute(insert(tokens).values(token_hash=hash_token(token), token_id=token_id, role=role,
                                               label=label[:200], created_at=utc_now()))
        return IssuedToken(token, token_id, role)

    def lookup_token(self, token: str) -> TokenInfo | None:
        if not token or len(token) > 200:
            return None
        with self._read("checking a token") as conn:
            row = conn.execute(select(tokens.c.token_id, tokens.c.role, tokens.c.label)
                               .where(tokens.c.token_hash == hash_token(token))).first()
        return TokenInfo(row.token_id, row.role, row.label) if row is not None else None

    def token_rows(self) -> list[dict[str, Any]]:
        with self._read("listing tokens") as conn:
            return [dict(r._mapping) for r in conn.execute(select(tokens).order_by(tokens.c.created_at))]

    # ---------------------------------------------------------------------------------------- analyses

    def append_analysis(self, fields: dict[str, Any], key: DeviceKey) -> dict[str, Any]:
        """Chain, sign and store one analysis in one transaction; returns its receipt.

        ``fields``: analysis_id, time, submitter, image_digest, model_digest, result (JSON-able)."""
        return self.append_analyses([fields], key)[0]

    def append_analyses(self, many: list[dict[str, Any]], key: DeviceKey) -> list[dict[str, Any]]:
        """Chain, sign and store analyses in order, all in one transaction (group commit: one fsync for
        the lot); all are stored or none. Returns their receipts."""
        for fields in many:
            canonical_json(fields["result"])  # refuse non-JSON results before taking the lock
        receipts: list[dict[str, Any]] = []
        with self._append_lock, self._write("recording the analysis") as conn:
            head = conn.execute(select(analyses.c.seq, analyses.c.entry_hash)
                                .order_by(analyses.c.seq.desc()).limit(1)).first()
            seq, prev = (int(head.seq), head.entry_hash) if head is not None else (0, GENESIS)
            rows = []
            for fields in many:
                seq += 1
                receipt = sign_receipt(key, fields, seq, prev)
                prev = receipt["ledger"]["entry_hash"]
                rows.append({"seq": seq, "id": fields["analysis_id"], "prev_hash": receipt["ledger"]["prev_hash"],
                             "entry_hash": prev, "created_at": fields["time"], "submitter": fields["submitter"],
                             "image_digest": fields["image_digest"], "model_digest": fields["model_digest"],
                             "receipt": canonical_json(receipt).decode()})
                receipts.append(receipt)
            if rows:
                conn.execute(insert(analyses), rows)
        return receipts

    def get_receipt(self, analysis_id: str) -> tuple[str, dict[str, Any]] | None:
        """(submitter token id, receipt) for one analysis, or None."""
        with self._read("reading an analysis") as conn:
            row = conn.execute(select(analyses.c.submitter, analyses.c.receipt)
                               .where(analyses.c.id == analysis_id)).first()
        return (row.submitter, json.loads(row.receipt)) if row is not None else None

    def list_receipts(self, since_seq: int = 0, since_time: str | None = None,
                      limit: int = 100) -> list[dict[str, Any]]:
        q = select(analyses.c.receipt).where(analyses.c.seq > since_seq)
        if since_time:
            q = q.where(analyses.c.created_at >= since_time)
        with self._read("listing analyses") as conn:
            rows = conn.execute(q.order_by(analyses.c.seq).limit(limit)).all()
        return [json.loads(r.receipt) for r in rows]

    def count(self) -> int:
        with self._read("counting analyses") as conn:
            return int(conn.execute(text("SELECT COUNT(*) FROM serve_analyses")).scalar() or 0)

    def check_chain(self) -> list[str]:
        """Problems with the analyses chain (empty when intact): order, links, and each row's hash."""
        problems: list[str] = []
        prev, expected = GENESIS, 1
        with self._read("checking the analyses chain") as conn:
            for row in conn.execute(select(analyses).order_by(analyses.c.seq)):
                if row.seq != expected:
                    problems.append(f"#{row.seq}: expected #{expected} (rows missing)")
                try:
                    receipt = json.loads(row.receipt)
                    recomputed = entry_hash(chain_entry(receipt, row.seq, row.prev_hash))
                except (ValueError, KeyError, TypeError):
                    problems.append(f"#{row.seq}: the stored receipt is unreadable")
                    recomputed = None
                if row.prev_hash != prev:
                    problems.append(f"#{row.seq}: prev_hash does not match the row before it")
                if recomputed is not None and recomputed != row.entry_hash:
                    problems.append(f"#{row.seq}: its content does not match its entry_hash (edited)")
                prev, expected = row.entry_hash, row.seq + 1
        return problems


def open_store(where: str | os.PathLike[str], *, create: bool = True) -> ServiceStore:
    """The service tables in the database at ``where`` (the ledger's path or URL); the database must exist."""
    kind, loc = resolve_location(where)
    if kind == "sqlite":
        path = Path(loc).absolute()
        if not path.is_file():
            raise MedadvError(f"ledger {path} does not exist.",
                              "create it with `medadv provenance init`, or pass --ledger to an existing ledger.")
        store = ServiceStore(_sqlite_engine(path), str(path))
    else:
        try:
            engine = create_engine(str(loc), pool_size=4, max_overflow=8, isolation_level="READ COMMITTED")
        except (ImportError, SQLAlchemyError) as exc:
            raise MedadvError(f"cannot use database URL for the service ({str(exc)[:120]}).",
                              "install the driver: pip install 'medadv[postgres]'.") from exc
        store = ServiceStore(engine, engine.url.render_as_string(hide_password=True))
    try:
        if create:
            store.create()
    except BaseException:
        store.close()
        raise
    return store
