"""Cross-check medadv's white-box attacks against torchattacks and ART on one trained model and images.

FGSM (deterministic): medadv ``FGSM`` must equal torchattacks ``FGSM`` and ART ``FastGradientMethod``
pixel for pixel (max abs difference <= 1e-6) at each eps: untargeted, continuous (``levels=None``: no
storage grid), so all three compute x + eps·sign(∇ CE(model(x), y)) clipped to [0, 1].

PGD (random start, so outputs differ): success rates over the same >= 200 images must agree within
2 points at the same eps, step, steps. Conventions matched: every library sees the same model on
[0, 1] inputs (ART: PyTorchClassifier with clip_values=(0, 1)), labels are the true labels, medadv runs
untargeted cross-entropy (``target="none"``), and success is argmax misclassification for all three
(medadv's operating threshold is not used here).

    .venv/bin/python bench/crosscheck_peers.py --model /tmp/perf/victim28 --n 256 --threads 1 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from medadv.attacks import FGSM, PGD, ThreatModel  # noqa: E402

FGSM_TOLERANCE = 1e-6
PGD_TOLERANCE = 0.02  # success-rate points (fraction)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/perf/victim28", help="trained checkpoint (random weights if absent)")
    ap.add_argument("--size", type=int, default=28, help="input size for random weights")
    ap.add_argument("--n", type=int, default=256, help="test images (>= 200 for the PGD comparison)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--fgsm-eps", type=float, nargs="+", default=[2 / 255, 8 / 255])
    ap.add_argument("--pgd-eps", type=float, nargs="+", default=[1 / 255, 2 / 255, 8 / 255])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    C.set_threads(args.threads)

    model, source = C.victim(args.model, args.size)
    x, y, images = C.batch(model, args.n, args.data_root)
    art = C.art_classifier(model, x)
    chunks = [slice(i, i + args.batch) for i in range(0, len(x), args.batch)]

    def batched(fn) -> torch.Tensor:
        return torch.cat([fn(x[s], y[s]) for s in chunks])

    rows = []
    for eps in args.fgsm_eps:
        threat = ThreatModel(norm="linf", eps=eps, steps=1, random_start=False, target="none", levels=None)
        ours = batched(lambda a, b: FGSM(threat)(model, a, b).x_adv)
        ta = batched(C.torchattacks_fgsm(model, eps))
        ar = batched(C.art_fgsm(art, eps, args.batch))
        d_ta, d_art = (ours - ta).abs().max().item(), (ours - ar).abs().max().item()
        rows.append({"attack": "fgsm", "eps": eps, "medadv_success": C.argmax_success(model, ours, y),
                     "torchattacks_success": C.argmax_success(model, ta, y), "art_success": C.argmax_success(model, ar, y),
                     "max_abs_diff_torchattacks": d_ta, "max_abs_diff_art": d_art,
                     "ok": d_ta <= FGSM_TOLERANCE and d_art <= FGSM_TOLERANCE})
    for eps in args.pgd_eps:
        alpha = eps / 4
        threat = ThreatModel(norm="linf", eps=eps, step_size=alpha, steps=args.steps, random_start=True, target="none",
                             levels=None)
        ours = batched(lambda a, b: PGD(threat, seed=0)(model, a, b).x_adv)
        ta = batched(C.torchattacks_pgd(model, eps, alpha, args.steps))
        ar = batched(C.art_pgd(art, eps, alpha, args.steps, args.batch))
        s = {k: C.argmax_success(model, v, y) for k, v in (("medadv", ours), ("torchattacks", ta), ("art", ar))}
        gap = max(abs(s["medadv"] - s["torchattacks"]), abs(s["medadv"] - s["art"]))
        rows.append({"attack": "pgd", "eps": eps, "alpha": alpha, "steps": args.steps,
                     **{f"{k}_success": v for k, v in s.items()}, "max_success_gap": gap,
                     "linf": max((v - x).abs().max().item() for v in (ours, ta, ar)), "ok": gap <= PGD_TOLERANCE})
    clean = C.argmax_success(model, x, y)
    record = {"model": source, "images": f"{images} ({len(x)})", "clean_error": clean, "threads": torch.get_num_threads(),
              "rows": rows, "all_ok": all(r["ok"] for r in rows)}
    if args.json:
        print(json.dumps(record))
        return
    print(f"{source}, {len(x)} {images}, clean argmax error {clean:.3f}, {torch.get_num_threads()} thread(s)")
    print(f"{'attack':6} {'eps':>7} {'medadv':>7} {'t.att':>7} {'ART':>7} {'check':>26} ok")
    for r in rows:
        check = (f"diff {r['max_abs_diff_torchattacks']:.1e}/{r['max_abs_diff_art']:.1e}" if r["attack"] == "fgsm"
                 else f"gap {r['max_success_gap']:.3f}")
        print(f"{r['attack']:6} {r['eps'] * 255:5.1f}/255 {r['medadv_success']:7.3f} {r['torchattacks_success']:7.3f} "
              f"{r['art_success']:7.3f} {check:>26} {'yes' if r['ok'] else 'NO'}")
    sys.exit(0 if record["all_ok"] else 1)


if __name__ == "__main__":
    main()
