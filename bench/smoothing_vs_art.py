"""Randomized smoothing (issue 11 (c)): ``medadv certify`` against ART 1.20's ``PyTorchRandomizedSmoothing``.

Same noise-trained model (``medadv train --noise-sigma <sigma>``, trained by this script if ``--model`` has no
checkpoint), same sigma, n0, n, alpha, batch size and torch threads, on the same images (the seeded,
class-stratified ``--limit`` test images ``medadv certify --limit`` picks). Both run Cohen et al.'s CERTIFY:
pick the top class from n0 noisy copies, count it in n fresh ones, one-sided Clopper-Pearson lower bound
p_low at 1 - alpha, abstain if p_low < 1/2 else certify with L2 radius sigma·Phi^-1(p_low). Noise is added
to the [0, 1] image and not clipped on either side.

Base classifier. medadv's smoothed classifier votes with the model's decision at its operating threshold
(P(disease) >= the checkpoint's Youden threshold); ART votes with argmax of the logits (threshold 0.5). So
that both smooth the same base classifier, ART is given the model with its disease logit shifted by
-logit(threshold) (argmax of the shifted logits is the thresholded decision); ``--art-argmax`` gives ART the
unshifted model instead.

Measured: the fraction of images with the same certified outcome (class 0, class 1 or abstain), the radii
(mean |delta r| over images both certify to the same class) and whether they agree within sampling error,
judged by simulation: the two libraries draw independent noise, so for each image the top-class counts
k ~ Binomial(n, p) differ by chance. p is estimated from both runs (medadv reports k; ART's k is recovered
from its radius by inverting the bound), each outcome is re-simulated ``--sims`` times for two independent
runs (selection on n0, certification on n), and the observed disagreement and mean |delta r| are set
against the simulated ones (their mean and 95% range). Also checked exactly: medadv's lower bound equals
statsmodels' ``proportion_confint(k, n, 2·alpha, "beta")`` (what ART calls) for every k in 0..n.
Timing: ``--rounds`` interleaved rounds, order rotated, each certifying all images with both; medadv via
``medadv.defenses.certify.certify_model`` (what ``medadv certify`` runs; it also loads the model and the split),
ART via ``certify`` only; wall and CPU seconds, ratio per round, median.

    .venv/bin/pip install --no-deps --target /tmp/peers adversarial-robustness-toolbox==1.20.1 six tqdm \\
        statsmodels pandas patsy python-dateutil pytz tzdata
    MEDADV_DATA=../shared/data PYTHONPATH=/tmp/peers .venv/bin/python bench/smoothing_vs_art.py \\
        --model /tmp/advbench/noise --sigma 0.25 --n0 100 --n 1000 --alpha 0.001 --limit 200 --threads 1 --rounds 2 --json

medadv's certificates alone, from the CLI (identical, same seed):
    medadv certify --model /tmp/advbench/noise --out /tmp/advbench/certify-cli --sigma 0.25 --n0 100 --n 1000 \\
        --alpha 0.001 --limit 200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEDADV = str(ROOT / ".venv" / "bin" / "medadv") if (ROOT / ".venv" / "bin" / "medadv").exists() else "medadv"


class Thresholded(nn.Module):
    """The model's logits with the disease logit lowered by logit(threshold): argmax = P(disease) >= threshold."""

    def __init__(self, model: nn.Module, threshold: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("shift", torch.tensor([0.0, math.log(threshold / (1 - threshold))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) - self.shift


def train_if_missing(args) -> None:
    if Path(args.model, "medadv.json").is_file():
        return
    cmd = [MEDADV, "train", "--task", "chest-xray", "--epochs", str(args.train_epochs), "--noise-sigma", str(args.sigma),
           "--seed", str(args.seed), "--out", args.model, "--quiet"]
    print("$ OMP_NUM_THREADS=%d %s" % (args.threads, " ".join(cmd[1:] if cmd[0] == MEDADV else cmd)), file=sys.stderr)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    subprocess.run(cmd, env=env, check=True, stdout=sys.stderr)  # its table on stderr: stdout is this script's JSON


def lcb_table(n: int, alpha: float) -> np.ndarray:
    """Clopper-Pearson one-sided lower bound for every k in 0..n (medadv's formula)."""
    from scipy.stats import beta

    k = np.arange(n + 1)
    out = np.zeros(n + 1)
    out[1:] = beta.ppf(alpha, k[1:], n - k[1:] + 1)
    return out


def check_bound(n: int, alpha: float) -> float:
    """max |medadv lower bound - statsmodels' (ART's)| over k = 0..n."""
    from statsmodels.stats.proportion import proportion_confint

    from medadv.defenses.smoothing import lower_confidence_bound

    return max(abs(lower_confidence_bound(k, n, alpha) - proportion_confint(k, n, alpha=2 * alpha, method="beta")[0])
               for k in range(n + 1))


def recover_k(radius: float, sigma: float, table: np.ndarray) -> int:
    """ART's top-class count from its certified radius (the k whose lower bound gives that radius)."""
    from scipy.stats import norm

    p = norm.cdf(radius / sigma)
    return int(np.argmin(np.abs(table - p)))


def simulate(p_top: float, n0: int, n: int, table: np.ndarray, sigma: float, sims: int,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes of ``sims`` CERTIFY runs for an image whose noisy base decision is the top class w.p. p_top:
    (class index 0 = top, 1 = other, -1 abstain; radius)."""
    from scipy.stats import norm

    sel_top = rng.binomial(n0, p_top, sims) * 2 >= n0  # argmax of n0 votes (ties: the top, as np.argmax on [top, other])
    k_top = rng.binomial(n, p_top, sims)
    k = np.where(sel_top, k_top, n - k_top)
    p_low = table[k]
    cls = np.where(p_low >= 0.5, np.where(sel_top, 0, 1), -1)
    rad = np.where(cls >= 0, sigma * norm.ppf(np.clip(p_low, 1e-12, 1 - 1e-12)), 0.0)
    return cls, rad


def agreement(med: list[dict], art_pred: np.ndarray, art_rad: np.ndarray, args) -> dict[str, Any]:
    n, table = args.n, lcb_table(args.n, args.alpha)
    mp = np.array([c["prediction"] for c in med])
    mr = np.array([c["radius"] for c in med])
    same = mp == art_pred
    both = same & (mp >= 0)
    dr = np.abs(mr - art_rad)
    rng = np.random.default_rng(12345)
    sim_disagree = np.zeros(args.sims)
    sim_dr_mean, sim_dr_hi, in_band = [], [], []
    sim_mean_dr_total = np.zeros(args.sims)
    for i, c in enumerate(med):
        # P(base decision = class 1) from each certified run (medadv reports k; ART's k from its radius)
        q1 = []
        if c["prediction"] >= 0:
            q1.append(c["count"] / n if c["prediction"] == 1 else 1 - c["count"] / n)
        if art_pred[i] >= 0:
            k_a = recover_k(art_rad[i], args.sigma, table)
            q1.append(k_a / n if art_pred[i] == 1 else 1 - k_a / n)
        if q1:
            p_top = max(float(np.mean(q1)), 1 - float(np.mean(q1)))
        else:  # both abstained: medadv's count of its selected class, whichever it was
            p_top = max(c["count"] / n, 1 - c["count"] / n)
        c1, r1 = simulate(p_top, args.n0, n, table, args.sigma, args.sims, rng)
        c2, r2 = simulate(p_top, args.n0, n, table, args.sigma, args.sims, rng)
        sim_disagree += c1 != c2
        d = np.abs(r1 - r2)
        sim_mean_dr_total += np.where((c1 == c2) & (c1 >= 0), d, 0.0)
        if both[i]:
            hi = float(np.quantile(d[(c1 == c2) & (c1 >= 0)], 0.95)) if ((c1 == c2) & (c1 >= 0)).any() else 0.0
            sim_dr_mean.append(float(d[(c1 == c2) & (c1 >= 0)].mean()) if ((c1 == c2) & (c1 >= 0)).any() else 0.0)
            sim_dr_hi.append(hi)
            in_band.append(dr[i] <= hi + 1e-9)
    m = len(med)
    obs_mean = float(dr[both].mean()) if both.any() else 0.0
    return {
        "n_images": m,
        "same_outcome": float(same.mean()), "same_outcome_count": int(same.sum()),
        "abstain_medadv": int((mp < 0).sum()), "abstain_art": int((art_pred < 0).sum()),
        "confusion_medadv_vs_art": {f"{a}/{b}": int(((mp == a) & (art_pred == b)).sum())
                                    for a in (-1, 0, 1) for b in (-1, 0, 1) if ((mp == a) & (art_pred == b)).any()},
        "expected_same_outcome_by_sampling": {"mean": float(1 - sim_disagree.mean() / m),
                                              "p2.5": float(1 - np.quantile(sim_disagree, 0.975) / m),
                                              "p97.5": float(1 - np.quantile(sim_disagree, 0.025) / m)},
        "mean_abs_delta_radius": obs_mean, "max_abs_delta_radius": float(dr[both].max()) if both.any() else 0.0,
        "mean_radius_medadv": float(mr[both].mean()) if both.any() else 0.0,
        "mean_radius_art": float(art_rad[both].mean()) if both.any() else 0.0,
        "mean_signed_delta_radius_medadv_minus_art": float((mr - art_rad)[both].mean()) if both.any() else 0.0,
        "expected_mean_abs_delta_radius_by_sampling": float(np.mean(sim_dr_mean)) if sim_dr_mean else 0.0,
        "images_within_95pct_sampling_band": float(np.mean(in_band)) if in_band else 1.0,
        "images_compared_for_radius": int(both.sum()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="/tmp/advbench/noise", help="noise-trained checkpoint (trained here if missing)")
    ap.add_argument("--train-epochs", type=int, default=3, help="if the model is trained here")
    ap.add_argument("--sigma", type=float, default=0.25)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--limit", type=int, default=200, help="test images (seeded, class-stratified, as medadv certify)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sims", type=int, default=2000, help="simulated run pairs per image for the sampling band")
    ap.add_argument("--art-argmax", action="store_true", help="give ART the model at argmax (threshold 0.5)")
    ap.add_argument("--out", default="/tmp/advbench/certify-bench")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    C.set_threads(args.threads)
    os.environ.setdefault("MEDADV_DATA", "/work/shared/data")
    try:
        from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing
    except ImportError as exc:
        sys.exit(f"ART is not importable ({exc}): see the install line in this script's docstring")
    from medadv.defenses.certify import _split_of, certify_model, stratified_pick
    from medadv.models import load_checkpoint

    train_if_missing(args)
    model, meta = load_checkpoint(args.model)
    model.eval()
    data = _split_of(meta, "test", None)
    index = stratified_pick(data.labels, args.limit, args.seed) if args.limit else np.arange(len(data))
    subset = data.subset(index)
    x = subset.tensor().numpy()
    threshold = float(model.threshold)
    art_model = model if args.art_argmax else Thresholded(model, threshold).eval()
    smoother = PyTorchRandomizedSmoothing(model=art_model, loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                                          nb_classes=2, clip_values=(0.0, 1.0), device_type="cpu",
                                          sample_size=args.n0, scale=args.sigma, alpha=args.alpha)
    out_root = Path(args.out)
    runs: dict[str, list[dict]] = {"medadv": [], "art": []}
    med_record, art_pred, art_rad = None, None, None
    for r in range(args.rounds):
        for who in (["medadv", "art"] if r % 2 == 0 else ["art", "medadv"]):
            load = os.getloadavg()[0]
            t, c = time.perf_counter(), time.process_time()
            if who == "medadv":
                shutil.rmtree(out_root / f"medadv-r{r}", ignore_errors=True)
                rec = certify_model(args.model, out_root / f"medadv-r{r}", sigma=args.sigma, n=args.n, alpha=args.alpha,
                                    n0=args.n0, limit=args.limit, seed=args.seed, batch_size=args.batch_size)
                med_record = med_record or rec
            else:
                np.random.seed(args.seed + r)  # ART draws its noise from NumPy's global generator
                pred, rad = smoother.certify(x, n=args.n, batch_size=args.batch_size)
                if art_pred is None:
                    art_pred, art_rad = pred.astype(int), rad.astype(float)
            row = {"round": r, "wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(time.process_time() - c, 2),
                   "load_1min_before": load}
            runs[who].append(row)
            print(f"round {r} {who}: wall {row['wall_s']} s cpu {row['cpu_s']} s (load {load:.1f})", file=sys.stderr,
                  flush=True)
    assert med_record is not None and art_pred is not None
    ids = [im["id"] for im in med_record["images"]]
    if ids != list(subset.ids):
        sys.exit("medadv certified other images than the ones given to ART")
    ratios = {k: {"per_round": [round(m[k] / a[k], 3) for m, a in zip(runs["medadv"], runs["art"])]}
              for k in ("wall_s", "cpu_s")}
    for v in ratios.values():
        v["median"] = round(statistics.median(v["per_round"]), 3)
    agree = agreement(med_record["images"], art_pred, art_rad, args)
    art_curve = []
    labels = subset.labels
    for row in med_record["summary"]["certified_accuracy"]:
        ok = (art_pred == labels) & (art_rad >= row["radius"])
        art_curve.append({"radius": row["radius"], "medadv": row["certified_accuracy"], "art": float(ok.mean())})
    import art

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    out = {"model": args.model, "threshold": threshold, "art_base": "argmax" if args.art_argmax else "shifted to threshold",
           "settings": {k: v for k, v in vars(args).items()}, "art_version": art.__version__,
           "bound_max_abs_diff_vs_statsmodels": check_bound(args.n, args.alpha),
           "agreement": agree, "certified_accuracy": art_curve, "runs": runs, "medadv_over_art": ratios,
           "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(out))
        return
    print(f"model {args.model} (threshold {threshold:.3f}; ART base: {out['art_base']}), {agree['n_images']} images, "
          f"sigma {args.sigma}, n0 {args.n0}, n {args.n}, alpha {args.alpha}")
    print(f"bound vs statsmodels: max abs diff {out['bound_max_abs_diff_vs_statsmodels']:.2e}")
    e = agree["expected_same_outcome_by_sampling"]
    print(f"same outcome: {agree['same_outcome']:.1%} ({agree['same_outcome_count']}/{agree['n_images']}); expected from "
          f"sampling alone {e['mean']:.1%} [{e['p2.5']:.1%}-{e['p97.5']:.1%}]; abstained medadv {agree['abstain_medadv']}, "
          f"ART {agree['abstain_art']}; {agree['confusion_medadv_vs_art']}")
    print(f"radius: mean |dr| {agree['mean_abs_delta_radius']:.4f} (expected from sampling "
          f"{agree['expected_mean_abs_delta_radius_by_sampling']:.4f}), max {agree['max_abs_delta_radius']:.4f}, "
          f"{agree['images_within_95pct_sampling_band']:.1%} of {agree['images_compared_for_radius']} images within their 95% band; "
          f"mean radius medadv {agree['mean_radius_medadv']:.4f} ART {agree['mean_radius_art']:.4f}")
    for row in art_curve:
        print(f"  certified accuracy at r={row['radius']:.2f}: medadv {row['medadv']:.3f} ART {row['art']:.3f}")
    for who, rows in runs.items():
        for row in rows:
            print(f"  round {row['round']} {who:6s} wall {row['wall_s']:7.1f} s cpu {row['cpu_s']:7.1f} s")
    for k, v in ratios.items():
        print(f"  medadv/ART {k}: median {v['median']} per round {v['per_round']}")


if __name__ == "__main__":
    main()
