"""Is the log we read the log the signed head commits to? Checked before any verdict is trusted.

Revocations, enrolments and rotations are log entries. Someone who can write the database (but holds
no private key) can drop the delete trigger and delete a ``revoke`` row: the Merkle nodes and the
signed heads still commit to it, so an inclusion proof for an image still checks, and a verifier
that reads its trust entries with a query would trust the revoked key again. So verification first
*audits* the log up to the newest signed head: every record ``1..size`` is present, chains on its
predecessor, matches its ``record_hash``, and the Merkle root over *all* of their leaves (images and
trust entries alike) is the head's signed root. Trust entries are then read from that audited log
only (a root-signed revocation found anywhere is honoured as well: withdrawing trust is always safe).

The audit reads the whole log once per process; afterwards each new head is audited incrementally
from the remembered frontier (the service verifies every upload group). What was audited is kept, so
deleting a row after it was audited changes nothing, and a later head that is smaller than, or forks
from, an audited one is caught (this process then serves as a kept head).

A kept head (``--head FILE``, from ``provenance head --out``) catches a truncation that rewrote the
rows, nodes and heads after a revocation consistently: :func:`kept_head_problem` proves the newest
head extends it (RFC 9162 consistency proof).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from medadv.provenance.ledger import GENESIS, Ledger, Record, RowError
from medadv.provenance.merkle import StreamingTree
from medadv.provenance.trust import TRUST_KINDS, TrustState


@dataclass
class Audited:
    """A log prefix checked against a signed head: ``size`` records, Merkle ``root``, the frontier to
    extend it, the last record's hash and the trust entries in it (in order)."""

    size: int
    root: bytes
    tree: StreamingTree
    last_hash: str
    entries: list[Record] = field(default_factory=list)


_LOCK = threading.Lock()
_AUDITED: dict[tuple[str, str], Audited] = {}  # (ledger display, ledger id) -> the largest audited prefix


def _copy(tree: StreamingTree) -> StreamingTree:
    return StreamingTree(tree.size, list(tree.stack))


def _extend(ledger: Ledger, base: Audited | None, size: int) -> tuple[Audited | None, str | None]:
    """Audit records ``base.size + 1 .. size`` on top of ``base`` (None: from the start)."""
    start = base.size if base else 0
    tree = _copy(base.tree) if base else StreamingTree()
    prev = base.last_hash if base else GENESIS
    entries = list(base.entries) if base else []
    expected = start + 1
    for rec in ledger.iter_rows(after=start, upto=size):
        if isinstance(rec, RowError):
            if not isinstance(rec.seq, int) or isinstance(rec.seq, bool):
                continue  # a row at no log position (seq 2.5): inserted noise, `corrupt` where it is matched
            return None, f"record {rec.label} is corrupt ({rec.reason})"
        if rec.seq != expected:
            return None, f"record #{expected} is missing (deleted)"
        if rec.prev_hash != prev:
            return None, f"record #{rec.seq} does not chain on record #{rec.seq - 1} (deleted, reordered or replaced)"
        if rec.compute_hash() != rec.record_hash:
            return None, f"record #{rec.seq}'s content does not match its record_hash (edited)"
        tree.append(rec.leaf())
        if rec.kind in TRUST_KINDS:
            entries.append(rec)
        prev, expected = rec.record_hash, expected + 1
    if expected != size + 1:
        return None, f"records #{expected}-#{size} are missing (deleted)"
    return Audited(size, tree.root(), tree, prev, entries), None


def audit(ledger: Ledger, head: dict[str, Any]) -> tuple[Audited | None, str | None]:
    """(the audited log, None) when records ``1..head['size']`` are exactly the log ``head`` commits to;
    (None, why) otherwise. ``head`` must already be a valid signed head (its signature is not checked here)."""
    size, root = head["size"], bytes.fromhex(head["root"])
    key = (ledger.display, ledger.ledger_id)
    with _LOCK:  # one audit at a time per process: a service's threads share the work
        known = _AUDITED.get(key)
        if known is not None and known.size > size:
            return None, (f"the newest signed head covers {size} records, but a head of {known.size} records was "
                          "audited before: the log was truncated")
        if known is not None and known.size == size:
            if known.root != root:
                return None, f"a signed head of {size} records with another root than the one audited before: the " \
                             "log was rewritten"
            return known, None
        got, why = _extend(ledger, known, size)
        if got is None:
            return None, why
        if got.root != root:
            what = "the records" if known is None else f"the records after the {known.size} audited before"
            return None, f"{what} do not give the signed head's Merkle root (the log was altered)"
        _AUDITED[key] = got
        return got, None


def audited_state(ledger: Ledger, state: TrustState, audited: Audited) -> TrustState:
    """The trust state from the audited entries only, plus every valid root-signed revocation in ``state``
    (the query's), wherever it is: trust may be withdrawn from outside the audited log, never granted."""
    out = ledger.trust_state_of(state.root, audited.entries)
    for kid, eff in state.revoked.items():
        out.revoked[kid] = min(out.revoked.get(kid, eff), eff)
    out.problems.extend(p for p in state.problems if p not in out.problems)
    return out


def kept_head_problem(ledger: Ledger, kept: Any, head: dict[str, Any] | None, state: TrustState) -> str | None:
    """Why the log's newest head ``head`` does not extend the kept head ``kept`` (None when it does)."""
    from medadv.provenance.ledger import ChainReport

    problems = ledger._consistency(kept, head, state, ChainReport(ledger.display))
    return problems[0].reason if problems else None


def forget() -> None:
    """Drop what this process audited (as a new process starts): the next verification audits from scratch."""
    with _LOCK:
        _AUDITED.clear()
