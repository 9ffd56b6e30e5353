"""Lung segmentation under attack (issue 21): a MONAI UNet on the Shenzhen lung masks, clean and under PGD,
targeted one-lung erasure, before and after PGD adversarial training, and a torchattacks cross-check.

Every medadv number goes through its command line (``medadv train``, ``evaluate``, ``attack``), so it is what a
user gets; each command is recorded beside its number with its wall time and the machine's load.

1. ``medadv train --task lung-seg --arch unet --size S``: the plain UNet, and (``--adversarial pgd``) the
   PGD-trained one, both from scratch with the same seed, epochs and batch (cached under ``--work``).
2. ``medadv evaluate --split test``: clean Dice, IoU, HD95 on the whole test split (113 images).
3. ``medadv attack --attack pgd --target none --eps E --limit N``: Dice under untargeted PGD on N test images
   (the saved PNGs are re-read and judged: on the 8-bit storage grid).
4. ``medadv attack --target erase-left --eps 8/255``: success = IoU >= 0.9 with the true mask minus the
   patient's left lung (the image's right half), over the images segmented before (clean Dice >= 0.5).
5. Cross-check (plain model): torchattacks' ``PGD`` (unchanged: its random start, sign steps, clamping) on
   the same network, images, eps, steps and step size, its CE loss turned into medadv's Dice + BCE through a
   wrapper returning two logits ``[0, L]`` per image with every label 0: ascending CE(label 0) =
   log(1 + exp(L)) ascends L, with the sign of grad L. Both tools' images are judged by the same code (mean
   Dice against the true mask), continuous (no storage grid) on both sides, over several seeds.

    .venv/bin/pip install --no-deps --target /tmp/peers torchattacks==3.5.1
    OMP_NUM_THREADS=2 .venv/bin/python bench/segmentation.py --data-root ../shared/data --markdown /tmp/seg_bench.md
"""

from __future__ import annotations

import argparse
import json
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


class DiceAsCE(nn.Module):
    """Two logits [0, L] per image, L = per-image Dice + BCE against ``masks`` (N×H×W), written here
    independently of medadv (MONAI's DiceLoss, torch's BCE). With every label 0, torchattacks' untargeted CE
    ascent is the ascent of log(1 + exp(L)): it ascends L."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.masks: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from monai.losses import DiceLoss

        assert self.masks is not None
        logits = self.model(x)
        want = self.masks[: len(x), None].to(logits.dtype)
        dice = DiceLoss(sigmoid=True, reduction="none")(logits, want).flatten(1).mean(1)
        bce = F.binary_cross_entropy_with_logits(logits, want, reduction="none").flatten(1).mean(1)
        L = dice + bce
        return torch.stack([torch.zeros_like(L), L], 1)


def mean_dice(model, x: torch.Tensor, masks: np.ndarray) -> float:
    from medadv.kinds.segmentation import overlap

    with torch.no_grad():
        pred = model.predict(model.probabilities(x))
    return float(np.nanmean(overlap(pred, masks, hd95=False)["dice"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/issue21_seg_bench")
    ap.add_argument("--data-root", default=os.environ.get("MEDADV_DATA", "../shared/data"))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--adv-eps", default="4/255")
    ap.add_argument("--adv-steps", type=int, default=3)
    ap.add_argument("--eps", nargs="+", default=["2/255", "4/255", "8/255"])
    ap.add_argument("--erase-eps", default="8/255")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--limit", type=int, default=20, help="test images attacked")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peer-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--peers", default="/tmp/peers")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-adversarial", action="store_true", help="the plain model only")
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--render", default=None, help="only re-render the tables of a bench.json this script wrote")
    args = ap.parse_args()
    if args.render:
        text = markdown(json.loads(Path(args.render).read_text()))
        if args.markdown:
            Path(args.markdown).write_text(text)
        print(text)
        return

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    root = str(Path(args.data_root).resolve())
    cli = CLI(args.threads)
    out: dict = {"machine": machine(), "uptime_start": uptime(), "args": vars(args), "models": {}}

    def train(tag: str, *extra: str) -> Path:
        folder = work / tag
        cmd = ["train", "--task", "lung-seg", "--arch", "unet", "--size", str(args.size), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed), *extra, "--data-root", root,
               "--out", str(folder), "--quiet"]
        if (folder / "medadv.json").is_file():
            entry = {"command": f"OMP_NUM_THREADS={args.threads} medadv " + " ".join(map(shlex.quote, cmd)), "cached": True}
        else:
            shutil.rmtree(folder, ignore_errors=True)
            entry = cli(*cmd)
        meta = json.loads((folder / "medadv.json").read_text())
        out["models"][tag] = {"train": entry, "validation_dice": meta["validation"]["dice"],
                              "validation_n": meta["validation"]["n"], "selection": meta["training"]["selection"],
                              "best_epoch": meta["training"]["best_epoch"],
                              "epoch_seconds": [h["seconds"] for h in meta["training"]["history"]]}
        return folder

    def attack(model: Path, tag: str, target: str, eps: str) -> dict:
        folder = work / f"{model.name}-{tag}"
        shutil.rmtree(folder, ignore_errors=True)
        entry = cli("attack", "--model", str(model), "--attack", "pgd", "--target", target, "--eps", eps, "--steps",
                    str(args.steps), "--limit", str(args.limit), "--seed", str(args.seed), "--data-root", root,
                    "--out", str(folder), "--quiet")
        r = json.loads((folder / "results.json").read_text())
        seg = r["segmentation"]
        return {"target": target, "eps": eps, "command": entry["command"], "seconds": entry["seconds"],
                "n": r["n_images"], "dice_clean": seg["dice_clean"], "dice_adversarial": seg["dice_adversarial"],
                "iou_adversarial": seg["iou_adversarial"], "area_change_percent": seg["area_change_percent"],
                "target_iou_clean": seg.get("target_iou_clean"), "target_iou_adversarial": seg.get("target_iou_adversarial"),
                "eligible": r["success"]["correct_before"], "succeeded": r["success"]["succeeded"],
                "success_rate": r["success_rate"], "definition": r["success"]["definition"]}

    models = [("unet", train("unet"))]
    if not args.skip_adversarial:
        models.append(("unet-pgd-at", train("unet-pgd-at", "--adversarial", "pgd", "--adv-eps", args.adv_eps,
                                            "--adv-steps", str(args.adv_steps))))
    for tag, folder in models:
        ev = work / f"{tag}-evaluate.json"
        entry = cli("evaluate", "--model", str(folder), "--split", "test", "--data-root", root, "--out", str(ev),
                    "--force", "--quiet")
        m = json.loads(ev.read_text())
        m = m.get("metrics", m)
        rec = out["models"][tag]
        rec["clean"] = {"command": entry["command"], "n": m["n"], "dice": m["dice"], "iou": m["iou"], "hd95": m["hd95"]}
        rec["attacks"] = [attack(folder, f"pgd-{e.replace('/', '_')}", "none", e) for e in args.eps]
        rec["attacks"].append(attack(folder, f"erase-left-{args.erase_eps.replace('/', '_')}", "erase-left", args.erase_eps))

    out["peer"] = peer(args, models[0][1], root)
    out["uptime_end"] = uptime()
    out["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    out["commands"] = cli.log
    (work / "bench.json").write_text(json.dumps(out, indent=1))
    text = markdown(out)
    if args.markdown:
        Path(args.markdown).write_text(text)
    print(text)


def peer(args, model_dir: Path, root: str) -> dict | str:
    if Path(args.peers).is_dir() and args.peers not in sys.path:
        sys.path.append(args.peers)
    try:
        import torchattacks
    except ImportError as exc:
        return f"torchattacks not importable ({exc}); see the docstring"
    from medadv.attacks import PGD, ThreatModel
    from medadv.data import load_split
    from medadv.models import load_checkpoint

    model, _ = load_checkpoint(model_dir)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    test = load_split("lung-seg", "test", data_root=root, size=model.spec.input_size)
    idx = np.arange(min(args.limit, len(test)))
    x, masks = test.tensor(idx).float(), test.labels[idx]
    wrapper = DiceAsCE(model).eval()
    wrapper.masks = torch.from_numpy(masks)
    res: dict = {"torchattacks": torchattacks.__version__, "n": len(x), "clean_dice": mean_dice(model, x, masks), "rows": []}
    for e in args.eps:
        num, _, den = e.partition("/")
        eps = float(num) / float(den)
        alpha = eps / 4  # medadv's default L-inf step
        for seed in args.peer_seeds:
            threat = ThreatModel(eps=eps, steps=args.steps, target="none", kind="segmentation", classes=2, levels=None)
            t0 = time.perf_counter()
            ours = PGD(threat, seed=seed)(model, x, torch.from_numpy(masks)).x_adv
            t_ours = time.perf_counter() - t0
            atk = torchattacks.PGD(wrapper, eps=eps, alpha=alpha, steps=args.steps, random_start=True)
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            theirs = atk(x, torch.zeros(len(x), dtype=torch.long))
            t_theirs = time.perf_counter() - t0
            assert (theirs - x).abs().max() <= eps + 1e-6 and (ours - x).abs().max() <= eps + 1e-6
            d_ours, d_theirs = mean_dice(model, ours, masks), mean_dice(model, theirs, masks)
            res["rows"].append({"eps": e, "seed": seed, "medadv_dice": d_ours, "torchattacks_dice": d_theirs,
                                "diff_points": round(100 * (d_ours - d_theirs), 2), "medadv_seconds": round(t_ours, 1),
                                "torchattacks_seconds": round(t_theirs, 1)})
            print(f"peer eps {e} seed {seed}: Dice medadv {d_ours:.4f}, torchattacks {d_theirs:.4f}", file=sys.stderr, flush=True)
    return res


def f3(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def markdown(o: dict) -> str:
    m, a = o["machine"], o["args"]
    L = ["## Lung segmentation under attack (issue 21): MONAI UNet on shenzhen-cxr-256\n"]
    L.append(f"Machine: {m['cpu']}, {m['cores']} cores, AVX2 {'yes' if m['avx2'] else 'no'}, AVX-512 "
             f"{'yes' if m['avx512f'] else 'no'}, GPU {'yes' if m['gpu'] else 'none'}; torch {m['torch']}; "
             f"OMP_NUM_THREADS={a['threads']}. Load: start `{o['uptime_start']}`; end `{o['uptime_end']}`. "
             f"Whole run {o['wall_seconds'] / 60:.1f} min.\n")
    L.append(f"```\nOMP_NUM_THREADS={a['threads']} .venv/bin/python bench/segmentation.py --data-root ../shared/data "
             f"--size {a['size']} --epochs {a['epochs']} --markdown /tmp/seg_bench.md\n```\n")
    L.append(f"UNet at {a['size']} px, {a['epochs']} epochs, batch {a['batch_size']}, seed {a['seed']}; PGD L-inf "
             f"{a['steps']} steps, random start, step eps/4, on the {a['limit']} test images of `--limit "
             f"{a['limit']}` (a seeded subset), crafted on the stored 256 px files (the network resizes them to "
             f"{a['size']} px inside the gradient path) on the 8-bit storage grid, saved PNGs re-read and judged. "
             "Clean figures beside attacked ones are on the same images.\n")
    L.append("| model | validation Dice (images) | test Dice clean (images) | IoU | HD95 px | attack | eps | images | Dice clean -> attacked | area change | success | command |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for tag, rec in o["models"].items():
        c = rec["clean"]
        for i, r in enumerate(rec["attacks"]):
            head = (f"| {tag} | {f3(rec['validation_dice'])} ({rec['validation_n']}) | {f3(c['dice'])} ({c['n']}) | "
                    f"{f3(c['iou'])} | {f3(c['hd95'])} " if i == 0 else "| | | | | ")
            what = "PGD untargeted" if r["target"] == "none" else f"PGD {r['target']}"
            succ = (f"{r['succeeded']} of {r['eligible']} ({100 * r['success_rate']:.0f}%)"
                    if r["success_rate"] is not None else "n/a")
            extra = (f"; IoU with target {f3(r['target_iou_clean'])} -> {f3(r['target_iou_adversarial'])}"
                     if r["target"] != "none" else "")
            area = "n/a" if r["area_change_percent"] is None else f"{r['area_change_percent']:+.1f}%"
            L.append(f"{head}| {what} | {r['eps']} | {r['n']} | {f3(r['dice_clean'])} -> **{f3(r['dice_adversarial'])}**{extra} | "
                     f"{area} | {succ} | `{r['command']}` |")
    L.append("")
    L.append("Training commands: " + "; ".join(f"`{rec['train']['command']}` (selection: {rec['selection']}, best epoch "
                                               f"{rec['best_epoch']}, epoch seconds {rec['epoch_seconds']})"
                                               for rec in o["models"].values()) + "\n")
    p = o["peer"]
    L.append("### Cross-check: torchattacks PGD with a Dice + BCE wrapper, same model and images\n")
    if isinstance(p, str):
        L.append(p + "\n")
    else:
        L.append(f"torchattacks {p['torchattacks']} `PGD` through a wrapper returning `[0, L]` (L = per-image Dice + BCE "
                 f"against the true mask, every label 0) and medadv's `PGD` (Python API, `--target none`, no storage "
                 f"grid), same plain UNet, the first {p['n']} test images loaded at the network's {a['size']} px "
                 f"(clean Dice {p['clean_dice']:.3f}), same eps, {a['steps']} steps, step eps/4, each tool's own "
                 "random start under the seed. These are other images, at another resolution, than the table "
                 "above's: a perturbation crafted on the 256 px files is averaged by the downsampling to the "
                 "network's input, so the same eps does less there.\n")
        L.append("| eps | seed | Dice medadv | Dice torchattacks | diff (points) | seconds medadv / torchattacks |")
        L.append("|---|---|---|---|---|---|")
        for r in p["rows"]:
            L.append(f"| {r['eps']} | {r['seed']} | {r['medadv_dice']:.4f} | {r['torchattacks_dice']:.4f} | "
                     f"{r['diff_points']:+.2f} | {r['medadv_seconds']} / {r['torchattacks_seconds']} |")
        by: dict = {}
        for r in p["rows"]:
            by.setdefault(r["eps"], []).append(r)
        for e, rows in by.items():
            mo, th = np.mean([r["medadv_dice"] for r in rows]), np.mean([r["torchattacks_dice"] for r in rows])
            L.append(f"| {e} | mean of {len(rows)} | **{mo:.4f}** | **{th:.4f}** | **{100 * (mo - th):+.2f}** | |")
        L.append("")
    L.append("Wall time of each command (s) and the 1-minute load before it: " + "; ".join(
        f"{e['seconds']} ({e['load_1min_before']})" for e in o["commands"]) + "\n")
    return "\n".join(L)


if __name__ == "__main__":
    main()
