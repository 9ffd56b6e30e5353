"""A torchrun worker for tests/test_ddp_train.py: DDP training and sharded certification on real chest
X-rays, over however many processes torchrun started (gloo on the CPU). Rank 0 writes a summary.

Usage: torchrun --standalone --nproc_per_node=N tests/ddp_worker.py DATA_ROOT OUT_DIR JOBS SHARED_DIR

JOBS is a comma-separated list of: ``plain`` (ResNet-18, 28 px, 256 training images, one epoch, global
batch 64, no augmentation, SGD), ``sync`` (the same with sync_batchnorm), ``pgd`` (PGD-2 adversarial
training, 64 images, the default AdamW recipe), ``certify`` (randomized smoothing of SHARED_DIR/plain on 12
test images), ``resume`` (the same certification killed on every rank after two images each, then
restarted), ``kill-after-1`` (two epochs of 64 images into SHARED_DIR/partial, killed after epoch 1's
partial state is written) and ``finish`` (the same training again: it resumes from that partial state).
Only positional arguments: torchrun takes any prefix of its own options (``--n`` would be ``--nnodes``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

from medadv import dist
from medadv.defenses import smoothing
from medadv.defenses.certify import certify_model
from medadv.models import train as train_module
from medadv.defenses.training import robust_training
from medadv.models.train import TrainConfig, train

CERTIFY = dict(sigma=0.25, n0=16, n=64, alpha=0.01, limit=12, seed=3, batch_size=32)
# SGD ("paper"): AdamW's first steps move every weight by about ±lr whatever its gradient's size, so float
# rounding in a near-zero gradient would flip whole steps and hide the comparison the test makes
TRAIN = dict(task="chest-xray", arch="resnet18", size=28, epochs=1, batch_size=64, max_train=256, augment=False,
             recipe="paper")
PARTIAL = dict(TRAIN, epochs=2, max_train=64, batch_size=32)


class Killed(Exception):
    """Stands in for a kill: raised on every rank inside its own loop, before any collective."""


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run_jobs(data_root: str | Path, out: Path, jobs: list[str], shared: Path) -> dict:
    """Run ``jobs`` in this process (one rank of the torchrun job, or alone); returns the summary."""
    cert_model = shared / "plain"
    shard = dist.init_from_env("cpu")
    summary: dict = {"world_size": shard.world_size, "seconds": {}}
    for job in jobs:
        t0 = time.perf_counter()
        if job in ("plain", "sync", "pgd"):
            cfg = TrainConfig(**TRAIN, sync_batchnorm=job == "sync")
            if job == "pgd":
                cfg = TrainConfig(**{**TRAIN, "max_train": 64, "batch_size": 32, "recipe": "auto"}, adversarial="pgd",
                                  adv_steps=2, robust_val_images=32)
            model, meta = train(cfg, out / job, data_root=data_root, robust=robust_training(cfg))
            digests = shard.gather([weights_digest(model)])
            norms = {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}
            summary[job] = {"history": meta["training"]["history"], "world_size": meta["training"]["world_size"],
                            "config_hash": meta["training"]["config_hash"], "rank_digests": digests,
                            "bn_types": sorted(norms)}
        elif job == "certify":
            record = certify_model(cert_model, out / "cert", data_root=data_root, **CERTIFY)
            summary[job] = {"images": record["images"], "run": record["run"]}
        elif job == "resume":
            original = smoothing.Smoothed.certify
            calls: list[int] = []

            def counting(self, *args, **kwargs):
                if die_after is not None and len(calls) == die_after:
                    raise Killed
                calls.append(1)
                return original(self, *args, **kwargs)

            smoothing.Smoothed.certify = counting
            try:
                die_after = 2
                try:
                    certify_model(cert_model, out / "resumed", data_root=data_root, **CERTIFY)
                    raise AssertionError("the kill did not happen")
                except Killed:
                    pass
                shard.barrier()  # every rank has stopped before the restart
                left = sorted(p.name for p in (out / ".resumed.shards").glob("*/cert-*.json"))
                die_after, calls[:] = None, []
                record = certify_model(cert_model, out / "resumed", data_root=data_root, **CERTIFY)
            finally:
                smoothing.Smoothed.certify = original
            summary[job] = {"images": record["images"], "left_by_kill": left,
                            "certified_after_restart": sum(shard.gather([len(calls)])),
                            "shards_left": (out / ".resumed.shards").exists()}
        elif job == "kill-after-1":
            original_epoch = train_module._train_epoch

            def dies_in_epoch_2(*args, **kwargs):
                if args[6] == 2:  # the epoch
                    raise Killed
                return original_epoch(*args, **kwargs)

            train_module._train_epoch = dies_in_epoch_2
            try:
                train(TrainConfig(**PARTIAL), shared / "partial", data_root=data_root)
                raise AssertionError("the kill did not happen")
            except Killed:
                pass
            finally:
                train_module._train_epoch = original_epoch
            summary[job] = {"partial": json.loads((shared / ".partial.partial" / "state.json").read_text())["history"]}
        elif job == "finish":
            _, meta = train(TrainConfig(**PARTIAL), shared / "partial", data_root=data_root)
            summary[job] = {"history": meta["training"]["history"], "world_size": meta["training"]["world_size"]}
        else:
            raise SystemExit(f"unknown job {job!r}")
        summary["seconds"][job] = round(time.perf_counter() - t0, 2)
    return summary


def main() -> None:
    out = Path(sys.argv[2])
    torch.set_num_threads(1)  # the same arithmetic in every process, whatever N
    summary = run_jobs(sys.argv[1], out, sys.argv[3].split(","), Path(sys.argv[4]))
    if dist.current().is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    dist.shutdown()


if __name__ == "__main__":
    main()
