"""A torchrun worker for tests/test_dist.py: attack 32 real chest X-rays with PGD and Square on a fixed
small network, sharded over however many processes torchrun started; rank 0 writes what it gathered.

Usage: torchrun --standalone --nproc_per_node=N tests/dist_worker.py DATA_ROOT OUT.npz [RESUME_DIR]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from medadv import dist
from medadv.attacks import PAPER
from medadv.data import load_split
from medadv.evaluate.battery import stratified_subset
from medadv.evaluate.runner import run_attack
from medadv.models.train import TrainConfig, build_classifier


def main() -> None:
    data_root, out = sys.argv[1], sys.argv[2]
    resume = sys.argv[3] if len(sys.argv) > 3 else None
    torch.set_num_threads(1)  # the same arithmetic in every process, whatever N
    shard = dist.init_from_env("cpu")
    torch.manual_seed(0)
    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia")).eval()
    data = stratified_subset(load_split("chest-xray", "test", data_root=data_root), 32, 0)
    threat = PAPER.with_(eps=8 / 255, steps=5, levels=data.levels)
    arrays, records = {}, {}
    for name, params in (("pgd", {}), ("square", {"max_queries": 20})):
        run = run_attack(name, model, data, threat, seed=3, params=params, batch_size=8,
                         resume_dir=None if resume is None else f"{resume}/{name}")
        arrays[name] = run.adversarial
        arrays[f"{name}_p"] = run.p_adv
        records[name] = {k: run.results[k] for k in ("adversarial", "flips", "success_rate", "queries")}
    if shard.is_main:
        np.savez(out, **arrays)
        with open(out + ".json", "w") as fh:
            json.dump({"world_size": shard.world_size, "records": records}, fh)
    dist.shutdown()


if __name__ == "__main__":
    main()
