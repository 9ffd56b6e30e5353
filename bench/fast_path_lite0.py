"""PGD on EfficientNet-Lite0 (ImageNet weights, the reproduce networks): eager vs medadv's fp32 fast path
(channels_last for depthwise networks) vs bf16. 64 random images, 5 steps, the median of 3 interleaved
repeats, wall seconds.

    .venv/bin/python bench/fast_path_lite0.py [--sizes 64 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from medadv.attacks import PGD, ThreatModel
from medadv.models.train import TrainConfig, build_classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    out = {}
    for size in args.sizes:
        cfg = TrainConfig(task="derm-melanoma", arch="efficientnet-lite0", size=size, pretrained="imagenet")
        model = build_classifier(cfg, 3, ("nevus", "melanoma")).eval()
        x, y = torch.rand(64, 3, size, size), torch.randint(0, 2, (64,))
        threat = ThreatModel(eps=2 / 255, steps=5, target="none", levels=None)
        times: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for fast in (None, "fp32", "bf16"):
                t0 = time.perf_counter()
                PGD(threat, 0, fast=fast)(model, x, y)
                times.setdefault(fast or "eager", []).append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out[size] = {**{f"{k}_seconds": round(v, 3) for k, v in med.items()},
                     **{f"{k}_speedup": round(med["eager"] / med[k], 2) for k in ("fp32", "bf16")}}
        if not args.json:
            print(f"{size} px: " + ", ".join(f"{k} {v:.2f} s" for k, v in med.items()))
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), "sizes": out}))


if __name__ == "__main__":
    main()
