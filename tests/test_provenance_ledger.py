"""Keys and the ledger: 0600 keys, a hash chain that finds edited, deleted and reordered rows, forged and
unknown signers, and bad input that leaves the ledger untouched. Every ledger test runs on SQLite and
on PostgreSQL (skipped, with the reason, when no server is configured)."""

# ruff: noqa: F811  (pytest fixtures imported from provenance_support)
from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PrivateKey
from provenance_support import drop_guards, ledger_where, make_device, pg_url, raw_sql, save_png  # noqa: F401
from sqlalchemy import insert

from medadv.errors import MedadvError
from medadv.provenance.digest import ImageDigest, digest_array
from medadv.provenance.keys import DeviceKey, generate_key, load_private_key, load_trusted_keys
from medadv.provenance.ledger import GENESIS, Record, name_stem, open_ledger, records, utc_now
from medadv.provenance.register import register_paths
from medadv.provenance.verify import Status, verify_digests


def items(n: int, start: int = 0) -> list[ImageDigest]:
    rng = np.random.default_rng(start)
    return [digest_array(rng.integers(0, 256, (8, 8), dtype=np.uint8), f"img{start + i}.png") for i in range(n)]


def filled(where: str, tmp_path: Path, n: int = 6) -> tuple[DeviceKey, list[ImageDigest]]:
    key = make_device(where, tmp_path / "keys")
    its = items(n)
    with open_ledger(where) as ledger:
        res = ledger.append(its, key, batch_size=4)
    assert (res.added, res.first_seq, res.last_seq) == (n, 1, n)
    return key, its


def problems(where: str, **kw: object) -> list[tuple[int | None, str]]:
    with open_ledger(where) as ledger:
        return [(p.seq, p.reason) for p in ledger.check(**kw).problems]


def state(where: str) -> tuple[int, tuple[int, str]]:
    with open_ledger(where) as ledger:
        return ledger.count(), ledger.head()


# ------------------------------------------------------------------------------------------------ keys


def test_keygen_creates_a_0600_key_and_never_overwrites_it(tmp_path: Path) -> None:
    old = os.umask(0)  # even with a permissive umask the secret is never readable by others
    try:
        key = generate_key("ct-1", tmp_path / "keys")
    finally:
        os.umask(old)
    assert key.path is not None
    assert key.path.stat().st_mode & 0o777 == 0o600
    assert key.path.with_suffix(".pub").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    before = key.path.read_bytes()
    with pytest.raises(MedadvError, match="already has a private key"):
        generate_key("ct-1", tmp_path / "keys")
    assert key.path.read_bytes() == before
    assert load_private_key("ct-1", tmp_path / "keys").key_id == key.key_id
    assert not [p for p in (tmp_path / "keys").iterdir() if p.name.startswith(".")]  # no temporary left


def test_bad_private_keys_are_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    key = generate_key("ct-1", keys)
    assert key.path is not None
    key.path.chmod(0o644)
    with pytest.raises(MedadvError, match="readable by others"):
        load_private_key("ct-1", keys)
    with pytest.raises(MedadvError, match="no private key for device ct-2"):
        load_private_key("ct-2", keys)
    fd = os.open(keys / "junk.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    os.close(fd)
    with pytest.raises(MedadvError, match="not a readable"):
        load_private_key("junk", keys)
    fd = os.open(keys / "ed448.key", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, Ed448PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    os.close(fd)
    with pytest.raises(MedadvError, match="not an Ed25519 key"):
        load_private_key("ed448", keys)
    with pytest.raises(MedadvError, match="not allowed"):
        generate_key("../escape", keys)


# ---------------------------------------------------------------------------------------------- ledger


def test_append_check_and_idempotent_reappend(ledger_where: str, tmp_path: Path) -> None:
    key, its = filled(ledger_where, tmp_path)
    with open_ledger(ledger_where) as ledger:
        report = ledger.check()
        assert report.ok and report.records == 6 and report.head_seq == 6
        again = ledger.append(its + items(2, start=100), key)
        assert (again.added, again.skipped, again.first_seq) == (2, 6, 7)
        rows = list(ledger.iter_records())
        assert [r.seq for r in rows] == list(range(1, 9))
        assert rows[0].prev_hash == GENESIS
        assert all(b.prev_hash == a.record_hash for a, b in zip(rows, rows[1:], strict=False))
        assert ledger.check().ok


def test_the_database_itself_refuses_edits_and_deletes(ledger_where: str, tmp_path: Path) -> None:
    filled(ledger_where, tmp_path, n=2)
    for sql in ("UPDATE records SET name = 'x' WHERE seq = 1", "DELETE FROM records WHERE seq = 2",
                "DELETE FROM devices"):
        with pytest.raises(Exception, match="append-only"):
            raw_sql(ledger_where, sql)
    assert problems(ledger_where) == []


def _swap_rows(where: str, a: int, b: int) -> None:
    raw_sql(where, f"UPDATE records SET seq = -1 WHERE seq = {a}", f"UPDATE records SET seq = {a} WHERE seq = {b}",
            f"UPDATE records SET seq = {b} WHERE seq = -1")


@pytest.mark.parametrize("tamper", ["edit", "edit-and-rehash", "delete", "reorder"])
def test_check_ledger_finds_tampered_rows(ledger_where: str, tmp_path: Path, tamper: str) -> None:
    filled(ledger_where, tmp_path)
    drop_guards(ledger_where)  # an attacker with database rights
    if tamper == "edit":
        raw_sql(ledger_where, f"UPDATE records SET digest = '{'0' * 64}' WHERE seq = 3")
        expect = {3}
    elif tamper == "edit-and-rehash":  # a careful attacker recomputes the hash but cannot sign
        with open_ledger(ledger_where) as ledger:
            rec = next(r for r in ledger.iter_records() if r.seq == 3)
        from dataclasses import replace

        forged = replace(rec, name="someone-else.png")
        raw_sql(ledger_where, f"UPDATE records SET name = 'someone-else.png', record_hash = '{forged.compute_hash()}' "
                              "WHERE seq = 3")
        expect = {3, 4}
    elif tamper == "delete":
        raw_sql(ledger_where, "DELETE FROM records WHERE seq = 3")
        expect = {4}
    else:
        _swap_rows(ledger_where, 3, 4)
        expect = {3, 4, 5}  # 5 no longer follows what now stands at 4
    found = problems(ledger_where)
    assert found, "tampering went unnoticed"
    assert {seq for seq, _ in found} == expect, found
    assert found[0][0] == min(expect)
    words = {"edit": "edited", "edit-and-rehash": "signature", "delete": "missing", "reorder": "prev_hash"}
    assert any(words[tamper] in reason for _, reason in found), found


def test_truncation_is_found_with_an_anchor(ledger_where: str, tmp_path: Path) -> None:
    filled(ledger_where, tmp_path)
    _, (_, head) = state(ledger_where)
    assert problems(ledger_where, anchor=head) == []
    drop_guards(ledger_where)
    raw_sql(ledger_where, "DELETE FROM records WHERE seq >= 5")
    assert problems(ledger_where) == []  # a shorter chain is still a valid chain...
    assert problems(ledger_where, anchor=head)[0][1].startswith(f"anchor {head} is not in the chain")  # ...but not ours


def _insert(where: str, rec: Record) -> None:
    with open_ledger(where) as ledger, ledger.engine.begin() as conn:
        conn.execute(insert(records).values(**rec.row()))


def test_forged_signature_is_rejected(ledger_where: str, tmp_path: Path) -> None:
    """Someone with database access but not the device key appends a record claiming the device."""
    real, _ = filled(ledger_where, tmp_path)
    attacker = generate_key("ct-1", tmp_path / "attacker")  # same name, different key
    fake = items(1, start=50)[0]
    count, (seq, prev) = state(ledger_where)
    claim = Record(seq + 1, prev, fake.digest, fake.name, name_stem(fake.name), None, None, real.device, real.key_id,
                   utc_now(), fake.meta)
    from dataclasses import replace

    claim = replace(claim, signature=attacker.sign(claim.signed_bytes()).hex())
    claim = replace(claim, record_hash=claim.compute_hash())  # the chain itself is extended correctly
    _insert(ledger_where, claim)
    with open_ledger(ledger_where) as ledger:
        (verdict,) = verify_digests(ledger, [("fake.png", fake)])
    assert verdict.status is Status.BAD_SIGNATURE and verdict.seq == seq + 1
    assert problems(ledger_where) == [(seq + 1, f"its signature does not verify with device {real.device}'s key "
                                                "(forged or edited)")]


def test_unknown_device_is_rejected(ledger_where: str, tmp_path: Path) -> None:
    real, _ = filled(ledger_where, tmp_path)
    rogue = generate_key("rogue", tmp_path / "rogue")
    fake = items(1, start=60)[0]
    _, (seq, prev) = state(ledger_where)
    _insert(ledger_where, Record.signed(seq + 1, prev, fake, rogue, utc_now()))  # its key is in no devices table
    with open_ledger(ledger_where) as ledger:
        (verdict,) = verify_digests(ledger, [("fake.png", fake)])
        assert verdict.status is Status.UNKNOWN_DEVICE
        assert any("unknown device rogue" in p.reason for p in ledger.check().problems)
        # an attacker who also adds the rogue key to the devices table fools the table, not trusted keys
        ledger.add_device("rogue", rogue.public.public_key)
        assert verify_digests(ledger, [("fake.png", fake)])[0].status is Status.VERIFIED
        trusted = load_trusted_keys(real.path.parent)  # type: ignore[union-attr]
        assert verify_digests(ledger, [("fake.png", fake)], trusted=trusted)[0].status is Status.UNKNOWN_DEVICE
        assert not ledger.check(trusted=trusted).ok


# ------------------------------------------------------------------------------------------- bad input


def test_wrong_key_or_bad_image_leaves_the_ledger_untouched(ledger_where: str, tmp_path: Path) -> None:
    filled(ledger_where, tmp_path)
    before = state(ledger_where)
    stranger = generate_key("ct-9", tmp_path / "other")
    good = save_png(tmp_path / "in" / "good.png", np.full((8, 8), 7, np.uint8))
    with open_ledger(ledger_where) as ledger:
        with pytest.raises(MedadvError, match="not registered in ledger"):
            register_paths([good], ledger, stranger)
        (tmp_path / "in" / "zz-corrupt.png").write_bytes(good.read_bytes()[:30])
        with pytest.raises(MedadvError, match="zz-corrupt.png"):
            register_paths([tmp_path / "in"], ledger, load_private_key("ct-1", tmp_path / "keys"))
    assert state(ledger_where) == before


def test_missing_corrupt_and_foreign_sqlite_ledgers(tmp_path: Path) -> None:
    missing = tmp_path / "nope.sqlite"
    with pytest.raises(MedadvError, match="does not exist"):
        open_ledger(missing)
    assert not missing.exists()  # opening never creates a ledger as a side effect
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database" * 100)
    digest = hashlib.sha256(corrupt.read_bytes()).hexdigest()
    with pytest.raises(MedadvError, match="corrupt") as info:
        open_ledger(corrupt)
    assert str(corrupt) in str(info.value)
    assert hashlib.sha256(corrupt.read_bytes()).hexdigest() == digest
    foreign = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(MedadvError, match="not a medadv ledger"):
        open_ledger(foreign)
    # a damaged page inside a real ledger is found too, not silently read
    good = tmp_path / "good.sqlite"
    make_device(str(good), tmp_path / "keys")
    data = bytearray(good.read_bytes())
    data[100:4096] = b"\xff" * (4096 - 100)
    good.write_bytes(bytes(data))
    with pytest.raises(MedadvError, match="corrupt"):
        open_ledger(good)


def test_missing_postgres_database_is_a_clear_error(pg_url: str) -> None:  # noqa: F811
    from sqlalchemy.engine import make_url

    url = make_url(pg_url).set(database="medadv_no_such_db").render_as_string(hide_password=False)
    with pytest.raises(MedadvError, match='database "medadv_no_such_db" does not exist') as info:
        open_ledger(url)
    assert "createdb" in (info.value.fix or "")
