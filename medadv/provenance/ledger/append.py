"""Appending to the ledger: signed records in batches, each batch one transaction (:meth:`medadv.db.Database.transact`)
that extends the hash chain and the Merkle log and stores a tree head signed by the log key; and the
informational ``devices`` table. Concurrent writers never fork the chain: the transaction holds the
ledger's append lock from its first statement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import Connection, func, insert, select
from sqlalchemy.exc import IntegrityError

from medadv.db import GENESIS, as_int, chain_head, chunks, first_line, utc_now
from medadv.errors import MedadvError
from medadv.progress import SILENT, Monitor
from medadv.provenance.digest import ImageDigest, canonical_json
from medadv.provenance.keys import DeviceKey, check_device_name, key_id, public_pem
from medadv.provenance.ledger.reads import Reading
from medadv.provenance.ledger.rows import AppendResult, Entry, Record, load_meta, name_stem
from medadv.provenance.ledger.schema import devices, heads, nodes, records
from medadv.provenance.merkle import StreamingTree, frontier
from medadv.provenance.trust import sign_head


class Appending(Reading):
    """Writing a ledger: devices (informational), courtesy checks on the signer, and appends."""

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
                meta = load_meta(r.meta)
            except MedadvError:
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

    def require_not_revoked(self, signer: DeviceKey) -> None:
        """Fail before writing anything when a revoke entry names ``signer``'s key: its records would all be
        ``revoked``, so say so at registration (a courtesy check, like :meth:`require_enrolled`)."""
        with self._read("reading revocations") as conn:
            revokes = conn.execute(select(records.c.seq, records.c.meta).where(records.c.kind == "revoke")).all()
        for r in revokes:
            try:
                meta = load_meta(r.meta)
            except MedadvError:
                continue
            eff = meta.get("effective_seq") if isinstance(meta, dict) else None
            if isinstance(meta, dict) and meta.get("subject_key_id") == signer.key_id \
                    and (as_int(eff) is None or eff <= self.head()[0] + 1):
                raise MedadvError(
                    f"the key of device {signer.device} (key id {signer.key_id}) was revoked in ledger "
                    f"{self.display} (entry #{r.seq}, from record #{meta.get('effective_seq')}): records it signs "
                    "would not verify.", "make a new key with `medadv provenance keygen` and have the organisation "
                    "enrol it (`medadv provenance rotate REQUEST --root-key ORG.root.key`).")

    def _frontier(self, conn: Connection, size: int) -> StreamingTree:
        want = frontier(size)
        got = self._fetch_nodes(conn, set(want))
        missing = [n for n in want if n not in got]
        if missing:
            raise MedadvError(f"ledger {self.display}: the Merkle log has no node {missing[0]} for {size} records.",
                              "run `medadv provenance check-ledger`; restore the ledger from a backup.")
        return StreamingTree(size, [got[n] for n in want])

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
        batches = list(chunks(list(entries), batch_size))
        for batch in monitor.track(batches, "appending to the ledger", total=len(batches)):
            part = self.transact("appending records",
                                 lambda conn, b=batch: self._append_batch(conn, b, signer, log_key, skip_present))
            result.skipped += part.skipped
            result.added += part.added
            if part.added:
                result.first_seq = result.first_seq or part.first_seq
                result.last_seq, result.head_hash, result.head = part.last_seq, part.head_hash, part.head
        return result

    def _append_batch(self, conn: Connection, batch: Sequence[Entry], signer: DeviceKey, log_key: DeviceKey,
                      skip_present: bool) -> AppendResult:
        """One batch in the open write transaction ``conn``; touches nothing outside it (it may run again)."""
        part = AppendResult()
        try:
            head = chain_head(conn, records, "record_hash", "logged_at")
        except ValueError as exc:
            raise MedadvError(f"ledger {self.display}: {exc}.",
                              "run `medadv provenance check-ledger`; restore the ledger from a backup.") from None
        if head is not None and not isinstance(head.logged_at, str):
            raise MedadvError(f"ledger {self.display}: the newest row is corrupt ({str(head.seq)[:20]!r}).",
                              "run `medadv provenance check-ledger`; restore the ledger from a backup.")
        seq, prev = (head.seq, head.record_hash) if head is not None else (0, GENESIS)
        last_time = head.logged_at if head is not None else ""
        tree = self._frontier(conn, seq)
        present: set[tuple[str, str]] = set()
        if skip_present:
            present = {(r.digest, r.name) for r in conn.execute(
                select(records.c.digest, records.c.name)
                .where(records.c.digest.in_({e.digest for e in batch}), records.c.key_id == signer.key_id,
                       records.c.kind == "image"))}
        rows: list[dict[str, Any]] = []
        node_rows: list[dict[str, Any]] = []
        for e in batch:
            if skip_present and (e.digest, e.name) in present:
                part.skipped += 1
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
            part.first_seq = part.first_seq or seq
            part.last_seq, part.head_hash = seq, prev
        if rows:
            signed = sign_head(log_key, self.ledger_id, tree.size, tree.root(), last_time)
            try:
                conn.execute(insert(records), rows)
                conn.execute(insert(nodes), node_rows)
                conn.execute(insert(heads).values(size=tree.size, body=canonical_json(signed).decode()))
            except IntegrityError as exc:  # cannot happen under the lock; refuse rather than fork
                raise MedadvError(f"ledger {self.display} refused a record that would fork the chain "
                                  f"({first_line(exc)}).", "retry; if it persists, run check-ledger.") from exc
            part.head = signed
        part.added = len(rows)
        return part

    def append(self, items: Sequence[ImageDigest], signer: DeviceKey, log_key: DeviceKey, *, batch_size: int = 256,
               monitor: Monitor = SILENT) -> AppendResult:
        """Sign and append image records (skipping ones this key already registered under the same name)."""
        if not isinstance(batch_size, int) or not 1 <= batch_size <= 100_000:
            raise MedadvError(f"batch size {batch_size} is not between 1 and 100000.", "pass --batch-size 1 or more.")
        self.require_enrolled(signer)
        return self.append_entries([Entry.image(i, signer.device) for i in items], signer, log_key,
                                   batch_size=batch_size, skip_present=True, monitor=monitor)
