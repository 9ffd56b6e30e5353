"""The allocator at 224 px: PGD steps on EfficientNet-Lite0 and ResNet-18 (random weights, 224 px, random
images) under glibc's defaults, the MALLOC_* variables of issue 19, and medadv's in-process setting
(:mod:`medadv.allocator`). Each configuration runs in a fresh process (malloc reads its settings once);
the configurations are interleaved, repeated, and the median wall, user and system seconds and peak
resident memory are printed, with each setting's speed-up over the defaults from the same round.

    .venv/bin/python bench/allocator.py [--arch efficientnet-lite0 resnet18] [--batch 16] [--steps 3]
                                        [--repeats 3] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CONFIGS = {
    "glibc defaults": {"MEDADV_MALLOC": "default"},
    "issue 19 MALLOC_* variables": {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736",
                                    "MALLOC_TOP_PAD_": "1073741824"},
    "medadv (mallopt)": {},
}


def child(arch: str, batch: int, steps: int, threads: int) -> None:
    import resource
    import time

    import torch

    from medadv import allocator
    from medadv.attacks import PGD, ThreatModel
    from medadv.models.train import TrainConfig, build_classifier

    state = allocator.keep_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = TrainConfig(task="chest-xray", arch=arch, size=224, pretrained=None)
    model = build_classifier(cfg, 3, ("normal", "pneumonia")).eval()
    x, y = torch.rand(batch, 3, 224, 224), torch.randint(0, 2, (batch,))
    PGD(ThreatModel(eps=2 / 255, steps=1, target="none", levels=None), 0)(model, x, y)  # warm up
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    PGD(ThreatModel(eps=2 / 255, steps=steps, target="none", levels=None), 0)(model, x, y)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    print(json.dumps({"wall": t1 - t0, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                      "maxrss_mib": r1.ru_maxrss / 1024, "allocator": state}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["efficientnet-lite0", "resnet18"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        arch, batch, steps, threads = args.child
        return child(arch, int(batch), int(steps), int(threads))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("MEDADV_MALLOC", "LD_PRELOAD")}
    out: dict[str, dict] = {}
    for arch in args.arch:
        runs: dict[str, list[dict]] = {name: [] for name in CONFIGS}
        for r in range(args.repeats):
            names = list(CONFIGS)
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: load hits all alike
                cmd = [sys.executable, __file__, "--child", arch, str(args.batch), str(args.steps), str(args.threads)]
                done = subprocess.run(cmd, env={**clean, **CONFIGS[name]}, capture_output=True, text=True, check=True)
                runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
        base = statistics.median(x["wall"] for x in runs["glibc defaults"])
        out[arch] = {name: {k: round(statistics.median(x[k] for x in v), 2) for k in ("wall", "user", "sys", "maxrss_mib")}
                     | {"speedup": round(base / statistics.median(x["wall"] for x in v), 2),
                        "allocator": v[0]["allocator"]["why"]} for name, v in runs.items()}
        if not args.json:
            print(f"{arch}, 224 px, batch {args.batch}, PGD {args.steps} steps, {args.threads} threads, "
                  f"median of {args.repeats}:")
            for name, m in out[arch].items():
                print(f"  {name:30s} wall {m['wall']:6.2f} s  user {m['user']:6.2f}  sys {m['sys']:6.2f}  "
                      f"peak RSS {m['maxrss_mib']:6.0f} MiB  x{m['speedup']:.2f}")
    if args.json:
        print(json.dumps({"batch": args.batch, "steps": args.steps, "threads": args.threads, "results": out}))


if __name__ == "__main__":
    main()
