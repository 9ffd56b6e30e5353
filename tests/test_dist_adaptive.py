"""The defenses study's adaptive evaluation under torchrun: two processes (gloo, CPU) give the same robust
accuracies, the same per-image outcomes and the same adversarial images as one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent


def _torchrun(n: int, data_root: Path, out: Path) -> tuple[dict, dict]:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.fail(f"torchrun not found beside {sys.executable}: the torch install is incomplete")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={n}", str(HERE / "dist_adaptive_worker.py"),
           str(data_root), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(str(out) + ".npz") as z:
        arrays = {k: z[k] for k in z.files}
    return json.loads(Path(str(out) + ".json").read_text()), arrays


@pytest.mark.slow  # two torchrun launches
def test_sharded_adaptive_evaluation_equals_one_process(data_root, tmp_path):
    one, a1 = _torchrun(1, data_root, tmp_path / "one")
    two, a2 = _torchrun(2, data_root, tmp_path / "two")
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["record"] == two["record"]
    assert set(a1) == set(a2) == {"na_0", "na_1", "ad_0", "ad_1"}
    for k in a1:
        np.testing.assert_allclose(a1[k], a2[k], atol=1e-6, err_msg=k)
    rows = one["record"]["rows"]
    assert rows[0]["adaptive"] >= rows[1]["adaptive"]  # monotone in eps
    assert sum(rows[1]["broken_by"].values()) > 0  # the attacks did something to judge


def _medadv_torchrun(n: int, args: list[str], data_root: Path) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDADV_DATA": str(data_root)}
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={n}", "-m", "medadv", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow  # three torchrun launches of the CLI
def test_cli_train_and_certify_run_under_torchrun(data_root, tmp_path):
    """`medadv train` under torchrun trains with DDP (SyncBatchNorm on request) and writes one checkpoint;
    `medadv certify` under torchrun writes the same certificates as one process."""
    ck = tmp_path / "ddp"
    proc = _medadv_torchrun(2, ["train", "--task", "chest-xray", "--epochs", "1", "--max-train", "128",
                                "--batch-size", "32", "--no-augment", "--sync-batchnorm", "--noise-sigma", "0.1",
                                "--out", str(ck), "-q"], data_root)
    meta = json.loads((ck / "medadv.json").read_text())
    assert meta["training"]["world_size"] == 2 and meta["training"]["sync_batchnorm"] is True
    assert proc.stdout.count("Validation") == 1  # rank 0 alone prints
    records = {}
    for n in (1, 2):
        out = tmp_path / f"cert{n}"
        _medadv_torchrun(n, ["certify", "--model", str(ck), "--sigma", "0.1", "--n0", "8", "--num-samples", "32",
                             "--alpha", "0.01", "--limit", "10", "--out", str(out), "-q"], data_root)
        records[n] = json.loads((out / "results.json").read_text())
    assert records[1]["images"] == records[2]["images"]
    drop = lambda summary: {k: v for k, v in summary.items() if k != "seconds"}  # noqa: E731
    assert drop(records[1]["summary"]) == drop(records[2]["summary"])
    assert records[2]["run"]["world_size"] == 2
