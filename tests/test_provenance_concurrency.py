"""Concurrent writers and killed writers, on SQLite and PostgreSQL, through the real command line.

8 processes register 200 images each into one ledger at the same time, 2 images per transaction (small
transactions, so that on a quiet machine one writer cannot commit all of its batches while the others sleep in
SQLite's busy handler):
1,600 records, none lost or duplicated, one unbroken chain. A writer killed with SIGKILL mid-run leaves a
ledger that checks, holding whole transactions only, and running the registration again completes it.
"""

# ruff: noqa: F811  (pytest fixtures imported from provenance_support)
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
from provenance_support import (ledger_where, make_device, medadv_cli, medadv_cli_together, pg_url,  # noqa: F401
                                save_png, trust)

from medadv.provenance.digest import digest_array, digest_npz
from medadv.provenance.ledger import open_ledger

WRITERS, PER_WRITER = 8, 200


def _distinct_pngs(folder: Path, writer: int, n: int) -> list[str]:
    """Write n tiny PNGs whose first pixels spell (writer, index), so all differ; return their digests."""
    rng = np.random.default_rng(writer)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
        img[0, :3] = (writer, i // 256, i % 256)
        save_png(folder / f"w{writer}-{i:03d}.png", img)
        out.append(digest_array(img, "").digest)  # a grey PNG's digest is its array's
    return out


def test_concurrent_writers_never_fork_the_chain(ledger_where: str, tmp_path: Path) -> None:  # noqa: F811
    keys = tmp_path / "keys"
    expected: dict[str, str] = {}
    for w in range(WRITERS):
        make_device(ledger_where, keys, f"scanner-{w}")
        for digest in _distinct_pngs(tmp_path / f"w{w}", w, PER_WRITER):
            expected[digest] = f"scanner-{w}"
    assert len(expected) == WRITERS * PER_WRITER
    procs = medadv_cli_together(WRITERS, lambda w: ("provenance", "register", tmp_path / f"w{w}", "--device",
                                                    f"scanner-{w}", "--keys", keys, "--ledger", ledger_where,
                                                    "--batch-size", "2", "--json", "-q"), tmp_path / "start")
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert json.loads(out)["added"] == PER_WRITER
    with open_ledger(ledger_where) as ledger:
        everything = list(ledger.iter_records())
        report = ledger.check(trust(ledger_where))
    assert report.ok, report.problems[:3]
    rows = [r for r in everything if r.kind == "image"]  # after the log-key entry and the 8 enrollments
    assert [r.seq for r in everything] == list(range(1, WRITERS * PER_WRITER + WRITERS + 2))
    assert {r.digest: r.device for r in rows} == expected  # none lost, none duplicated, each by its device
    switches = sum(a.device != b.device for a, b in zip(rows, rows[1:], strict=False))
    # the writers really did take turns on the chain (one after the other would switch 7 times)
    assert switches > WRITERS - 1, f"writers did not interleave ({switches} switches): the lock was not exercised"


def _tiny_npz(path: Path, n: int) -> Path:
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (n, 8, 8), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) // 256, np.arange(n) % 256  # all distinct
    np.savez(path, train_images=images, train_labels=np.zeros((n, 1), np.uint8))
    return path


def test_a_writer_killed_mid_run_leaves_a_ledger_that_checks(ledger_where: str, tmp_path: Path) -> None:  # noqa: F811
    n, batch = 1500, 20
    make_device(ledger_where, tmp_path / "keys", "xray-1")
    npz = _tiny_npz(tmp_path / "batch.npz", n)
    args = ("provenance", "register", npz, "--device", "xray-1", "--keys", tmp_path / "keys",
            "--ledger", ledger_where, "--batch-size", str(batch), "--json", "-q")
    proc = medadv_cli(*args)
    with open_ledger(ledger_where) as ledger:
        deadline = time.monotonic() + 120
        while ledger.count() < 5 * batch + 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the writer finished before it could be killed"
    with open_ledger(ledger_where) as ledger:
        kept = ledger.count() - 2  # the log-key and enrollment entries
        report = ledger.check(trust(ledger_where))
    assert report.ok, report.problems[:3]
    assert 0 < kept < n and kept % batch == 0  # whole transactions only
    again = medadv_cli(*args)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    summary = json.loads(out)
    assert (summary["added"], summary["skipped"]) == (n - kept, kept)
    with open_ledger(ledger_where) as ledger:
        assert ledger.check(trust(ledger_where)).ok
        assert sorted(r.digest for r in ledger.iter_records() if r.kind == "image") == \
            sorted(d.digest for d in digest_npz(npz))
