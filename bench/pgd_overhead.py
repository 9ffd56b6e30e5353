"""PGD overhead benchmark: PGD-k L-inf time over the time of k plain forward+backward passes.

The reference ("raw") is k passes of the same model on the same batch for the input's gradient (eval
mode, parameters frozen, summed cross-entropy, ``torch.autograd.grad`` w.r.t. the input): the floor any
PGD step pays. Timed in the same process, interleaved (rotated order each round), medians over rounds:

    medadv       PGD(threat)(model, x, y)                       the eager loop
    medadv_fast  PGD(threat, fast="fp32")                      BN folded into convs, channels_last
    medadv_bf16  PGD(threat, fast="bf16")                      the same in bfloat16 (opt-in: other numerics)
    torchattacks torchattacks.PGD(model, eps, alpha, steps, random_start=True)
    art          ART ProjectedGradientDescent on PyTorchClassifier(clip_values=(0, 1))

Times are this process's CPU seconds by default (``--clock cpu``): on a machine shared with other
people's jobs, elapsed time mostly measures their load. Use ``--threads 1`` there.

Victim: ResNet-18 (medadv zoo, MedicalClassifier wrapper), a trained checkpoint per size if given
(``--model28``/``--model64``), else random weights (timing only: success rates then mean nothing).
Images: PneumoniaMNIST test images at the model's size (``MEDADV_DATA``), else noise. Success rates are
argmax misclassification after the attack, untargeted, continuous (no storage grid).

    .venv/bin/python bench/pgd_overhead.py --model28 /tmp/perf/victim28 --model64 /tmp/perf/victim64 --threads 1
    .venv/bin/python bench/pgd_overhead.py --json   # one line: the 28 px figures (and 64 px under "64")
    PYTHONPATH=/tmp/peers .venv/bin/python bench/pgd_overhead.py --sizes 224 --model224 <224 px checkpoint> \
        --batch 32 --methods medadv medadv_fast torchattacks     # the paper's regime (issue 19)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from medadv.attacks import PGD, ThreatModel  # noqa: E402
from medadv.attacks.fast import accelerated  # noqa: E402

METHODS = ("medadv", "medadv_fast", "medadv_bf16", "torchattacks", "art")


def measure(checkpoint: str | None, size: int, args: argparse.Namespace) -> dict:
    model, source = C.victim(checkpoint, size)
    x, y, images = C.batch(model, args.batch, args.data_root)
    eps, steps = args.eps, args.steps
    alpha = args.alpha if args.alpha is not None else eps / 4
    threat = ThreatModel(norm="linf", eps=eps, step_size=alpha, steps=steps, random_start=True, target="none",
                         levels=None)
    t0 = time.perf_counter()
    for precision in ("fp32", "bf16"):
        accelerated(model, precision)  # one-time cost, reported apart; PGD(fast=...) finds them cached
    accelerate_seconds = (time.perf_counter() - t0) / 2
    attacks = {
        "medadv": lambda x, y: PGD(threat, seed=0)(model, x, y).x_adv,
        "medadv_fast": lambda x, y: PGD(threat, seed=0, fast="fp32")(model, x, y).x_adv,
        "medadv_bf16": lambda x, y: PGD(threat, seed=0, fast="bf16")(model, x, y).x_adv,
        "torchattacks": C.torchattacks_pgd(model, eps, alpha, steps),
        "art": C.art_pgd(C.art_classifier(model, x), eps, alpha, steps, args.batch),
    }
    attacks = {k: v for k, v in attacks.items() if k in args.methods}
    outputs: dict[str, torch.Tensor] = {}

    def timed(name):
        def run():
            outputs[name] = attacks[name](x, y)
        return run

    methods = {"raw": C.raw_passes(model, x, y, steps), **{n: timed(n) for n in attacks}}
    timing = C.interleaved(methods, args.rounds, "raw", args.clock)
    with torch.no_grad():
        clean = C.argmax_success(model, x, y)
    out = {
        "size": size, "model": source, "images": images, "batch": len(x), "threads": torch.get_num_threads(),
        "eps": eps, "alpha": alpha, "steps": steps, "rounds": args.rounds, "clock": args.clock,
        "clean_error": round(clean, 4),
        "raw_seconds": round(timing["raw"]["seconds"], 3), "accelerate_seconds": round(accelerate_seconds, 3),
        "load_average": round(os.getloadavg()[0], 2),
    }
    for name in attacks:
        out[f"{name}_over_raw"] = round(timing[name]["over_ref"], 3)
        out[f"{name}_over_raw_range"] = [round(timing[name]["over_ref_min"], 3), round(timing[name]["over_ref_max"], 3)]
        out[f"{name}_seconds"] = round(timing[name]["seconds"], 3)
        out[f"{name}_success"] = round(C.argmax_success(model, outputs[name], y), 4)
        linf = (outputs[name] - x).abs().max().item()
        assert linf <= eps + 1e-6, f"{name} left the ball: {linf}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model28", default="/tmp/perf/victim28", help="checkpoint at 28 px (random weights if absent)")
    ap.add_argument("--model64", default="/tmp/perf/victim64", help="checkpoint at 64 px (random weights if absent)")
    ap.add_argument("--model224", default=None, help="checkpoint at 224 px, e.g. the demo's EfficientNet-Lite0 (random ResNet-18 if absent)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[28, 64])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--eps", type=float, default=2 / 255, help="L-inf budget in [0, 1] units (default 2/255)")
    ap.add_argument("--alpha", type=float, default=None, help="step (default eps/4)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (medians)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 on a shared machine)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: this process's CPU seconds (robust to other people's load); wall: elapsed")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    C.set_threads(args.threads)
    results = {size: measure(getattr(args, f"model{size}", None), size, args) for size in args.sizes}
    if args.json:
        first = results[args.sizes[0]]
        line = {k: v for k, v in first.items()}
        line["medadv_fast_bf16_over_raw"] = first.get("medadv_bf16_over_raw")
        line["medadv_fast_bf16_success"] = first.get("medadv_bf16_success")
        line.update({str(s): r for s, r in results.items() if s != args.sizes[0]})
        print(json.dumps(line))
        return
    for size, r in results.items():
        print(f"\n{size} px, {r['model']}, {r['images']}, batch {r['batch']}, {r['threads']} thread(s), "
              f"PGD-{r['steps']} eps {r['eps']:.5f} step {r['alpha']:.5f}; raw {r['raw_seconds']:.2f} {r['clock']} s, "
              f"clean error {r['clean_error']:.3f}, load {r['load_average']}")
        print(f"{'method':14} {'time/raw':>9} {'range':>15} {'seconds':>8} {'success':>8}")
        for name in METHODS:
            if f"{name}_over_raw" in r:
                lo, hi = r[f"{name}_over_raw_range"]
                print(f"{name:14} {r[f'{name}_over_raw']:9.3f} {f'{lo:.2f}-{hi:.2f}':>15} {r[f'{name}_seconds']:8.2f} "
                      f"{r[f'{name}_success']:8.3f}")


if __name__ == "__main__":
    main()
