"""Adversarial training (issue 11): medadv's recipes under AutoAttack, and medadv's PGD-AT against ART 1.20's.

Two stages, each runnable alone (``--stages``); both write under ``--root`` (default /tmp/advbench) and reuse
finished checkpoints and attack results there, so a rerun only redoes what is missing.

``recipes`` (issue 11 (a)): PneumoniaMNIST 28 px, ResNet-18, L-inf eps 4/255. Four models trained with the
CLI, each to its own folder: undefended, PGD-AT (``--adversarial pgd --adv-steps 7``), TRADES
(``--adversarial trades --trades-beta 6``) and fast AT (``--adversarial fast``), same epochs, batch size and
seed. Each is then measured with the CLI: ``medadv evaluate`` (clean accuracy/AUC on the whole test split at
the saved Youden threshold), and on the same seeded, class-stratified ``--n-eval`` test images
``medadv attack --attack autoattack`` (standard: APGD-CE, APGD-margin targeted, Square 5,000 queries) and
``medadv attack --attack pgd --steps 40`` (step eps/4, random start), untargeted, outputs on the 8-bit grid,
judged at the model's operating threshold. Every command is printed as it runs.

``art`` (issue 11 (b)): medadv's PGD-AT loop (``medadv.models.train.train``, what ``medadv train
--adversarial pgd`` runs) against ART's ``AdversarialTrainerMadryPGD`` on the same network (medadv's
ResNet-18 ``MedicalClassifier``, same seeded initialization, channels_last as medadv's loop sets it),
wrapped in ART's ``PyTorchClassifier`` (clip_values (0, 1)); the same training images (``--art-max-train``,
medadv's seeded subset), no augmentation on either side (ART has none), epochs, batch size 128 (ART's PGD
crafts in batches of 128 too, not its default 32), eps, 7 steps of 2.5·eps/7 with one random start, the
same optimizer (AdamW 2e-3, weight decay 1e-4) and per-step cosine schedule (ART: a LambdaLR stepped per
batch), the same torch threads. Runs are interleaved: each round trains both, order rotated. Reported per
run: wall and CPU seconds of the whole call, and of the training loop alone (medadv's time minus its
per-epoch validation, which ART does not do: clean val AUC plus PGD-7 on 256 val images for model
selection); ratios within a round, medians over rounds. Both round-0 models are saved as medadv
checkpoints (ART's with a Youden threshold on the validation split, as medadv sets its own) and attacked
exactly as in ``recipes``.

Commands (ART outside the venv's requirements, as the other peer benchmarks):

    .venv/bin/pip install --no-deps --target /tmp/peers adversarial-robustness-toolbox==1.20.1 six tqdm
    MEDADV_DATA=../shared/data PYTHONPATH=/tmp/peers .venv/bin/python bench/adv_training_vs_art.py \\
        --threads 1 --epochs 5 --n-eval 256 --art-epochs 2 --art-max-train 2048 --rounds 2 --json

``--stages recipes`` needs no ART. ``--parallel 2`` trains the recipe models two at a time (one thread
each), which suits two cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEDADV = str(ROOT / ".venv" / "bin" / "medadv") if (ROOT / ".venv" / "bin" / "medadv").exists() else "medadv"
RECIPES = {  # name -> medadv train flags beyond the shared ones
    "undefended": [],
    "pgd": ["--adversarial", "pgd", "--adv-eps", "4/255", "--adv-steps", "7"],
    "trades": ["--adversarial", "trades", "--trades-beta", "6", "--adv-eps", "4/255", "--adv-steps", "7"],
    "fast": ["--adversarial", "fast", "--adv-eps", "4/255"],
}


def child_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.setdefault("MEDADV_DATA", "/work/shared/data")
    return env


def run_cli(args: list[str], threads: int, log: list[dict]) -> dict[str, float]:
    """Run one medadv command, print it, record wall seconds and the child's CPU seconds."""
    line = "OMP_NUM_THREADS=%d medadv %s" % (threads, shlex.join(args))
    print(f"$ {line}", file=sys.stderr, flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([MEDADV, *args], env=child_env(threads), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {line}\n{proc.stderr[-3000:]}")
    # with --parallel the children overlap, so their CPU seconds are only approximate per command
    row = {"command": line, "wall_s": round(wall, 1),
           "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
           "load_1min": os.getloadavg()[0]}
    log.append(row)
    return row


def attack_args(model: Path, kind: str, eps: str, n_eval: int, seed: int) -> list[str]:
    """``kind``: autoattack or pgd40, at ``eps``; a suffix ``-eps<k>`` (e.g. pgd40-eps8) attacks at k/255 instead."""
    kind_, _, levels = kind.partition("-eps")
    eps = f"{levels}/255" if levels else eps
    common = ["--eps", eps, "--norm", "linf", "--target", "none", "--limit", str(n_eval), "--seed", str(seed),
              "--no-save-images", "--quiet", "--model", str(model), "--out", str(model / f"eval-{kind}")]
    if kind_ == "autoattack":
        return ["attack", "--attack", "autoattack", "--version", "standard", *common]
    return ["attack", "--attack", "pgd", "--steps", "40", *common]


def evaluate_checkpoint(model: Path, args, log: list[dict]) -> dict[str, Any]:
    """Clean metrics on the whole test split, AutoAttack and PGD-40 on the same n_eval images (CLI)."""
    clean_json = model / "eval-clean.json"
    if not clean_json.is_file():
        run_cli(["evaluate", "--model", str(model), "--split", "test", "--out", str(clean_json), "--quiet"],
                args.threads, log)
    clean = json.loads(clean_json.read_text())
    row: dict[str, Any] = {"model": str(model), "clean_test": {k: clean.get(k) for k in (
        "n", "accuracy", "auc", "sensitivity", "specificity")}}
    for kind in args.evals:
        res = model / f"eval-{kind}" / "results.json"
        if not res.is_file():
            run_cli(attack_args(model, kind, args.eps, args.n_eval, args.seed), args.threads, log)
        r = json.loads(res.read_text())
        adv, cln = r["adversarial"], r["clean"]
        row[kind] = {"n": r["n_images"], "clean_accuracy": cln["accuracy"], "robust_accuracy": adv["accuracy"],
                     "robust_sensitivity": adv.get("sensitivity"), "robust_specificity": adv.get("specificity"),
                     "robust_balanced_accuracy": None if adv.get("sensitivity") is None or adv.get("specificity") is None
                     else (adv["sensitivity"] + adv["specificity"]) / 2,
                     "n_disease": adv.get("n_disease"), "robust_auc": adv.get("auc"), "seconds": r.get("seconds"),
                     "flags": r["attack"].get("flags")}
    meta = json.loads((model / "medadv.json").read_text())
    row["threshold"] = meta["spec"].get("threshold")
    row["best_epoch"] = meta.get("training", {}).get("best_epoch")
    row["history"] = meta.get("training", {}).get("history")
    return row


# ------------------------------------------------------------------------------------------ recipes
def stage_recipes(args, log: list[dict]) -> dict[str, Any]:
    root = Path(args.root)

    def train(name: str) -> None:
        out = root / name
        if (out / "medadv.json").is_file():
            print(f"reusing {out}", file=sys.stderr)
            return
        run_cli(["train", "--task", "chest-xray", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                 "--seed", str(args.seed), *RECIPES[name], "--out", str(out), "--quiet"], args.threads, log)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(train, args.models))
    rows = {name: evaluate_checkpoint(root / name, args, log) for name in args.models}
    out: dict[str, Any] = {"models": rows}
    base = rows.get("undefended")
    if base:
        for name, row in rows.items():
            for kind in args.evals:
                b = base[kind]["robust_accuracy"]
                row[kind]["over_undefended"] = None if not b else round(row[kind]["robust_accuracy"] / b, 3)
    return out


# ---------------------------------------------------------------------------------------------- art
class Timed:
    """Accumulate wall and CPU seconds spent in a module-level function (monkeypatched)."""

    def __init__(self, module, name: str) -> None:
        self.module, self.name, self.fn = module, name, getattr(module, name)
        self.wall = self.cpu = 0.0

    def __enter__(self):
        def wrapped(*a, **k):
            t, c = time.perf_counter(), time.process_time()
            try:
                return self.fn(*a, **k)
            finally:
                self.wall += time.perf_counter() - t
                self.cpu += time.process_time() - c

        setattr(self.module, self.name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.module, self.name, self.fn)


def art_config(args):
    from medadv.models.train import TrainConfig

    return TrainConfig(task="chest-xray", epochs=args.art_epochs, batch_size=args.batch_size, seed=args.seed,
                       augment=False, max_train=args.art_max_train, adversarial="pgd", adv_eps=4 / 255, adv_steps=7)


def run_medadv(args, out: Path) -> dict[str, Any]:
    import shutil

    import medadv.models.train as T
    from medadv.defenses.training import robust_training

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.parent / f".{out.name}.partial", ignore_errors=True)
    cfg = art_config(args)
    init: dict[str, torch.Tensor] = {}
    build = T.build_classifier

    def capture(*a, **k):
        m = build(*a, **k)
        init.update({k2: v.detach().clone() for k2, v in m.state_dict().items()})
        return m

    T.build_classifier = capture
    try:
        with Timed(T, "_train_epoch") as loop, Timed(T, "_robust_validation") as rval:
            t, c = time.perf_counter(), time.process_time()
            _, meta = T.train(cfg, out, data_root=args.data_root, robust=robust_training(cfg))
            wall, cpu = time.perf_counter() - t, time.process_time() - c
    finally:
        T.build_classifier = build
    return {"wall_s": wall, "cpu_s": cpu, "loop_wall_s": loop.wall, "loop_cpu_s": loop.cpu,
            "robust_val_wall_s": rval.wall, "best_epoch": meta["training"]["best_epoch"],
            "history": meta["training"]["history"], "init": init}


def art_data(args):
    """medadv's training subset and validation split, read exactly as its train() reads them."""
    from medadv.data import get_task, load_split, resolve_data_root, resolve_source

    cfg = art_config(args)
    task = get_task(cfg.task)
    root = resolve_data_root(args.data_root)
    source = resolve_source(task, None, root)
    read = dict(data_root=root, source=source, size=cfg.size, split_seed=cfg.split_seed, file_size=cfg.data_size)
    train_set, val_set = load_split(task, "train", **read), load_split(task, "val", **read)
    if cfg.max_train and cfg.max_train < len(train_set):
        pick = np.sort(np.random.default_rng(cfg.seed).permutation(len(train_set))[: cfg.max_train])
        train_set = train_set.subset(pick)
    return task, train_set, val_set


def run_art(args, out: Path, medadv_meta: dict[str, Any] | None, save: bool) -> dict[str, Any]:
    from art.defences.trainer import AdversarialTrainerMadryPGD
    from art.estimators.classification import PyTorchClassifier

    from medadv.metrics import clinical_metrics, youden_threshold
    from medadv.models.checkpoint import save_checkpoint
    from medadv.models.recipes import pick_recipe
    from medadv.models.train import build_classifier
    from medadv.runinfo import seed_everything

    cfg = art_config(args)
    task, train_set, val_set = art_data(args)
    seed_everything(cfg.seed)  # as medadv's train() before it builds the network: the same initial weights
    model = build_classifier(cfg, train_set.channels, task.class_names)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.network.to(memory_format=torch.channels_last)  # as medadv's loop trains it
    recipe = pick_recipe(cfg.recipe, False)
    optimizer = recipe.make_optimizer(model.parameters())
    x = train_set.tensor().numpy()
    y = train_set.labels.astype(np.int64)
    total = (len(x) // cfg.batch_size + (len(x) % cfg.batch_size > 0)) * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: recipe.lr_at(s, total) / recipe.lr)
    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), optimizer=optimizer,
                                   input_shape=tuple(x.shape[1:]), nb_classes=2, clip_values=(0.0, 1.0),
                                   device_type="cpu")
    eps = cfg.adv_eps
    trainer = AdversarialTrainerMadryPGD(classifier, nb_epochs=cfg.epochs, batch_size=cfg.batch_size, eps=eps,
                                         eps_step=2.5 * eps / cfg.adv_steps, max_iter=cfg.adv_steps, num_random_init=1)
    trainer.attack.set_params(batch_size=cfg.batch_size)  # ART's default crafts in batches of 32
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    t, c = time.perf_counter(), time.process_time()
    trainer.fit(x, y, scheduler=scheduler)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    row: dict[str, Any] = {"wall_s": wall, "cpu_s": cpu, "loop_wall_s": wall, "loop_cpu_s": cpu, "init": init,
                           "final_lr": optimizer.param_groups[0]["lr"]}
    if save and medadv_meta is not None:
        model.eval()
        model.network.to(memory_format=torch.contiguous_format)
        p_val = model.probabilities(val_set.tensor()).numpy()
        model.spec.threshold = youden_threshold(val_set.labels, p_val)
        meta = copy.deepcopy({k: v for k, v in medadv_meta.items() if k not in ("format", "spec")})
        meta["training"] = {"trainer": "ART 1.20.1 AdversarialTrainerMadryPGD", "epochs": cfg.epochs,
                            "batch_size": cfg.batch_size, "eps": eps, "eps_step": 2.5 * eps / cfg.adv_steps,
                            "max_iter": cfg.adv_steps, "max_train": cfg.max_train, "augment": False,
                            "threshold_rule": "youden", "selection": "last epoch"}
        meta["validation"] = clinical_metrics(val_set.labels, p_val, model.spec.threshold)
        save_checkpoint(model, out, meta)
    return row


def stage_art(args, log: list[dict]) -> dict[str, Any]:
    import art

    root = Path(args.root) / "art-compare"
    saved = root / "runs.json"
    if saved.is_file() and not args.retrain:  # trained and timed before: only (re)evaluate
        print(f"reusing the trainings and timings in {saved} (--retrain to redo them)", file=sys.stderr)
        result = json.loads(saved.read_text())
        return finish_art(result, root, args, log)
    runs: dict[str, list[dict]] = {"medadv": [], "art": []}
    medadv_meta = None
    for r in range(args.rounds):
        order = ["medadv", "art"] if r % 2 == 0 else ["art", "medadv"]
        for who in order:
            load = os.getloadavg()[0]
            if who == "medadv":
                row = run_medadv(args, root / ("medadv" if r == 0 else f"medadv-r{r}"))
                medadv_meta = json.loads((root / "medadv" / "medadv.json").read_text()) if r == 0 else medadv_meta
            else:
                if medadv_meta is None:  # ART ran first in this round: medadv's round-0 checkpoint lends the metadata
                    medadv_meta = json.loads((root / "medadv" / "medadv.json").read_text())
                row = run_art(args, root / "art", medadv_meta, save=(r == 0))
            row["round"], row["load_1min_before"] = r, load
            runs[who].append(row)
            print(f"round {r} {who}: wall {row['wall_s']:.1f} s, cpu {row['cpu_s']:.1f} s, loop wall "
                  f"{row['loop_wall_s']:.1f} s (load {load:.1f})", file=sys.stderr, flush=True)
    same_init = all(torch.equal(runs["medadv"][0]["init"][k], runs["art"][0]["init"][k]) for k in runs["art"][0]["init"])
    for rows in runs.values():
        for row in rows:
            row.pop("init")
    ratios = {}
    for key in ("wall_s", "cpu_s", "loop_wall_s", "loop_cpu_s"):
        per_round = [m[key] / a[key] for m, a in zip(runs["medadv"], runs["art"])]
        ratios[key] = {"median": round(statistics.median(per_round), 3), "per_round": [round(v, 3) for v in per_round]}
    for rows in runs.values():
        for row in rows:
            for k, v in list(row.items()):
                if isinstance(v, float):
                    row[k] = round(v, 2)
    cfg = art_config(args)
    result = {"art_version": art.__version__, "same_initial_weights": same_init,
              "config": {"epochs": cfg.epochs, "max_train": cfg.max_train, "batch_size": cfg.batch_size,
                         "eps": cfg.adv_eps, "steps": cfg.adv_steps, "step_size": 2.5 * cfg.adv_eps / cfg.adv_steps,
                         "augment": False, "optimizer": "AdamW 2e-3, wd 1e-4, cosine per step", "threads": args.threads},
              "runs": runs, "medadv_over_art": ratios}
    saved.write_text(json.dumps(result, indent=1))
    return finish_art(result, root, args, log)


def finish_art(result: dict[str, Any], root: Path, args, log: list[dict]) -> dict[str, Any]:
    """Attack both round-0 models the same way (CLI) and add the robust-accuracy gap."""
    evals = {"medadv": evaluate_checkpoint(root / "medadv", args, log),
             "art": evaluate_checkpoint(root / "art", args, log)}
    gap = {kind: round(100 * (evals["medadv"][kind]["robust_accuracy"] - evals["art"][kind]["robust_accuracy"]), 2)
           for kind in args.evals}
    return {**result, "evaluation": evals, "robust_accuracy_gap_points_medadv_minus_art": gap}


# --------------------------------------------------------------------------------------------- main
def print_tables(out: dict[str, Any]) -> None:
    if "recipes" in out:
        kinds = out["settings"]["evals"]
        print("\nrecipes (clean: whole test split; attacks: the same stratified n test images, untargeted, at each "
              "model's threshold; robust accuracy, x the undefended model's, robust sensitivity/specificity)")
        print(f"{'model':11s} {'clean acc':>9s} {'AUC':>6s} " + " ".join(f"{k:>28s}" for k in kinds))
        for name, r in out["recipes"]["models"].items():
            cells = []
            for k in kinds:
                e = r.get(k, {})
                cells.append(f"{e.get('robust_accuracy', float('nan')):.3f} (x{e.get('over_undefended') or float('nan'):.2f}) "
                             f"{e.get('robust_sensitivity') or 0:.2f}/{e.get('robust_specificity') or 0:.2f}")
            print(f"{name:11s} {r['clean_test']['accuracy']:9.3f} {r['clean_test']['auc']:6.3f} "
                  + " ".join(f"{c:>28s}" for c in cells))
    if "art" in out:
        a = out["art"]
        print(f"\nPGD-AT, medadv vs ART {a['art_version']} ({a['config']}); same initial weights: {a['same_initial_weights']}")
        for who in ("medadv", "art"):
            for row in a["runs"][who]:
                print(f"  round {row['round']} {who:6s} wall {row['wall_s']:8.1f} s  cpu {row['cpu_s']:8.1f} s  "
                      f"loop wall {row['loop_wall_s']:8.1f} s  loop cpu {row['loop_cpu_s']:8.1f} s")
        for k, v in a["medadv_over_art"].items():
            print(f"  medadv/ART {k}: median {v['median']} per round {v['per_round']}")
        for who, r in a["evaluation"].items():
            print(f"  {who:6s} clean acc {r['clean_test']['accuracy']:.3f} AUC {r['clean_test']['auc']:.3f}  " +
                  "  ".join(f"{k} robust acc {r[k]['robust_accuracy']:.3f}" for k in out["settings"]["evals"]))
        print(f"  robust accuracy gap (points, medadv - ART): {a['robust_accuracy_gap_points_medadv_minus_art']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default="recipes,art", help="comma list of: recipes, art")
    ap.add_argument("--root", default="/tmp/advbench", help="folder for checkpoints and attack results")
    ap.add_argument("--data-root", default=os.environ.get("MEDADV_DATA", "/work/shared/data"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and in every child command")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--eps", default="4/255", help="evaluation eps (training eps is 4/255)")
    ap.add_argument("--n-eval", type=int, default=256, help="test images attacked (seeded, class-stratified)")
    ap.add_argument("--evals", default="autoattack,pgd40,pgd40-eps8",
                    help="comma list of: autoattack, pgd40 (at --eps); a suffix -eps<k> attacks at k/255 instead")
    ap.add_argument("--epochs", type=int, default=5, help="recipes: training epochs")
    ap.add_argument("--models", default=",".join(RECIPES), help="recipes: comma list of " + ", ".join(RECIPES))
    ap.add_argument("--parallel", type=int, default=1, help="recipes: trainings at a time")
    ap.add_argument("--art-epochs", type=int, default=2)
    ap.add_argument("--art-max-train", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2, help="art: interleaved rounds (each trains both)")
    ap.add_argument("--retrain", action="store_true", help="art: train and time again even if runs.json exists")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()
    args.models = [m for m in args.models.split(",") if m]
    args.evals = [e for e in args.evals.split(",") if e]
    stages = [s for s in args.stages.split(",") if s]
    C.set_threads(args.threads)
    os.environ.setdefault("MEDADV_DATA", args.data_root)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    log: list[dict] = []
    out: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items()}, "cpu": cpu, "cores": os.cpu_count(),
                           "load_1min_start": os.getloadavg()[0]}
    if "recipes" in stages:
        out["recipes"] = stage_recipes(args, log)
    if "art" in stages:
        import importlib.util

        if importlib.util.find_spec("art") is None:
            sys.exit("ART is not importable: pip install --no-deps --target /tmp/peers adversarial-robustness-toolbox==1.20.1 "
                     "six tqdm, then PYTHONPATH=/tmp/peers")
        out["art"] = stage_art(args, log)
    out["commands"] = log
    out["load_1min_end"] = os.getloadavg()[0]
    from medadv.runinfo import environment

    out["environment"] = environment()
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print_tables(out)


if __name__ == "__main__":
    main()
