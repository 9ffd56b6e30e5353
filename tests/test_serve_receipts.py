"""Receipts and records: a receipt verifies offline and an edited one does not; the analyses chain is
intact, append-only and never half-written; tokens are stored only as hashes."""

from __future__ import annotations

import copy
import hashlib
import json
import sqlite3

import pytest
from fastapi.testclient import TestClient

from provenance_support import pg_url, run_main  # noqa: F401
from test_serve_support import bearer, make_app, world  # noqa: F401


@pytest.fixture(scope="module")
def analysed(world):  # noqa: F811
    app = make_app(world, policy="flag", rate=1000, burst=1000)
    with TestClient(app) as client:
        receipts = []
        for name in ("xray-0.png", "xray-1.png"):
            r = client.post("/v1/analyses", files={"file": (name, world.images[name].read_bytes(), "image/png")},
                            headers=bearer(world.tokens["submitter"]))
            assert r.status_code == 201, r.text
            receipts.append(r.json()["receipt"])
        downloaded = client.get(f"/v1/analyses/{receipts[0]['analysis_id']}/receipt",
                                headers=bearer(world.tokens["reader"]))
        assert downloaded.headers["content-disposition"].startswith("attachment")
        assert downloaded.json() == receipts[0]
        yield app, receipts


def _verify(tmp_path, receipt, pub, capsys, name="r.json"):
    path = tmp_path / name
    path.write_text(json.dumps(receipt))
    return run_main(["provenance", "verify-receipt", path, "--public-key", pub], capsys)


def test_a_receipt_verifies_offline_and_any_edit_fails(world, analysed, tmp_path, capsys):  # noqa: F811
    app, receipts = analysed
    pub = app.state.public_key_path
    r = receipts[0]
    assert set(r) >= {"image_digest", "model_digest", "result", "time", "ledger", "signature", "service_key_id"}
    assert r["model_digest"] == app.state.model.digest
    code, out, err = _verify(tmp_path, r, pub, capsys)
    assert code == 0 and "verified" in out, err

    edits = {
        "p_disease": lambda x: x["result"]["diagnosis"].__setitem__("p_disease", 0.99),
        "label": lambda x: x["result"]["diagnosis"].__setitem__("positive", not x["result"]["diagnosis"]["positive"]),
        "provenance": lambda x: x["result"]["provenance"].__setitem__("status", "modified"),
        "image_digest": lambda x: x.__setitem__("image_digest", "0" * 64),
        "model_digest": lambda x: x.__setitem__("model_digest", "f" * 64),
        "time": lambda x: x.__setitem__("time", "2020-01-01T00:00:00Z"),
        "position": lambda x: x["ledger"].__setitem__("seq", x["ledger"]["seq"] + 1),
        "signature": lambda x: x.__setitem__("signature", ("0" if x["signature"][0] != "0" else "1") + x["signature"][1:]),
        "extra field": lambda x: x.__setitem__("note", "approved"),
        "removed field": lambda x: x.pop("submitter"),
    }
    for what, edit in edits.items():
        bad = copy.deepcopy(r)
        edit(bad)
        code, _, err = _verify(tmp_path, bad, pub, capsys, name=f"{what}.json")
        assert code == 1 and "does not verify" in err, what
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1 and "Traceback" not in err

    # another key (a forger's) does not verify a genuine receipt
    from medadv.serve.receipts import load_or_create_service_key

    _, other_pub, _ = load_or_create_service_key(tmp_path / "other" / "svc.key")
    code, _, err = _verify(tmp_path, r, other_pub, capsys)
    assert code == 1 and "names service key" in err
    # not JSON, and a missing public key: one line each
    (tmp_path / "junk.json").write_text("{not json")
    code, _, err = run_main(["provenance", "verify-receipt", tmp_path / "junk.json", "--public-key", pub], capsys)
    assert code == 1 and "is not valid JSON" in err
    code, _, err = run_main(["provenance", "verify-receipt", tmp_path / "r.json", "--public-key", tmp_path / "no.pub"],
                            capsys)
    assert code == 2 and err.startswith("medadv: error:") and "does not exist" in err


def test_service_key_is_private_and_reused(world, analysed):  # noqa: F811
    app, receipts = analysed
    assert (world.service_key.stat().st_mode & 0o777) == 0o600
    again = make_app(world, policy="flag")
    assert again.state.service_key.key_id == app.state.service_key.key_id == receipts[0]["service_key_id"]


def test_the_analyses_chain_is_intact_append_only_and_matches_the_receipts(world, analysed):  # noqa: F811
    app, receipts = analysed
    store = app.state.store
    assert store.check_chain() == []
    rows = {r["analysis_id"]: r for r in store.list_receipts(0, None, 1000)}
    for r in receipts:
        assert rows[r["analysis_id"]] == r
    second = receipts[1]["ledger"]
    assert second["seq"] == receipts[0]["ledger"]["seq"] + 1 and second["prev_hash"] == receipts[0]["ledger"]["entry_hash"]
    con = sqlite3.connect(world.ledger)
    for sql in ("UPDATE serve_analyses SET receipt = '{}' WHERE seq = 1", "DELETE FROM serve_analyses WHERE seq = 1"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            con.execute(sql)
    con.close()
    # the provenance ledger is untouched by the service: its own check still passes
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.trust import load_trust_root

    with open_ledger(world.ledger) as book:
        report = book.check(load_trust_root(world.trust_root))
    # the only problem is the fixture's own: an image signed by the key it revoked (stolen-0.png)
    assert [p.seq for p in report.problems] == [report.head_seq - 1], report.problems
    assert "revoked" in report.problems[0].reason


def test_a_failed_write_leaves_no_half_row(world, analysed):  # noqa: F811
    app, receipts = analysed
    store, key = app.state.store, app.state.service_key
    before = store.count()
    dup = {"analysis_id": receipts[0]["analysis_id"], "time": "2026-01-01T00:00:00Z", "submitter": "x",
           "image_digest": "0" * 64, "model_digest": "0" * 64, "result": {"provenance": {}}}
    from medadv.errors import MedadvError

    with pytest.raises(MedadvError):  # the id is taken: the insert fails inside the transaction
        store.append_analysis(dup, key)
    with pytest.raises((TypeError, ValueError)):  # a result that is not JSON is refused before any write
        store.append_analysis({**dup, "analysis_id": "ab" * 12, "result": {"x": object()}}, key)
    assert store.count() == before and store.check_chain() == []


def test_tokens_are_stored_only_as_sha256(world, tmp_path, capsys):  # noqa: F811
    code, out, err = run_main(["serve", "token", "create", "--role", "reader", "--ledger", world.ledger, "--json"],
                              capsys)
    assert code == 0, err
    issued = json.loads(out)
    token = issued["token"]
    assert issued["role"] == "reader" and len(token) >= 40
    con = sqlite3.connect(world.ledger)
    rows = con.execute("SELECT token_hash, token_id, role FROM serve_tokens").fetchall()
    con.close()
    assert (hashlib.sha256(token.encode()).hexdigest(), issued["token_id"], "reader") in rows
    for tok in (token, *world.tokens.values()):
        for f in (world.ledger, world.ledger + "-wal"):
            try:
                data = open(f, "rb").read()
            except FileNotFoundError:
                continue
            assert tok.encode() not in data  # the database never holds a token, only its hash
    code, _, err = run_main(["serve", "token", "create", "--role", "superuser", "--ledger", world.ledger], capsys)
    assert code == 2 and "is not one of" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_main(["serve", "token", "create", "--role", "reader", "--ledger", tmp_path / "none.sqlite"],
                            capsys)
    assert code == 2 and "does not exist" in err


def test_serve_command_refuses_bad_settings_in_one_line(world, tmp_path, capsys):  # noqa: F811
    cases = [
        (["serve", "--ledger", world.ledger], "needs a model"),
        (["serve", "--model", world.model, "--ledger", world.ledger, "--policy", "trust-me"], "is not one of"),
        (["serve", "--model", world.model, "--ledger", world.ledger, "--max-batch", "0"], "--max-batch 0"),
        (["serve", "--model", world.model, "--ledger", tmp_path / "missing.sqlite", "--trust-root", world.trust_root],
         "does not exist"),
        (["serve", "--model", tmp_path, "--ledger", world.ledger, "--trust-root", world.trust_root],
         "not a medadv checkpoint"),
    ]
    for argv, needle in cases:
        code, _, err = run_main(argv, capsys)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and err.startswith("medadv: error:") and needle in err, (argv, err)


@pytest.mark.postgres
def test_the_service_tables_on_postgresql(pg_url, tmp_path):  # noqa: F811
    """Tokens, group-committed analyses from concurrent writers, the chain and the append-only guard on
    PostgreSQL (skipped without MEDADV_TEST_POSTGRES_URL)."""
    import concurrent.futures

    from sqlalchemy import create_engine, text

    from medadv.provenance.ledger import open_ledger
    from medadv.serve.receipts import load_or_create_service_key, verify_receipt
    from medadv.serve.store import open_store

    open_ledger(pg_url, create=True).close()
    key, _, _ = load_or_create_service_key(tmp_path / "svc.key")
    with open_store(pg_url) as store, open_store(pg_url) as other:  # two stores: two "processes"
        issued = store.create_token("reader", "pg")
        assert other.lookup_token(issued.token).role == "reader"

        def write(k: int) -> list[dict]:
            s = store if k % 2 else other
            return s.append_analyses([{"analysis_id": f"{k:02d}{j}".ljust(24, "0"), "time": f"2026-01-01T00:00:{k:02d}Z",
                                       "submitter": "t", "image_digest": "0" * 64, "model_digest": "1" * 64,
                                       "result": {"k": k, "j": j}} for j in range(3)], key)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            receipts = [r for batch in pool.map(write, range(8)) for r in batch]
        assert store.count() == 24 and store.check_chain() == []
        assert sorted(r["ledger"]["seq"] for r in receipts) == list(range(1, 25))
        assert all(verify_receipt(r, key.public)[0] for r in receipts)
    engine = create_engine(pg_url)
    try:
        with pytest.raises(Exception, match="append-only"), engine.begin() as conn:
            conn.execute(text("UPDATE serve_analyses SET receipt = '{}'"))
        with engine.connect() as conn:
            assert issued.token not in str(conn.execute(text("SELECT * FROM serve_tokens")).all())
    finally:
        engine.dispose()
