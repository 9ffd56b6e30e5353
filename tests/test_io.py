"""Atomic outputs: checked before any computing, never replacing a file of the other kind, and no
temporary folder of a killed writer left behind for good."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from medadv.errors import MedadvError
from medadv.io import atomic_dir, atomic_path, check_output, remove_stale_partials, write_json


def test_check_output_refuses_a_file_where_a_folder_goes(tmp_path):
    f = tmp_path / "results"
    f.write_text("keep me")
    with pytest.raises(MedadvError, match="existing file"):
        check_output(f)
    with pytest.raises(MedadvError, match="existing file"):
        with atomic_dir(f):
            pass
    assert f.read_text() == "keep me"


def test_check_output_refuses_a_folder_where_a_file_goes(tmp_path):
    with pytest.raises(MedadvError, match="is a folder"):
        check_output(tmp_path, kind="file")
    with pytest.raises(MedadvError, match="is a folder"):
        write_json(tmp_path, {"a": 1})


def test_check_output_names_an_unwritable_location(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # A parent that is a file cannot be made into a folder, whoever runs the test (root included).
    with pytest.raises(MedadvError, match=r"--model-out .*cannot be written.*Fix: pass a writable location"):
        check_output(blocker / "sub" / "out", flag="--model-out")
    out = check_output(tmp_path / "new" / "out")
    assert out.parent.is_dir() and not out.exists() and list(out.parent.iterdir()) == []


def test_a_killed_writers_partial_folder_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "run"
    code = ("import os, sys\nfrom medadv.io import atomic_dir\n"
            f"with atomic_dir({str(out)!r}) as tmp:\n"
            "    (tmp / 'half').write_text('x')\n"
            "    os._exit(9)\n")  # killed mid-save: no cleanup runs
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    stale = list(tmp_path.glob(".run.partial-*"))
    assert len(stale) == 1 and (stale[0] / "half").is_file()
    # a live writer's partial folder (this process) is never touched
    mine = tmp_path / f".run.partial-{os.getpid()}-live"
    mine.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "done").write_text("ok")
    assert (out / "done").read_text() == "ok"
    assert not stale[0].exists() and mine.is_dir()
    assert remove_stale_partials(out) == []


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
