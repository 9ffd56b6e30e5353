"""A multi-label chest X-ray reader under attack (issue 20): macro AUC clean and under PGD, hide-everything,
add/remove one finding with its collateral, and a torchattacks cross-check of the hide attack.

Everything medadv measures here goes through its command line (``medadv train``, ``evaluate``, ``attack``), so
the numbers are the ones a user gets; the script records every command beside its number, with the seed, the
image counts (N images, eligible images), the machine and its load.

1. ``medadv train --task chest-findings``: EfficientNet-Lite0 (ImageNet weights), 64 px, fine-tuned on the 600
   NIH ChestX-ray14 training images of ``nih-cxr14-1000`` (cached under ``--work``: trained once).
2. ``medadv evaluate --split test``: clean macro AUC on the whole test split.
3. ``medadv attack --attack pgd --target none --eps E``: macro AUC under untargeted PGD at each ``--eps``.
4. ``medadv attack --attack pgd --target hide --eps E``: every finding below its threshold ("no finding"),
   success over the eligible images (truly abnormal and flagged before the attack).
5. For the ``--top`` most frequent findings of the test split: ``--target finding:NAME=1`` (add, on images where
   it is truly and correctly absent) and ``=0`` (remove, where truly and correctly present), at ``--finding-eps``:
   success over the eligible images and the mean number of other findings that changed side (collateral).
6. Cross-check: torchattacks' ``PGD`` (unchanged: its random start, sign steps and clamping) on the same network
   (the checkpoint's ``MedicalClassifier``, taking the stored [0, 1] pixels), the same images, eps, steps and
   step size, with medadv's hide objective expressed through a model wrapper (torchattacks' own loss is
   cross-entropy): the wrapper returns two logits ``[-L, 0]`` with L(x) = sum over findings of
   BCE(logit - logit(threshold), 0), written here independently of medadv, and every image is labelled 1, so
   torchattacks' untargeted CE ascent, log(1 + exp(-L)), descends L; its gradient's sign is that of -grad L
   (checked: the fraction of pixels where it agrees with medadv's own objective's gradient is reported). Both
   tools' outputs are judged by the same code here (every finding below its threshold, on the images that were
   truly abnormal and flagged before), once continuous (medadv ``--grid none``, torchattacks' raw output) and
   once on the 8-bit storage grid (medadv's default, saved PNGs re-read; torchattacks' output rounded to the
   nearest level, which never leaves eps = k/255). Each seed runs both tools side by side.

torchattacks is optional (the cross-check is skipped if it is absent); install it without its torchvision pin:

    .venv/bin/pip install --no-deps --target /tmp/peers torchattacks==3.5.1
    OMP_NUM_THREADS=1 .venv/bin/python bench/multilabel.py --data-root ../shared/data --markdown /tmp/issue20_bench.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from _common import CLI, machine, uptime  # bench/ is on sys.path when a script here runs

FINDING_TIE_BREAK = "NIH's column order"


def frac(text: str) -> float:
    num, _, den = text.partition("/")
    return float(num) / float(den) if den else float(num)


def fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    return path


# ------------------------------------------------------------------------------------------- the peer

class HideAsCE(nn.Module):
    """Two logits [-L, 0] per image, L = sum_f BCE(s_f, want_f) with s_f = logit_f - logit(threshold_f).

    With every label 1, cross-entropy is log(1 + exp(-L)); ascending it (torchattacks' untargeted PGD)
    descends L, and its input gradient is -sigmoid(-L) grad L: the sign of -grad L, computed through the
    small softmax entry (no rounding of 1 - p to zero). ``want``: N×F wanted states (hide: all 0)."""

    def __init__(self, model: nn.Module, thresholds: np.ndarray) -> None:
        super().__init__()
        self.model = model
        t = torch.as_tensor(np.clip(np.asarray(thresholds, dtype=np.float64), 1e-6, 1 - 1e-6), dtype=torch.float32)
        self.register_buffer("logit_t", torch.log(t) - torch.log1p(-t))
        self.want: torch.Tensor | None = None

    def L(self, x: torch.Tensor) -> torch.Tensor:
        s = self.model(x) - self.logit_t
        want = torch.zeros_like(s) if self.want is None else self.want.to(s)
        return F.binary_cross_entropy_with_logits(s, want, reduction="none").sum(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = self.L(x)
        return torch.stack([-L, torch.zeros_like(L)], 1)


@torch.no_grad()
def decisions(model: nn.Module, x: torch.Tensor, thresholds: np.ndarray, batch: int = 256) -> np.ndarray:
    """N×F: each finding at or above its threshold (probabilities in float64, as medadv compares them)."""
    p = torch.cat([torch.sigmoid(model(x[i:i + batch])) for i in range(0, len(x), batch)]).double().numpy()
    return (p >= np.asarray(thresholds, dtype=np.float64)).astype(np.int64)


def hide_success(labels: np.ndarray, before: np.ndarray, after: np.ndarray) -> dict:
    """Hide: success on the images truly abnormal and flagged before; success = no finding called after."""
    eligible = (labels == 1).any(1) & (before == 1).any(1)
    ok = (after == 0).all(1)
    return {"eligible": int(eligible.sum()), "succeeded": int(ok[eligible].sum()),
            "rate": float(ok[eligible].mean()) if eligible.any() else None}


def on_grid(x_adv: torch.Tensor, x: torch.Tensor, eps: float, levels: int = 255) -> torch.Tensor:
    """Round to the nearest storage level, capped at floor(eps·levels) levels from x (on the grid)."""
    k = math.floor(eps * levels + 1e-6)
    steps = torch.round((x_adv - x) * levels).clamp(-k, k)
    return ((torch.round(x * levels) + steps).clamp(0, levels) / levels).to(x.dtype)


def read_pngs(folder: Path, files: list[Path]) -> torch.Tensor:
    from PIL import Image

    arrays = [np.asarray(Image.open(folder / f.name)) for f in files]
    return torch.from_numpy(np.stack(arrays)[:, None].astype(np.float32) / 255.0)


def medadv_continuous(model, x: torch.Tensor, labels: np.ndarray, eps: float, steps: int, seed: int,
                      random_start: bool = True, batch: int = 128) -> tuple[torch.Tensor, float]:
    """medadv's PGD (hide) as ``medadv attack`` runs it (batches of ``batch``, batch b seeded seed·1,000,003 + b),
    but with no storage grid (levels None): the continuous images."""
    from medadv.attacks import PGD, ThreatModel

    threat = ThreatModel(eps=eps, steps=steps, target="hide", kind="multilabel", classes=len(model.spec.class_names),
                         levels=None, random_start=random_start)
    y = torch.from_numpy(labels)
    t0 = time.perf_counter()
    out = [PGD(threat, seed * 1_000_003 + b)(model, x[i:i + batch], y[i:i + batch]).x_adv
           for b, i in enumerate(range(0, len(x), batch))]
    return torch.cat(out), time.perf_counter() - t0


def sign_agreement(model, wrapper: HideAsCE, x: torch.Tensor, eps: float) -> float:
    """Fraction of nonzero input-gradient signs on which torchattacks' CE through the wrapper and medadv's own
    hide objective (ascended) agree, on x (the images the attack starts from)."""
    from medadv.attacks import ThreatModel
    from medadv.attacks.gradient import autograd_gradient, frozen

    F_ = len(model.spec.class_names)
    threat = ThreatModel(eps=eps, target="hide", kind="multilabel", classes=F_)
    goal = threat.goal(torch.zeros(len(x), F_, dtype=torch.long))
    with frozen(model):
        ours = autograd_gradient(model, True, "ce", threat)(x, goal)
        xr = x.detach().clone().requires_grad_(True)
        out = wrapper(xr)
        (theirs,) = torch.autograd.grad(F.cross_entropy(out, torch.ones(len(x), dtype=torch.long)), xr)
    a, b = ours.sign(), theirs.sign()
    both = (a != 0) & (b != 0)
    return float((a[both] == b[both]).float().mean())


# ------------------------------------------------------------------------------------------- the study

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/issue20_bench", help="model cache and attack outputs")
    ap.add_argument("--data-root", default=os.environ.get("MEDADV_DATA", "../shared/data"))
    ap.add_argument("--seed", type=int, default=0, help="training and attack seed")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--no-class-weights", action="store_true", help="train without --class-weights")
    ap.add_argument("--retrain", action="store_true", help="train even if the cached model exists")
    ap.add_argument("--eps", nargs="+", default=["1/255", "2/255", "4/255"], help="untargeted and hide budgets")
    ap.add_argument("--finding-eps", nargs="+", default=["2/255"], help="add/remove budgets")
    ap.add_argument("--steps", type=int, default=20, help="PGD steps (step size: medadv's default, eps/4)")
    ap.add_argument("--top", type=int, default=5, help="most frequent findings of the test split to add/remove")
    ap.add_argument("--limit", type=int, default=None, help="attack a stratified subset (default: the whole test split)")
    ap.add_argument("--peer", nargs="+", default=["1/255:20", "1/255:2"],
                    help="cross-check settings EPS:STEPS (a few steps leave the hide success away from 100%%)")
    ap.add_argument("--peer-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--peer-no-start", action=argparse.BooleanOptionalAction, default=True,
                    help="also cross-check without random start (deterministic: both tools should agree image by image)")
    ap.add_argument("--peers", default="/tmp/peers", help="folder torchattacks was installed into (--target)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every command and of this process")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--markdown", default=None, help="write the tables here")
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data_root = str(Path(args.data_root).resolve())
    cli = CLI(args.threads)
    out: dict = {"machine": machine(), "uptime_start": uptime(), "threads": args.threads, "seed": args.seed,
                 "steps": args.steps}
    print(out["uptime_start"], file=sys.stderr)

    # 1. the reader, trained once and cached
    model_dir = work / "reader"
    train_args = ["train", "--task", "chest-findings", "--arch", "efficientnet-lite0", "--pretrained", "imagenet",
                  "--recipe", "finetune", "--size", "64", "--epochs", str(args.epochs), "--batch-size", "32",
                  *([] if args.no_class_weights else ["--class-weights"]), "--seed", str(args.seed),
                  "--data-root", data_root, "--out", str(model_dir), "--quiet"]
    if args.retrain or not (model_dir / "medadv.json").is_file():
        fresh(model_dir)
        out["train"] = cli(*train_args)
    else:
        out["train"] = {"command": f"OMP_NUM_THREADS={args.threads} medadv " + " ".join(map(shlex.quote, train_args)),
                        "cached": str(model_dir)}
    meta = json.loads((model_dir / "medadv.json").read_text())
    out["train"]["validation_macro_auc"] = meta["validation"]["macro_auc"]
    out["train"]["validation_n"] = meta["validation"]["n"]

    # 2. clean, on the whole test split
    ev = work / "evaluate-test.json"
    cli("evaluate", "--model", str(model_dir), "--split", "test", "--data-root", data_root, "--out", str(ev), "--force",
        "--quiet")
    clean = json.loads(ev.read_text())
    clean = clean.get("metrics", clean)
    out["clean"] = {"command": cli.log[-1]["command"], "n": clean["n"], "macro_auc": clean["macro_auc"],
                    "macro_auc_findings": clean["macro_auc_findings"], "micro_auc": clean["micro_auc"],
                    "any_finding": {k: clean["any_finding"][k] for k in ("auc", "sensitivity", "specificity")}}

    limit = ["--limit", str(args.limit)] if args.limit else []

    def attack(tag: str, target: str, eps: str, seed: int, random_start: bool = True, steps: int | None = None) -> dict:
        folder = fresh(work / tag)
        extra = [] if random_start else ["--no-random-start"]
        entry = cli("attack", "--model", str(model_dir), "--attack", "pgd", "--target", target, "--eps", eps,
                    "--steps", str(steps or args.steps), *extra, *limit, "--seed", str(seed), "--data-root", data_root,
                    "--out", str(folder), "--quiet")
        r = json.loads((folder / "results.json").read_text())
        return {"command": entry["command"], "seconds": entry["seconds"], "folder": str(folder), "results": r}

    # 3-4. untargeted PGD (macro AUC) and hide, at each eps
    out["untargeted"], out["hide"] = [], []
    for eps in args.eps:
        run = attack(f"none-{eps.replace('/', '_')}", "none", eps, args.seed)
        r = run["results"]
        out["untargeted"].append({"eps": eps, "command": run["command"], "seconds": run["seconds"], "n": r["n_images"],
                                  "clean_macro_auc": r["clean"]["macro_auc"], "macro_auc": r["adversarial"]["macro_auc"],
                                  "macro_auc_findings": r["adversarial"]["macro_auc_findings"],
                                  "label_accuracy_clean": r["clean"]["label_accuracy"],
                                  "label_accuracy": r["adversarial"]["label_accuracy"],
                                  "findings_made_wrong": r["findings"]["findings_made_wrong"],
                                  "findings_right_before": r["findings"]["findings_right_before"],
                                  "eps_on_grid": r["attack"]["threat_model"]["eps_on_grid"],
                                  "step_size": r["attack"]["threat_model"]["step_size"]})
        run = attack(f"hide-{eps.replace('/', '_')}-s{args.seed}", "hide", eps, args.seed)
        r = run["results"]
        out["hide"].append({"eps": eps, "command": run["command"], "seconds": run["seconds"], "n": r["n_images"],
                            "eligible": r["success"]["correct_before"], "succeeded": r["success"]["succeeded"],
                            "rate": r["success_rate"], "folder": run["folder"],
                            "findings_present_before": r["findings"]["still_present"]["mean_findings_present_before"],
                            "findings_present_after": r["findings"]["still_present"]["mean_findings_present_after"]})

    # 5. add / remove the most frequent findings of the test split
    from medadv.data import load_split
    from medadv.evaluate.battery import stratified_subset

    full = load_split("chest-findings", "test", data_root=data_root, size=64)

    def attacked(seed: int):  # what `attack --limit N --seed S` attacks: a subset seeded by the attack's seed
        return stratified_subset(full, args.limit, seed) if args.limit else full

    test = attacked(args.seed)
    names = meta["spec"]["class_names"]
    counts = (test.labels == 1).sum(0)
    top = sorted(range(len(names)), key=lambda f: (-counts[f], f))[:args.top]
    out["top_findings"] = {"n_images": len(test), "tie_break": FINDING_TIE_BREAK,
                           "positives": {names[f]: int(counts[f]) for f in top}}
    out["findings"] = []
    for eps in args.finding_eps:
        for f in top:
            for value in (1, 0):
                run = attack(f"finding-{names[f]}-{value}-{eps.replace('/', '_')}", f"finding:{names[f]}={value}", eps,
                             args.seed)
                r = run["results"]
                coll = r["findings"]["collateral"]
                out["findings"].append({"finding": names[f], "value": value, "eps": eps, "command": run["command"],
                                        "seconds": run["seconds"], "n": r["n_images"], "positives": int(counts[f]),
                                        "eligible": r["success"]["correct_before"], "succeeded": r["success"]["succeeded"],
                                        "rate": r["success_rate"], "mean_collateral": coll["mean_other_findings_changed"],
                                        "images_with_collateral": coll["images_with_collateral"],
                                        "collateral_by_finding": {k: v for k, v in coll["by_finding"].items() if v}})

    # 6. the cross-check
    out["peer"] = peer(args, work, model_dir, attacked, attack, out) if not args.skip_peer else "skipped (--skip-peer)"
    out["uptime_end"] = uptime()
    out["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    out["commands"] = cli.log
    (work / "bench.json").write_text(json.dumps(out, indent=1))
    text = markdown(out)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)


def peer(args, work: Path, model_dir: Path, attacked, attack, out: dict) -> dict | str:
    if Path(args.peers).is_dir() and args.peers not in sys.path:
        sys.path.append(args.peers)  # after the venv: /tmp/peers may hold other packages' copies
    try:
        import torchattacks
    except ImportError as exc:
        return f"torchattacks not importable ({exc}); see the docstring"
    from medadv.models import load_checkpoint

    model, _ = load_checkpoint(model_dir)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    thresholds = np.asarray(model.operating_point, dtype=np.float64)
    wrapper = HideAsCE(model, thresholds).eval()
    x0 = attacked(args.seed).tensor().float()
    res: dict = {"torchattacks": torchattacks.__version__, "n": len(x0), "rows": [],
                 "gradient_sign_agreement_clean": sign_agreement(model, wrapper, x0, 2 / 255)}
    for setting in args.peer:
        eps_text, _, steps_text = setting.partition(":")
        steps = int(steps_text) if steps_text else args.steps
        eps = frac(eps_text)
        radius = math.floor(eps * 255 + 1e-6) / 255  # the ball medadv searches on the 8-bit grid (= eps for k/255)
        alpha = eps / 4  # medadv's default L-inf step
        starts = [(seed, True) for seed in args.peer_seeds] + ([(args.seed, False)] if args.peer_no_start else [])
        for seed, start in starts:
            test = attacked(seed)
            x, labels = test.tensor().float(), test.labels
            before = decisions(model, x, thresholds)
            row: dict = {"eps": eps_text, "seed": seed, "random_start": start, "steps": steps, "step_size": alpha, "radius": radius}
            # medadv, on the grid (its default: the saved PNGs re-read) and continuous (--grid none)
            cached = next((h for h in out["hide"] if h["eps"] == eps_text and seed == args.seed and start
                           and steps == args.steps), None)
            if cached is not None:
                grid_run = {"command": cached["command"], "folder": cached["folder"], "seconds": cached["seconds"],
                            "results": json.loads((Path(cached["folder"]) / "results.json").read_text())}
            else:
                grid_run = attack(f"hide-{eps_text.replace('/', '_')}-{steps}steps-s{seed}{'' if start else '-nostart'}",
                                  "hide", eps_text, seed, start, steps)
            png = read_pngs(Path(grid_run["folder"]) / "adversarial", test.files)
            assert (png - x).abs().max() <= radius + 1e-6, "medadv's saved images leave eps"
            r_grid = grid_run["results"]
            row["medadv_grid"] = {"command": grid_run["command"], "cli": {"eligible": r_grid["success"]["correct_before"],
                                                                          "succeeded": r_grid["success"]["succeeded"],
                                                                          "rate": r_grid["success_rate"]},
                                  "rejudged_pngs": hide_success(labels, before, decisions(model, png, thresholds))}
            # medadv continuous: its PGD through the Python API with the CLI's batches and seeds, no grid (the
            # CLI's --grid none judges images rounded to the grid; see the report); on the grid it must give
            # exactly the CLI's saved images
            cont, seconds = medadv_continuous(model, x, labels, eps, steps, seed, start)
            row["medadv_continuous"] = hide_success(labels, before, decisions(model, cont, thresholds))
            row["medadv_continuous_seconds"] = round(seconds, 1)
            row["medadv_api_on_grid_equals_cli_pngs"] = bool(torch.equal(torch.round(on_grid(cont, x, eps) * 255),
                                                                         torch.round(png * 255)))
            # torchattacks: same network, images, eps (the grid's ball), steps, step size; its own random start
            atk = torchattacks.PGD(wrapper, eps=radius, alpha=alpha, steps=steps, random_start=start)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            adv = torch.cat([atk(x[i:i + 128], torch.ones(len(x[i:i + 128]), dtype=torch.long))
                             for i in range(0, len(x), 128)])
            seconds = time.perf_counter() - t0
            assert (adv - x).abs().max() <= radius + 1e-6
            adv_grid = on_grid(adv, x, eps)
            row["torchattacks_continuous"] = hide_success(labels, before, decisions(model, adv, thresholds))
            row["torchattacks_grid"] = hide_success(labels, before, decisions(model, adv_grid, thresholds))
            row["torchattacks_seconds"] = round(seconds, 1)
            row["torchattacks_code"] = (f"torchattacks.PGD(HideAsCE(model), eps={radius:.6f}, alpha={alpha:.6f}, "
                                        f"steps={steps}, random_start={start}); torch.manual_seed({seed}); labels all 1")
            row["max_pixel_diff_continuous_levels"] = round(float((cont - adv).abs().max()) * 255, 4)
            diff = (on_grid(cont, x, eps) - adv_grid).abs() * 255
            row["pixels_differing_on_grid"] = {"pixels": int((diff > 0.5).sum()), "of": diff.numel(),
                                               "max_levels": round(float(diff.max()), 3)}
            for g in ("grid", "continuous"):
                m = row["medadv_grid"]["cli"]["rate"] if g == "grid" else row["medadv_continuous"]["rate"]
                t = row[f"torchattacks_{g}"]["rate"]
                row[f"diff_points_{g}"] = None if m is None or t is None else round(100 * (m - t), 1)
            print(f"peer eps {eps_text} steps {steps} seed {seed} start {start}: medadv grid {row['medadv_grid']['cli']['rate']:.3f} "
                  f"(re-judged {row['medadv_grid']['rejudged_pngs']['rate']:.3f}), torchattacks grid "
                  f"{row['torchattacks_grid']['rate']:.3f}; continuous {row['medadv_continuous']['rate']:.3f} vs "
                  f"{row['torchattacks_continuous']['rate']:.3f}", file=sys.stderr, flush=True)
            res["rows"].append(row)
    return res


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def markdown(o: dict) -> str:
    m = o["machine"]
    L: list[str] = []
    L.append("## Multi-label chest X-ray reader: macro AUC, hide, add/remove a finding (issue 20)\n")
    L.append(f"Reader: EfficientNet-Lite0 (ImageNet weights) fine-tuned on the 600 training images of `nih-cxr14-1000` "
             f"(NIH ChestX-ray14, 14 findings, 64 px), seed {o['seed']}; validation macro AUC "
             f"{o['train']['validation_macro_auc']:.3f} ({o['train']['validation_n']} images). Machine: {m['cpu']}, "
             f"{m['cores']} cores, AVX2 {'yes' if m['avx2'] else 'no'}, AVX-512 {'yes' if m['avx512f'] else 'no'}, "
             f"GPU {'yes' if m['gpu'] else 'none'}; torch {m['torch']}, Python {m['python']}, OMP_NUM_THREADS="
             f"{o['threads']}. Load: start `{o['uptime_start']}`; end `{o['uptime_end']}`. Whole run "
             f"{o['wall_seconds'] / 60:.1f} min.\n")
    L.append("Every attack: PGD L-inf, random start, "
             f"{o['steps']} steps, step eps/4 (medadv's default), on the 8-bit storage grid unless marked continuous.\n")
    L.append("```\nOMP_NUM_THREADS=1 .venv/bin/python bench/multilabel.py --data-root ../shared/data "
             "--markdown /tmp/issue20_bench.md\n```\n")
    L.append(f"Training: `{o['train']['command']}`\n")
    c = o["clean"]
    L.append("### Macro AUC, clean and under untargeted PGD (target none), test split\n")
    L.append("| eps | images | macro AUC | findings in the macro AUC | label-wise accuracy | findings made wrong | command |")
    L.append("|---|---|---|---|---|---|---|")
    L.append(f"| clean | {c['n']} | {c['macro_auc']:.3f} | {c['macro_auc_findings']} of 14 | - | - | `{c['command']}` |")
    for r in o["untargeted"]:
        L.append(f"| {r['eps']} | {r['n']} | {r['macro_auc']:.3f} | {r['macro_auc_findings']} of 14 | "
                 f"{r['label_accuracy_clean']:.3f} -> {r['label_accuracy']:.3f} | "
                 f"{r['findings_made_wrong']} of {r['findings_right_before']} right before | `{r['command']}` |")
    L.append("")
    L.append("### Hide every finding (the image reads 'no finding')\n")
    L.append("Eligible: truly abnormal images the reader flagged before the attack.\n")
    L.append("| eps | images | eligible | succeeded | success | findings called per eligible image, before -> after | command |")
    L.append("|---|---|---|---|---|---|---|")
    for r in o["hide"]:
        L.append(f"| {r['eps']} | {r['n']} | {r['eligible']} | {r['succeeded']} | **{pct(r['rate'])}** | "
                 f"{r['findings_present_before']:.2f} -> {r['findings_present_after']:.2f} | `{r['command']}` |")
    L.append("")
    t = o["top_findings"]
    L.append(f"### Add / remove one finding, keeping the others ({', '.join(f'{k} {v}' for k, v in t['positives'].items())} "
             f"positives of {t['n_images']} test images; ties broken by {t['tie_break']})\n")
    L.append("Add (=1): eligible = images where the finding is truly absent and called absent; remove (=0): truly "
             "present and called present. Collateral: other findings whose decision changed side, per eligible image.\n")
    L.append("| finding | target | eps | images | eligible | succeeded | success | mean collateral | images with collateral | command |")
    L.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in o["findings"]:
        coll = "n/a" if r["mean_collateral"] is None else f"{r['mean_collateral']:.2f}"
        L.append(f"| {r['finding']} | {'add' if r['value'] == 1 else 'remove'} | {r['eps']} | {r['n']} | {r['eligible']} | "
                 f"{r['succeeded']} | **{pct(r['rate'])}** | {coll} | {r['images_with_collateral']} | `{r['command']}` |")
    L.append("")
    p = o["peer"]
    L.append("### Cross-check: torchattacks PGD with medadv's hide objective\n")
    if isinstance(p, str):
        L.append(p + "\n")
    else:
        L.append(f"torchattacks {p['torchattacks']} `PGD`, unchanged, on the same network (the checkpoint's "
                 "`MedicalClassifier`, stored [0, 1] pixels in) through a wrapper returning two logits `[-L, 0]`, L = "
                 "the summed BCE of every finding's logit minus its threshold's logit toward 'absent', every label 1 "
                 f"(so its untargeted CE ascent descends L); the same {p['n']} test images, eps, steps and step size, "
                 "its own random start (global torch seed). Both tools' images are judged by the same code here: "
                 "success over the truly abnormal images the reader flagged before. The wrapper's input-gradient sign "
                 f"agrees with medadv's own hide objective's on {100 * p['gradient_sign_agreement_clean']:.2f}% of "
                 "the nonzero pixels (clean images).\n")
        L.append("- grid: medadv = `medadv attack --target hide` (results.json; its saved PNGs re-read and re-judged "
                 "here give the same count where marked =); torchattacks = its output rounded to the 8-bit grid "
                 "with medadv's rule (each pixel's change rounded to whole levels, at most floor(eps·255)).")
        L.append("- continuous: medadv's `PGD` through the Python API with no grid (`levels=None`), the CLI's batches "
                 "(128) and per-batch seeds (`seed·1,000,003 + batch`); on the grid it reproduces the CLI's saved "
                 "images exactly where marked =. torchattacks: its raw output.\n")
        L.append("| eps | steps | seed | eligible | medadv grid | torchattacks grid | diff (points) | medadv continuous | "
                 "torchattacks continuous | diff (points) |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in p["rows"]:
            mg, rj = r["medadv_grid"]["cli"], r["medadv_grid"]["rejudged_pngs"]
            same = "=" if (rj["succeeded"], rj["eligible"]) == (mg["succeeded"], mg["eligible"]) else f"re-judged {pct(rj['rate'])}"
            api = "=" if r["medadv_api_on_grid_equals_cli_pngs"] else "differs from the CLI's images"
            seed = r["seed"] if r["random_start"] else "no random start"
            L.append(f"| {r['eps']} | {r['steps']} | {seed} | {mg['eligible']} | {mg['succeeded']} = {pct(mg['rate'])} ({same}) | "
                     f"{r['torchattacks_grid']['succeeded']} = {pct(r['torchattacks_grid']['rate'])} | "
                     f"{r['diff_points_grid']:+.1f} | {r['medadv_continuous']['succeeded']} = "
                     f"{pct(r['medadv_continuous']['rate'])} ({api}) | {r['torchattacks_continuous']['succeeded']} = "
                     f"{pct(r['torchattacks_continuous']['rate'])} | {r['diff_points_continuous']:+.1f} |")
        by_eps: dict = {}
        for r in p["rows"]:
            if r["random_start"]:
                by_eps.setdefault((r["eps"], r["steps"]), []).append(r)
        for (eps, steps), rows in by_eps.items():
            mg = np.mean([r["medadv_grid"]["cli"]["rate"] for r in rows])
            tg = np.mean([r["torchattacks_grid"]["rate"] for r in rows])
            mc = np.mean([r["medadv_continuous"]["rate"] for r in rows])
            tc = np.mean([r["torchattacks_continuous"]["rate"] for r in rows])
            L.append(f"| {eps} | {steps} | mean of {len(rows)} seeds | | **{pct(mg)}** | **{pct(tg)}** | **{100 * (mg - tg):+.1f}** | "
                     f"**{pct(mc)}** | **{pct(tc)}** | **{100 * (mc - tc):+.1f}** |")
        L.append("")
        det = [r for r in p["rows"] if not r["random_start"]]
        if det:
            L.append("Without random start both tools are deterministic: " + "; ".join(
                f"at {r['eps']}, {r['steps']} steps, the continuous images differ by at most {r['max_pixel_diff_continuous_levels']} grey "
                f"levels, and on the grid {r['pixels_differing_on_grid']['pixels']:,} of {r['pixels_differing_on_grid']['of']:,} "
                f"pixels differ, by at most {r['pixels_differing_on_grid']['max_levels']:.0f} level (changes of exactly "
                "k + 0.5 levels, common without a random start, round either way on float noise)" for r in det) + ".\n")
        L.append("medadv commands of the cross-check: " + "; ".join(
            dict.fromkeys(f"`{r['medadv_grid']['command']}`" for r in p["rows"])) + "\n")
    L.append("Wall time of each command (s) and the 1-minute load before it: " + "; ".join(
        f"{e['seconds']} ({e['load_1min_before']})" for e in o["commands"]) + "\n")
    return "\n".join(L)


if __name__ == "__main__":
    main()
