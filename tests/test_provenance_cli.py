"""The provenance commands: exit codes (0 ok, 1 not verified / chain broken, 2 bad input), one-line
errors without tracebacks, JSON output, and a ledger left untouched when a command fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from provenance_support import cli_env, drop_guards, raw_sql, run_main, save_png, small_npz

from medadv.provenance.ledger import open_ledger


def _one_error_line(err: str, *words: str) -> None:
    # progress lines (RichMonitor logs stages when stderr is not a terminal) are not errors
    lines = [line for line in err.splitlines() if line.startswith("medadv:")]
    assert len(lines) == 1, err
    assert lines[0].startswith("medadv: error: ") and " Fix: " in lines[0], err
    for w in words:
        assert w in lines[0], (w, err)
    assert "Traceback" not in err


def _state(ledger: Path) -> tuple[int, tuple[int, str]]:
    with open_ledger(ledger) as book:
        return book.count(), book.head()


def _images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(3)
    return [save_png(folder / f"img{i}.png", rng.integers(0, 256, (12, 12), dtype=np.uint8)) for i in range(n)]


def _org(tmp_path: Path, capsys, device: str = "ct-1") -> tuple[Path, Path, Path]:
    """init, keygen, enroll through the command line: (ledger, keystore, trust root file)."""
    ledger, keys = tmp_path / "ledger.sqlite", tmp_path / "keys"
    code, out, err = run_main(["provenance", "init", "--org", "acme", "--keys", keys, "--ledger", ledger], capsys)
    assert code == 0 and "acme" in out and ledger.is_file(), err
    assert (keys / "acme.root.key").stat().st_mode & 0o777 == 0o600
    assert (keys / "log.key").stat().st_mode & 0o777 == 0o600
    code, out, err = run_main(["provenance", "keygen", "--device", device, "--keys", keys], capsys)
    assert code == 0 and device in out and (keys / f"{device}.request.json").is_file(), err
    assert (keys / f"{device}.key").stat().st_mode & 0o777 == 0o600
    code, out, err = run_main(["provenance", "enroll", keys / f"{device}.request.json", "--root-key",
                               keys / "acme.root.key", "--keys", keys, "--ledger", ledger], capsys)
    assert code == 0 and "enrolled" in out and (keys / f"{device}.enrollment.json").is_file(), err
    return ledger, keys, keys / "acme.root.pub"


def test_keygen_register_verify_check(tmp_path: Path, capsys) -> None:
    ledger, keys, root = _org(tmp_path, capsys)
    imgs = _images(tmp_path / "acq", 4)
    npz = small_npz(tmp_path / "acq", per_split=2)
    code, out, _ = run_main(["provenance", "register", tmp_path / "acq", "--device", "ct-1", "--keys", keys,
                             "--ledger", ledger, "--json"], capsys)
    summary = json.loads(out)
    assert code == 0 and (summary["files"], summary["images"], summary["added"]) == (5, 10, 10)
    code, out, _ = run_main(["provenance", "verify", *imgs, npz, "--ledger", ledger, "--trust-root", root], capsys)
    assert code == 0 and "10 verified" in out
    code, out, _ = run_main(["provenance", "check-ledger", "--ledger", ledger, "--trust-root", root], capsys)
    assert code == 0 and "12 records" in out and "intact" in out

    with Image.open(imgs[1]) as im:
        edited = np.asarray(im).copy()
    edited[5, 5] = int(edited[5, 5]) ^ 1
    save_png(imgs[1], edited)
    code, out, _ = run_main(["provenance", "verify", *imgs, tmp_path / "nope.png", "--ledger", ledger, "--json",
                             "--trust-root", root], capsys)
    report = json.loads(out)
    assert code == 1 and report["verified"] is False
    assert [r["status"] for r in report["results"]] == ["verified", "modified", "verified", "verified", "unreadable"]
    assert report["counts"] == {"modified": 1, "unreadable": 1, "verified": 3}


def test_check_ledger_exits_1_and_names_the_record(tmp_path: Path, capsys) -> None:
    ledger, keys, root = _org(tmp_path, capsys)
    _images(tmp_path / "acq", 5)
    run_main(["provenance", "register", tmp_path / "acq", "--device", "ct-1", "--keys", keys, "--ledger", ledger,
              "--batch-size", "2"], capsys)
    head = tmp_path / "head.json"
    code, _, err = run_main(["provenance", "head", "--ledger", ledger, "--trust-root", root, "--out", head], capsys)
    assert code == 0 and json.loads(head.read_text())["size"] == 7, err
    drop_guards(str(ledger))
    raw_sql(str(ledger), "DELETE FROM records WHERE seq = 4")
    code, out, err = run_main(["provenance", "check-ledger", "--ledger", ledger, "--trust-root", root], capsys)
    assert code == 1
    assert "broken at record #5: record 4 is missing (deleted)" in err
    code, _, err = run_main(["provenance", "check-ledger", "--ledger", ledger, "--trust-root", root, "--head", head],
                            capsys)
    assert code == 1 and "Traceback" not in err


def test_bad_input_is_one_line_exit_2_and_leaves_the_ledger_untouched(tmp_path: Path, capsys) -> None:
    ledger, keys, root = _org(tmp_path, capsys)
    imgs = _images(tmp_path / "acq", 3)
    run_main(["provenance", "register", *imgs, "--device", "ct-1", "--keys", keys, "--ledger", ledger], capsys)
    before = _state(ledger)
    bytes_before = ledger.read_bytes()

    (tmp_path / "acq" / "broken.png").write_bytes(imgs[0].read_bytes()[:50])
    new = _images(tmp_path / "more", 2)
    cases = [
        (["provenance", "register", *new, tmp_path / "acq" / "broken.png", "--device", "ct-1", "--keys", keys,
          "--ledger", ledger], ["broken.png", "corrupt"]),
        (["provenance", "register", *new, "--device", "ct-2", "--keys", keys, "--ledger", ledger],
         ["no private key for device ct-2"]),
        (["provenance", "keygen", "--device", "ct-1", "--keys", keys],
         ["already has a private key"]),
        (["provenance", "verify", *imgs, "--ledger", tmp_path / "missing.sqlite", "--trust-root", root],
         ["missing.sqlite", "does not exist"]),
        (["provenance", "verify", *imgs, "--ledger", "postgresql://u:secret@127.0.0.1:9/none", "--trust-root", root],
         ["127.0.0.1", "***"]),
        (["provenance", "verify", *imgs, "--ledger", ledger, "--trust-root", tmp_path / "nokeys.pub"],
         ["trust root", "does not exist"]),
        (["provenance", "enroll", imgs[0], "--root-key", keys / "acme.root.key", "--keys", keys, "--ledger", ledger],
         ["enrollment request", "keygen"]),
    ]
    other = tmp_path / "other"
    run_main(["provenance", "keygen", "--device", "ct-9", "--keys", other], capsys)
    cases.append((["provenance", "register", *new, "--device", "ct-9", "--keys", other, "--log-key", keys / "log.key",
                   "--ledger", ledger], ["ct-9", "not enrolled in ledger", "enroll"]))
    for argv, words in cases:
        code, _, err = run_main(argv, capsys)
        assert code == 2, (argv, err)
        _one_error_line(err, *words)
        assert "secret" not in err
    assert _state(ledger) == before
    assert ledger.read_bytes() == bytes_before
    # a ledger that cannot be reached fails init before any key exists
    code, _, err = run_main(["provenance", "init", "--org", "beta", "--keys", tmp_path / "k5", "--ledger",
                             "postgresql://u:secret@127.0.0.1:9/none"], capsys)
    assert code == 2 and not (tmp_path / "k5").exists() and "secret" not in err

    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(os.urandom(8192))
    blob = corrupt.read_bytes()
    code, _, err = run_main(["provenance", "check-ledger", "--ledger", corrupt, "--trust-root", root], capsys)
    assert code == 2
    _one_error_line(err, "corrupt.sqlite", "corrupt")
    assert corrupt.read_bytes() == blob
    code, _, err = run_main(["provenance", "register", *new, "--device", "ct-1", "--keys", keys, "--ledger", ledger,
                             "--batch-size", "0"], capsys)
    assert code == 2 and "batch-size" in err  # a bad flag is a usage error


def test_console_script_process_and_env_ledger(tmp_path: Path) -> None:
    """A real process: MEDADV_LEDGER picks the ledger; errors are one line, exit 2, no traceback."""
    corrupt = tmp_path / "ledger.sqlite"
    corrupt.write_bytes(b"\0" * 5000)
    img = _images(tmp_path, 1)[0]
    from medadv.provenance.trust import init_root

    _, pub, _ = init_root("acme", tmp_path / "keys")
    res = subprocess.run([sys.executable, "-m", "medadv.cli", "provenance", "verify", str(img)], cwd=tmp_path,
                         env=cli_env(MEDADV_LEDGER=str(corrupt), MEDADV_TRUST_ROOT=str(pub)), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2
    _one_error_line(res.stderr, str(corrupt))
