"""Robust gain of adversarial training at 4/255 under the strongest evaluation medadv has (issue 11).

Per model: clean accuracy and AUC at the operating threshold, and robust accuracy at L-inf 4/255 as the
per-image worst case of PGD-40 and AutoAttack (fast: APGD-CE, APGD-margin, Square with 200 queries),
through ``medadv.evaluate.adaptive.evaluate_robustness``, on the same stratified test images. The models
are checkpoints trained beforehand, e.g.:

    medadv train --task chest-xray --epochs 5 --out runs/gain/undefended
    medadv train --task chest-xray --epochs 5 --adversarial pgd --adv-eps 4/255 --adv-steps 7 --out runs/gain/pgd
    medadv train --task chest-xray --epochs 5 --adversarial trades --trades-beta 6 --adv-eps 4/255 --out runs/gain/trades
    OMP_NUM_THREADS=1 MEDADV_DATA=../shared/data .venv/bin/python bench/robust_gain.py --models runs/gain \\
        --images 256 --json runs/gain.json undefended pgd trades
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medadv.data import load_split
from medadv.evaluate.adaptive import AdaptiveConfig, evaluate_robustness
from medadv.evaluate.battery import stratified_subset
from medadv.metrics import clinical_metrics
from medadv.models import load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)
    ap.add_argument("names", nargs="+", help="checkpoint folders under --models")
    ap.add_argument("--models", type=Path, required=True)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--eps", type=float, default=4 / 255)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    test = stratified_subset(load_split("chest-xray", "test"), args.images, args.seed)
    x, y = test.stored(), torch.from_numpy(test.labels)
    cfg = AdaptiveConfig(eps=(args.eps,), steps=40, adaptive_steps=40, autoattack="fast", square_queries=200)
    out = {"images": len(test), "checksum": test.checksum, "config": cfg.to_json(), "models": {}}
    for name in args.names:
        model, meta = load_checkpoint(args.models / name)
        t0 = time.perf_counter()
        r = evaluate_robustness(model.eval(), x, y, config=cfg, levels=test.levels, seed=args.seed)
        p = model.probabilities(x).double().numpy()
        clean = clinical_metrics(test.labels, p, model.threshold)
        out["models"][name] = {"clean": clean, "robust": r.to_json(), "training": {
            k: meta["training"].get(k) for k in ("epochs", "adversarial", "adv_eps", "adv_steps", "selection")},
            "seconds": round(time.perf_counter() - t0, 1)}
        row = r.rows[0]
        print(f"{name}: clean accuracy {clean['accuracy']:.3f} AUC {clean['auc']:.3f}; robust at {args.eps * 255:.0f}/255 "
              f"{row['adaptive']:.3f} (PGD-40 alone {row['non_adaptive']:.3f}) on {len(test)} images", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
