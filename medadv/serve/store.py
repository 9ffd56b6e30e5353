"""The service's own tables, in the ledger's database (same URL: SQLite file or PostgreSQL).

* ``serve_analyses``: one row per analysis, hash-chained (``prev_hash`` = the previous row's
  ``entry_hash``; 64 zeros for the first), holding the signed receipt. A row is written in one
  transaction that holds the table's append lock from its first statement (``BEGIN IMMEDIATE`` on
  SQLite, an advisory lock on PostgreSQL), so concurrent writers never fork the chain and a crash
  leaves either the whole row or nothing. Append-only: triggers refuse UPDATE and DELETE.
* ``serve_tokens``: bearer tokens, stored as ``sha256(token)`` only, with a role (submitter, reader,
  admin), a short public id, and optionally when it expires and when it was revoked (both checked on
  every request). The token itself is shown once, when it is made. A database made before expiry and
  revocation existed gets the two columns (NULL: never expires, not revoked) the first time it is opened
  for writing (:meth:`ServiceStore.create`).

The provenance ledger's tables are never written here. Engines, transactions, the append-only triggers
and the hash chain come from :mod:`medadv.db`, as the ledger's do.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    MetaData,
    String,
    Table,
    Text,
    insert,
    inspect,
    select,
    text,
    update,
)

from medadv.db import GENESIS, AppendOnly, ChainWalker, Database, chain_head, open_engine, utc_now
from medadv.errors import MedadvError
from medadv.provenance.digest import canonical_json
from medadv.provenance.keys import DeviceKey
from medadv.serve.receipts import chain_entry, entry_hash, load_receipt_json, sign_receipt

ROLES = ("submitter", "reader", "admin")
PUBLIC_TOKEN_FIELDS = ("token_id", "role", "label", "created_at", "expires_at", "revoked_at")  # never the hash
TOKEN_PREFIX = "mdv_"

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
    Column("expires_at", String(40), nullable=True),  # utc_now() format; NULL: never
    Column("revoked_at", String(40), nullable=True),  # NULL: not revoked
)
TOKEN_COLUMNS_ADDED = ("expires_at", "revoked_at")  # after the first release: migrated in place
MAX_TOKEN_LIFETIME = timedelta(days=3650)
_DURATION = re.compile(r"([1-9][0-9]{0,5})([mhdw])")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
GUARD = AppendOnly(("serve_analyses",), function="medadv_serve_append_only")  # tokens are revocable: no guard
GUARD.attach(metadata)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def parse_duration(value: str) -> timedelta:
    """``30d``, ``12h``, ``45m``, ``2w`` -> a timedelta (ASCII digits, one unit, at most ten years)."""
    m = _DURATION.fullmatch(value.strip())
    span = int(m.group(1)) * _UNITS[m.group(2)] if m else None
    if span is None or span > MAX_TOKEN_LIFETIME:
        raise MedadvError(f"--expires-in {value[:20]!r} is not a duration of at most ten years (a number and one of "
                          "m, h, d, w).", "pass e.g. --expires-in 30d or --expires-in 12h.")
    return span


def _parse_time(stamp: str | None) -> datetime | None:
    """A stored time (utc_now() format) as an aware datetime; None when it cannot be read."""
    try:
        when = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except (ValueError, TypeError):
        return None
    return when if when.tzinfo is not None else None


@dataclass(frozen=True)
class TokenInfo:
    token_id: str
    role: str
    label: str
    expires_at: str | None = None
    revoked_at: str | None = None

    def refusal(self, now: datetime | None = None) -> str | None:
        """Why this token may not be used at ``now`` (revoked, expired), or None. A stored time that
        cannot be read counts as past (fail closed)."""
        now = now or datetime.now(timezone.utc)
        if self.revoked_at is not None:
            return f"token {self.token_id} was revoked at {self.revoked_at}"
        if self.expires_at is not None:
            when = _parse_time(self.expires_at)
            if when is None or when <= now:
                return f"token {self.token_id} expired at {self.expires_at}"
        return None


@dataclass(frozen=True)
class IssuedToken:
    token: str  # shown once; only its sha256 is stored
    token_id: str
    role: str
    expires_at: str | None = None


def _stamp(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class ServiceStore(Database):
    """The service's tables in one database. Thread-safe; make it with :func:`open_store`."""

    NOUN = "service database"
    LOCK_LABEL = b"medadv-serve-analyses-append"  # not the ledger's: analyses never wait on registrations

    def __init__(self, engine: Engine, display: str) -> None:
        super().__init__(engine, display)
        self._append_lock = threading.Lock()  # in-process writers queue here rather than on the DB lock

    def __enter__(self) -> ServiceStore:
        return self

    def create(self) -> None:
        with self._write("creating the service tables") as conn:
            if not inspect(conn).has_table("serve_analyses"):  # the triggers come with the tables, once
                metadata.create_all(conn)
            elif not inspect(conn).has_table("serve_tokens"):
                metadata.create_all(conn, tables=[tokens])
            else:
                self._migrate_tokens(conn)

    def _migrate_tokens(self, conn: Connection) -> None:
        """Add the expiry and revocation columns to a token table made before them (under the write lock,
        so two processes opening an old database at once add them once). Old tokens: NULL, NULL."""
        have = {c["name"] for c in inspect(conn).get_columns("serve_tokens")}
        for name in TOKEN_COLUMNS_ADDED:
            if name not in have:
                conn.execute(text(f"ALTER TABLE serve_tokens ADD COLUMN {name} VARCHAR(40)"))

    def _check_token_schema(self, conn: Connection) -> None:
        have = {c["name"] for c in inspect(conn).get_columns("serve_tokens")}
        missing = [n for n in TOKEN_COLUMNS_ADDED if n not in have]
        if missing:
            raise MedadvError(f"service database {self.display}: its token table predates token expiry and "
                              f"revocation (no {', '.join(missing)} column).",
                              "open it once for writing (e.g. `medadv serve token list`) to add the columns.")

    # ------------------------------------------------------------------------------------------ tokens

    def create_token(self, role: str, label: str = "", expires_in: timedelta | None = None) -> IssuedToken:
        """A new token of ``role``; ``expires_in``: refused on every request after that long (None: never)."""
        if role not in ROLES:
            raise MedadvError(f"role {role!r} is not one of {', '.join(ROLES)}.", f"pass --role {' or '.join(ROLES)}.")
        if expires_in is not None and not timedelta(0) < expires_in <= MAX_TOKEN_LIFETIME:
            raise MedadvError("a token's lifetime must be positive and at most ten years.",
                              "pass e.g. --expires-in 30d.")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)  # 32 random bytes
        token_id = secrets.token_hex(6)
        now = datetime.now(timezone.utc)
        expires = None if expires_in is None else _stamp(now + expires_in)
        with self._write("issuing a token") as conn:
            conn.execute(insert(tokens).values(token_hash=hash_token(token), token_id=token_id, role=role,
                                               label=label[:200], created_at=_stamp(now), expires_at=expires))
        return IssuedToken(token, token_id, role, expires)

    def lookup_token(self, token: str) -> TokenInfo | None:
        """The token's row (its expiry and revocation included: :meth:`TokenInfo.refusal`), or None."""
        if not token or len(token) > 200:
            return None
        with self._read("checking a token") as conn:
            row = conn.execute(select(tokens.c.token_id, tokens.c.role, tokens.c.label, tokens.c.expires_at,
                                      tokens.c.revoked_at)
                               .where(tokens.c.token_hash == hash_token(token))).first()
        if row is None:
            return None
        return TokenInfo(row.token_id, row.role, row.label, row.expires_at, row.revoked_at)

    def token_rows(self) -> list[dict[str, Any]]:
        """Every token without its hash: token_id, role, label, created_at, expires_at, revoked_at."""
        cols = [tokens.c[n] for n in PUBLIC_TOKEN_FIELDS]
        with self._read("listing tokens") as conn:
            self._check_token_schema(conn)
            return [dict(r._mapping) for r in conn.execute(select(*cols).order_by(tokens.c.created_at))]

    def revoke_token(self, token_id: str) -> tuple[dict[str, Any], bool]:
        """Revoke the token ``token_id`` from now on: (its row, whether it was revoked already). Raises
        :class:`MedadvError` when no token has that id."""
        token_id = token_id.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{1,32}", token_id):
            raise MedadvError(f"{token_id[:40]!r} is not a token id (hex digits, as `medadv serve token list` "
                              "shows them).", "pass the id column of `medadv serve token list`.")
        with self._write("revoking a token") as conn:
            self._check_token_schema(conn)
            changed = conn.execute(update(tokens).where(tokens.c.token_id == token_id, tokens.c.revoked_at.is_(None))
                                   .values(revoked_at=utc_now())).rowcount
            row = conn.execute(select(*[tokens.c[n] for n in PUBLIC_TOKEN_FIELDS])
                               .where(tokens.c.token_id == token_id)).first()
        if row is None:
            raise MedadvError(f"no token has id {token_id}.", "list the tokens with `medadv serve token list`.")
        return dict(row._mapping), changed == 0

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
        with self._append_lock:
            return self.transact("recording the analysis", lambda conn: self._append(conn, many, key))

    def _append(self, conn: Connection, many: list[dict[str, Any]], key: DeviceKey) -> list[dict[str, Any]]:
        """Sign and insert ``many`` after the chain's head, in the open write transaction ``conn`` (it may run
        again: nothing here outlives the transaction)."""
        try:
            head = chain_head(conn, analyses, "entry_hash")
        except ValueError as exc:
            raise MedadvError(f"service database {self.display}: in the analyses chain, {exc}.",
                              "tell the service's operator (`check_chain` names the row).") from None
        seq, prev = (head.seq, head.entry_hash) if head is not None else (0, GENESIS)
        receipts: list[dict[str, Any]] = []
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
        return (row.submitter, _stored_receipt(row.receipt, analysis_id)) if row is not None else None

    def list_receipts(self, since_seq: int = 0, since_time: str | None = None,
                      limit: int = 100) -> list[dict[str, Any]]:
        q = select(analyses.c.seq, analyses.c.receipt).where(analyses.c.seq > since_seq)
        if since_time:
            q = q.where(analyses.c.created_at >= since_time)
        with self._read("listing analyses") as conn:
            rows = conn.execute(q.order_by(analyses.c.seq).limit(limit)).all()
        return [_stored_receipt(r.receipt, f"#{r.seq}") for r in rows]

    def count(self) -> int:
        with self._read("counting analyses") as conn:
            return int(conn.execute(text("SELECT COUNT(*) FROM serve_analyses")).scalar() or 0)

    def check_chain(self) -> list[str]:
        """Problems with the analyses chain (empty when intact): order, links, and each row's hash."""
        words = {"gap": "expected #{m} (rows missing)", "link": "prev_hash does not match the row before it",
                 "unreadable": "the stored receipt is unreadable",
                 "edited": "its content does not match its entry_hash (edited)"}
        problems: list[str] = []
        walker = ChainWalker()
        with self._read("checking the analyses chain") as conn:
            for row in conn.execute(select(analyses).order_by(analyses.c.seq)):
                try:
                    receipt = load_receipt_json(row.receipt)
                    recomputed: str | None = entry_hash(chain_entry(receipt, row.seq, row.prev_hash))
                except (MedadvError, ValueError, KeyError, TypeError):
                    recomputed = None
                problems.extend(f"#{b.seq}: " + words[b.kind].format(m=b.missing_from)
                                for b in walker.step(row.seq, row.prev_hash, row.entry_hash, recomputed))
        return problems


def _stored_receipt(stored: str, which: str) -> dict[str, Any]:
    """A stored receipt, parsed strictly: one that is not a receipt-sized JSON object was written by someone
    other than the service (an edit in the database): a one-line 503 naming it, never a 500."""
    from medadv.serve.analysis import ServiceError

    try:
        receipt = load_receipt_json(stored, f"the stored receipt of analysis {which}")
    except MedadvError as exc:
        raise ServiceError(503, f"{exc.what.rstrip('.')}: the service's record was edited in the database.",
                           "tell the service's operator (the analyses chain check names the row).") from None
    if not isinstance(receipt, dict):
        raise ServiceError(503, f"the stored receipt of analysis {which} is not a JSON object: the service's "
                                "record was edited in the database.", "tell the service's operator.")
    return receipt


def open_store(where: str | os.PathLike[str], *, create: bool = True) -> ServiceStore:
    """The service tables in the database at ``where`` (the ledger's path or URL); the database must exist."""
    # connections kept open (no overflow): under 32 clients an overflow connection was opened and closed
    # per token check; the cap (12) is what pool 4 + overflow 8 allowed before
    engine, display = open_engine(where, pool_size=12, max_overflow=0, missing_fix=(
        "create it with `medadv provenance init`, or pass --ledger to an existing ledger."))
    store = ServiceStore(engine, display)
    try:
        if create:
            store.create()
    except BaseException:
        store.close()
        raise
    return store
