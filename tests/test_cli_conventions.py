"""Conventions every command shares: one-line errors (Click's usage errors and bugs too), progress lines
in logs, the same options on every command, a suite that keeps every core, a clean install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from medadv.cli import PROGRESS_EVERY_S, RichMonitor, main, progress_line

from conftest import INITIAL_THREADS, REPO


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return " ".join(lines[0].split())


def test_the_suite_keeps_every_core():
    # A module that calls torch.set_num_threads(1) at import runs every later test on one core; the
    # conftest guard stops collection then, and this test fails where the guard is bypassed.
    assert torch.get_num_threads() == INITIAL_THREADS


@pytest.mark.parametrize("argv,command", [(["train", "--bogus"], "medadv train"),
                                          (["nonsense"], "medadv"),
                                          (["attack", "--model"], "medadv attack"),
                                          (["train", "--epochs", "many"], "medadv train")])
def test_click_usage_errors_are_one_line_with_the_fix(argv, command, capsys):
    code, _, err = run(argv, capsys)
    line = one_line(err)
    assert code == 2
    assert line.startswith("medadv: error:") and f"Fix: see '{command} --help'" in line, line


def test_help_and_bare_group_still_print_help(capsys):
    code, out, err = run(["provenance"], capsys)
    assert code == 0 and "register" in out and not err.strip()
    code, out, _ = run(["attack", "--help"], capsys)
    assert code == 0 and "--eps" in out


def test_an_unexpected_exception_is_one_line_and_debug_shows_it(monkeypatch, capsys):
    import medadv.runinfo

    def broken():
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(medadv.runinfo, "package_versions", broken)
    code, _, err = run(["version"], capsys)
    line = one_line(err)
    assert code == 1
    assert "internal error: ValueError: boom second line" in line and "--debug" in line, line
    with pytest.raises(ValueError, match="boom"):
        main(["version", "--debug"])
    monkeypatch.setenv("MEDADV_DEBUG", "1")
    with pytest.raises(ValueError, match="boom"):
        main(["version"])


def test_audit_takes_device_like_the_other_commands(tmp_path, capsys):
    for command in ("train", "attack", "reproduce", "demo", "audit"):
        code, out, _ = run([command, "--help"], capsys)
        assert code == 0 and "--device" in out, command
    code, _, err = run(["audit", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--device", "tpu"],
                       capsys)
    assert code == 2 and "is not cpu or cuda" in one_line(err)


def test_progress_off_a_terminal_prints_lines_with_a_rate(capsys):
    monitor = RichMonitor()
    assert list(monitor.track(range(40), "pgd on 40 images")) == list(range(40))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    # started, 9 intermediate lines (10%, 20%, ... 90%), done
    assert lines[0] == "pgd on 40 images: started (40 steps)"
    assert lines[-1].startswith("pgd on 40 images: done, 40 steps in")
    middle = lines[1:-1]
    assert len(middle) == 9, lines
    assert middle[0].startswith("pgd on 40 images: 4/40 (10%)") and "steps/s" in middle[0] and "left" in middle[0]
    quiet = RichMonitor(quiet=True)
    assert list(quiet.track(range(5), "x")) == list(range(5)) and not capsys.readouterr().err


def test_progress_line_without_a_total_and_time_based_lines(monkeypatch, capsys):
    assert progress_line("fit", 3, None, 2.0) == "fit: 3 steps, 2 s, 1.50 steps/s"
    clock = iter(float(t) for t in range(0, 1000, 20))  # each step takes 20 s of a fake clock
    import time

    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    list(RichMonitor().track(iter(range(4)), "slow stage"))  # no length: only time-based lines
    lines = capsys.readouterr().err.splitlines()
    assert any(ln.startswith("slow stage: 2 steps") for ln in lines), lines
    assert PROGRESS_EVERY_S <= 30


def test_package_metadata_uses_an_spdx_license():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib is Python >= 3.11")
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"  # a string: setuptools warns on the table form
    requires = " ".join(meta["build-system"]["requires"])
    assert "setuptools>=77" in requires  # the first setuptools that reads SPDX strings
    assert (REPO / "LICENSE").is_file() or "license-files" not in meta["project"]
    assert Path(REPO / "README.md").is_file()


def test_commands_that_do_not_shard_refuse_to_run_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run(["evaluate", "--model", "nowhere"], capsys)
    assert code == 2 and "does not shard its work across torchrun processes" in one_line(err)
    code, out, _ = run(["version"], capsys)
    assert code == 0 and "torch" in out


def test_the_layers_import_only_downward():
    """data knows no networks or attacks, models never import evaluate, attacks know tensors and a model
    callable (ARCHITECTURE.md): checked on the source, so a new import that breaks it fails here."""
    import ast

    forbidden = {"data": ("medadv.models", "medadv.attacks", "medadv.evaluate", "medadv.defenses", "medadv.study"),
                 "models": ("medadv.evaluate", "medadv.study", "medadv.report"),
                 "attacks": ("medadv.evaluate", "medadv.study", "medadv.report", "medadv.data")}
    broken = []
    for layer, banned in forbidden.items():
        for path in sorted((REPO / "medadv" / layer).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                broken += [f"{path.relative_to(REPO)} imports {n}" for n in names if n.startswith(banned)]
    assert not broken, broken
