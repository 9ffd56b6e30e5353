"""Time one L-inf attack on a few 3D volumes, in memory (no write-back, no whole-split evaluation): the attack's
wall time, per volume and step, and the process's peak RSS.

    python bench/volume_attack.py MODEL [--n 4] [--eps 2/255] [--steps 20] [--attack pgd]

``medadv attack --limit`` also evaluates the whole split clean, which at 64³ on 2 CPU cores costs minutes;
this times the attack alone, on a seeded class-stratified subset of the model's test split."""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=4, help="test volumes attacked (class-stratified, seed 0)")
    ap.add_argument("--eps", default="2/255", help="L-inf budget in [0, 1] of the stored range")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--attack", default="pgd")
    args = ap.parse_args()
    from medadv.attacks import ThreatModel
    from medadv.data.model_split import model_split
    from medadv.evaluate.battery import stratified_subset
    from medadv.evaluate.runner import run_attack
    from medadv.models import load_checkpoint

    model, meta = load_checkpoint(args.model)
    num, _, den = args.eps.partition("/")
    eps = float(num) / float(den or 1)
    data = stratified_subset(model_split(meta, "test"), args.n, 0)
    threat = ThreatModel(eps=eps, steps=args.steps, target="opposite", classes=2, kind="binary", levels=data.levels)
    t0 = time.perf_counter()
    run = run_attack(args.attack, model, data, threat, batch_size=args.n)
    wall = time.perf_counter() - t0
    r = run.results
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.attack} eps {args.eps} {args.steps} steps on {len(data)} volumes of "
          f"{'x'.join(map(str, data.size))} (model input {model.spec.input_size}^3): attack {r['seconds']:.1f} s "
          f"({r['seconds'] / len(data) / max(1, args.steps):.2f} s per volume-step), run {wall:.1f} s; peak RSS "
          f"{peak:.0f} MiB; accuracy {r['clean']['accuracy']:.3f} -> {r['adversarial']['accuracy']:.3f}, "
          f"L-inf max {np.float64(r['perturbation']['linf_max']) * data.levels:.0f} levels")


if __name__ == "__main__":
    main()
