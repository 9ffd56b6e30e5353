"""Scale-out on one machine: the same sharded PGD job as 1 process x T threads and as P processes x 1
thread under torchrun (gloo), side by side, rounds interleaved; plus the time spent gathering.

    python bench/dist_scaling.py --images 256 --rounds 3            # driver: runs the configurations
    torchrun --standalone --nproc_per_node=2 bench/dist_scaling.py --worker --images 256   # one job

Reports medians over rounds of the job's wall time (attack loop and gather, not the process start) and
the ratio of each configuration to 1 process x all threads, measured in the same round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(args: argparse.Namespace) -> None:
    from medadv import dist
    from medadv.attacks import PAPER
    from medadv.data import load_split
    from medadv.evaluate.runner import run_attack

    from _common import victim

    shard = dist.init_from_env("cpu")
    model, what = victim(args.model, 28)
    data = load_split("chest-xray", "test", data_root=args.data_root)
    data = data.subset(np.arange(min(args.images, len(data))))
    threat = PAPER.with_(levels=data.levels)
    gathered = {"s": 0.0}
    original = dist.Shard.gather

    def timed_gather(self, items):
        t0 = time.perf_counter()
        out = original(self, items)
        gathered["s"] += time.perf_counter() - t0
        return out

    dist.Shard.gather = timed_gather
    shard.barrier()
    t0 = time.perf_counter()
    run = run_attack("pgd", model, data, threat, seed=0, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    if shard.is_main:
        Path(args.out).write_text(json.dumps({
            "seconds": seconds, "gather_s": gathered["s"], "world": shard.world_size,
            "threads": torch.get_num_threads(), "accuracy": run.results["adversarial"]["accuracy"],
            "model": what, "n": len(data)}))
    dist.shutdown()


def driver(args: argparse.Namespace) -> None:
    cores = os.cpu_count() or 2
    configs = [(1, cores), (cores, 1)] + ([(1, 1)] if cores > 1 else [])
    torchrun = Path(sys.executable).with_name("torchrun")
    results: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    ratios: dict[tuple[int, int], list[float]] = {c: [] for c in configs}
    for r in range(args.rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]  # rotate: load hits all alike
        this_round = {}
        for procs, threads in order:
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                cmd = [str(torchrun), "--standalone", f"--nproc_per_node={procs}", __file__, "--worker",
                       "--images", str(args.images), "--batch-size", str(args.batch_size), "--out", out.name]
                cmd += ["--data-root", args.data_root] if args.data_root else []
                cmd += ["--model", args.model] if args.model else []
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                subprocess.run(cmd, check=True, env=env, capture_output=True)
                rec = json.loads(Path(out.name).read_text())
            results[(procs, threads)].append(rec)
            this_round[(procs, threads)] = rec["seconds"]
        for c in configs:
            ratios[c].append(this_round[c] / this_round[(1, cores)])
    print(f"PGD-20 (paper preset) on {results[configs[0]][0]['n']} PneumoniaMNIST test images, "
          f"ResNet-18 28 px ({results[configs[0]][0]['model']}), batch {args.batch_size}, {args.rounds} rounds, "
          f"{cores} cores")
    print("| processes x threads | median s | ratio to 1 x all threads | gather s (median) | adversarial accuracy |")
    print("|---|---|---|---|---|")
    for c in configs:
        secs = statistics.median(x["seconds"] for x in results[c])
        gather = statistics.median(x["gather_s"] for x in results[c])
        acc = {round(x["accuracy"], 4) for x in results[c]}
        print(f"| {c[0]} x {c[1]} | {secs:.2f} | {statistics.median(ratios[c]):.3f} | {gather:.3f} | {sorted(acc)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: a seeded random ResNet-18)")
    ap.add_argument("--data-root", default=os.environ.get("MEDADV_DATA"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    (worker if args.worker else driver)(args)


if __name__ == "__main__":
    main()
