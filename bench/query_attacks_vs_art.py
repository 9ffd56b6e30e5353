"""medadv's query attacks against ART 1.20's on one victim: Square (score-based) and HopSkipJump (label-only).

Same model, same N correctly classified PneumoniaMNIST test images, same L-inf eps, untargeted.

Success criterion. ART decides by argmax of the two logits, i.e. P(disease) >= 0.5 (up to exact ties), so
here medadv's oracles use threshold 0.5 too, not the checkpoint's tuned operating point; images are
chosen correctly classified under that same rule. Every final image, medadv's and ART's alike, is judged
the same way: projected into the eps-ball, rounded onto the 8-bit grid (what a stored file holds), then
classified. ART's own output is continuous; its "raw" success (adversarial and within eps, unrounded) is
reported beside it.

Queries. medadv counts them per image. ART's are counted by wrapping the network: for Square every query
lies within eps of its source image, so each row is charged to its nearest source; HSJA runs one image
per ``generate`` call (ART's HSJA is sequential anyway) and is charged the calls' total.
ART's Square spends 3 queries per iteration (it re-scores the current point and its loss each time),
medadv's 1, so ART is run twice: with max_iter = the query budget (same iterations, about 3x the
queries) and with max_iter = budget / 3 (same queries). ART's HSJA has no query budget: it gets the
most iterations whose nominal cost fits in the budget, and its measured queries are reported.

    OMP_NUM_THREADS=1 python bench/query_attacks_vs_art.py --n 32 --max-queries 300
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medadv.attacks.base import LabelOracle, ProbabilityOracle
from medadv.attacks.hsja import HopSkipJump
from medadv.attacks.square import Square
from medadv.attacks.threat_model import ThreatModel


def victim(path: str | None, cache: Path, data_root: Path):
    from medadv.models import load_checkpoint

    if path is None:
        from medadv.cache import StageCache
        from medadv.study import DEMO_PLAN, trained_model

        path = str(trained_model(DEMO_PLAN.train, StageCache(cache), data_root))  # trained once, then reused
    model, _ = load_checkpoint(path)
    return model.eval(), path


class Counting(nn.Module):
    """The victim, counting the images it scores; ``owners`` (if set) charges each to its nearest source."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.total, self.sources, self.per_image = model, 0, None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # ART's HSJA sends float64
        self.total += len(x)
        if self.sources is not None:
            near = (x.flatten(1)[:, None] - self.sources.flatten(1)[None]).abs().amax(2).argmin(1)
            self.per_image += torch.bincount(near, minlength=len(self.sources))
        return self.model(x)


def judge(model, x_adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """Adversarial at threshold 0.5 after projection into the ball and rounding onto the grid."""
    stored = threat.to_grid(threat.project(x_adv.float().clamp(0, 1), x), x)
    with torch.no_grad():
        pred = (torch.softmax(model(stored), 1)[:, 1] >= 0.5).long()
    return pred != y


def art_hsja_iterations(budget: int, init_eval: int, max_eval: int, d: int) -> int:
    """Most HSJA iterations whose nominal cost (ART's schedule) fits in ``budget``."""
    search = math.ceil(math.log2(100 * d))  # ART's L-inf binary search: theta = 0.01/d
    cost, k = 2 + 10 + search, 0  # clean, one init try, init blend search, first boundary search
    while True:
        step = min(int(init_eval * math.sqrt(k + 1)), max_eval) + 2 + search
        if cost + step > budget:
            return max(k, 1)
        cost, k = cost + step, k + 1


def raw_success(model, adv: torch.Tensor, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """ART's own view: its continuous output adversarial at 0.5 and within eps (no projection, no rounding)."""
    with torch.no_grad():
        raw = (torch.softmax(model(adv.float()), 1)[:, 1] >= 0.5).long() != y
    return round((raw & ((adv - x).flatten(1).abs().amax(1) <= eps + 1e-6)).float().mean().item(), 4)


def summary(success: torch.Tensor, queries, seconds: float) -> dict:
    q = torch.as_tensor(queries).float()
    return {"success": round(success.float().mean().item(), 4), "median_queries": q.median().item(),
            "mean_queries": round(q.mean().item(), 1), "max_queries": q.max().item(), "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--eps", type=float, default=8 / 255)
    ap.add_argument("--max-queries", type=int, default=1000)
    ap.add_argument("--p-init", type=float, default=0.1)
    ap.add_argument("--model", default=None, help="checkpoint folder (default: train/reuse the demo victim)")
    ap.add_argument("--cache", default=os.environ.get("MEDADV_TEST_CACHE", "/tmp/qbench/cache"))
    ap.add_argument("--skip", default="", help="comma list of: square, hsja")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)  # ART draws from NumPy's global generator
    try:
        from art.attacks.evasion import HopSkipJump as ArtHSJA
        from art.attacks.evasion import SquareAttack as ArtSquare
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        sys.exit("ART is not installed: pip install adversarial-robustness-toolbox==1.20.1")
    from medadv.data import load_split

    data_root = Path(os.environ.get("MEDADV_DATA", "/work/shared/data"))
    model, path = victim(args.model, Path(args.cache), data_root)
    test = load_split("chest-xray", "test", data_root=data_root)
    x_all, y_all = test.tensor(slice(0, 8 * args.n)), torch.as_tensor(test.labels[: 8 * args.n]).long()
    with torch.no_grad():
        correct = (torch.softmax(model(x_all), 1)[:, 1] >= 0.5).long() == y_all
    keep = correct.nonzero()[:, 0][: args.n]
    x, y = x_all[keep], y_all[keep]
    threat = ThreatModel(norm="linf", eps=args.eps, target="none")
    eps = threat.radius  # the same whole number of levels for both libraries
    counting = Counting(model)
    art_model = PyTorchClassifier(model=counting, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                  nb_classes=2, clip_values=(0.0, 1.0), device_type="cpu")
    onehot = np.eye(2, dtype=np.float32)[y.numpy()]
    B = args.max_queries
    out: dict = {"n": len(x), "eps": eps, "max_queries": B, "model": str(path), "criterion": "P(disease) >= 0.5"}
    skip = set(filter(None, args.skip.split(",")))

    if "square" not in skip:
        t = time.perf_counter()
        res = Square(threat, 0, max_queries=B, p_init=args.p_init, threshold=0.5)(ProbabilityOracle.from_model(model),
                                                                                  x, y)
        out["medadv_square"] = summary(judge(model, res.x_adv, x, y, threat), res.queries, time.perf_counter() - t)
        for tag, iters in (("art_square_same_iters", B), ("art_square_same_queries", max(1, (B - 2) // 3))):
            counting.sources, counting.per_image = x, torch.zeros(len(x), dtype=torch.long)
            attack = ArtSquare(art_model, norm=np.inf, eps=eps, max_iter=iters, p_init=args.p_init, nb_restarts=1,
                               batch_size=len(x), verbose=False)
            t = time.perf_counter()
            adv = torch.from_numpy(attack.generate(x.numpy(), y=onehot))
            seconds = time.perf_counter() - t
            row = summary(judge(model, adv, x, y, threat), counting.per_image, seconds)
            row["raw_success"] = raw_success(model, adv, x, y, eps)
            row["max_iter"] = iters
            out[tag] = row
        counting.sources = None

    if "hsja" not in skip:
        t = time.perf_counter()
        res = HopSkipJump(threat, 0, max_queries=B)(LabelOracle(ProbabilityOracle.from_model(model), 0.5), x, y)
        out["medadv_hsja"] = summary(judge(model, res.x_adv, x, y, threat), res.queries, time.perf_counter() - t)
        iters = art_hsja_iterations(B, 100, 10000, x[0].numel())
        attack = ArtHSJA(art_model, batch_size=256, targeted=False, norm=np.inf, max_iter=iters, max_eval=10000,
                         init_eval=100, init_size=100, verbose=False)
        advs, queries = [], []
        t = time.perf_counter()
        for i in range(len(x)):
            before = counting.total
            advs.append(torch.from_numpy(attack.generate(x[i:i + 1].numpy(), y=onehot[i:i + 1])))
            queries.append(counting.total - before)
        seconds = time.perf_counter() - t
        adv = torch.cat(advs)
        row = summary(judge(model, adv, x, y, threat), queries, seconds)
        row["raw_success"] = raw_success(model, adv, x, y, eps)
        row["max_iter"] = iters
        out["art_hsja"] = row

    if args.json:
        print(json.dumps(out))
        return
    print(f"victim {out['model']}\n{out['n']} images, L-inf eps {eps * 255:.0f}/255, untargeted, budget {B} "
          f"queries/image, success = {out['criterion']} after projection + 8-bit rounding")
    print(f"{'attack':26s} {'success':>8s} {'raw':>6s} {'med q':>7s} {'mean q':>7s} {'max q':>6s} {'seconds':>8s}")
    for k, v in out.items():
        if isinstance(v, dict):
            raw = f"{v['raw_success']:.1%}" if "raw_success" in v else "-"
            print(f"{k:26s} {v['success']:8.1%} {raw:>6s} {v['median_queries']:7.0f} {v['mean_queries']:7.1f} "
                  f"{v['max_queries']:6.0f} {v['seconds']:8.1f}")


if __name__ == "__main__":
    main()
