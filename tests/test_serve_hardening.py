"""Issue 22, item 6 (and the service's side of item 2): decompression bombs answer 413 on every decoding
path, ``since=`` is parsed strictly (422, never 500), tokens expire and are revoked (checked on every
request, 401), an old token table is migrated, and rows an insider INSERTs into the ledger (NaN, deep
nesting) never make ``POST /v1/analyses`` answer 500.
"""

from __future__ import annotations

import io
import json
import sqlite3
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from provenance_support import ledger_where, pg_url, raw_sql, run_main  # noqa: F401
from test_serve_support import assert_error_line, bearer, make_app, make_world, png_bytes, world, xray  # noqa: F401


def upload(client, name, data, token, mime="image/png"):
    return client.post("/v1/analyses", files={"file": (name, data, mime)}, headers=bearer(token))


def jpeg_bomb(side: int = 65_500) -> bytes:
    """A tiny valid JPEG whose frame header (SOF0) declares side x side pixels."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", side, side)  # height, width
    return bytes(data)


def png_bomb(side: int = 65_500) -> bytes:
    """A tiny PNG whose IHDR (with a correct CRC, so decoders accept it) declares side x side pixels."""
    data = bytearray(png_bytes(np.zeros((8, 8), np.uint8)))
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture(scope="module")
def client(world):  # noqa: F811
    app = make_app(world, policy="flag", rate=1000, burst=1000)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, app


# ------------------------------------------------------------------------------------ decompression bombs


def test_a_jpeg_declaring_65500_squared_pixels_answers_413(world, client):  # noqa: F811
    c, app = client
    before = app.state.store.count()
    r = upload(c, "bomb.jpg", jpeg_bomb(), world.tokens["submitter"], "image/jpeg")
    body = assert_error_line(r, 413, "decompression bomb")
    assert "medadv-serve-" not in r.text and "/tmp" not in r.text
    assert "downsample" in body["fix"]
    assert app.state.store.count() == before  # nothing recorded for a refused upload


def test_a_bomb_past_raised_limits_still_answers_413_not_422_or_500(world):  # noqa: F811
    from medadv.serve.analysis import Limits

    # an operator who lifts the pixel limits past what PIL decodes: the decoder's refusal is still a 413
    app = make_app(world, policy="flag", limits=Limits(max_bytes=1 << 20, max_pixels=10**10, max_side=100_000))
    with TestClient(app, raise_server_exceptions=False) as c:
        for name, data, mime in (("bomb.png", png_bomb(), "image/png"), ("bomb.jpg", jpeg_bomb(), "image/jpeg")):
            assert_error_line(upload(c, name, data, world.tokens["submitter"], mime), 413, "decompression bomb")


def test_the_batch_mode_gives_a_bomb_an_error_row_with_413(world, tmp_path):  # noqa: F811
    from medadv.serve.config import service_config
    from medadv.serve.offline import analyze_files

    bomb = tmp_path / "in" / "bomb.jpg"
    bomb.parent.mkdir()
    bomb.write_bytes(jpeg_bomb())
    config = service_config(world.model, world.ledger, trust_root=world.trust_root, service_key=world.service_key)
    record = analyze_files(config, [bomb, world.images["xray-0.png"]], tmp_path / "out", submitter="bombs")
    rows = {Path(r["file"]).name: r for r in record["files"]}
    assert rows["bomb.jpg"]["status"] == "error" and rows["bomb.jpg"]["http_status"] == 413
    assert rows["xray-0.png"]["status"] == "analysed"  # the bomb does not stop the batch


# ---------------------------------------------------------------------------------------------- since=


@pytest.mark.parametrize("since", [
    "99999999999999999999",  # past the database's 64-bit integers
    "9223372036854775808",  # 2**63
    "9999-12-31T23:59:59-23:59",  # a real local time, after year 9999 in UTC
    "0001-01-01T00:00:00+23:59",  # before year 1 in UTC
    "\u0661\u0662\u0663",  # Arabic-Indic digits 123: str.isdigit() says yes
    "\u00b2",  # superscript two: isdigit() yes, int() no
    "12\u0663",
    "2026-02-30T00:00:00Z",
    "2026-01-31T12:00:00",  # no zone: ambiguous
    "2026-01-31T\u0661\u0662:00:00Z",
    "-1",
    "+5",
    " 5",
    "2026-01-31T12:00:00+24:00",
])
def test_since_is_validated_strictly_with_422(world, client, since):  # noqa: F811
    c, _ = client
    r = c.get("/v1/analyses", params={"since": since}, headers=bearer(world.tokens["reader"]))
    body = assert_error_line(r, 422, "since=")
    assert "since=0" in body["fix"]


def test_since_still_takes_positions_times_and_dates(world, client):  # noqa: F811
    c, _ = client
    reader = bearer(world.tokens["reader"])
    assert upload(c, "xray-1.png", world.images["xray-1.png"].read_bytes(), world.tokens["submitter"]).status_code == 201
    for since in ("0", "999999999999999999", "2000-01-01", "2000-01-01T00:00:00Z", "2000-01-01T05:30:00+05:30",
                  "2000-01-01T00:00:00.5-01:00"):
        r = c.get("/v1/analyses", params={"since": since}, headers=reader)
        assert r.status_code == 200, (since, r.text)
    assert c.get("/v1/analyses", params={"since": "999999999999999999"}, headers=reader).json() == \
        {"analyses": [], "count": 0, "next": 999999999999999999}
    assert c.get("/v1/analyses", params={"since": "2000-01-01"}, headers=reader).json()["count"] >= 1


# ---------------------------------------------------------------------------------------------- tokens


def test_tokens_expire_and_are_revoked_on_every_request(world, tmp_path, capsys):  # noqa: F811
    from medadv.serve.store import open_store

    app = make_app(world, policy="flag", rate=1000, burst=1000)
    with TestClient(app, raise_server_exceptions=False) as c:
        code, out, err = run_main(["serve", "token", "create", "--role", "reader", "--name", "auditor-2",
                                   "--expires-in", "12h", "--ledger", world.ledger, "--json"], capsys)
        assert code == 0, err
        issued = json.loads(out)
        token, tid = issued["token"], issued["token_id"]
        assert issued["expires_at"] and issued["expires_at"].endswith("Z")
        assert c.get("/v1/model", headers=bearer(token)).status_code == 200  # before: it works

        # list: id, role, label, created, expires, revoked; never a token or a hash
        code, out, err = run_main(["serve", "token", "list", "--ledger", world.ledger], capsys)
        assert code == 0, err
        line = next(ln for ln in out.splitlines() if tid in ln)
        assert "reader" in line and "auditor-2" in line and issued["expires_at"] in line
        con = sqlite3.connect(world.ledger)
        hashes = [h for (h,) in con.execute("SELECT token_hash FROM serve_tokens")]
        con.close()
        for secret in (token, *world.tokens.values(), *hashes):
            assert secret not in out
        code, out, _ = run_main(["serve", "token", "list", "--ledger", world.ledger, "--json"], capsys)
        listed = {t["token_id"]: t for t in json.loads(out)["tokens"]}
        assert set(listed[tid]) == {"token_id", "role", "label", "created_at", "expires_at", "revoked_at"}
        assert listed[tid]["revoked_at"] is None and token not in out and not any(h in out for h in hashes)

        # revoke: the very next request with it is refused, by the running service (no restart, no cache)
        code, out, err = run_main(["serve", "token", "revoke", tid, "--ledger", world.ledger], capsys)
        assert code == 0 and f"token {tid} (reader) revoked at" in out, err
        assert_error_line(c.get("/v1/model", headers=bearer(token)), 401, f"token {tid} was revoked")
        code, out, _ = run_main(["serve", "token", "revoke", tid, "--ledger", world.ledger], capsys)
        assert code == 0 and "already revoked" in out
        code, _, err = run_main(["serve", "token", "revoke", "abcdef012345", "--ledger", world.ledger], capsys)
        assert code == 2 and "no token has id abcdef012345" in err and len(err.strip().splitlines()) == 1
        code, _, err = run_main(["serve", "token", "revoke", "'; DROP TABLE x", "--ledger", world.ledger], capsys)
        assert code == 2 and "is not a token id" in err

        # expiry: a token whose time has passed is refused (its time moved back, as the clock moving on would)
        with open_store(world.ledger) as store:
            short = store.create_token("reader", "short-lived", __import__("datetime").timedelta(minutes=5))
        assert c.get("/v1/model", headers=bearer(short.token)).status_code == 200
        con = sqlite3.connect(world.ledger)
        with con:
            con.execute("UPDATE serve_tokens SET expires_at = '2001-01-01T00:00:00.000000Z' WHERE token_id = ?",
                        (short.token_id,))
        con.close()
        assert_error_line(c.get("/v1/model", headers=bearer(short.token)), 401, f"token {short.token_id} expired")
        # an expiry an insider made unreadable fails closed
        con = sqlite3.connect(world.ledger)
        with con:
            con.execute("UPDATE serve_tokens SET expires_at = 'whenever' WHERE token_id = ?", (short.token_id,))
        con.close()
        assert_error_line(c.get("/v1/model", headers=bearer(short.token)), 401, "expired")

        # the API: an admin issues an expiring token and revokes one; bad lifetimes are a 422
        admin = bearer(world.tokens["admin"])
        r = c.post("/v1/tokens", json={"role": "submitter", "expires_in": "30d"}, headers=admin)
        assert r.status_code == 201 and r.json()["expires_at"]
        sub = r.json()
        assert upload(c, "xray-2.png", world.images["xray-2.png"].read_bytes(), sub["token"]).status_code == 201
        r = c.delete(f"/v1/tokens/{sub['token_id']}", headers=admin)
        assert r.status_code == 200 and r.json()["already_revoked"] is False
        assert_error_line(upload(c, "xray-2.png", world.images["xray-2.png"].read_bytes(), sub["token"]), 401,
                          "was revoked")
        assert_error_line(c.delete("/v1/tokens/abcdef012345", headers=admin), 404, "no token has id")
        assert_error_line(c.delete(f"/v1/tokens/{tid}", headers=bearer(world.tokens["reader"])), 403)
        for bad in ("0d", "30", "30y", "\u0663d", "9999999d", "1.5h", ""):
            assert_error_line(c.post("/v1/tokens", json={"role": "reader", "expires_in": bad}, headers=admin), 422,
                              "expires_in")


def test_bad_expiry_on_the_command_line_is_one_line(world, capsys):  # noqa: F811
    for bad in ("0d", "30", "30y", "-1d", "\u0663d", "3651d", "12 h h"):
        code, _, err = run_main(["serve", "token", "create", "--role", "reader", "--expires-in", bad,
                                 "--ledger", world.ledger], capsys)
        assert code == 2 and "--expires-in" in err and len(err.strip().splitlines()) == 1, (bad, err)


def test_a_token_table_from_before_expiry_is_migrated_in_place(ledger_where, capsys):
    from medadv.errors import MedadvError
    from medadv.provenance.ledger import open_ledger
    from medadv.serve.store import open_store

    with open_ledger(ledger_where, create=True):
        pass
    with open_store(ledger_where) as store:
        old = store.create_token("admin", "from the first release")
    # the table as the first release made it
    raw_sql(ledger_where, "ALTER TABLE serve_tokens DROP COLUMN expires_at",
            "ALTER TABLE serve_tokens DROP COLUMN revoked_at")
    with open_store(ledger_where, create=False) as store, pytest.raises(MedadvError, match="predates token expiry"):
        store.token_rows()  # read-only: refused with a clear line rather than an SQL error
    code, out, err = run_main(["serve", "token", "list", "--ledger", ledger_where, "--json"], capsys)
    assert code == 0, err  # opening it for writing added the columns
    rows = json.loads(out)["tokens"]
    assert [(r["token_id"], r["expires_at"], r["revoked_at"]) for r in rows] == [(old.token_id, None, None)]
    with open_store(ledger_where) as store:
        info = store.lookup_token(old.token)
        assert info is not None and info.refusal() is None  # an old token keeps working
        store.revoke_token(old.token_id)
        assert "revoked" in store.lookup_token(old.token).refusal()
    with open_store(ledger_where) as store:  # opening a migrated database again changes nothing
        assert [r["token_id"] for r in store.token_rows()] == [old.token_id]


# ------------------------------------------------------------------------------- insider rows in the ledger


def test_insider_rows_with_nan_or_deep_nesting_never_make_an_analysis_500(tmp_path):
    """A plain INSERT (no trigger to drop) of records whose meta holds NaN or nests 100,000 levels deep,
    with the digest of an image that is then uploaded, and as a trust entry: every upload still gets a
    verdict (201, receipted), the other images still verify, and the listing and receipts still read."""
    from medadv.provenance.digest import digest_file

    w = make_world(tmp_path)
    digest = digest_file(w.images["xray-1.png"]).digest
    deep = "[" * 100_000 + "]" * 100_000
    con = sqlite3.connect(w.ledger)
    (top,) = con.execute("SELECT MAX(seq) FROM records").fetchone()
    (ledger_id,) = con.execute("SELECT ledger_id FROM records LIMIT 1").fetchone()
    rows = [(top + 1, "a" * 64, "b" * 64, "image", digest, "xray-1.png", '{"label": NaN}'),
            (top + 2, "c" * 64, "d" * 64, "image", digest, "xray-1.png", '{"x": ' + deep + "}"),
            (top + 3, "e" * 64, "f" * 64, "enroll", "0" * 64, "ct-9", '{"public_key": ' + deep + "}"),
            (top + 4, "1" * 64, "2" * 64, "revoke", "0" * 64, "ct-1", '{"subject_key_id": NaN}')]
    with con:
        for seq, prev, rh, kind, dig, name, meta in rows:
            con.execute("INSERT INTO records (seq, prev_hash, record_hash, kind, digest, view_digest, name, stem, uid, "
                        "series_uid, device, key_id, ledger_id, created_at, logged_at, meta, signature) VALUES "
                        "(?, ?, ?, ?, ?, NULL, ?, ?, NULL, NULL, 'ct-1', 'k', ?, '2026-01-01T00:00:00.000000Z', "
                        "'2026-01-01T00:00:00.000000Z', ?, 'ab')",
                        (seq, prev, rh, kind, dig, name, name.rsplit(".", 1)[0], ledger_id, meta))
    con.close()
    for policy in ("flag", "require-provenance"):
        app = make_app(w, policy=policy, rate=1000, burst=1000)
        with TestClient(app, raise_server_exceptions=False) as c:
            for name in ("xray-0.png", "xray-1.png"):
                r = upload(c, name, w.images[name].read_bytes(), w.tokens["submitter"])
                assert r.status_code == 201, (policy, name, r.status_code, r.text)
                # the rows are corrupt and outside the signed log: the registered images still verify
                assert r.json()["provenance"]["status"] == "verified", r.json()["provenance"]
                assert r.json()["diagnosis"] is not None
            listed = c.get("/v1/analyses", headers=bearer(w.tokens["reader"]))
            assert listed.status_code == 200 and listed.json()["count"] >= 2
            assert app.state.store.check_chain() == []


def test_an_inserted_analysis_row_or_receipt_file_of_deep_json_is_a_line_not_a_crash(tmp_path, capsys):
    """The service's own table: an insider INSERTs an analysis whose receipt nests 100,000 levels deep.
    Listing names it (503, one line), the chain check names it, and `verify-receipt` on such a file fails
    with one line."""
    world = make_world(tmp_path / "w")  # its own: the edited table must not reach other tests
    app = make_app(world, policy="flag", rate=1000, burst=1000)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = upload(c, "xray-0.png", world.images["xray-0.png"].read_bytes(), world.tokens["submitter"])
        assert r.status_code == 201
        deep = "[" * 100_000 + "]" * 100_000
        con = sqlite3.connect(world.ledger)
        (top,) = con.execute("SELECT MAX(seq) FROM serve_analyses").fetchone()
        with con:
            con.execute("INSERT INTO serve_analyses VALUES (?, 'f00d', ?, ?, '2030-01-01T00:00:00.000000Z', 'x', ?, ?, ?)",
                        (top + 1, "e" * 64, "f" * 64, "0" * 64, "0" * 64, '{"a": ' + deep + ', "b": NaN}'))
        con.close()
        reader = bearer(world.tokens["reader"])
        assert_error_line(c.get("/v1/analyses", params={"since": top}, headers=reader), 503,
                          f"analysis #{top + 1}")
        assert_error_line(c.get("/v1/analyses/f00d", headers=reader), 503, "edited in the database")
        problems = app.state.store.check_chain()
        assert any(p.startswith(f"#{top + 1}: the stored receipt is unreadable") for p in problems), problems
        assert c.get("/v1/analyses", params={"since": 0, "limit": top}, headers=reader).status_code == 200
        receipt = tmp_path / "deep.json"
        receipt.write_text('{"type": ' + deep + "}")
        pub = world.service_key.with_suffix(".pub")
        code, _, err = run_main(["provenance", "verify-receipt", receipt, "--public-key", pub], capsys)
        assert code == 1 and "Traceback" not in err and "nested" in err and len(err.strip().splitlines()) == 1, err
        receipt.write_text('{"type": NaN}')
        code, _, err = run_main(["provenance", "verify-receipt", receipt, "--public-key", pub], capsys)
        assert code == 1 and "NaN" in err, err


def test_a_ledger_that_cannot_be_judged_is_a_verdict_and_a_database_outage_a_503(world, client, monkeypatch):  # noqa: F811
    """Whatever verification raises (a trust failure, a parser's surprise) becomes an ``unverifiable``
    verdict, receipted and withheld under require-provenance; only a database that does not answer is a
    503 (retry). Never a 500."""
    from sqlalchemy.exc import OperationalError

    import medadv.provenance.verify as verify
    from medadv.errors import MedadvError

    def trust_failure(*a, **k):
        raise MedadvError("the log does not match its signed head at record #7.", "run check-ledger.")

    def parser_surprise(*a, **k):
        raise RecursionError("maximum recursion depth exceeded")

    def outage(*a, **k):
        try:
            raise OperationalError("SELECT", {}, Exception("disk I/O error"))
        except OperationalError as exc:
            raise MedadvError("ledger x: reading records failed (disk I/O error).", "retry.") from exc

    strict = make_app(world, policy="require-provenance", rate=1000, burst=1000)
    with TestClient(strict, raise_server_exceptions=False) as c:
        for broken, detail in ((trust_failure, "does not match its signed head"), (parser_surprise, "RecursionError")):
            monkeypatch.setattr(verify, "verify_digests", broken)
            r = upload(c, "xray-0.png", world.images["xray-0.png"].read_bytes(), world.tokens["submitter"])
            assert r.status_code == 201, r.text
            body = r.json()
            assert body["provenance"]["status"] == "unknown-device"
            assert body["provenance"]["ledger_verdict"] == "unverifiable" and detail in body["provenance"]["detail"]
            assert body["diagnosis"] is None and "require-provenance" in body["withheld"]
        monkeypatch.setattr(verify, "verify_digests", outage)
        before = strict.state.store.count()
        r = upload(c, "xray-0.png", world.images["xray-0.png"].read_bytes(), world.tokens["submitter"])
        assert_error_line(r, 503, "database")
        assert strict.state.store.count() == before


# -------------------------------------------------------------------------------------- one config builder


def test_serve_and_serve_batch_build_their_config_in_one_place(world, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Issue 18: ``ServiceConfig`` is built by medadv.serve.config.service_config for both commands, so they
    refuse the same bad values with the same line, and build the same config from the same flags."""
    import medadv.serve.config as config_module

    common = ["--ledger", world.ledger, "--trust-root", world.trust_root, "--service-key", world.service_key]
    serve = ["serve", "--model", world.model, *common]
    batch = ["serve", "batch", world.images["xray-0.png"], "--model", world.model, "--out", tmp_path / "o", *common]
    for flags, needle in ((["--screen-threshold", "nan"], "--screen-threshold nan"),
                          (["--max-upload-mb", "0"], "--max-upload-mb"), (["--policy", "trust-me"], "is not one of")):
        errs = []
        for argv in (serve, batch):
            code, _, err = run_main([*argv, *flags], capsys)
            assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, (argv, err)
            errs.append(err)
        assert errs[0] == errs[1]
    built = []

    def spy(model, ledger, **flags):
        built.append((str(model), flags))
        raise config_module.MedadvError("stop here.", "spy.")

    monkeypatch.setattr(config_module, "service_config", spy)
    for argv in (serve, batch):
        code, _, err = run_main(argv, capsys)
        assert code == 2 and "stop here" in err
    assert len(built) == 2 and built[0][0] == built[1][0] == str(world.model)
    assert {k: built[0][1][k] for k in built[1][1]} == built[1][1]  # the batch's flags, as serve passes them


# ---------------------------------------------------------------------------------------- scratch files


def test_uploads_leave_nothing_behind_in_the_scratch_folders(world, client):  # noqa: F811
    """Each worker thread reuses one private folder; after every request, good or refused half-way (a bomb
    is written, then refused from its header), the folders are empty, and closing the app removes them."""
    import stat

    from medadv.serve.analysis import ScratchFolders

    c, app = client
    good = upload(c, "xray-0.png", world.images["xray-0.png"].read_bytes(), world.tokens["submitter"])
    bad = upload(c, "bomb.png", png_bomb(), world.tokens["submitter"])
    assert (good.status_code, bad.status_code) == (201, 413)
    root = app.state.scratch.root
    folders = list(root.iterdir())
    assert folders and all(p.is_dir() and not any(p.iterdir()) for p in folders)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    scratch = ScratchFolders()
    with pytest.raises(RuntimeError):
        with scratch.folder() as tmp:
            (tmp / "upload.dcm").write_bytes(b"x")
            raise RuntimeError("a decoder failed")
    assert not any(tmp.iterdir())
    with scratch.folder() as again:
        assert again == tmp  # the same thread reuses its folder
    scratch.close()
    assert not scratch.root.exists()
