"""Checking the ledger (``check-ledger``): the database's integrity, every row's types, the hash chain
(:class:`medadv.db.ChainWalker`), every signature against the keys the trust root vouches for, the
ledger id, the monotone log clock, the Merkle tree against every stored signed head, and a kept head's
consistency proof (RFC 9162)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medadv.db import GENESIS, Break, ChainWalker, as_int
from medadv.progress import SILENT, Monitor
from medadv.provenance.ledger.reads import Reading
from medadv.provenance.ledger.rows import Record, RowError
from medadv.provenance.merkle import StreamingTree, consistency_path, root_hash, verify_consistency
from medadv.provenance.trust import TrustRoot, TrustState, head_problem


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


def _chain_problem(b: Break) -> Problem:
    """check-ledger's words for a fault the chain walker found."""
    if b.kind == "gap":
        gap = f"record {b.missing_from} is missing" if b.seq == b.missing_from + 1 else \
            f"records {b.missing_from}-{b.seq - 1} are missing"
        return Problem(b.seq, f"{gap} (deleted)")
    if b.kind == "link":
        return Problem(b.seq, "its prev_hash does not match the record before it "
                              "(a record was deleted, reordered or replaced)")
    return Problem(b.seq, "its content does not match its record_hash (the row was edited)")


@dataclass
class _Walk:
    """What walking the rows found: the Merkle tree over them, its roots at the stored heads' sizes."""

    tree: StreamingTree = field(default_factory=StreamingTree)
    roots: dict[int, bytes] = field(default_factory=dict)


class Checking(Reading):
    """``check-ledger``: walk the whole log and report every problem with its sequence number."""

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
        head_at: dict[int, list[Any]] = {}
        for size, body in self.signed_heads():
            if as_int(size) is None:
                problems.append(Problem(None, f"a stored tree head has size {str(size)[:20]!r}"))
                continue
            head_at.setdefault(size, []).append(body)
        walk = self._walk_rows(root, state, head_at, report, problems, monitor)
        latest = self._check_heads(head_at, walk, state, problems)
        report.signed_head = latest
        if old_head is not None:
            problems.extend(self._consistency(old_head, latest, state, report))
        report.problems = problems[:max_problems]
        report.more_problems = max(0, len(problems) - max_problems)
        return report

    def _walk_rows(self, root: TrustRoot, state: TrustState, head_at: dict[int, list[Any]], report: ChainReport,
                   problems: list[Problem], monitor: Monitor) -> _Walk:
        """Every row in order: types, chain, ledger id, log clock, signer; builds the Merkle tree."""
        walk = _Walk()
        walk.roots[0] = walk.tree.root()
        chain = ChainWalker()
        last_time = ""
        total, seen = self.count(), 0
        for rec in monitor.track(self.iter_rows(), "checking the log", total=total):
            seen += 1
            if isinstance(rec, RowError):
                problems.append(Problem(as_int(rec.seq), f"row {rec.label} is corrupt: {rec.reason}"))
                continue
            problems.extend(_chain_problem(b) for b in chain.step(rec.seq, rec.prev_hash, rec.record_hash,
                                                                   rec.compute_hash()))
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
            walk.tree.append(rec.leaf())
            walk.roots[walk.tree.size] = walk.tree.root() if walk.tree.size in head_at else b""
            last_time = max(last_time, rec.logged_at)
            report.records += 1
            report.head_seq, report.head_hash = rec.seq, rec.record_hash
        if seen != total:
            problems.append(Problem(None, f"{total - seen} rows could not be read in sequence order"))
        return walk

    def _check_heads(self, head_at: dict[int, list[Any]], walk: _Walk, state: TrustState,
                     problems: list[Problem]) -> dict[str, Any] | None:
        """Every stored signed head against the walked tree; returns the latest valid one."""
        tree = walk.tree
        latest = None
        for size in sorted(head_at):
            for body in head_at[size]:
                why = head_problem(body, state.log_keys, self.ledger_id)
                if why is None and body["size"] != size:
                    why = "its size differs from its row"
                if why is None and size > tree.size:
                    why = f"it covers {size} records but the log has {tree.size} (records were deleted)"
                if why is None and bytes.fromhex(body["root"]) != walk.roots.get(size):
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
        if latest is not None:
            size = latest["size"]
            got = self.proofs({"root": lambda p: root_hash(size, p)})["root"]
            if got is None or got.hex() != latest["root"]:
                problems.append(Problem(None, "the stored Merkle nodes do not give the signed head's root "
                                              "(the nodes table was edited)"))
        return latest

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
