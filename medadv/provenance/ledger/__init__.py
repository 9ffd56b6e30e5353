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

The code, by responsibility: :mod:`.rows` (the record, what is signed and hashed), :mod:`.schema` (tables,
guards, schema, integrity; engines, transactions, triggers and the hash chain come from
:mod:`medadv.db`, shared with the service store), :mod:`.reads` (lookups, trust state, proofs),
:mod:`.append` (appending, devices) and :mod:`.checks` (``check-ledger``). :class:`Ledger` is all of them.
"""

from __future__ import annotations

import os

from medadv.db import GENESIS, open_engine, resolve_location, utc_now
from medadv.provenance.ledger.append import Appending
from medadv.provenance.ledger.checks import ChainReport, Checking, Problem, signer_problem
from medadv.provenance.ledger.rows import AppendResult, Entry, Record, RowError, name_stem
from medadv.provenance.ledger.schema import metadata, nodes, records

# What cli.py, serve/, the other provenance modules, the tests and the benchmarks import from here.
__all__ = ["GENESIS", "AppendResult", "ChainReport", "Entry", "Ledger", "Problem", "Record", "RowError", "metadata",
           "name_stem", "nodes", "open_ledger", "records", "resolve_location", "signer_problem", "utc_now"]


class Ledger(Appending, Checking):
    """An open ledger. Make one with :func:`open_ledger`; close it (or use ``with``) when done.

    Storage and transactions (:class:`~.schema.Storage`) < reading (:class:`~.reads.Reading`) <
    appending (:class:`~.append.Appending`) and checking (:class:`~.checks.Checking`)."""

    def __enter__(self) -> Ledger:
        return self


def open_ledger(where: str | os.PathLike[str], *, create: bool = False, readonly: bool = False) -> Ledger:
    """Open the ledger at a path (SQLite) or a ``postgresql+psycopg://`` URL.

    ``create``: make the file/schema when missing (``provenance init`` does); otherwise a missing
    ledger is an error, and nothing is created as a side effect. ``readonly``: for verification and
    checks; works on a SQLite ledger in a folder this process cannot write.
    """
    engine, display = open_engine(where, create=create, readonly=readonly, missing_fix=(
        "create it with `medadv provenance init --org NAME --ledger PATH`, or pass --ledger / set MEDADV_LEDGER "
        "to an existing ledger."))
    ledger = Ledger(engine, display, readonly)
    try:
        if create:
            ledger._create()
        ledger._validate()
    except BaseException:
        ledger.close()
        raise
    return ledger
