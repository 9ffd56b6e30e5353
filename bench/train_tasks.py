"""Training benchmark (issue 2): per task, epoch time, peak memory and final clean test metrics.

Each configuration trains in its own process (`medadv train`), so peak RSS is that run's alone.

    .venv/bin/python bench/train_tasks.py --data-root ../shared/data --out runs/bench-train [--only NAME ...]

Prints one JSON line per configuration and a markdown table (for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    # name: medadv train flags (the chest pair at the demo's budget: the recipe comparison behind `scratch`)
    "chest-resnet18-28-scratch": "--task chest-xray --arch resnet18 --size 28 --epochs 3 --recipe scratch",
    "chest-resnet18-28-paper": "--task chest-xray --arch resnet18 --size 28 --epochs 3 --recipe paper",
    "fundus-resnet18-28-scratch": "--task fundus-dr --arch resnet18 --size 28 --epochs 20 --recipe scratch",
    "derm-lite0-128-paper": "--task derm-melanoma --arch efficientnet-lite0 --size 128 --epochs 6 --pretrained imagenet "
                            "--batch-size 16 --recipe paper",
    "derm-resnet18-64-scratch": "--task derm-melanoma --arch resnet18 --size 64 --epochs 10 --recipe scratch --batch-size 64",
}


def run(name: str, flags: str, out: Path, data_root: str, seed: int) -> dict:
    ckpt = out / name
    cmd = [sys.executable, "-m", "medadv.cli", "train", *flags.split(), "--seed", str(seed), "--out", str(ckpt),
           "--data-root", data_root, "-q"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        return {"name": name, "error": f"exit status {status}"}
    meta = json.loads((ckpt / "medadv.json").read_text())
    test = out / f"{name}-test.json"
    subprocess.run([sys.executable, "-m", "medadv.cli", "evaluate", "--model", str(ckpt), "--split", "test",
                    "--out", str(test), "--data-root", data_root], check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads(test.read_text())
    epochs = [h["seconds"] for h in meta["training"]["history"]]
    return {
        "name": name, "flags": flags, "seed": seed,
        "epoch_seconds_median": sorted(epochs)[len(epochs) // 2], "wall_seconds": round(wall, 1),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "best_epoch": meta["training"]["best_epoch"], "val_auc": round(meta["training"]["best_val_auc"], 4),
        **{k: round(metrics[k], 4) for k in ("accuracy", "auc", "sensitivity", "specificity", "mean_confidence")},
        "load_average": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-root", default=os.environ.get("MEDADV_DATA", "../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench-train"))
    ap.add_argument("--only", nargs="*", choices=sorted(CONFIGS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    for name in args.only or CONFIGS:
        row = run(name, CONFIGS[name], args.out, args.data_root, args.seed)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| configuration | epoch (s, median) | peak RSS (MiB) | test accuracy | test AUC | sensitivity | specificity |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | {r['error']} | | | | | |")
            continue
        print(f"| {r['name']} | {r['epoch_seconds_median']:.1f} | {r['peak_rss_mib']:.0f} | {r['accuracy']:.3f} | "
              f"{r['auc']:.3f} | {r['sensitivity']:.3f} | {r['specificity']:.3f} |")


if __name__ == "__main__":
    main()
