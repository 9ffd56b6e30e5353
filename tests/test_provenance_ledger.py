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
from provenance_support import (  # noqa: F401
    drop_guards,
    ledger_where,
    log_key,
    make_device,
    pg_url,
    raw_sql,
    save_png,
    trust,
)

from medadv.errors import MedadvError
from medadv.provenance.digest import ImageDigest, digest_array
from medadv.provenance.keys import DeviceKey, generate_key, load_private_key
from medadv.provenance.ledger import GENESIS, Entry, open_ledger
from medadv.provenance.register import register_paths
from medadv.provenance.verify import Status, verify_digests


def items(n: int, start: int = 0) -> list[ImageDigest]:
    rng = np.random.default_rng(start)
    return [digest_array(rng.integers(0, 256, (8, 8), dtype=np.uint8), f"img{start + i}.png") for i in range(n)]


def filled(where: str, tmp_path: Path, n: int = 6) -> tuple[DeviceKey, list[ImageDigest]]:
    key = make_device(where, tmp_path / "keys")
    its = items(n)
    with open_ledger(where) as ledger:
        res = ledger.append(its, key, log_key(where), batch_size=4)
    assert (res.added, res.first_seq, res.last_seq) == (n, 3, n + 2)  # after the log-key and enroll entries
    return key, its


def problems(where: str, **kw: object) -> list[tuple[int | None, str]]:
    with open_ledger(where) as ledger:
        return [(p.seq, p.reason) for p in ledger.check(trust(where), **kw).problems]


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
        report = ledger.check(trust(ledger_where))
        assert report.ok and report.records == 8 and report.head_seq == 8 and report.integrity.startswith(("ok", "not"))
        assert report.signed_head is not None and report.signed_head["size"] == 8
        again = ledger.append(its + items(2, start=100), key, log_key(ledger_where))
        assert (again.added, again.skipped, again.first_seq) == (2, 6, 9)
        rows = list(ledger.iter_records())
        assert [r.seq for r in rows] == list(range(1, 11))
        assert rows[0].prev_hash == GENESIS
        assert all(b.prev_hash == a.record_hash for a, b in zip(rows, rows[1:], strict=False))
        assert ledger.check(trust(ledger_where)).ok


def test_the_database_itself_refuses_edits_and_deletes(ledger_where: str, tmp_path: Path) -> None:
    filled(ledger_where, tmp_path, n=2)
    for sql in ("UPDATE records SET name = 'x' WHERE seq = 1", "DELETE FROM records WHERE seq = 2",
                "DELETE FROM nodes", "UPDATE heads SET body = 'x'"):
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
        expect = {3, 4, None}
    elif tamper == "delete":
        raw_sql(ledger_where, "DELETE FROM records WHERE seq = 3")
        expect = {4, None}
    else:
        _swap_rows(ledger_where, 3, 4)
        expect = {3, 4, 5, None}  # 5 no longer follows what now stands at 4
    found = problems(ledger_where)
    assert found, "tampering went unnoticed"
    assert {seq for seq, _ in found} == expect, found
    assert found[0][0] == min(s for s in expect if s is not None)
    words = {"edit": "edited", "edit-and-rehash": "signature", "delete": "missing", "reorder": "prev_hash"}
    assert any(words[tamper] in reason for _, reason in found), found


def test_truncation_is_found_with_a_kept_head(ledger_where: str, tmp_path: Path) -> None:
    filled(ledger_where, tmp_path)
    with open_ledger(ledger_where) as ledger:
        kept = ledger.check(trust(ledger_where)).signed_head
    assert kept is not None and problems(ledger_where, old_head=kept) == []
    drop_guards(ledger_where)
    raw_sql(ledger_where, "DELETE FROM records WHERE seq >= 5", "DELETE FROM heads WHERE size >= 5")
    assert any("truncated" in r for _, r in problems(ledger_where, old_head=kept))


def test_forged_signature_is_rejected(ledger_where: str, tmp_path: Path) -> None:
    """Someone with database access but not the device key appends a record claiming the device's key."""
    from dataclasses import replace

    real, _ = filled(ledger_where, tmp_path)
    attacker = generate_key("ct-1", tmp_path / "attacker")  # same name, different key
    fake = items(1, start=50)[0]
    with open_ledger(ledger_where) as ledger:
        ledger.append_entries([Entry.image(fake, "ct-1")], replace(attacker, device="ct-1"), log_key(ledger_where))
        rec = list(ledger.iter_records())[-1]
    drop_guards(ledger_where)
    rehashed = replace(rec, key_id=real.key_id).compute_hash()  # claim the real key, keep the row self-consistent
    raw_sql(ledger_where, f"UPDATE records SET key_id = '{real.key_id}', record_hash = '{rehashed}' WHERE seq = {rec.seq}")
    with open_ledger(ledger_where) as ledger:
        (verdict,) = verify_digests(ledger, [("fake.png", fake)], trust(ledger_where))
    assert verdict.status is Status.BAD_SIGNATURE and verdict.seq == rec.seq
    found = problems(ledger_where)
    assert (rec.seq, "its signature does not verify with device ct-1's key (forged or edited)") in found


def test_unknown_device_is_rejected(ledger_where: str, tmp_path: Path) -> None:
    filled(ledger_where, tmp_path)
    rogue = generate_key("rogue", tmp_path / "rogue")
    fake = items(1, start=60)[0]
    with open_ledger(ledger_where) as ledger:
        ledger.add_device("rogue", rogue.public.public_key)  # the devices table confers nothing
        ledger.append_entries([Entry.image(fake, "rogue")], rogue, log_key(ledger_where))
        (verdict,) = verify_digests(ledger, [("fake.png", fake)], trust(ledger_where))
        assert verdict.status is Status.UNKNOWN_DEVICE
        assert any("never enrolled" in p.reason for p in ledger.check(trust(ledger_where)).problems)


# ------------------------------------------------------------------------------------------- bad input


def test_wrong_key_or_bad_image_leaves_the_ledger_untouched(ledger_where: str, tmp_path: Path) -> None:
    filled(ledger_where, tmp_path)
    before = state(ledger_where)
    stranger = generate_key("ct-9", tmp_path / "other")
    good = save_png(tmp_path / "in" / "good.png", np.full((8, 8), 7, np.uint8))
    with open_ledger(ledger_where) as ledger:
        with pytest.raises(MedadvError, match="not enrolled in ledger"):
            register_paths([good], ledger, stranger, log_key(ledger_where))
        (tmp_path / "in" / "zz-corrupt.png").write_bytes(good.read_bytes()[:30])
        with pytest.raises(MedadvError, match="zz-corrupt.png"):
            register_paths([tmp_path / "in"], ledger, load_private_key("ct-1", tmp_path / "keys"), log_key(ledger_where))
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
