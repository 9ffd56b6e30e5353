"""medadv/db.py is the one database layer under the provenance ledger and the service store: both get their
engines, transactions, append-only triggers and hash chain from it. Checked as an insider would (raw SQL
on the database file or server, no private key), on SQLite and, with MEDADV_TEST_POSTGRES_URL, PostgreSQL."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest
from provenance_support import drop_guards, ledger_where, make_device, make_org, pg_url, raw_sql  # noqa: F401
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, insert, select, text
from sqlalchemy.exc import OperationalError

from medadv import db
from medadv.errors import MedadvError
from medadv.provenance.digest import canonical_json
from medadv.provenance.keys import generate_key
from medadv.provenance.ledger import open_ledger, schema
from medadv.provenance.ledger.rows import SIGN_DOMAIN
from medadv.serve import store as store_mod
from medadv.serve.receipts import ENTRY_DOMAIN, chain_entry, load_or_create_service_key, load_receipt_json
from medadv.serve.store import open_store


def _fields(i: int) -> dict:
    return {"analysis_id": f"{i:024x}", "time": f"2026-01-01T00:00:0{i}.000000Z", "submitter": "t1",
            "image_digest": f"{i:064x}", "model_digest": "f" * 64, "result": {"diagnosis": {"p": i / 10}}}


def _both(where: str, tmp: Path):
    """A ledger with a device enrolled (so ``records`` has rows) and the service's table with three analyses."""
    org = make_org(where, tmp / "keys")
    for name in ("ct-1", "ct-2", "ct-3"):
        make_device(where, tmp / "keys", name)
    key = generate_key("service", tmp / "svc")
    with open_store(where) as store:
        store.append_analyses([_fields(i) for i in (1, 2, 3)], key)
    return org


def _sql_rows(where: str, sql: str) -> list:
    if "://" in where:
        engine = create_engine(where)
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(sql)).all())
        finally:
            engine.dispose()
    con = sqlite3.connect(where)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def test_both_get_their_guards_from_one_description():
    assert isinstance(schema.GUARD, db.AppendOnly) and isinstance(store_mod.GUARD, db.AppendOnly)
    assert schema.GUARD.tables == ("records", "devices", "nodes", "heads")
    assert store_mod.GUARD.tables == ("serve_analyses",)
    # same template: the store's statements are the ledger's with the table (and function) renamed
    led = schema.GUARD.statements("sqlite")[0]
    assert store_mod.GUARD.statements("sqlite")[0] == led.replace("records", "serve_analyses")
    pg_led = schema.GUARD.statements("postgresql")
    pg_store = store_mod.GUARD.statements("postgresql")
    assert pg_store[0] == pg_led[0].replace("medadv_append_only", "medadv_serve_append_only")
    assert pg_store[1:] == [s.replace("records", "serve_analyses").replace("medadv_append_only",
                                                                           "medadv_serve_append_only")
                            for s in pg_led[1:3]]


def test_update_and_delete_on_either_table_are_refused_with_the_same_text(ledger_where, tmp_path):  # noqa: F811
    where = ledger_where
    _both(where, tmp_path)
    if "://" not in where:  # the triggers in the file are exactly what db.AppendOnly writes
        stored = dict(_sql_rows(where, "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
        for guard in (schema.GUARD, store_mod.GUARD):
            for stmt in guard.statements("sqlite"):
                assert stored[stmt.split()[2]] == stmt
    for table in ("records", "serve_analyses"):
        for sql in (f"UPDATE {table} SET prev_hash = prev_hash", f"DELETE FROM {table}"):
            with pytest.raises(Exception) as caught:
                raw_sql(where, sql)
            assert db.AppendOnly.message(table) in str(caught.value), (sql, caught.value)
    if "://" in where:
        for table in ("records", "serve_analyses"):
            with pytest.raises(Exception, match=db.AppendOnly.message(table)):
                raw_sql(where, f"TRUNCATE {table}")


def test_one_chain_walker_verifies_both_chains_and_catches_an_insider(ledger_where, tmp_path):  # noqa: F811
    where = ledger_where
    org = _both(where, tmp_path)

    def walk_records():
        with open_ledger(where) as book:
            return db.ChainWalker().walk((r.seq, r.prev_hash, r.record_hash, r.compute_hash())
                                         for r in book.iter_records())

    def walk_analyses():
        rows = _sql_rows(where, "SELECT seq, prev_hash, entry_hash, receipt FROM serve_analyses ORDER BY seq")
        return db.ChainWalker().walk(
            (s, p, h, db.row_digest(ENTRY_DOMAIN, canonical_json(chain_entry(load_receipt_json(r), s, p))))
            for s, p, h, r in rows)

    assert walk_records() == [] and walk_analyses() == []
    with open_ledger(where) as book:  # each record's hash is db.row_digest over the ledger's domain and content
        rec = next(book.iter_records())
        assert rec.compute_hash() == db.row_digest(SIGN_DOMAIN, rec._content(), b"\n", rec.signature.encode())
        assert book.count() >= 4  # the root's log-key entry and three enrollments
    # an insider drops the guards, edits one row of each table and deletes another
    drop_guards(where)
    raw_sql(where, "DROP TRIGGER serve_analyses_append_only ON serve_analyses" if "://" in where
            else "DROP TRIGGER serve_analyses_no_update", *([] if "://" in where
                                                             else ["DROP TRIGGER serve_analyses_no_delete"]))
    raw_sql(where, "UPDATE records SET name = 'edited.png' WHERE seq = 2", "DELETE FROM records WHERE seq = 3",
            "UPDATE serve_analyses SET receipt = replace(receipt, '\"submitter\":\"t1\"', '\"submitter\":\"t9\"') "
            "WHERE seq = 3", "DELETE FROM serve_analyses WHERE seq = 1")
    kinds = {(b.seq, b.kind) for b in walk_records()}
    assert {(2, "edited"), (4, "gap"), (4, "link")} <= kinds, kinds
    assert {(b.seq, b.kind) for b in walk_analyses()} == {(2, "gap"), (2, "link"), (3, "edited")}
    # and both stores' own checks, which walk with the same helper, say so in their words
    with open_ledger(where) as book:
        reasons = [p.reason for p in book.check(org.trust).problems]
    assert any("record 3 is missing (deleted)" in r for r in reasons), reasons
    assert any("the row was edited" in r for r in reasons), reasons
    with open_store(where) as store:
        problems = store.check_chain()
    assert problems == ["#2: expected #1 (rows missing)", "#2: prev_hash does not match the row before it",
                        "#3: its content does not match its entry_hash (edited)"]


def test_a_transient_failure_reruns_the_whole_transaction(tmp_path):
    path = tmp_path / "t.sqlite"
    meta = MetaData()
    t = Table("t", meta, Column("v", Integer, primary_key=True))
    base = db.Database(db.sqlite_engine(path, create=True), str(path))
    with base._write("creating") as conn:
        meta.create_all(conn)
    base.RETRY_BASE_S = 0.0
    calls = []

    def body(conn):
        conn.execute(insert(t).values(v=len(calls) + 1))  # written, then rolled back on the first run
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
        return "done"

    assert base.transact("writing", body) == "done" and len(calls) == 2
    with base._read("reading") as conn:
        assert [r.v for r in conn.execute(select(t.c.v))] == [2]

    def broken(conn):
        calls.append(1)
        conn.execute(text("INSERT INTO nowhere VALUES (1)"))

    calls.clear()
    with pytest.raises(MedadvError, match=r"database .*: writing failed \(no such table: nowhere\)"):
        base.transact("writing", broken)
    assert len(calls) == 1  # not transient: not rerun
    base.close()


def test_transient_errors_are_recognised_for_both_dialects():
    class PgError(Exception):
        sqlstate = "40P01"

    assert db.is_transient(OperationalError("x", {}, PgError()))
    assert db.is_transient(OperationalError("x", {}, sqlite3.OperationalError("database is locked")))
    assert not db.is_transient(OperationalError("x", {}, sqlite3.OperationalError("disk I/O error")))
    PgError.sqlstate = "23505"  # unique violation: rerunning would not help
    assert not db.is_transient(OperationalError("x", {}, PgError()))


def test_the_service_key_is_written_by_the_keystore_code(tmp_path, monkeypatch):
    """receipts.py writes its key through keys.write_secret: 0600 from creation, atomic, never replaced."""
    from medadv.provenance import keys

    seen = []
    real = keys.write_secret
    monkeypatch.setattr("medadv.serve.receipts.write_secret", lambda p, d: (seen.append(p), real(p, d))[1])
    key, pub, created = load_or_create_service_key(tmp_path / "svc" / "service.key")
    assert created and seen == [tmp_path / "svc" / "service.key"]
    assert stat.S_IMODE((tmp_path / "svc" / "service.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    before = (tmp_path / "svc" / "service.key").read_bytes()
    again, _, created2 = load_or_create_service_key(tmp_path / "svc" / "service.key")
    assert not created2 and again.key_id == key.key_id and (tmp_path / "svc" / "service.key").read_bytes() == before
    with pytest.raises(FileExistsError):  # the shared writer never replaces a key
        keys.write_secret(tmp_path / "svc" / "service.key", b"other")
    assert (tmp_path / "svc" / "service.key").read_bytes() == before
    assert not [p for p in (tmp_path / "svc").iterdir() if p.name.endswith(".tmp")]


def test_the_ledger_check_still_passes_with_the_store_beside_it(tmp_path):
    where = str(tmp_path / "ledger.sqlite")
    org = _both(where, tmp_path)
    with open_ledger(where) as book:
        report = book.check(org.trust)
    assert report.ok and report.records >= 4, report.problems


def test_both_open_their_engines_through_db(tmp_path):
    """One engine recipe: WAL made at creation, synchronous=FULL for writers, a read-only engine that cannot
    write; the ledger and the store both come out of it (the store on the ledger's file)."""
    where = str(tmp_path / "ledger.sqlite")
    _both(where, tmp_path)
    with open_ledger(where) as book, open_store(where) as store:
        for engine in (book.engine, store.engine):
            with engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
                assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert isinstance(book, db.Database) and isinstance(store, db.Database)
        assert book.LOCK_LABEL != store.LOCK_LABEL  # analyses never wait on registrations
    engine, display = db.open_engine(where, readonly=True)
    assert display == str(Path(where).absolute())
    with pytest.raises(Exception, match="readonly"), engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO ledger_meta VALUES ('x', 'y')")
    engine.dispose()
    with pytest.raises(MedadvError, match="does not exist"):
        db.open_engine(str(tmp_path / "none.sqlite"))
    assert not (tmp_path / "none.sqlite").exists()
