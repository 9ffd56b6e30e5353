"""A torchrun worker for tests/test_dist_adaptive.py: the defenses study's adaptive evaluation (non-adaptive
PGD, transfer, PGD with BPDA, AutoAttack) of a bit-depth defense on 24 real chest X-rays, sharded over
however many processes torchrun started; rank 0 writes the record and the non-adaptive images.

Usage: torchrun --standalone --nproc_per_node=N tests/dist_adaptive_worker.py DATA_ROOT OUT
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from medadv import dist
from medadv.data import load_split
from medadv.defenses import defend
from medadv.evaluate.adaptive import AdaptiveConfig, evaluate_robustness
from medadv.evaluate.battery import stratified_subset
from medadv.models.train import TrainConfig, build_classifier


def main() -> None:
    data_root, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)  # the same arithmetic in every process, whatever N
    shard = dist.init_from_env("cpu")
    torch.manual_seed(0)
    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia")).eval()
    torch.manual_seed(1)
    surrogate = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia")).eval()
    data = stratified_subset(load_split("chest-xray", "test", data_root=data_root), 24, 0)
    cfg = AdaptiveConfig(eps=(2 / 255, 8 / 255), steps=3, adaptive_steps=3, autoattack="fast", autoattack_steps=3,
                         square_queries=10, batch_size=5)
    result = evaluate_robustness(defend(model, "bit-depth"), data.stored(), torch.from_numpy(data.labels),
                                 surrogate=surrogate, config=cfg, levels=data.levels, seed=7)
    if shard.is_main:
        np.savez(out + ".npz", **{f"na_{i}": result.adversarial[e].numpy() for i, e in enumerate(cfg.eps)},
                 **{f"ad_{i}": result.adaptive_correct[e] for i, e in enumerate(cfg.eps)})
        with open(out + ".json", "w") as fh:
            json.dump({"world_size": shard.world_size, "record": result.to_json()}, fh)
    dist.shutdown()


if __name__ == "__main__":
    main()
