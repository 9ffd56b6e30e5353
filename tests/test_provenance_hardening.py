"""Issue 22, the trust items: an insider with write access to the ledger database (no private key) and a
careless operator. Each test reproduces one failure the issue names and checks what must hold instead:
raw SQL on the database, no private key, every command ends in a verdict or one line, never a traceback."""

# ruff: noqa: F811  (pytest fixtures imported from provenance_support)
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from provenance_support import drop_guards, make_device, make_org, org_of, raw_sql, run_main, save_png
from pydicom.data import get_testdata_file

from medadv import strictjson
from medadv.errors import MedadvError
from medadv.provenance import audit
from medadv.provenance.gate import check_imageset
from medadv.provenance.ledger import open_ledger
from medadv.provenance.org import revoke
from medadv.provenance.register import register_paths
from medadv.provenance.verify import Status, verify_digests, verify_paths

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(autouse=True)
def _fresh_process() -> None:
    """Each test starts as a new process would: nothing audited yet."""
    audit.forget()


def _pngs(folder: Path, n: int, seed: int = 0, prefix: str = "img", size: tuple[int, int] = (10, 10)) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [save_png(folder / f"{prefix}{i}.png", rng.integers(0, 256, size, dtype=np.uint8)) for i in range(n)]


def _register(where: str, key, *paths: Path) -> None:
    with open_ledger(where) as ledger:
        register_paths(paths, ledger, key, org_of(where).log)


def _verdicts(where: str, *paths: Path, **kw) -> list[Status]:
    with open_ledger(where, readonly=True) as ledger:
        return [v.status for v in verify_paths(paths, ledger, org_of(where).trust, **kw)]


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code, out, err = run_main([str(a) for a in argv], capsys)
    assert "Traceback" not in err and "internal error" not in err, err
    return code, out, err


def _imageset(paths: list[Path], *, fit_size: int | None = None):
    """The ImageSet medadv's folder reader makes of ``paths`` (fitted to ``fit_size`` when uneven)."""
    from medadv.data.folder import load_images_full
    from medadv.data.imageset import ImageSet

    out = load_images_full(list(paths), None, str(paths[0].parent), "letterbox", fit_size)
    return ImageSet(pixels=out.pixels, labels=np.zeros(len(paths), np.int64), ids=[p.name for p in paths], task="t",
                    split="test", source=str(paths[0].parent), checksum="", files=list(paths), window=out.window,
                    meta={"fit": "letterbox"})


def _gate(where: str, paths: list[Path], **kw) -> list[str]:
    return check_imageset(_imageset(paths, fit_size=kw.pop("fit_size", None)), where, only_flag=True,
                          trust_root=org_of(where).trust, **kw).statuses


def _revoked_setup(tmp_path: Path, capsys) -> tuple[str, object, Path, Path, Path]:
    """ct-1 registers `before`, its key is revoked (CLI), the stolen key registers `after`; a head is kept."""
    where = str(tmp_path / "ledger.sqlite")
    key = make_device(where, tmp_path / "keys", "ct-1")
    org = org_of(where)
    before, after = _pngs(tmp_path / "acq", 1)[0], _pngs(tmp_path / "late", 1, seed=5, prefix="late")[0]
    _register(where, key, before)
    code, _, err = _cli(capsys, "provenance", "revoke", "--device", "ct-1", "--key-id", key.key_id, "--root-key",
                        org.root.path, "--log-key", org.log.path, "--ledger", where)
    assert code == 0, err
    kept = tmp_path / "kept.json"
    assert _cli(capsys, "provenance", "head", "--ledger", where, "--trust-root", org.root_pub, "--out", kept)[0] == 0
    _register(where, key, after)  # the stolen key keeps signing (below the CLI's door)
    assert _verdicts(where, before, after) == [Status.VERIFIED, Status.REVOKED]
    return where, key, before, after, kept


# ------------------------------------------------------------------------ 1. deleting a revocation


def test_deleting_a_revocation_does_not_bring_the_key_back(tmp_path: Path, capsys) -> None:
    where, key, before, after, _ = _revoked_setup(tmp_path, capsys)
    org = org_of(where)
    drop_guards(where)
    raw_sql(where, "DELETE FROM records WHERE kind = 'revoke'")
    # this process audited the log before: what it audited (the revocation included) stands
    assert _verdicts(where, after) == [Status.REVOKED]
    audit.forget()  # a fresh process: the log no longer matches its signed head, nothing is trusted
    got = _verdicts(where, before, after)
    assert Status.VERIFIED not in got and got == [Status.NOT_LOGGED, Status.NOT_LOGGED]
    code, out, _ = _cli(capsys, "provenance", "verify", after, "--ledger", where, "--trust-root", org.root_pub,
                        "--json")
    detail = json.loads(out)["results"][0]["detail"]
    assert code == 1 and "does not match its signed head" in detail and "missing" in detail
    # the gate (the same path) refuses it
    with pytest.raises(MedadvError, match=r"late0.png \(not-logged\)"):
        check_imageset(_imageset([after]), where, only_flag=False, trust_root=org.trust)
    # the service's path (verify_digests, what `serve` and `serve batch` call) says the same
    from medadv.provenance.digest import digest_file

    with open_ledger(where, readonly=True) as ledger:
        assert [v.status for v in verify_digests(ledger, [("late0.png", digest_file(after))], org.trust)] == \
            [Status.NOT_LOGGED]


def test_a_consistent_truncation_after_a_revocation_is_caught_with_a_kept_head(tmp_path: Path, capsys,
                                                                                monkeypatch) -> None:
    """The insider (database, log key, the stolen device key) cuts the log back to before the revocation,
    rows, Merkle nodes and heads alike, and registers with the stolen key again: the log is consistent in
    itself, so only a kept head can tell; `verify --head` and the gate with a kept head must."""
    where, key, before, _, kept = _revoked_setup(tmp_path, capsys)
    org = org_of(where)
    with open_ledger(where) as ledger:
        cut = next(r.seq for r in ledger.iter_records() if r.kind == "revoke") - 1
    drop_guards(where)
    raw_sql(where, f"DELETE FROM records WHERE seq > {cut}", f"DELETE FROM heads WHERE size > {cut}",
            f"DELETE FROM nodes WHERE (idx + 1) * (1 << level) > {cut}")
    audit.forget()
    evil = _pngs(tmp_path / "evil", 1, seed=11, prefix="evil")[0]
    _register(where, key, evil)
    audit.forget()
    assert _verdicts(where, evil) == [Status.VERIFIED]  # consistent in itself: without a kept head it passes
    assert _verdicts(where, evil, before, kept_head=json.loads(kept.read_text())) == [Status.NOT_LOGGED] * 2
    code, out, _ = _cli(capsys, "provenance", "verify", evil, "--ledger", where, "--trust-root", org.root_pub,
                        "--head", kept, "--json")
    assert code == 1 and "kept head" in json.loads(out)["results"][0]["detail"]
    with pytest.raises(MedadvError, match=r"evil0.png \(not-logged\)"):
        check_imageset(_imageset([evil]), where, only_flag=False, trust_root=org.trust, kept_head=kept)
    # the commands' gate takes the kept head from MEDADV_KEPT_HEAD
    from medadv.cli import provenance_gate
    from medadv.progress import SILENT

    monkeypatch.setenv("MEDADV_KEPT_HEAD", str(kept))
    gate = provenance_gate(where, True, SILENT, str(org.root_pub))
    assert gate(_imageset([evil]))["failing"][0]["status"] == "not-logged"


# ------------------------------------------------------------------------ 2. one inserted row


def test_inserted_rows_with_nan_or_deep_meta_are_corrupt_not_crashes(tmp_path: Path, capsys) -> None:
    """Plain INSERTs (no trigger dropped): meta with NaN, meta nested 100,000 deep, rows at seq 0 and -5. Every
    check goes on: the rows are `corrupt`, named by seq; the other images still verify."""
    where = str(tmp_path / "ledger.sqlite")
    key = make_device(where, tmp_path / "keys")
    org = org_of(where)
    good, other = _pngs(tmp_path / "acq", 2)
    _register(where, key, good)
    from medadv.provenance.digest import digest_file

    victim = digest_file(other).digest
    with open_ledger(where) as ledger:
        top = ledger.head()[0]
    row = ("INSERT INTO records VALUES ({seq}, '{h1}', '{h2}', 'image', '{d}', NULL, 'img1.png', 'img1', NULL, NULL, "
           "'ct-1', '{k}', 'x', 'c', 'l', '{meta}', '{s}')")
    raw_sql(where, *(row.format(seq=seq, h1=f"{n + 100:064x}", h2=f"{n + 200:064x}", d=victim, k="0" * 32, s="0" * 128,
                                meta=meta)
                     for n, (seq, meta) in enumerate([(top + 1, '{"a": NaN}'), (top + 2, '{"a":' + DEEP + '}'),
                                                      (0, "{}"), (-5, '{"a": Infinity}')])))
    assert _verdicts(where, good, other) == [Status.VERIFIED, Status.CORRUPT]
    code, out, _ = _cli(capsys, "provenance", "verify", good, other, "--ledger", where, "--trust-root",
                        org.root_pub, "--json")
    res = json.loads(out)["results"]
    assert code == 1 and res[0]["status"] == "verified" and res[1]["status"] == "corrupt"
    assert any(f"row #{seq} is corrupt" in res[1]["detail"] for seq in (top + 1, top + 2, 0, -5))
    assert _gate(where, [good, other]) == ["verified", "corrupt"]
    code, out, _ = _cli(capsys, "provenance", "head", "--ledger", where, "--trust-root", org.root_pub)
    assert code == 0 and json.loads(out)["size"] == top
    code, out, _ = _cli(capsys, "provenance", "check-ledger", "--ledger", where, "--trust-root", org.root_pub,
                        "--json")
    named = {p["seq"] for p in json.loads(out)["problems"] if "corrupt" in p["reason"]}
    assert code == 1 and {top + 1, top + 2, 0, -5} <= named
    # the service's path
    with open_ledger(where, readonly=True) as ledger:
        got = verify_digests(ledger, [("img0.png", digest_file(good)), ("img1.png", digest_file(other))], org.trust)
    assert [v.status for v in got] == [Status.VERIFIED, Status.CORRUPT]


def test_deep_or_nan_json_files_are_refused_with_one_line(tmp_path: Path, capsys) -> None:
    where = str(tmp_path / "ledger.sqlite")
    make_org(where, tmp_path / "keys")
    org = org_of(where)
    deep, nan = tmp_path / "deep.json", tmp_path / "nan.json"
    deep.write_text(DEEP)
    nan.write_text('{"results": [], "trust": {}, "x": NaN}')
    for argv in (["provenance", "check-proof", deep, "--trust-root", org.root_pub],
                 ["provenance", "check-proof", nan, "--trust-root", org.root_pub],
                 ["provenance", "check-ledger", "--ledger", where, "--trust-root", org.root_pub, "--head", deep],
                 ["provenance", "verify", tmp_path, "--ledger", where, "--trust-root", org.root_pub, "--head", deep],
                 ["provenance", "enroll", deep, "--root-key", org.root.path, "--ledger", where, "--keys",
                  tmp_path / "keys"]):
        code, _, err = _cli(capsys, *argv)
        assert code != 0 and "is not valid JSON" in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert ("nested 100000 levels" in err or "bytes" in err) if argv[2] == deep or argv[-1] == deep \
            else "NaN" in err, (argv, err)
    pub = tmp_path / "svc.pub"
    shutil.copy(org.root_pub, pub)
    code, _, err = _cli(capsys, "provenance", "verify-receipt", deep, "--public-key", pub)
    assert code == 1 and "does not verify" in err and "nested" in err


def test_strictjson_api() -> None:
    assert strictjson.loads(b'{"a": [1, {"b": "[[[["}]}', max_bytes=100, max_depth=3) == {"a": [1, {"b": "[[[["}]}
    for bad, why in (('{"a": NaN}', "NaN"), ("[-Infinity]", "Infinity"), ('{"a": 1, "a": 2}', "duplicate key"),
                     (DEEP, "nested 100000 levels"), ("[[[[1]]]]", "nested 4 levels"), (b"\xff\xfe", "not UTF-8"),
                     ("{", "")):
        with pytest.raises(MedadvError, match="is not valid JSON") as exc:
            strictjson.loads(bad, max_bytes=1 << 20, max_depth=3)
        assert why in exc.value.what
    for big in ('"' + "x" * 200 + '"', b"[" + b"1," * 60 + b"1]"):
        with pytest.raises(MedadvError, match="bytes"):
            strictjson.loads(big, max_bytes=100, max_depth=3)


# ------------------------------------------------------------------------ 3. check-proof binds the image


def test_check_proof_binds_the_image_to_the_proven_leaf(tmp_path: Path, capsys) -> None:
    where = str(tmp_path / "ledger.sqlite")
    key = make_device(where, tmp_path / "keys")
    org = org_of(where)
    a, m = _pngs(tmp_path / "acq", 2)
    _register(where, key, a, m)
    arr = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(m)).copy()
    arr[0, 0] ^= 1
    save_png(m, arr)  # modified in place
    code, out, _ = _cli(capsys, "provenance", "verify", a, m, "--ledger", where, "--trust-root", org.root_pub,
                        "--json")
    doc = json.loads(out)
    assert code == 1 and [r["status"] for r in doc["results"]] == ["verified", "modified"]
    honest = tmp_path / "honest.json"
    honest.write_text(json.dumps(doc))
    code, out, _ = _cli(capsys, "provenance", "check-proof", honest, "--trust-root", org.root_pub)
    assert code == 0 and "1 of 1 proofs" in out
    doc["results"][1]["status"] = "verified"  # the modified row gets the verified row's status and proof
    doc["results"][1]["proof"] = doc["results"][0]["proof"]
    doctored = tmp_path / "doctored.json"
    doctored.write_text(json.dumps(doc))
    code, out, _ = _cli(capsys, "provenance", "check-proof", doctored, "--trust-root", org.root_pub)
    assert code == 1 and "1 of 2 proofs" in out and "FAILED" in out and "another image" in out
    doc["results"][1]["digest"] = doc["results"][0]["digest"]  # the digest copied too: the name still differs
    doc["results"][1]["seq"] = doc["results"][0]["seq"]
    doctored.write_text(json.dumps(doc))
    code, out, _ = _cli(capsys, "provenance", "check-proof", doctored, "--trust-root", org.root_pub)
    assert code == 1 and "is not named img0.png" in out


# ------------------------------------------------------------------------ 4. only the root signs trust entries


def test_enroll_revoke_rotate_refuse_a_key_that_is_not_the_root(tmp_path: Path, capsys) -> None:
    where = str(tmp_path / "ledger.sqlite")
    keys = tmp_path / "keys"
    dev = make_device(where, keys, "ct-1")
    org = org_of(where)
    other_root = make_org(str(tmp_path / "other.sqlite"), tmp_path / "other", org="rival").root
    _cli(capsys, "provenance", "keygen", "--device", "ct-9", "--keys", tmp_path / "req")
    request = tmp_path / "req" / "ct-9.request.json"
    with open_ledger(where) as ledger:
        size = ledger.count()
    for wrong in (other_root.path, dev.path, org.log.path):
        for argv in (["provenance", "enroll", request, "--root-key", wrong],
                     ["provenance", "revoke", "--device", "ct-1", "--key-id", dev.key_id, "--root-key", wrong],
                     ["provenance", "rotate", request, "--root-key", wrong]):
            code, out, err = _cli(capsys, *argv, "--ledger", where, "--log-key", org.log.path)
            assert code != 0 and "is not the root key that initialised ledger" in err, (wrong, argv, err)
            assert len(err.strip().splitlines()) == 1 and "organisation's root private key" in err
    # a configured trust root that is not the signing key: refused too
    code, _, err = _cli(capsys, "provenance", "revoke", "--device", "ct-1", "--key-id", dev.key_id, "--root-key",
                        org.root.path, "--log-key", org.log.path, "--ledger", where, "--trust-root",
                        tmp_path / "other" / "rival.root.pub")
    assert code != 0 and "is not the organisation's root key" in err
    with open_ledger(where) as ledger:
        assert ledger.count() == size  # nothing was appended
    code, _, err = _cli(capsys, "provenance", "revoke", "--device", "ct-1", "--key-id", dev.key_id, "--root-key",
                        org.root.path, "--log-key", org.log.path, "--ledger", where, "--trust-root", org.root_pub)
    assert code == 0, err


# ------------------------------------------------------------------------ 5. head --out keeps a kept head


def test_head_out_refuses_an_existing_file_unless_forced(tmp_path: Path, capsys) -> None:
    where = str(tmp_path / "ledger.sqlite")
    make_org(where, tmp_path / "keys")
    org = org_of(where)
    kept = tmp_path / "h.json"
    kept.write_text("kept")
    code, _, err = _cli(capsys, "provenance", "head", "--ledger", where, "--trust-root", org.root_pub, "--out", kept)
    assert code != 0 and "already exists" in err and "--force" in err and kept.read_text() == "kept"
    code, _, err = _cli(capsys, "provenance", "head", "--ledger", where, "--trust-root", org.root_pub, "--out", kept,
                        "--force")
    assert code == 0 and json.loads(kept.read_text())["type"] == "medadv-tree-head/1"


# ------------------------------------------------------------------------ 7. smaller


def test_register_with_a_revoked_key_is_refused(tmp_path: Path, capsys) -> None:
    where = str(tmp_path / "ledger.sqlite")
    keys = tmp_path / "keys"
    key = make_device(where, keys, "ct-1")
    org = org_of(where)
    with open_ledger(where) as ledger:
        revoke(ledger, org.root, "ct-1", key.key_id, org.log)
        size = ledger.count()
    img = _pngs(tmp_path / "acq", 1)[0]
    code, _, err = _cli(capsys, "provenance", "register", img, "--device", "ct-1", "--keys", keys, "--ledger", where)
    assert code != 0 and "was revoked" in err and len(err.strip().splitlines()) == 1
    with open_ledger(where) as ledger:
        assert ledger.count() == size


def test_two_encodings_of_one_image_the_second_is_refused(tmp_path: Path, capsys) -> None:
    where = str(tmp_path / "ledger.sqlite")
    keys = tmp_path / "keys"
    make_device(where, keys, "ct-1")
    arr = np.random.default_rng(3).integers(0, 256, (16, 16), dtype=np.uint8)
    first = save_png(tmp_path / "a" / "scan.png", arr, compress_level=0)
    second = save_png(tmp_path / "b" / "scan-copy.png", arr, compress_level=9)
    assert first.read_bytes() != second.read_bytes()
    code, _, err = _cli(capsys, "provenance", "register", first, "--device", "ct-1", "--keys", keys, "--ledger", where)
    assert code == 0, err
    code, _, err = _cli(capsys, "provenance", "register", second, "--device", "ct-1", "--keys", keys, "--ledger",
                        where)
    assert code != 0 and "scan-copy.png has the same pixels as scan.png" in err
    got = _verdicts(where, first, second)
    assert got[0] is Status.VERIFIED and got[1] in (Status.NAME_MISMATCH, Status.UNREGISTERED)  # not two `duplicate`s
    # both in one registration: refused, nothing written
    third = save_png(tmp_path / "c" / "again.png", arr)
    code, _, err = _cli(capsys, "provenance", "register", third, second, "--device", "ct-1", "--keys", keys,
                        "--ledger", where)
    assert code != 0 and "same pixels" in err


def test_root_key_and_trust_root_errors_name_the_organisations_root(tmp_path: Path, capsys) -> None:
    where = str(tmp_path / "ledger.sqlite")
    make_device(where, tmp_path / "keys", "ct-1")
    org = org_of(where)
    for bad in (org.root.path, tmp_path / "keys" / "ct-1.key"):  # a private key given as the trust root
        code, _, err = _cli(capsys, "provenance", "verify", tmp_path, "--ledger", where, "--trust-root", bad)
        assert code != 0 and "root public key <org>.root.pub" in err and "<device>.pub" not in err
    code, _, err = _cli(capsys, "provenance", "revoke", "--device", "ct-1", "--key-id", "0" * 32, "--root-key",
                        tmp_path / "missing.root.key", "--ledger", where)
    assert code != 0 and "organisation's root private key" in err and "keygen" not in err


def test_check_ledger_names_rows_at_seq_zero_or_below(tmp_path: Path, capsys) -> None:
    where = str(tmp_path / "ledger.sqlite")
    make_org(where, tmp_path / "keys")
    org = org_of(where)
    row = ("INSERT INTO records VALUES ({seq}, '{h}', '{g}', 'image', '{h}', NULL, 'x.png', 'x', NULL, NULL, 'ct-1', "
           "'{k}', 'x', 'c', 'l', '{{}}', '{s}')")
    raw_sql(where, row.format(seq=0, h="1" * 64, g="2" * 64, k="0" * 32, s="0" * 128),
            row.format(seq=-3, h="3" * 64, g="4" * 64, k="0" * 32, s="0" * 128))
    code, out, _ = _cli(capsys, "provenance", "check-ledger", "--ledger", where, "--trust-root", org.root_pub, "--json")
    problems = json.loads(out)["problems"]
    assert code == 1 and {0, -3} <= {p["seq"] for p in problems}
    assert any("row #-3 is corrupt" in p["reason"] for p in problems)


# ------------------------------------------------------------------------ 10. one verification path


def _non_square_dicom(path: Path, cols: int = 48) -> Path:
    """A non-square 12-bit-stored DICOM (64x48): fitted to a model's input, the reader's two routes (from the
    decoded values, from the stored grid) differ by a grey level here and there; the old gate re-rendered it
    by the other route and called the registered original `modified`."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    arr = np.clip(ds.pixel_array[:, :cols].astype(np.int32) * 3, 0, 4095).astype(np.uint16)
    ds.Columns, ds.PixelRepresentation, ds.BitsStored, ds.HighBit = cols, 0, 12, 11
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


def test_gate_and_verify_agree_on_every_verdict(tmp_path: Path) -> None:
    """A mixed set loaded as a model gets it (non-square 16-bit DICOM and 8-bit PNGs fitted to 32x32):
    original, modified, renamed adversarial DICOM, unregistered, revoked key. The gate and `verify` give the
    same verdict on each, and the registered originals (the non-square DICOM included) pass the gate."""
    where = str(tmp_path / "ledger.sqlite")
    keys = tmp_path / "keys"
    key = make_device(where, keys, "ct-1")
    stolen = make_device(where, keys, "ct-2")
    org = org_of(where)
    acq = tmp_path / "acq"
    dcm = _non_square_dicom(acq / "mr.dcm")
    png, mod = _pngs(acq, 2)
    (theft,) = _pngs(acq, 1, seed=4, prefix="theft")
    _register(where, key, dcm, png, mod)
    _register(where, stolen, theft)
    with open_ledger(where) as ledger:
        first = next(r.seq for r in ledger.iter_records() if r.name == theft.name)
        revoke(ledger, org.root, "ct-2", stolen.key_id, org.log, effective_seq=first)
    site = tmp_path / "site"
    shutil.copytree(acq, site)
    arr = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(site / mod.name)).copy()
    arr[1, 1] ^= 4
    save_png(site / mod.name, arr)
    ds = pydicom.dcmread(dcm)  # an adversarial copy of the DICOM, saved under another name (same SOPInstanceUID)
    adv = ds.pixel_array.copy()
    adv[10, 10] += 3
    ds.PixelData = adv.tobytes()
    ds.save_as(site / "mr-renamed.dcm")
    (unreg,) = _pngs(site, 1, seed=9, prefix="new")
    files = [site / "mr.dcm", site / png.name, site / mod.name, site / "mr-renamed.dcm", unreg, site / theft.name]
    expected = ["verified", "verified", "modified", "modified", "unregistered", "revoked"]
    assert [s.value for s in _verdicts(where, *files)] == expected
    images = _imageset(files, fit_size=32)
    assert images.size == (32, 32) and images.pixels.dtype == np.uint16  # fitted, 16-bit: the hard case
    assert _gate(where, files, fit_size=32) == expected
    # the originals alone pass the gate (not refused as `modified` one grey level away)
    check_imageset(_imageset(files[:2], fit_size=32), where, only_flag=False, trust_root=org.trust)
    # pixels changed after loading are not vouched for, though the file verifies
    images = _imageset(files[:2], fit_size=32)
    images.pixels[1, 0, 0, 0] ^= 1
    report = check_imageset(images, where, only_flag=True, trust_root=org.trust)
    assert report.statuses == ["verified", "modified"] and "changed after loading" in report.verdicts[1].detail
