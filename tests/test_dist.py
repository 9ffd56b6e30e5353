"""Scale-out: sharded attacks give per-image identical results for any number of processes (gloo, two
processes on the CPU, under torchrun), and a killed sharded run resumes from the batches it finished."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medadv.dist import SINGLE, BatchStore, Shard, run_batches

HERE = Path(__file__).parent


def test_batches_are_dealt_round_robin_and_cover_the_job():
    shards = [Shard(r, 3) for r in range(3)]
    mine = [s.mine(10) for s in shards]
    assert mine[0] == [0, 3, 6, 9] and mine[1] == [1, 4, 7] and mine[2] == [2, 5, 8]
    assert sorted(b for m in mine for b in m) == list(range(10))
    assert SINGLE.mine(4) == [0, 1, 2, 3] and SINGLE.is_main and not SINGLE.distributed


def _fake_attack(calls):
    def attack_batch(b, idx):
        calls.append(b)
        return (idx * 10 + b).astype(np.int64), idx.astype(np.float64) + 0.5
    return attack_batch


def test_a_killed_run_resumes_from_the_batches_it_finished(tmp_path):
    batches = [np.arange(i, min(i + 4, 18)) for i in range(0, 18, 4)]
    reference = list(run_batches(batches, _fake_attack([])))

    calls: list[int] = []
    attack = _fake_attack(calls)

    def dies_after_two(b, idx):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed mid-job
        return attack(b, idx)

    store = BatchStore(tmp_path / "resume")
    with pytest.raises(KeyboardInterrupt):
        list(run_batches(batches, dies_after_two, SINGLE, store))
    assert store.done() == [0, 1]
    calls.clear()
    resumed = list(run_batches(batches, attack, SINGLE, BatchStore(tmp_path / "resume")))
    assert calls == [2, 3, 4]  # the finished batches are not attacked again
    for (b1, i1, a1, q1), (b2, i2, a2, q2) in zip(reference, resumed):
        assert b1 == b2 and np.array_equal(i1, i2) and np.array_equal(a1, a2) and np.array_equal(q1, q2)


def test_a_damaged_batch_file_is_recomputed(tmp_path):
    store = BatchStore(tmp_path)
    store.save(0, np.arange(3), None)
    (tmp_path / "batch-000000.npz").write_bytes(b"not a zip")
    calls: list[int] = []
    out = list(run_batches([np.arange(3)], _fake_attack(calls), SINGLE, store))
    assert calls == [0] and np.array_equal(out[0][2], np.arange(3) * 10)


def _torchrun(n: int, data_root: Path, out: Path, resume: Path | None = None) -> dict:
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.fail(f"torchrun not found beside {sys.executable}: the torch install is incomplete")
    cmd = [str(torchrun), "--standalone", f"--nproc_per_node={n}", str(HERE / "dist_worker.py"), str(data_root),
           str(out)] + ([str(resume)] if resume else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(Path(str(out) + ".json").read_text())


@pytest.mark.slow  # three torchrun launches: about 30 s on a quiet 2-core machine
def test_two_gloo_processes_give_the_same_images_as_one(data_root, tmp_path):
    one = _torchrun(1, data_root, tmp_path / "one.npz")
    two = _torchrun(2, data_root, tmp_path / "two.npz", resume=tmp_path / "resume")
    assert one["world_size"] == 1 and two["world_size"] == 2
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for name in ("pgd", "square"):
        assert np.array_equal(a[name], b[name]), name  # stored pixels: exactly the same files
        np.testing.assert_allclose(a[f"{name}_p"], b[f"{name}_p"], atol=1e-6)
        assert one["records"][name] == two["records"][name]
    assert one["records"]["pgd"]["flips"]["total"] > 0  # the attack did something to compare
    # the same job again resumes from every finished batch (all of them): same result, nothing redone
    shutil.copy(tmp_path / "two.npz", tmp_path / "first.npz")
    _torchrun(2, data_root, tmp_path / "two.npz", resume=tmp_path / "resume")
    again = np.load(tmp_path / "two.npz")
    assert all(np.array_equal(again[k], np.load(tmp_path / "first.npz")[k]) for k in ("pgd", "square"))


@pytest.mark.slow  # two launches of the real command line
def test_medadv_attack_under_torchrun_writes_once_the_same_record(data_root, tmp_path):
    from medadv.models import save_checkpoint
    from medadv.models.train import TrainConfig, build_classifier

    import torch

    torch.manual_seed(0)
    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia"))
    ck = tmp_path / "ck"
    save_checkpoint(model, ck, {"task": "chest-xray", "seed": 0,
                                "data": {"source": "medmnist:pneumoniamnist", "image_size": 28, "split_seed": 0}})
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDADV_DATA": str(data_root)}
    records = {}
    for n in (1, 2):
        out = tmp_path / f"adv{n}"
        cmd = [str(torchrun), "--standalone", f"--nproc_per_node={n}", "-m", "medadv", "attack", "--model", str(ck),
               "--attack", "pgd", "--eps", "8/255", "--steps", "5", "--limit", "24", "--batch-size", "8",
               "--out", str(out), "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records[n] = json.loads((out / "results.json").read_text())
        assert len(list((out / "adversarial").glob("*.png"))) == 24
        assert not (tmp_path / f".adv{n}.shards").exists()  # finished batches are removed once written
    assert records[2]["distributed"]["world_size"] == 2 and "distributed" not in records[1]
    for key in ("adversarial", "flips", "perturbation", "success_rate"):
        assert records[1][key] == records[2][key], key
    for f in (tmp_path / "adv1" / "adversarial").glob("*.png"):
        assert f.read_bytes() == (tmp_path / "adv2" / "adversarial" / f.name).read_bytes()
