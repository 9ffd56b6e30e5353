"""Studies: the paper reproduced on its three tasks (``reproduce``), the smallest honest end-to-end run
(``demo``), and the same battery on a user's own model and data (``audit``).

A study trains (or loads) a victim and an independently trained surrogate per task, measures Table 1,
runs the battery (:mod:`medadv.evaluate.battery`), and writes ``results.json`` and a self-contained
``report.html``. Every stage is cached by configuration hash under the study's cache folder: a killed
run resumes (training resumes mid-way by epoch), a second run reuses the models and attack results.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medadv.cache import StageCache, model_fingerprint
from medadv.dist import current as current_shard
from medadv.errors import MedadvError
from medadv.data import get_task, resolve_data_root, resolve_source
from medadv.evaluate.adaptive import adaptive_victim, defense_record
from medadv.evaluate.battery import BatteryConfig, BatteryOutput, needs_fit, run_battery
from medadv.evaluate.clean import evaluate_model, model_split, predict
from medadv.models import load_checkpoint
from medadv.models.train import TrainConfig, stage_config, train
from medadv.progress import SILENT, Monitor
from medadv.report.paper import PAPER_SETUP, PAPER_TABLE2
from medadv.runinfo import config_hash, environment, seed_everything

STUDY_SCHEMA = "medadv-study/1"


@dataclass
class TaskPlan:
    """How one task is run: the victim's training configuration and the battery's budget. The shipped
    plans are JSON files (medadv/plans/reproduce/), read by :func:`reproduce_plan`."""

    train: TrainConfig
    battery: BatteryConfig = field(default_factory=BatteryConfig)
    surrogate_arch: str | None = None  # default: the victim's architecture (as in the paper)
    # TrainConfig fields changed for the surrogate only: an attacker with less data or compute than the
    # victim's trainer (e.g. {"epochs": 1, "max_train": 1000}); the seed still differs from the victim's
    surrogate_overrides: dict[str, Any] = field(default_factory=dict)
    caveats: tuple[str, ...] = ()
    # preprocessing defenses in front of the victim ({"name": ..., **settings}); attacked with BPDA
    defense: tuple[dict[str, Any], ...] = ()


LOW_RES = ("The data are the 28 px MedMNIST files (the paper used 224-299 px photographs); the network sees them "
           "upsampled to its input size, and the attack perturbs the 28 px stored pixels.")


def reproduce_plan(ref: str | Path) -> TaskPlan:
    """A reproduce plan: a shipped one by name (``chest-xray``, ``demo``; ``medadv plan list``) or a JSON
    plan file a user wrote (``medadv plan show`` prints one to start from), checked strictly
    (:mod:`medadv.plans`); the registry names it holds are checked by :func:`check_task_plan`."""
    from medadv import plans

    return plans.load(ref, "reproduce", TaskPlan)


def check_task_plan(plan: TaskPlan) -> None:
    """Raise MedadvError, before any training, for a plan naming an unknown task, architecture, recipe,
    battery row or preprocessing defense, or a number out of its bounds (a plan built in code or changed
    by flags gets the same check as a plan file)."""
    from medadv import plans
    from medadv.defenses import build_preprocessor
    from medadv.evaluate.battery import known_rows
    from medadv.models.recipes import pick_recipe
    from medadv.models.zoo import get_arch

    plans.build(TaskPlan, plans.to_data(plan), f"the {plan.train.task} plan")
    get_task(plan.train.task)
    get_arch(plan.train.arch)
    get_arch(surrogate_config(plan).arch)
    pick_recipe(plan.train.recipe, plan.train.pretrained is not None)
    unknown = [r for r in plan.battery.rows if r not in known_rows()]
    if unknown:
        raise MedadvError(f"unknown battery row(s) {', '.join(unknown)} in the {plan.train.task} plan.",
                          f"choose from {', '.join(known_rows())}.")
    for d in plan.defense:  # unknown names and bad settings fail here
        build_preprocessor(d["name"], **{k: v for k, v in d.items() if k != "name"})


# The shipped plans are data (medadv/plans/reproduce/*.json), loaded once here: the paper's three tasks
# (the full study's budget on 2 CPU cores, all three in under 30 minutes, see BENCHMARKS.md) and the demo.
REPRODUCE_TASKS = ("fundus-dr", "chest-xray", "derm-melanoma")
REPRODUCE_PLANS: dict[str, TaskPlan] = {t: reproduce_plan(t) for t in REPRODUCE_TASKS}
DEMO_PLAN = reproduce_plan("demo")  # the 28 px run: the smallest honest one (the tests' shared victim)
# what `medadv demo` runs: the paper's regime, a pretrained network fine-tuned on 224 px chest X-rays
DEMO_DEFAULT = "demo-224"


# ----------------------------------------------------------------------------------------- models

def trained_model(cfg: TrainConfig, cache: StageCache, data_root: Path, monitor: Monitor = SILENT,
                  device: str = "cpu") -> Path:
    """The checkpoint for ``cfg``, trained once and cached (a killed training resumes by epoch)."""
    task = get_task(cfg.task)
    cfg = replace(cfg, source=resolve_source(task, cfg.source, data_root, cfg.size))
    key = {"train": stage_config(cfg), "data_root": str(data_root)}
    folder = cache.path(f"model-{cfg.task}-{cfg.arch}-s{cfg.seed}", key)
    if folder is None:
        raise ValueError("a study needs a cache folder for its models")
    if (folder / "medadv.json").is_file():
        monitor.log(f"reusing {folder}")
        return folder
    monitor.log(f"training {cfg.arch} for {cfg.task} (seed {cfg.seed}, {cfg.epochs} epochs)")
    from medadv.defenses.training import robust_training  # the job hands the training defense to train()

    train(cfg, folder, data_root=data_root, monitor=monitor, device=device, robust=robust_training(cfg))
    return folder


def fit_to_data(plan: TaskPlan, data_root: Path, monitor: Monitor = SILENT) -> TaskPlan:
    """``plan`` reading the best MedMNIST file it can get: the plan's resolution (downloaded when missing),
    else the largest smaller official file already in the data root, upsampled to the network's size and
    said in a caveat. Non-MedMNIST sources and plans that fix ``data_size`` are returned unchanged."""
    from medadv.data import medmnist
    from medadv.data import _medmnist_size

    cfg = replace(plan.train, source=resolve_source(get_task(plan.train.task), plan.train.source, data_root,
                                                    plan.train.size))
    kind, _, flag = cfg.source.partition(":")
    if kind != "medmnist" or cfg.data_size:
        return replace(plan, train=cfg)
    want = _medmnist_size(cfg.size)
    try:
        medmnist.locate(flag, want, data_root)
        note = () if want == 28 else (f"MedMNIST+ {want} px files (the paper used 224-299 px photographs).",)
        return replace(plan, train=cfg, caveats=(*plan.caveats, *note))
    except MedadvError as err:
        have = [s for s in medmnist.SIZES if s < want and (data_root / "medmnist" / medmnist.file_name(flag, s)).is_file()]
        if not have:
            raise
        size = max(have)
        monitor.log(f"{medmnist.file_name(flag, want)} is not available ({err.what}); reading the {size} px file, "
                    f"upsampled to the network's {cfg.size} px")
        caveat = LOW_RES.replace("28 px", f"{size} px") + (
            f" The {want} px MedMNIST+ file this plan asks for was not available here; on a machine that can download "
            "it, the study reads it.")
        return replace(plan, train=replace(cfg, data_size=size), caveats=(*plan.caveats, caveat))


def surrogate_config(plan: TaskPlan) -> TrainConfig:
    """The black-box attacker's own model: another seed (so another initialization and data order), with
    the plan's surrogate overrides (its own epochs or training images)."""
    return replace(plan.train, **{"seed": plan.train.seed + 1, "arch": plan.surrogate_arch or plan.train.arch,
                                  **plan.surrogate_overrides})


# ----------------------------------------------------------------------------------------- battery

def _save_battery(out: BatteryOutput, folder: Path) -> None:
    (folder / "battery.json").write_text(json.dumps(out.results, default=float))
    arrays = {}
    for i, ex in enumerate(out.examples):
        for k in ("clean", "adv"):
            arrays[f"{i}_{k}"] = ex[k]
    np.savez(folder / "examples.npz", **arrays)
    (folder / "examples.json").write_text(json.dumps([{k: v for k, v in ex.items() if k not in ("clean", "adv")}
                                                      for ex in out.examples]))


def _load_battery(folder: Path) -> BatteryOutput:
    results = json.loads((folder / "battery.json").read_text())
    meta = json.loads((folder / "examples.json").read_text())
    with np.load(folder / "examples.npz", allow_pickle=False) as z:
        examples = [{**m, "clean": z[f"{i}_clean"], "adv": z[f"{i}_adv"]} for i, m in enumerate(meta)]
    return BatteryOutput(results, examples)


def run_task(plan: TaskPlan, cache: StageCache, data_root: Path, seed: int, monitor: Monitor = SILENT,
             device: str = "cpu") -> dict[str, Any]:
    """Victim, surrogate, Table 1 and the battery for one task; returns its study record and examples."""
    plan = fit_to_data(replace(plan, train=replace(plan.train, seed=seed)), data_root, monitor)
    cfg = plan.train
    victim_dir = trained_model(cfg, cache, data_root, monitor, device)
    surrogate_dir = trained_model(surrogate_config(plan), cache, data_root, monitor, device)
    victim, meta = load_checkpoint(victim_dir, device)
    if plan.defense:
        from medadv.defenses import defend

        victim = defend(victim, list(plan.defense), adaptive=True)
    surrogate, s_meta = load_checkpoint(surrogate_dir, device)
    test = model_split(meta, "test", data_root=data_root)
    # the registry says which rows' attacks are fitted on training images (patch, universal perturbation)
    train_set = model_split(meta, "train", data_root=data_root) if needs_fit(plan.battery.rows) else None
    p_test = predict(victim, test)  # once: Table 1 and the battery's clean figures share it
    table1 = evaluate_model(victim, test, scores=p_test)
    key = {"battery": plan.battery.to_json(), "victim": model_fingerprint(victim_dir),
           "surrogate": model_fingerprint(surrogate_dir), "test": test.checksum, "seed": seed,
           **({"defense": victim.to_json()} if plan.defense else {})}
    t0 = time.perf_counter()
    seed_everything(seed)
    battery = cache.run(f"battery-{cfg.task}", key,
                        lambda: run_battery(victim, test, surrogate=surrogate, train=train_set, config=plan.battery,
                                            seed=seed, monitor=monitor, clean_scores=p_test),
                        _save_battery, _load_battery)
    rows = battery.results["rows"]
    # like for like: Table 2's clean column is measured on the images the PGD rows attacked (reproduce
    # attacks a subset); the whole split's clean figure stays in table1. Each column keeps its count.
    attacked = next((rows[r] for r in ("pgd_white", "pgd_black") if r in rows), None)
    table2 = {}
    for name, m in (("clean", attacked["clean"] if attacked else table1),
                    ("white", rows.get("pgd_white", {}).get("adversarial")),
                    ("black", rows.get("pgd_black", {}).get("adversarial"))):
        if m is not None:
            table2[name] = {k: m.get(k) for k in ("accuracy", "auc", "mean_confidence", "sensitivity", "specificity", "n")}
    paper = PAPER_TABLE2.get(cfg.task)
    return {
        "task": cfg.task,
        "title": get_task(cfg.task).title,
        "victim": {"path": str(victim_dir), "arch": victim.spec.arch, "input_size": victim.spec.input_size,
                   "class_names": list(victim.spec.class_names),
                   "pretrained": victim.spec.pretrained, "threshold": victim.threshold, "training": meta["training"],
                   "thresholds": list(getattr(victim.spec, "thresholds", ()) or ()),
                   "validation": meta["validation"], "data": meta["data"],
                   "defense": victim.to_json() if plan.defense else None},
        "surrogate": {"path": str(surrogate_dir), "arch": surrogate.spec.arch, "seed": s_meta["seed"],
                      "test": evaluate_model(surrogate, test)},
        "table1": table1,
        "table2": table2,
        "paper": None if paper is None else {
            "setup": PAPER_SETUP[cfg.task],
            **{k: dict(zip(("accuracy", "auc", "mean_confidence"), v)) for k, v in paper.items()}},
        **battery.results,
        "battery_seconds": round(time.perf_counter() - t0, 1),
        "caveats": list(plan.caveats),
        "_examples": battery.examples,
    }


def _budgeted(plans: list[TaskPlan], seconds: float, cache: StageCache, root: Path, device: str,
              monitor: Monitor) -> tuple[list[TaskPlan], list[dict[str, Any]]]:
    """The plans sized to ``seconds``; the sizing is cached like a stage, so a resumed or repeated run
    keeps the plan (and the cached models and rows) instead of re-measuring a noisy machine."""
    from medadv.budget import fit_study

    key = {"plans": [stage_config(p.train) for p in plans], "batteries": [p.battery.to_json() for p in plans],
           "seconds": seconds, "device": device, "data_root": str(root)}
    if any(p.surrogate_overrides for p in plans):  # absent otherwise, so earlier sizings keep their key
        key["surrogates"] = [dict(p.surrogate_overrides) for p in plans]
    folder = cache.path("budget", key)
    if folder is not None and (folder / "budget.json").is_file():
        saved = json.loads((folder / "budget.json").read_text())
        monitor.log(f"budget: reusing the sizing in {folder}")
        return [_apply_sizing(p, r) for p, r in zip(plans, saved)], saved
    from medadv.dist import current

    shard = current()
    # under torchrun rank 0 alone measures (the others would disturb it) and every rank takes its sizing
    mine = fit_study(plans, seconds, root, device, monitor, resolve=lambda p: fit_to_data(p, root))[1] \
        if shard.is_main else None
    records = shard.gather([mine])[0]
    fitted = [_apply_sizing(p, r) for p, r in zip(plans, records)]
    if folder is not None and shard.is_main:
        from medadv.io import write_json

        write_json(folder / "budget.json", records)
    return fitted, records


def _apply_sizing(plan: TaskPlan, record: dict[str, Any]) -> TaskPlan:
    from medadv.budget import apply_sizing, caveat

    note = caveat(record)
    sized = apply_sizing(plan, record["plan"])
    return replace(sized, caveats=(*plan.caveats, note) if note else plan.caveats)


def run_study(kind: str, plans: list[TaskPlan], out: Path, *, data_root: str | Path | None = None,
              cache_dir: str | Path | None = None, seed: int = 0, monitor: Monitor = SILENT,
              device: str = "cpu", budget: float | None = None) -> dict[str, Any]:
    """Run ``plans`` and write ``out/results.json``, ``out/report.html`` and ``out/figures/``.

    ``device`` (cpu, cuda) places training and attacks; it is recorded but not part of the stage keys.
    ``budget`` (seconds) sizes the plans to this machine's measured throughput (:mod:`medadv.budget`)."""
    from medadv.report.html import write_report

    for plan in plans:  # every name is checked before any training starts
        check_task_plan(plan)
    root = resolve_data_root(data_root)
    cache = StageCache(Path(cache_dir) if cache_dir else out.parent / f".{out.name}.cache", shard=current_shard)
    t0 = time.perf_counter()
    budgets: list[dict[str, Any] | None] = [None] * len(plans)
    if budget is not None:
        plans, budgets = _budgeted(plans, budget, cache, root, device, monitor)
    tasks = []
    for plan, plan_budget in zip(plans, budgets):
        monitor.log(f"== {plan.train.task} ==")
        tasks.append({**run_task(plan, cache, root, seed, monitor, device), "budget": plan_budget})
    study = {
        "schema": STUDY_SCHEMA,
        "kind": kind,
        "seed": seed,
        "config": {"plans": [{"train": asdict(p.train), "battery": p.battery.to_json(),
                              "surrogate_arch": p.surrogate_arch or p.train.arch,
                              "surrogate_overrides": dict(p.surrogate_overrides)} for p in plans],
                   "data_root": str(root), "cache": str(cache.root)},
        "config_hash": config_hash({"plans": [asdict(p.train) for p in plans], "seed": seed}),
        "environment": {**environment(), "device": device},
        "budget_seconds": budget,
        "seconds": round(time.perf_counter() - t0, 1),
        "tasks": tasks,
    }
    write_report(out, study)
    return study


# ------------------------------------------------------------------------------------------- audit

def load_any_model(path: str | Path, overrides: dict[str, Any] | None = None, device: str = "cpu"):
    """A medadv checkpoint folder, a TorchScript file, an ONNX file, or a published chest X-ray reader's
    weights (``xrv:FILE``, torchxrayvision's DenseNet-121; ``chexnet:FILE``, CheXNet's design; read as
    tensors only, :mod:`medadv.models.xrv`), wrapped, with its metadata.

    ``device`` places checkpoints and TorchScript models; ONNX models run on onnxruntime's CPU provider."""
    from medadv.models.xrv import PREFIXES, load_prefixed

    if str(path).startswith(PREFIXES):
        model, meta = load_prefixed(str(path), overrides)
        return model.to(device), meta
    path = Path(path)
    if path.is_dir():
        from medadv.defenses.checkpoint import load_defended

        model, meta = load_defended(path, device, adaptive=True)  # a defended model: the whole pipeline, BPDA
        if overrides and overrides.get("threshold") is not None:
            model.spec.threshold = overrides["threshold"]
        return model, meta
    from medadv.models.external import load_external

    model = load_external(path, overrides)
    if device != "cpu" and model.differentiable:
        model = model.to(device)
    return model, {"task": model.spec.task, "format": path.suffix.lstrip("."), "training": None}


def run_audit(model_path: Path, out: Path, *, task: str | None, source: str | None, data_root: str | Path | None = None,
              surrogate_path: Path | None = None, train_surrogate: str | None = None, overrides: dict | None = None,
              battery: BatteryConfig | None = None, image_size: int | None = None, cache_dir: Path | None = None,
              seed: int = 0, gate=None, monitor: Monitor = SILENT, device: str = "cpu",
              data_options: dict | None = None) -> dict[str, Any]:
    """The reproduce battery and report for a user's own model and data (attacks run on ``device``).

    ``data_options`` go to :func:`medadv.data.load_split` (resplit_by_patient, patient_pattern,
    allow_outside_paths, fit); images are fitted to the model's input size unless ``image_size`` says
    otherwise. Patient leakage found on load is logged and becomes a caveat of the report.

    ``gate(imageset)`` (optional) verifies the images' provenance before any model sees them and returns
    a JSON-able record. Without ``surrogate_path``, ``train_surrogate`` (an architecture name) trains one
    on the data's training split, which an ONNX victim needs for transfer attacks.
    """
    from medadv.data import load_split

    root = resolve_data_root(data_root)
    victim, meta = load_any_model(model_path, overrides, device)
    from medadv.models.interface import refuse_dense_or_volume

    refuse_dense_or_volume(getattr(victim, "model", victim), "medadv audit (the attack battery)")
    task = task or meta.get("task")
    if task is None:
        raise MedadvError("the model does not say which task it was trained for.", "pass --task.")
    if meta.get("task") and task != meta["task"]:
        raise MedadvError(f"--task {task} does not match the model ({meta['task']}).", f"pass --task {meta['task']}.")
    src = source or (meta.get("data") or {}).get("source")
    options = dict(data_options or {})
    if image_size is None and not (src or "").startswith("medmnist:"):
        options.setdefault("fit_size", victim.spec.input_size)  # mixed sizes and non-square images fit the model's input
    from medadv.data import get_task, with_findings

    task_name = task
    task = get_task(task_name)
    if task.kind == "multilabel" and victim.spec.kind == "multilabel":  # the reader's own finding columns
        task = with_findings(task, tuple(victim.spec.class_names), (meta.get("data") or {}).get("uncertain"))
    test = load_split(task, "test", data_root=root, source=src, size=image_size, **options)
    from medadv.data.leakage import warning as leakage_warning

    leak = leakage_warning(test.meta.get("leakage"), "test")
    if leak:
        monitor.log(f"warning: {leak}")
    provenance = gate(test) if gate is not None else None
    try:
        train_set = load_split(task, "train", data_root=root, source=src, size=image_size, **options)
        if gate is not None:
            gate(train_set)
    except MedadvError as exc:
        monitor.log(f"no training images for the patch/UAP rows: {exc}")
        train_set = None
    cache = StageCache(cache_dir or out.parent / f".{out.name}.cache", shard=current_shard)
    surrogate = None
    if surrogate_path is not None:
        surrogate, _ = load_checkpoint(surrogate_path, device)
    elif train_surrogate:
        size = victim.spec.input_size
        cfg = TrainConfig(task=task_name, arch=train_surrogate, size=size, epochs=3, seed=seed + 1, source=src,
                          pretrained="imagenet" if train_surrogate.startswith("efficientnet") else None,
                          findings=task.class_names if task.kind == "multilabel" else None)
        surrogate_path = trained_model(cfg, cache, root, monitor, device)
        surrogate, _ = load_checkpoint(surrogate_path, device)
    cfg = battery or BatteryConfig()
    from medadv.evaluate.clean import evaluate_model as clean_metrics

    randomized = False
    if meta.get("defense"):  # randomness detected -> every attack follows the EOT gradient
        victim, randomized = adaptive_victim(victim, test.stored(np.arange(min(len(test), 16))).to(device))

    p_test = predict(victim, test)  # once: Table 1 and the battery's clean figures share it
    table1 = clean_metrics(victim, test, scores=p_test)
    seed_everything(seed)
    result = run_battery(victim, test, surrogate=surrogate, train=train_set, config=cfg, seed=seed,
                         differentiable=victim.differentiable, monitor=monitor, clean_scores=p_test)
    rows = result.results["rows"]
    # like for like: the clean column is measured on the images the attack rows ran on (a --limit subset),
    # the whole split's clean figure stays in table1
    attacked = next((rows[r] for r in ("pgd_white", "pgd_black") if r in rows), None)
    table2 = {"clean": attacked["clean"] if attacked else table1}
    for name, row in (("white", "pgd_white"), ("black", "pgd_black")):
        if row in rows:
            table2[name] = rows[row]["adversarial"]
    record = {
        "task": task_name, "title": f"Audit: {model_path.name} on {test.source}",
        "victim": {"path": str(model_path), "arch": victim.spec.arch, "input_size": victim.spec.input_size,
                   "class_names": list(victim.spec.class_names), "pretrained": victim.spec.pretrained,
                   "threshold": victim.threshold, "training": meta.get("training"),
                   "thresholds": list(getattr(victim.spec, "thresholds", ()) or ()),
                   "format": meta.get("format", "medadv checkpoint"), "differentiable": victim.differentiable,
                   "data": {"source": test.source, "train": {"checksum": train_set.checksum if train_set else None}}},
        "surrogate": None if surrogate is None else {"path": str(surrogate_path), "arch": surrogate.spec.arch,
                                                     "test": clean_metrics(surrogate, test)},
        "table1": table1, "table2": table2, "paper": None, **result.results,
        "provenance": provenance,
        "defense": None if not meta.get("defense") else defense_record(victim, meta["defense"], test, seed, False, randomized=randomized),
        "leakage": test.meta.get("leakage"),
        "caveats": ([] if victim.differentiable else
                    ["The model is ONNX (no gradients): white-box rows are crafted on the surrogate (transfer)."])
                   + ([leak] if leak else [])
                   + ([f"Clean figures beside attacked ones are on the {table2['clean']['n']} attacked images; "
                       f"on the whole test split ({table1['n']} images) clean accuracy is {table1['accuracy']:.3f}."]
                      if table2["clean"]["n"] != table1["n"] else []),
        "_examples": result.examples,
    }
    study = {"schema": STUDY_SCHEMA, "kind": "audit", "seed": seed,
             "config": {"model": str(model_path), "task": task_name, "source": test.source, "battery": cfg.to_json(),
                        "overrides": overrides or {}},
             "config_hash": config_hash({"model": str(model_path), "source": test.source, "seed": seed}),
             "environment": {**environment(), "device": device}, "seconds": None, "tasks": [record]}
    from medadv.report.html import write_report

    write_report(out, study)
    return study
