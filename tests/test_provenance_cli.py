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
    lines = [line for line in err.splitlines() if line.strip()]
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


def test_keygen_register_verify_check(tmp_path: Path, capsys) -> None:
    ledger, keys = tmp_path / "ledger.sqlite", tmp_path / "keys"
    code, out, _ = run_main(["provenance", "keygen", "--device", "ct-1", "--keys", keys, "--ledger", ledger], capsys)
    assert code == 0 and "ct-1" in out and ledger.is_file()
    assert (keys / "ct-1.key").stat().st_mode & 0o777 == 0o600
    imgs = _images(tmp_path / "acq", 4)
    npz = small_npz(tmp_path / "acq", per_split=2)
    code, out, _ = run_main(["provenance", "register", tmp_path / "acq", "--device", "ct-1", "--keys", keys,
                             "--ledger", ledger, "--json"], capsys)
    summary = json.loads(out)
    assert code == 0 and (summary["files"], summary["images"], summary["added"]) == (5, 10, 10)
    code, out, _ = run_main(["provenance", "verify", *imgs, npz, "--ledger", ledger], capsys)
    assert code == 0 and "10 verified" in out
    code, out, _ = run_main(["provenance", "check-ledger", "--ledger", ledger], capsys)
    assert code == 0 and "10 records" in out and "chain intact" in out

    with Image.open(imgs[1]) as im:
        edited = np.asarray(im).copy()
    edited[5, 5] = int(edited[5, 5]) ^ 1
    save_png(imgs[1], edited)
    code, out, _ = run_main(["provenance", "verify", *imgs, tmp_path / "nope.png", "--ledger", ledger, "--json"],
                            capsys)
    report = json.loads(out)
    assert code == 1 and report["verified"] is False
    assert [r["status"] for r in report["results"]] == ["verified", "modified", "verified", "verified", "unreadable"]
    assert report["counts"] == {"modified": 1, "unreadable": 1, "verified": 3}


def test_check_ledger_exits_1_and_names_the_record(tmp_path: Path, capsys) -> None:
    ledger, keys = tmp_path / "ledger.sqlite", tmp_path / "keys"
    run_main(["provenance", "keygen", "--device", "ct-1", "--keys", keys, "--ledger", ledger], capsys)
    _images(tmp_path / "acq", 5)
    run_main(["provenance", "register", tmp_path / "acq", "--device", "ct-1", "--keys", keys, "--ledger", ledger,
              "--batch-size", "2"], capsys)
    code, out, _ = run_main(["provenance", "check-ledger", "--ledger", ledger, "--json"], capsys)
    head = json.loads(out)["head_hash"]
    drop_guards(str(ledger))
    raw_sql(str(ledger), "DELETE FROM records WHERE seq = 2")
    code, out, err = run_main(["provenance", "check-ledger", "--ledger", ledger], capsys)
    assert code == 1
    assert "broken at record #3: record 2 is missing (deleted)" in err
    raw_sql(str(ledger), "DELETE FROM records WHERE seq >= 3")  # now a short, valid chain: the anchor notices
    assert run_main(["provenance", "check-ledger", "--ledger", ledger], capsys)[0] == 0
    code, _, err = run_main(["provenance", "check-ledger", "--ledger", ledger, "--anchor", head], capsys)
    assert code == 1 and "truncated" in err


def test_bad_input_is_one_line_exit_2_and_leaves_the_ledger_untouched(tmp_path: Path, capsys) -> None:
    ledger, keys = tmp_path / "ledger.sqlite", tmp_path / "keys"
    run_main(["provenance", "keygen", "--device", "ct-1", "--keys", keys, "--ledger", ledger], capsys)
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
        (["provenance", "keygen", "--device", "ct-1", "--keys", keys, "--ledger", ledger],
         ["already has a private key"]),
        (["provenance", "verify", *imgs, "--ledger", tmp_path / "missing.sqlite"],
         ["missing.sqlite", "does not exist"]),
        (["provenance", "verify", *imgs, "--ledger", "postgresql://u:secret@127.0.0.1:9/none"],
         ["127.0.0.1", "***"]),
        (["provenance", "verify", *imgs, "--ledger", ledger, "--trusted-keys", tmp_path / "nokeys"],
         ["trusted-keys folder"]),
    ]
    other = tmp_path / "other"
    run_main(["provenance", "keygen", "--device", "ct-9", "--keys", other, "--ledger", tmp_path / "other.sqlite"],
             capsys)
    cases.append((["provenance", "register", *new, "--device", "ct-9", "--keys", other, "--ledger", ledger],
                  ["ct-9", "not registered in ledger", "add-device"]))
    for argv, words in cases:
        code, _, err = run_main(argv, capsys)
        assert code == 2, (argv, err)
        _one_error_line(err, *words)
        assert "secret" not in err
    assert _state(ledger) == before
    assert ledger.read_bytes() == bytes_before
    # a ledger that cannot be reached fails keygen before any key exists
    code, _, err = run_main(["provenance", "keygen", "--device", "ct-5", "--keys", keys, "--ledger",
                             "postgresql://u:secret@127.0.0.1:9/none"], capsys)
    assert code == 2 and not (keys / "ct-5.key").exists() and "secret" not in err

    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(os.urandom(8192))
    blob = corrupt.read_bytes()
    code, _, err = run_main(["provenance", "check-ledger", "--ledger", corrupt], capsys)
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
    res = subprocess.run([sys.executable, "-m", "medadv.cli", "provenance", "verify", str(img)], cwd=tmp_path,
                         env=cli_env(MEDADV_LEDGER=str(corrupt)), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    _one_error_line(res.stderr, str(corrupt))
