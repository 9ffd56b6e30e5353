"""Reading the ledger: counts, the head, signed tree heads, lookups by digest and identity, every row in
order (validated: a corrupt row is a :class:`~.rows.RowError`, never a traceback), the trust state the
root's entries give, and the Merkle nodes proofs need."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import Connection, func, select

from medadv import strictjson
from medadv.db import GENESIS, as_int, chunks, is_hex
from medadv.errors import MedadvError
from medadv.provenance.keys import PublicKey, key_id, load_public_pem
from medadv.provenance.ledger.rows import Record, RowError, name_stem
from medadv.provenance.ledger.schema import Storage, heads, nodes, records
from medadv.provenance.merkle import needed_nodes
from medadv.provenance.trust import Enrollment, TrustRoot, TrustState, head_problem

HEAD_MAX_BYTES = 1 << 16
CHUNK = 500  # values per IN (...) query


class Reading(Storage):
    """What every reader of a ledger needs (verification, the audit, checks, the appender's courtesy checks)."""

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
        return (row.seq, row.record_hash) if as_int(row.seq) is not None else (0, str(row.record_hash))

    def signed_heads(self) -> list[tuple[Any, Any]]:
        """Every stored head as (size column, decoded body or the raw text), by size."""
        with self._read("reading tree heads") as conn:
            rows = conn.execute(select(heads.c.size, heads.c.body).order_by(heads.c.size)).all()
        out = []
        for r in rows:
            try:
                body = strictjson.loads(r.body, max_bytes=HEAD_MAX_BYTES, max_depth=4) \
                    if isinstance(r.body, str) else r.body
            except MedadvError:
                body = r.body  # not a head: head_problem says so
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
            for chunk in chunks(values, CHUNK):
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

    def iter_rows(self, batch: int = 2000, *, after: int = 0, upto: int | None = None) -> Iterator[Record | RowError]:
        """Every row in sequence order, validated, read in pages (constant memory). Never loops: paging
        follows the raw ``seq`` values, and stops at values that do not order (text in SQLite).

        Rows with a seq of 0 or below come first (as corrupt rows, so check-ledger names them). With
        ``after``/``upto``: only rows with ``after < seq <= upto`` (and no seq-0-or-below rows)."""
        last: Any = after
        if after == 0 and upto is None:
            with self._read("reading records") as conn:
                low = conn.execute(select(records).where(records.c.seq <= 0).order_by(records.c.seq)
                                   .limit(10_000)).all()
            for row in low:
                try:
                    yield Record.from_row(row)
                except RowError as exc:
                    yield exc
        while True:
            with self._read("reading records") as conn:
                q = select(records).where(records.c.seq > last)
                if upto is not None:
                    q = q.where(records.c.seq <= upto)
                rows = conn.execute(q.order_by(records.c.seq).limit(batch)).all()
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

    def trust_state(self, root: TrustRoot) -> TrustState:
        """The keys the trust root vouches for in this ledger, from its root-signed entries (only)."""
        found = self._lookup("kind", ["enroll", "revoke", "log-key"], kind=None)
        return self.trust_state_of(root, [r for v in found.values() for r in v])

    def trust_state_of(self, root: TrustRoot, rows: Iterable[Record | RowError]) -> TrustState:
        """What the root vouches for in the trust entries ``rows`` (any order; sorted here by seq)."""
        state = TrustState(root, self.ledger_id)
        rows = sorted(rows, key=lambda r: r.seq if isinstance(r, Record) else 0)
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
        if not is_hex(m.get("subject_key_id"), 32):
            return "it names no subject key"
        if rec.kind in ("enroll", "log-key"):
            if not isinstance(m.get("public_key"), str):
                return "it carries no public key"
            try:
                if key_id(load_public_pem(m["public_key"], "entry")) != m["subject_key_id"]:
                    return "its public key does not match its key id"
            except MedadvError:
                return "its public key is not a PEM Ed25519 key"
        if rec.kind == "revoke" and (as_int(m.get("effective_seq")) is None or m["effective_seq"] < 1):
            return "its effective_seq is not a positive integer"
        return None

    def _fetch_nodes(self, conn: Connection, want: set[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        out: dict[tuple[int, int], bytes] = {}
        by_level: dict[int, list[int]] = {}
        for level, idx in want:
            by_level.setdefault(level, []).append(idx)
        for level, idxs in by_level.items():
            for chunk in chunks(sorted(idxs), CHUNK):
                for r in conn.execute(select(nodes.c.idx, nodes.c.hash)
                                      .where(nodes.c.level == level, nodes.c.idx.in_(chunk))):
                    if as_int(r.idx) is not None and is_hex(r.hash, 64):
                        out[(level, r.idx)] = bytes.fromhex(r.hash)
        return out

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
