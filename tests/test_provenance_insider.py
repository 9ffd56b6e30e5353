"""An insider with write access to the ledger's database (and, where it makes the attack stronger, the log
key), but without the organisation's root key or a device key, attacks the provenance layer. Every attack
must be caught with a named verdict or problem and a non-zero exit, trusting nothing but the configured
trust root. Ledger attacks run on SQLite and on PostgreSQL (skipped without MEDADV_TEST_POSTGRES_URL)."""

# ruff: noqa: F811  (pytest fixtures imported from provenance_support)
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from provenance_support import (  # noqa: F401
    drop_guards,
    ledger_where,
    make_device,
    make_org,
    org_of,
    pg_url,
    raw_sql,
    run_main,
    save_png,
)
from sqlalchemy import insert

from medadv.errors import MedadvError
from medadv.provenance import merkle
from medadv.provenance.keys import generate_key
from medadv.provenance.ledger import Entry, open_ledger, records
from medadv.provenance.org import enroll, init_ledger, revoke, rotate
from medadv.provenance.register import register_paths
from medadv.provenance.trust import init_root
from medadv.provenance.verify import Status, check_proof, verify_paths


def _pngs(folder: Path, n: int, seed: int = 0, prefix: str = "img") -> list[Path]:
    rng = np.random.default_rng(seed)
    return [save_png(folder / f"{prefix}{i}.png", rng.integers(0, 256, (10, 10), dtype=np.uint8)) for i in range(n)]


def _verdicts(where: str, *paths: Path) -> list[Status]:
    with open_ledger(where, readonly=True) as ledger:
        return [v.status for v in verify_paths(paths, ledger, org_of(where).trust)]


def _register(where: str, key, *paths: Path, **kw) -> None:
    with open_ledger(where) as ledger:
        register_paths(paths, ledger, key, org_of(where).log, **kw)


def _cli_verify(where: str, *paths: Path, capsys) -> tuple[int, dict]:
    code, out, err = run_main(["provenance", "verify", *paths, "--ledger", where, "--trust-root",
                               org_of(where).root_pub, "--json"], capsys)
    assert "Traceback" not in err
    return code, json.loads(out)


def _cli_check(where: str, capsys, *extra) -> tuple[int, str]:
    """Exit code and the problems (one per line), plus "consistency proof" when one was checked."""
    code, out, err = run_main(["provenance", "check-ledger", "--ledger", where, "--trust-root",
                               org_of(where).root_pub, "--json", *extra], capsys)
    assert "Traceback" not in err
    report = json.loads(out)
    lines = [f"#{p['seq']}: {p['reason']}" for p in report["problems"]]
    if report["consistency"] and report["consistency"]["ok"]:
        lines.append("consistency proof ok")
    return code, "\n".join(lines)


def _save_head(where: str, path: Path, capsys) -> Path:
    code, _, err = run_main(["provenance", "head", "--ledger", where, "--trust-root", org_of(where).root_pub,
                             "--out", path], capsys)
    assert code == 0, err
    return path


# ------------------------------------------------------------------------------------------ the log itself


def _mth(leaves: list[bytes]) -> bytes:
    if not leaves:
        return merkle.EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return merkle.node_hash(_mth(leaves[:k]), _mth(leaves[k:]))


def test_merkle_proofs_match_a_brute_force_tree_and_catch_every_change() -> None:
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(19)]
    tree = merkle.StreamingTree()
    nodes: dict[tuple[int, int], bytes] = {}
    for leaf in leaves:
        nodes.update({(lv, ix): h for lv, ix, h in tree.append(leaf)})
        assert tree.root() == _mth(leaves[:tree.size])
    get = lambda lv, ix: nodes[(lv, ix)]  # noqa: E731
    for n in range(1, 20):
        root = _mth(leaves[:n])
        assert merkle.root_hash(n, get) == root
        for m in range(n):
            path = merkle.inclusion_path(m, n, get)
            assert len(path) <= n.bit_length()  # logarithmic
            assert merkle.verify_inclusion(leaves[m], m, n, path, root)
            assert not merkle.verify_inclusion(leaves[m], (m + 1) % n, n, path, root) or n == 1
            if path:
                bad = [path[0][:-1] + bytes([path[0][-1] ^ 1]), *path[1:]]
                assert not merkle.verify_inclusion(leaves[m], m, n, bad, root)
        for m in range(0, n + 1):
            proof = merkle.consistency_path(m, n, get)
            assert merkle.verify_consistency(m, n, _mth(leaves[:m]), root, proof), (m, n)
            if 0 < m < n:
                forked = _mth([*leaves[:m - 1], merkle.leaf_hash(b"forged")])
                assert not merkle.verify_consistency(m, n, forked, root, proof)


# ------------------------------------------------------------------------------------------ self-enrolment


def test_self_enrolment_is_not_trusted(ledger_where: str, tmp_path: Path, capsys) -> None:
    """`keygen --device <existing name>`, a fake enrollment signed by a root of one's own, a devices-table
    entry, and the real log key: the images it registers are `unknown-device`, the gate refuses them."""
    real = make_device(ledger_where, tmp_path / "keys", "ct-1")
    genuine = _pngs(tmp_path / "acq", 1)
    _register(ledger_where, real, *genuine)
    code, _, _ = run_main(["provenance", "keygen", "--device", "ct-1", "--keys", tmp_path / "attacker"], capsys)
    assert code == 0
    from medadv.provenance.keys import load_private_key

    attacker = load_private_key("ct-1", tmp_path / "attacker")
    fake_root, _, _ = init_root("acme", tmp_path / "fake-root")  # same organisation name, another key
    with open_ledger(ledger_where) as ledger:
        enroll(ledger, fake_root, "ct-1", attacker.public, org_of(ledger_where).log)
        ledger.add_device("ct-1-evil", attacker.public.public_key)
    forged = _pngs(tmp_path / "forged", 1, seed=9, prefix="evil")
    _register(ledger_where, attacker, *forged)
    assert _verdicts(ledger_where, *genuine, *forged) == [Status.VERIFIED, Status.UNKNOWN_DEVICE]
    code, report = _cli_verify(ledger_where, *forged, capsys=capsys)
    assert code == 1 and report["results"][0]["status"] == "unknown-device"
    code, text = _cli_check(ledger_where, capsys)
    assert code == 1 and "never enrolled" in text and "trust root" in text


def test_rewriting_history_with_ones_own_key_is_caught(ledger_where: str, tmp_path: Path, capsys) -> None:
    """The insider drops the triggers, deletes records from #k on (rows, Merkle nodes and heads), and
    re-appends a tampered copy of one image signed by a self-enrolled key, with the real log key."""
    key = make_device(ledger_where, tmp_path / "keys", "ct-1")
    imgs = _pngs(tmp_path / "acq", 4)
    _register(ledger_where, key, *imgs)
    kept = _save_head(ledger_where, tmp_path / "kept-head.json", capsys)
    drop_guards(ledger_where)
    raw_sql(ledger_where, "DELETE FROM records WHERE seq >= 5", "DELETE FROM heads WHERE size >= 5",
            "DELETE FROM nodes WHERE idx >= 4 OR (level = 1 AND idx >= 2) OR (level >= 2 AND idx >= 1)")
    attacker = generate_key("ct-1", tmp_path / "attacker")
    fake_root, _, _ = init_root("acme", tmp_path / "fake-root")
    tampered = imgs[3].parent.parent / "tampered" / imgs[3].name
    arr = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(imgs[3])).copy()
    arr[0, 0] ^= 0xFF
    save_png(tampered, arr)
    with open_ledger(ledger_where) as ledger:
        enroll(ledger, fake_root, "ct-1", attacker.public, org_of(ledger_where).log)
        register_paths([tampered], ledger, attacker, org_of(ledger_where).log)
    assert _verdicts(ledger_where, tampered, imgs[3]) == [Status.UNKNOWN_DEVICE, Status.MODIFIED]
    code, _ = _cli_verify(ledger_where, tampered, capsys=capsys)
    assert code == 1
    code, text = _cli_check(ledger_where, capsys)
    assert code == 1 and "never enrolled" in text
    code, text = _cli_check(ledger_where, capsys, "--head", kept)
    assert code == 1 and "not an extension of the kept head" in text


def test_a_record_replayed_from_another_ledger_is_refused(ledger_where: str, tmp_path: Path, capsys) -> None:
    """Same organisation, two ledgers: a device's record and its enrollment copied verbatim from ledger A
    into ledger B verify in neither sense in B (`replayed`)."""
    other = str(tmp_path / "ledger-a.sqlite")
    key = make_device(other, tmp_path / "keys", "ct-1")
    org = org_of(other)
    with open_ledger(ledger_where, create=True) as ledger:  # ledger B, same root and log key
        init_ledger(ledger, org.root, org.log)
    from provenance_support import _ORGS

    _ORGS[ledger_where] = replace(org, where=ledger_where)
    img = _pngs(tmp_path / "acq", 1)
    _register(other, key, *img)
    with open_ledger(other) as a:
        rows = [r for r in a.iter_records() if r.kind in ("enroll", "image")]
    with open_ledger(ledger_where) as b, b.engine.begin() as conn:
        conn.execute(insert(records), [r.row() for r in rows])
    assert _verdicts(other, *img) == [Status.VERIFIED]
    assert _verdicts(ledger_where, *img) == [Status.REPLAYED]
    code, report = _cli_verify(ledger_where, *img, capsys=capsys)
    assert code == 1 and report["results"][0]["status"] == "replayed"
    code, text = _cli_check(ledger_where, capsys)
    assert code == 1 and "replayed" in text


def test_revoked_and_rotated_keys(ledger_where: str, tmp_path: Path, capsys) -> None:
    key = make_device(ledger_where, tmp_path / "keys", "ct-1")
    org = org_of(ledger_where)
    before, after = _pngs(tmp_path / "acq", 1), _pngs(tmp_path / "late", 1, seed=5, prefix="late")
    _register(ledger_where, key, *before)
    code, out, err = run_main(["provenance", "revoke", "--device", "ct-1", "--key-id", key.key_id, "--root-key",
                               org.root.path, "--log-key", org.log.path, "--ledger", ledger_where], capsys)
    assert code == 0, err
    _register(ledger_where, key, *after)  # the stolen key keeps signing
    assert _verdicts(ledger_where, *before, *after) == [Status.VERIFIED, Status.REVOKED]
    code, report = _cli_verify(ledger_where, *after, capsys=capsys)
    assert code == 1 and report["results"][0]["status"] == "revoked"
    code, text = _cli_check(ledger_where, capsys)
    assert code == 1 and "revoked from record" in text
    # rotation: the new key verifies, the old one is revoked from the rotation on
    new = generate_key("ct-2", tmp_path / "keys")
    k2 = make_device(ledger_where, tmp_path / "keys2", "ct-3")
    with open_ledger(ledger_where) as ledger:
        rotate(ledger, org.root, "ct-3", new.public, org.log, [k2.key_id])
    fresh_new = _pngs(tmp_path / "n", 1, seed=7, prefix="n")
    fresh_old = _pngs(tmp_path / "o", 1, seed=8, prefix="o")
    _register(ledger_where, replace(new, device="ct-3"), *fresh_new)
    _register(ledger_where, k2, *fresh_old)
    assert _verdicts(ledger_where, *fresh_new, *fresh_old) == [Status.VERIFIED, Status.REVOKED]
    _register(ledger_where, replace(new, device="ct-3"), *fresh_old)  # the new key re-registers it: trusted again
    assert _verdicts(ledger_where, *fresh_old) == [Status.VERIFIED]
    # retroactive revocation (a key stolen on a known day): records from that position on
    with open_ledger(ledger_where) as ledger:
        first = next(r.seq for r in ledger.iter_records() if r.name == before[0].name)
        revoke(ledger, org.root, "ct-3", new.key_id, org.log, effective_seq=first)
    assert _verdicts(ledger_where, *fresh_new) == [Status.REVOKED]


# ------------------------------------------------------------------------------------- what a record binds


def test_name_swap_copy_over_and_duplicates(tmp_path: Path, capsys) -> None:
    where = str(tmp_path / "ledger.sqlite")
    key = make_device(where, tmp_path / "keys")
    a, b, c = _pngs(tmp_path / "acq", 3)
    _register(where, key, a, b, c)
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    shutil.copy(a, swapped / b.name)
    shutil.copy(b, swapped / a.name)
    shutil.copy(a, swapped / c.name)  # one image copied over another
    code, report = _cli_verify(where, swapped / a.name, swapped / b.name, swapped / c.name, capsys=capsys)
    assert code == 1 and [r["status"] for r in report["results"]] == ["name-mismatch"] * 3
    assert _verdicts(where, a, b, c) == [Status.VERIFIED] * 3
    # the same pixels registered under a second name: which image is it?
    dup = tmp_path / "acq2" / "copy.png"
    dup.parent.mkdir()
    shutil.copy(a, dup)
    with pytest.raises(MedadvError, match=rf"copy.png has the same pixels as {a.name}, already registered"):
        _register(where, key, dup)  # refused at registration, naming the first (issue 22)
    assert _verdicts(where, a, dup) == [Status.VERIFIED, Status.NAME_MISMATCH]
    with open_ledger(where) as ledger:  # appended anyway (below the register door): both are `duplicate`
        from medadv.provenance.digest import digest_path

        ledger.append(digest_path(dup, with_view=True), key, org_of(where).log)
    assert _verdicts(where, a, dup) == [Status.DUPLICATE, Status.DUPLICATE]


def _imageset(paths: list[Path], labels: list[int]):
    from medadv.data.folder import load_images
    from medadv.data.imageset import ImageSet

    pixels, _ = load_images(paths, None, "test")
    return ImageSet(pixels=pixels, labels=np.asarray(labels, np.int64), ids=[p.name for p in paths], task="t",
                    split="test", source=str(paths[0].parent), checksum="", files=list(paths))


def test_gate_checks_pixels_names_and_labels(tmp_path: Path) -> None:
    from medadv.provenance.gate import check_imageset

    where = str(tmp_path / "ledger.sqlite")
    key = make_device(where, tmp_path / "keys")
    imgs = _pngs(tmp_path / "acq", 4)
    labels_csv = tmp_path / "labels.csv"
    labels_csv.write_text("path,label\n" + "".join(f"{p.name},{i % 2}\n" for i, p in enumerate(imgs)))
    from medadv.provenance.register import read_labels_csv

    _register(where, key, *imgs, labels=read_labels_csv(labels_csv))
    trust = org_of(where).trust
    good = _imageset(imgs, [0, 1, 0, 1])
    report = check_imageset(good, where, only_flag=False, trust_root=trust)
    assert report.ok and report.counts["verified"] == 4 and report.head is not None
    # the label the user supplies differs from the one signed at acquisition
    with pytest.raises(MedadvError, match=r"img1.png \(label-mismatch\)"):
        check_imageset(_imageset(imgs, [0, 0, 0, 1]), where, only_flag=False, trust_root=trust)
    # the files are swapped after loading: the gate judges the sources as `verify` does (one path, issue 22)
    # and fails closed: the swapped file no longer verifies, though the pixels in memory are the original's
    shutil.copy(imgs[0], imgs[3])
    assert check_imageset(good, where, only_flag=True, trust_root=trust).statuses[3] == "name-mismatch"
    # ...and loading the swapped file is caught, by name
    flagged = check_imageset(_imageset(imgs, [0, 1, 0, 1]), where, only_flag=True, trust_root=trust)
    assert flagged.statuses == ["verified", "verified", "verified", "name-mismatch"]
    # the gate trusts nothing without a root
    with pytest.raises(MedadvError, match="trust root"):
        check_imageset(good, where, only_flag=False, trust_root=tmp_path / "missing.pub")
    other, _, _ = init_root("other", tmp_path / "other")
    from medadv.provenance.keys import PublicKey
    from medadv.provenance.trust import TrustRoot

    foreign = TrustRoot(PublicKey("other", other.private_key.public_key()), "other")
    assert check_imageset(good, where, only_flag=True, trust_root=foreign).counts["unknown-device"] == 4


# ----------------------------------------------------------------------------------- truncation, heads


def test_truncation_is_caught_with_a_kept_head(ledger_where: str, tmp_path: Path, capsys) -> None:
    key = make_device(ledger_where, tmp_path / "keys")
    imgs = _pngs(tmp_path / "acq", 6)
    _register(ledger_where, key, *imgs[:3])
    kept = _save_head(ledger_where, tmp_path / "head.json", capsys)
    _register(ledger_where, key, *imgs[3:])
    code, text = _cli_check(ledger_where, capsys, "--head", kept)
    assert code == 0 and "consistency proof" in text
    with open_ledger(ledger_where, readonly=True) as ledger:  # a verdict's proof checks against its head
        v = verify_paths([imgs[0]], ledger, org_of(ledger_where).trust)[0]
        log_keys = ledger.trust_state(org_of(ledger_where).trust).log_keys
    assert v.ok and check_proof(v.proof, log_keys)
    bad = json.loads(json.dumps(v.proof))
    bad["leaf_hash"] = hashlib.sha256(b"x").hexdigest()
    assert not check_proof(bad, log_keys)
    drop_guards(ledger_where)
    raw_sql(ledger_where, "DELETE FROM records WHERE seq >= 4")  # rows only: the stored heads notice
    code, text = _cli_check(ledger_where, capsys)
    assert code == 1 and "records were deleted" in text
    assert _verdicts(ledger_where, imgs[0]) == [Status.VERIFIED]  # older records still prove against a head
    # a careful insider also deletes the heads and nodes past the cut: only a kept head catches it
    # (log-key entry #1 and enrollment #2 stay; the insider holds the log key, so heads 1 and 2 stay valid)
    raw_sql(ledger_where, "DELETE FROM records WHERE seq >= 3", "DELETE FROM heads WHERE size > 2",
            "DELETE FROM nodes WHERE level = 0 AND idx >= 2", "DELETE FROM nodes WHERE level >= 1 AND idx >= 1",
            "DELETE FROM nodes WHERE level >= 2")
    assert _cli_check(ledger_where, capsys) == (0, "")  # a shorter log is a valid log...
    code, text = _cli_check(ledger_where, capsys, "--head", kept)  # ...but not an extension of the kept head
    assert code == 1 and "truncated" in text
    # and a fork: the log regrows past the kept head with other records
    _register(ledger_where, key, *_pngs(tmp_path / "fork", 4, seed=3, prefix="fork"))
    code, text = _cli_check(ledger_where, capsys, "--head", kept)
    assert code == 1 and "not an extension of the kept head" in text


def test_log_clock_is_monotone_and_signer_clock_kept(tmp_path: Path) -> None:
    where = str(tmp_path / "ledger.sqlite")
    key = make_device(where, tmp_path / "keys")
    _register(where, key, *_pngs(tmp_path / "acq", 5))
    with open_ledger(where) as ledger:
        recs = list(ledger.iter_records())
    times = [r.logged_at for r in recs]
    assert times == sorted(times) and all(r.created_at for r in recs)
    drop_guards(where)
    raw_sql(where, f"UPDATE records SET logged_at = '2000-01-01T00:00:00.000000Z' WHERE seq = {recs[-1].seq}")
    with open_ledger(where) as ledger:
        reasons = [p.reason for p in ledger.check(org_of(where).trust).problems]
    assert any("log clock ran backwards" in r for r in reasons) and any("root does not match" in r for r in reasons)


# ----------------------------------------------------------------------------------------- bad rows


def test_rows_of_wrong_types_are_corrupt_not_crashes(tmp_path: Path, capsys) -> None:
    where = str(tmp_path / "ledger.sqlite")
    key = make_device(where, tmp_path / "keys")
    imgs = _pngs(tmp_path / "acq", 2)
    _register(where, key, *imgs)
    with open_ledger(where) as ledger:
        rec = next(r for r in ledger.iter_records() if r.name == imgs[1].name)
    # rows at no log position (plain INSERTs): corrupt where matched, the other images still verify
    raw_sql(where, "INSERT INTO records VALUES (2.5, 'p1', 'h1', 'image', 'd', NULL, 'n', 's', NULL, NULL, 'x', "
            "'k', 'l', 'c', 'l', '{}', 's')",
            "INSERT INTO records VALUES ('abc', 'p2', 'h2', 'image', 'd2', NULL, 'n', 's', NULL, NULL, 'x', 'k', "
            "'l', 'c', 'l', '{}', 's')")
    assert _verdicts(where, *imgs) == [Status.VERIFIED, Status.VERIFIED]
    # a record of the signed log edited in place: it might have been a revocation, so no verdict is
    # trusted until the log matches its signed head again (issue 22: fail closed, naming the record)
    drop_guards(where)
    raw_sql(where, f"UPDATE records SET meta = 'not json', signature = 42 WHERE seq = {rec.seq}")
    # this process audited the log before the edit: what it audited stands (the edited row is corrupt)
    assert _verdicts(where, *imgs) == [Status.VERIFIED, Status.CORRUPT]
    from medadv.provenance import audit

    audit.forget()  # as a fresh process sees it
    assert _verdicts(where, *imgs) == [Status.NOT_LOGGED, Status.CORRUPT]
    code, report = _cli_verify(where, *imgs, capsys=capsys)
    assert code == 1 and f"record #{rec.seq} is corrupt" in report["results"][0]["detail"]
    assert "corrupt" in report["results"][1]["detail"]
    code, text = _cli_check(where, capsys)  # terminates, names the rows
    assert code == 1 and "corrupt" in text and "'abc'" in text and "2.5" in text
    code, _, err = run_main(["provenance", "register", *_pngs(tmp_path / "more", 1, seed=4, prefix="m"), "--device",
                             "ct-1", "--keys", tmp_path / "keys", "--ledger", where], capsys)
    assert code == 2 and "Traceback" not in err and "corrupt" in err


def test_malformed_text_rows_on_any_engine(ledger_where: str, tmp_path: Path, capsys) -> None:
    key = make_device(ledger_where, tmp_path / "keys")
    imgs = _pngs(tmp_path / "acq", 2)
    _register(ledger_where, key, *imgs)
    drop_guards(ledger_where)
    raw_sql(ledger_where, "UPDATE records SET meta = '[1, 2' WHERE kind = 'image'")
    assert _verdicts(ledger_where, *imgs) == [Status.CORRUPT, Status.CORRUPT]
    assert _cli_check(ledger_where, capsys)[0] == 1


# ----------------------------------------------------------------------------------------- bad input


def test_decompression_bomb_is_one_unreadable_verdict(tmp_path: Path, monkeypatch, capsys) -> None:
    where = str(tmp_path / "ledger.sqlite")
    key = make_device(where, tmp_path / "keys")
    small = _pngs(tmp_path / "acq", 2)
    _register(where, key, *small)
    big = save_png(tmp_path / "acq2" / "bomb.png", np.zeros((200, 200), np.uint8))  # 40k px: tiny file
    (tmp_path / "acq2" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    monkeypatch.setenv("MEDADV_MAX_PIXELS", "10000")
    code, report = _cli_verify(where, small[0], big, tmp_path / "acq2" / "garbage.png", small[1], capsys=capsys)
    assert code == 1
    assert [r["status"] for r in report["results"]] == ["verified", "unreadable", "unreadable", "verified"]
    assert "decompression bomb" in report["results"][1]["detail"]
    bomb_npz = tmp_path / "acq2" / "bomb.npz"
    np.savez(bomb_npz, train_images=np.zeros((2, 200, 200), np.uint8))  # members over the limit: header only read
    code, report = _cli_verify(where, bomb_npz, small[0], capsys=capsys)
    assert code == 1 and [r["status"] for r in report["results"]] == ["unreadable", "verified"]


def test_a_read_only_ledger_can_be_verified(tmp_path: Path, monkeypatch, capsys) -> None:
    where = str(tmp_path / "ro" / "ledger.sqlite")
    key = make_device(where, tmp_path / "keys")
    imgs = _pngs(tmp_path / "acq", 2)
    _register(where, key, *imgs)
    import medadv.db as db_mod  # the ledger's engines are made there

    monkeypatch.setattr(db_mod, "_writable", lambda path: False)  # as on a read-only mount (tests may run as root)
    code, report = _cli_verify(where, *imgs, capsys=capsys)
    assert code == 0 and report["counts"] == {"verified": 2}
    assert _cli_check(where, capsys)[0] == 0


def test_the_cli_gate_needs_a_trust_root(tmp_path: Path, monkeypatch) -> None:
    from medadv.cli import RichMonitor, provenance_gate

    monkeypatch.delenv("MEDADV_TRUST_ROOT", raising=False)
    monkeypatch.setattr("medadv.provenance.trust.trust_root_default", lambda: tmp_path / "none.pub")
    with pytest.raises(MedadvError, match="no trust root is configured"):
        provenance_gate(str(tmp_path / "l.sqlite"), False, RichMonitor(True), None)
    where = str(tmp_path / "ledger.sqlite")
    make_org(where, tmp_path / "keys")
    monkeypatch.setenv("MEDADV_TRUST_ROOT", str(org_of(where).root_pub))
    assert provenance_gate(where, False, RichMonitor(True), None) is not None
    with open_ledger(where) as ledger:  # a trust entry signed by a non-root key confers nothing
        entries = [Entry.trust("enroll", "x", {"subject_key_id": "0" * 32})]
        ledger.append_entries(entries, generate_key("x", tmp_path / "x"), org_of(where).log)
        assert ledger.trust_state(org_of(where).trust).problems


def test_a_physically_corrupted_index_page_is_caught(tmp_path: Path, capsys) -> None:
    """Bytes flipped inside an index b-tree page (the table rows intact): the engine's integrity check finds it."""
    import sqlite3

    where = str(tmp_path / "ledger.sqlite")
    key = make_device(where, tmp_path / "keys")
    _register(where, key, *_pngs(tmp_path / "acq", 5))
    conn = sqlite3.connect(where)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    rootpage = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'ix_records_digest'").fetchone()[0]
    conn.close()
    data = bytearray(Path(where).read_bytes())
    end = rootpage * page
    for i in range(end - 200, end - 100):  # the cell content area, at the end of the page
        data[i] ^= 0x5A
    Path(where).write_bytes(bytes(data))
    code, out, err = run_main(["provenance", "check-ledger", "--ledger", where, "--trust-root", org_of(where).root_pub],
                              capsys)
    assert code != 0 and "Traceback" not in err
    assert "integrity" in out + err or "corrupt" in out + err


def test_gate_binds_the_dicom_window_the_model_applies(tmp_path: Path) -> None:
    """DICOM pixels reach the model with their VOI window aside: a window changed after registration is
    another model input, so the gate refuses it even though the stored values are the same."""
    import pydicom
    from pydicom.data import get_testdata_file

    from medadv.data.folder import load_images_full
    from medadv.data.imageset import ImageSet
    from medadv.provenance.gate import check_imageset

    where = str(tmp_path / "ledger.sqlite")
    key = make_device(where, tmp_path / "keys")
    src = tmp_path / "acq" / "ct.dcm"
    src.parent.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.save_as(src)
    _register(where, key, src)

    def imageset() -> ImageSet:
        loaded = load_images_full([src], None, "test")
        return ImageSet(pixels=loaded.pixels, labels=np.zeros(1, np.int64), ids=[src.name], task="t", split="test",
                        source=str(src.parent), checksum="", files=[src], window=loaded.window)

    trust_root = org_of(where).trust
    assert check_imageset(imageset(), where, only_flag=False, trust_root=trust_root).ok
    ds.WindowCenter = "400"
    ds.save_as(src)
    report = check_imageset(imageset(), where, only_flag=True, trust_root=trust_root)
    assert report.statuses == ["modified"]


def test_postgres_integrity_check_uses_amcheck(pg_url: str, tmp_path: Path) -> None:
    key = make_device(pg_url, tmp_path / "keys")
    _register(pg_url, key, *_pngs(tmp_path / "acq", 3))
    with open_ledger(pg_url, readonly=True) as ledger:
        assert ledger.check(org_of(pg_url).trust).integrity.startswith("not available")
    raw_sql(pg_url, "CREATE EXTENSION IF NOT EXISTS amcheck")
    with open_ledger(pg_url, readonly=True) as ledger:
        report = ledger.check(org_of(pg_url).trust)
    assert report.ok and report.integrity == "ok"


def test_proofs_check_offline_from_the_trust_root_alone(tmp_path: Path, capsys) -> None:
    """`verify --json` carries, per verified image, the signed record, its inclusion proof and the signed
    head, and the root-signed entries behind them: `check-proof` needs no ledger, only the trust root."""
    where = str(tmp_path / "ledger.sqlite")
    key = make_device(where, tmp_path / "keys")
    imgs = _pngs(tmp_path / "acq", 3)
    _register(where, key, *imgs)
    code, report = _cli_verify(where, *imgs, capsys=capsys)
    assert code == 0
    saved = tmp_path / "verify.json"
    saved.write_text(json.dumps(report))
    Path(where).unlink()  # no ledger from here on
    root = org_of(where).root_pub
    code, out, _ = run_main(["provenance", "check-proof", saved, "--trust-root", root], capsys)
    assert code == 0 and "3 of 3 proofs check" in out
    tampered = json.loads(saved.read_text())
    tampered["results"][1]["proof"]["record"]["name"] = "someone-else.png"  # edit the record
    tampered["results"][2]["proof"]["path"][0] = "00" * 32  # edit the audit path
    saved.write_text(json.dumps(tampered))
    code, out, _ = run_main(["provenance", "check-proof", saved, "--trust-root", root], capsys)
    assert code == 1 and "1 of 3 proofs check" in out and "signature" in out and "inclusion proof" in out
    other, other_pub, _ = init_root("other", tmp_path / "other")
    saved.write_text(json.dumps(report))
    code, out, _ = run_main(["provenance", "check-proof", saved, "--trust-root", other_pub], capsys)
    assert code == 1 and "0 of 3 proofs check" in out and "not signed by the trust root" in out


def test_register_can_skip_unreadable_files(tmp_path: Path, monkeypatch, capsys) -> None:
    where = str(tmp_path / "ledger.sqlite")
    make_device(where, tmp_path / "keys")
    good = _pngs(tmp_path / "acq", 2)
    save_png(tmp_path / "acq" / "zbomb.png", np.zeros((200, 200), np.uint8))
    monkeypatch.setenv("MEDADV_MAX_PIXELS", "10000")
    argv = ["provenance", "register", tmp_path / "acq", "--device", "ct-1", "--keys", tmp_path / "keys", "--ledger",
            where, "--json"]
    code, _, err = run_main(argv, capsys)  # default: all or nothing, one line
    assert code == 2 and "zbomb.png" in err and "Traceback" not in err
    code, out, err = run_main([*argv, "--skip-unreadable"], capsys)
    assert code == 1 and json.loads(out)["added"] == 2 and "zbomb.png" in err
    assert _verdicts(where, *good) == [Status.VERIFIED, Status.VERIFIED]
