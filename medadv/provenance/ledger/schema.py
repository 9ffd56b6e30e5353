"""The ledger's storage: its tables, their append-only guards, schema creation and validation, and the
database's own integrity check. Transactions, engines and triggers come from :mod:`medadv.db`.

Tables: ``records`` (one row per entry, hash-chained: :mod:`.rows`), ``nodes`` (the Merkle log's
perfect subtrees, (level, idx) -> hash, so a proof reads O(log n) rows), ``heads`` (a tree head
signed by the log key after every append transaction), ``devices`` (public keys noted by
``add_device``; informational, *never* trusted) and ``ledger_meta`` (schema version, the ledger's
random id).
"""

from __future__ import annotations

import secrets

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.exc import SQLAlchemyError

from medadv.db import AppendOnly, Database, first_line, utc_now
from medadv.errors import MedadvError

SCHEMA = "medadv-ledger/2"

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
GUARD = AppendOnly(("records", "devices", "nodes", "heads"), function="medadv_append_only")
GUARD.attach(metadata)


class Storage(Database):
    """An open ledger's database: transactions (:class:`medadv.db.Database`, under the ledger's append
    lock), the schema, and the ledger's id."""

    NOUN = "ledger"
    LOCK_LABEL = b"medadv-ledger-append"  # every medadv writer of a ledger agrees on this advisory lock
    FIXES = {
        "locked": "another process held the ledger's write lock too long; retry.",
        "corrupt": "the ledger file is corrupt: restore it from a backup (check-ledger cannot repair it).",
        "append-only": "the ledger refuses changes to existing rows; append new records instead.",
        "readonly": "the ledger is read-only here: verify and check-ledger work, appending needs write access.",
        "other": "check the ledger with `medadv provenance check-ledger`; restore it from a backup if it is damaged.",
    }

    def __init__(self, engine: Engine, display: str, readonly: bool = False) -> None:
        super().__init__(engine, display, readonly)
        self._ledger_id: str | None = None

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
        if not (isinstance(lid, str) and 0 < len(lid) <= 64):
            raise MedadvError(f"ledger {self.display} has no valid ledger id.", "restore the ledger from a backup.")
        self._ledger_id = lid

    @property
    def ledger_id(self) -> str:
        assert self._ledger_id is not None
        return self._ledger_id

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
                    bad.append(f"{name}: {first_line(exc)}")
        return "ok" if not bad else "; ".join(bad)[:300]
