"""The defenses study behind ``medadv defend``: how robust each defense makes a medical model, honestly.

For one task it trains (cached, resumable like ``reproduce``) an undefended model and the training
defenses (PGD-AT, TRADES, fast AT, Gaussian-noise training for randomized smoothing), puts the
preprocessing defenses (the generic ones and the modality's own) in front of the undefended model, and
for each defense measures on the same test images:

* clinical metrics at the operating threshold (accuracy, AUC, sensitivity, specificity);
* robust accuracy at each eps, non-adaptive beside adaptive (:mod:`medadv.evaluate.adaptive`: the
  per-image worst case of the non-adaptive PGD itself, transfer, PGD with BPDA/EOT and AutoAttack);
* the gradient-masking checks (:mod:`medadv.defenses.masking`) on the model as a naive evaluator sees it;

plus the detectors on the undefended model (detection rate at 5% false positives against the
non-adaptive attack, and how many adversarial images the adaptive attack gets past them) and, for the
noise-trained model, randomized-smoothing certificates (certified accuracy against L2 radius; the
radius eps·sqrt(d) of an L-inf ball gives a certified lower bound beside the empirical columns).

Every stage is cached by configuration hash, so a killed run resumes and a second run only renders.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medadv.cache import StageCache, model_fingerprint
from medadv.dist import current as current_shard
from medadv.data import get_task, resolve_data_root
from medadv.defenses import defend
from medadv.defenses.detect import build_detector, detector_names
from medadv.defenses.training import TRAINING_DEFENSES, training_defense
from medadv.errors import MedadvError
from medadv.evaluate.adaptive import EVALUATION_VERSION, AdaptiveConfig, evaluate_robustness
from medadv.evaluate.battery import stratified_subset
from medadv.evaluate.clean import evaluate_model, model_split
from medadv.metrics import clinical_metrics
from medadv.models import load_checkpoint
from medadv.models.train import TrainConfig
from medadv.progress import SILENT, Monitor
from medadv.runinfo import config_hash, environment, seed_everything

SCHEMA = "medadv-study/1"

# the dataset-specific preprocessing of each modality (the paper: standardized capture is the defender's
# opportunity); registered defenses by name, keyed by the tasks' modality names (medadv.data.tasks): a
# test checks every key is one, and an unregistered name is an error, never skipped
MODALITY_DEFENSES = {"chest-xray": ("histeq",), "fundus": ("fundus-fov",), "dermoscopy": ("derm-color-constancy",)}
GENERIC_DEFENSES = ("bit-depth", "jpeg", "median", "gaussian")
# training defenses and detectors come from their registries (medadv.defenses.training, .detect): a plan
# runs every registered one unless it names its own
TRAINED = tuple(TRAINING_DEFENSES)  # the built-in ones, in registration order (pgd, trades, fast, noise)


@dataclass
class DefendPlan:
    """What ``medadv defend`` runs for one task. Eps and sigma in [0, 1] units of the stored pixels. The
    shipped plans are JSON files (medadv/plans/defend/), read by :func:`defend_plan`."""

    base: TrainConfig
    trained: tuple[str, ...] = field(default_factory=lambda: tuple(TRAINING_DEFENSES))  # every registered one
    preprocessing: tuple[str, ...] | None = None  # None: GENERIC_DEFENSES + the modality's own
    detectors: tuple[str, ...] = field(default_factory=detector_names)  # every registered detector
    adv_eps: float = 4 / 255
    adv_steps: int = 5
    trades_beta: float = 6.0
    noise_sigma: float = 0.25
    n_images: int = 128  # test images every defense is judged on (the same ones)
    robust: AdaptiveConfig = field(default_factory=AdaptiveConfig)
    detect_eps: tuple[float, ...] = (4 / 255, 8 / 255)
    detect_calibration: int = 300  # clean validation images the detectors' 5% threshold is set on
    fpr: float = 0.05
    masking_images: int = 48
    certify: dict[str, Any] = field(default_factory=lambda: {"n0": 64, "n": 500, "alpha": 0.001})
    certify_radii: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5)
    caveats: tuple[str, ...] = ()
    # TrainConfig fields changed for the training defenses only (quick runs and tests: e.g. fewer epochs)
    trained_overrides: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["robust"] = self.robust.to_json()
        return d


def defend_plan(ref: str | Path, epochs: int | None = None) -> DefendPlan:
    """A defend plan: a shipped one by task name (``chest-xray``, ``fundus-dr``; ``medadv plan list``) or
    a JSON plan file a user wrote, checked strictly (:mod:`medadv.plans`); ``epochs`` (optional) replaces
    the training epochs of every model. The registry names it holds are checked by :func:`check_plan`."""
    from medadv import plans

    plan = plans.load(ref, "defend", DefendPlan)
    if epochs is None:
        return plan
    # every model: the training defenses' own epochs (trained_overrides) give way too
    overrides = {k: v for k, v in plan.trained_overrides.items() if k != "epochs"}
    return replace(plan, base=replace(plan.base, epochs=epochs), trained_overrides=overrides)


def chest_plan(epochs: int | None = None) -> DefendPlan:
    """The default: PneumoniaMNIST at 28 px, ResNet-18 from scratch (its wall time: BENCHMARKS.md)."""
    return defend_plan("chest-xray", epochs)


# the shipped plans (medadv/plans/defend/*.json) by task: PLANS[task](epochs) -> DefendPlan
PLANS = {name: partial(defend_plan, name) for name in ("chest-xray", "fundus-dr")}


def training_configs(plan: DefendPlan) -> dict[str, TrainConfig]:
    """The undefended configuration and one per training defense, named as in the report."""
    out = {"undefended": replace(plan.base, adversarial=None, noise_sigma=0.0)}
    base = replace(out["undefended"], **plan.trained_overrides)
    for method in plan.trained:
        d = training_defense(method)  # a MedadvError naming the registered ones
        out[d.row_name(plan)] = replace(base, **d.fields(plan))
    return out


def preprocessing_names(plan: DefendPlan, modality: str) -> list[str]:
    from medadv.defenses import PREPROCESSORS

    names = plan.preprocessing if plan.preprocessing is not None else GENERIC_DEFENSES + MODALITY_DEFENSES.get(modality, ())
    unknown = [n for n in names if n not in PREPROCESSORS]
    if unknown:  # never dropped quietly: a study that leaves a defense out must not look complete
        raise MedadvError(f"unknown preprocessing defense(s) {', '.join(unknown)}.",
                          f"choose from {', '.join(sorted(PREPROCESSORS))}.")
    return list(names)


def check_plan(plan: DefendPlan) -> None:
    """Raise MedadvError for a plan that names an unknown defense or detector, has no images, or has a
    number out of its bounds (a plan built in code or changed by flags gets a plan file's check)."""
    from medadv import plans
    from medadv.models.zoo import get_arch

    plans.build(DefendPlan, plans.to_data(plan), f"the {plan.base.task} defend plan")
    training_configs(plan)
    preprocessing_names(plan, get_task(plan.base.task).modality)
    get_arch(plan.base.arch)
    unknown = [d for d in plan.detectors if d not in detector_names()]
    if unknown:
        raise MedadvError(f"unknown detector(s) {', '.join(unknown)}.", f"choose from {', '.join(detector_names())}.")
    if plan.n_images < 2 or not plan.robust.eps:
        raise MedadvError("a defenses study needs at least 2 test images and one eps.", "pass --n-images 128.")


def _json_stage(cache: StageCache, stage: str, key: dict[str, Any], compute) -> dict[str, Any]:
    def save(value: dict[str, Any], folder: Path) -> None:
        (folder / "stage.json").write_text(json.dumps(value, default=float))

    # the JSON form on both paths, so a fresh run and a cached one return the same record
    return cache.run(stage, key, lambda: json.loads(json.dumps(compute(), default=float)), save,
                     lambda folder: json.loads((folder / "stage.json").read_text()))


def _probabilities(model, x: torch.Tensor, randomized: bool, draws: int) -> np.ndarray:
    """P(disease) per image; a randomized model's mean over ``draws`` passes."""
    with torch.no_grad():
        reps = draws if randomized else 1
        p = torch.stack([model.probabilities(x) for _ in range(reps)]).mean(0)
    return p.double().numpy()


def evaluate_defense(name: str, kind: str, model, x: torch.Tensor, y: torch.Tensor, plan: DefendPlan, *,
                     surrogate, levels: int, seed: int, monitor: Monitor) -> dict[str, Any]:
    """One row of the Defenses table: clinical metrics, robust accuracy (non-adaptive, adaptive) and the
    masking checks, on the images x (N×C×H×W in [0, 1]) with labels y."""
    from medadv.defenses.masking import check_gradient_masking
    from medadv.evaluate.adaptive import non_adaptive_view

    monitor.log(f"{name}: robust accuracy on {len(x)} test images")
    t0 = time.perf_counter()
    robust = evaluate_robustness(model, x, y, surrogate=surrogate, config=plan.robust, levels=levels, seed=seed,
                                 monitor=monitor)
    p = _probabilities(model, x, robust.randomized, plan.robust.eot_samples)
    clinical = clinical_metrics(y.numpy(), p, float(model.threshold))
    k = min(plan.masking_images, len(x))
    try:
        masking = check_gradient_masking(non_adaptive_view(model), x[:k], y[:k], seed=seed,
                                         black_box_queries=100).to_json()
        masking["n_images"] = k
    except MedadvError as exc:  # e.g. the model gets none of these images right
        masking = {"flagged": None, "checks": [], "skipped": exc.what}
    return {"name": name, "kind": kind, "clinical": {**clinical, "n": len(x)}, "robust": robust.to_json(),
            "masking": masking, "seconds": round(time.perf_counter() - t0, 1)}


def evaluate_detector(name: str, model, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor,
                      x_fit: torch.Tensor, y_fit: torch.Tensor, plan: DefendPlan, *, levels: int, seed: int,
                      monitor: Monitor) -> dict[str, Any]:
    """A detector on the undefended model: threshold at ``plan.fpr`` false positives on clean validation
    images; per eps, the non-adaptive PGD's successful images it flags (and its detection AUC), and how
    many successful images the adaptive attack (network and detector together, BPDA) gets past it."""
    from medadv.attacks import ThreatModel
    from medadv.attacks.steps import pgd_step
    from medadv.defenses.detect import adaptive_attack, detection_auc
    from medadv.evaluate.adaptive import attack_images, decide, in_batches

    detector = build_detector(name, model, x_fit, y_fit)
    threshold = detector.calibrate(x_val, plan.fpr)
    op = float(model.threshold)
    clean_flags = detector.flags(x).numpy()
    rows = []
    for k, eps in enumerate(plan.detect_eps):
        x_na = attack_images("pgd", model, x, y, eps, plan.robust.steps, seed * 101 + k, levels, plan.robust.batch_size)
        fooled = (decide(model, x_na, op, plan.robust.batch_size) != y).numpy()
        flagged = detector.flags(x_na).numpy()
        threat = ThreatModel(norm="linf", eps=eps, steps=plan.robust.adaptive_steps,
                             step_size=pgd_step(eps, plan.robust.adaptive_steps),
                             random_start=True, target="none", levels=levels)
        base_seed = (seed * 101 + k) * 1_000_003
        x_ad = in_batches(lambda b, xb, yb: adaptive_attack(detector, xb, yb, threat, seed=base_seed + b),
                          x, y, plan.robust.batch_size)
        fooled_ad = (decide(model, x_ad, op, plan.robust.batch_size) != y).numpy()
        flagged_ad = detector.flags(x_ad).numpy()
        rows.append({
            "eps": eps, "eps_255": round(eps * 255, 3),
            "non_adaptive": {"successful": int(fooled.sum()),
                             "detected": int((fooled & flagged).sum()),
                             "detection_rate": float((fooled & flagged).sum() / fooled.sum()) if fooled.any() else None,
                             "detection_auc": detection_auc(detector, x, x_na[fooled]) if fooled.any() else None},
            "adaptive": {"successful": int(fooled_ad.sum()),
                         "undetected": int((fooled_ad & ~flagged_ad).sum()),
                         "detection_rate": float((fooled_ad & flagged_ad).sum() / fooled_ad.sum()) if fooled_ad.any() else None,
                         # the attacker's win: images misclassified AND not flagged, over all n
                         "evasion_rate": float((fooled_ad & ~flagged_ad).mean())},
        })
        monitor.log(f"  {name} eps {eps * 255:.0f}/255: non-adaptive detected {rows[-1]['non_adaptive']['detected']}"
                    f"/{int(fooled.sum())}, adaptive undetected {rows[-1]['adaptive']['undetected']}/{int(fooled_ad.sum())}")
    return {"name": name, "threshold": threshold, "false_positive_rate_target": plan.fpr,
            "calibration_images": len(x_val), "test_false_positive_rate": float(clean_flags.mean()),
            "n_images": len(x), "rows": rows}


def certify_smoothed(model, x: torch.Tensor, y: torch.Tensor, plan: DefendPlan, *, levels: int, seed: int,
                     monitor: Monitor) -> dict[str, Any]:
    """Randomized smoothing of the noise-trained model: certified accuracy against L2 radius, and at the
    L2 radius eps·sqrt(d) containing each L-inf ball (a certified lower bound for the L-inf columns)."""
    from medadv.defenses.smoothing import Smoothed, certified_accuracy, certify_batch

    smoothed = Smoothed(model, plan.noise_sigma, levels=levels)
    c = plan.certify
    certs = certify_batch(smoothed, x, c["n0"], c["n"], c["alpha"], seed, monitor=monitor)
    d = int(np.prod(x.shape[1:]))
    linf = [{"eps": e, "eps_255": round(e * 255, 3), "l2_radius": e * math.sqrt(d),
             "certified_accuracy": certified_accuracy(certs, y.numpy(), [e * math.sqrt(d)])[0]["certified_accuracy"]}
            for e in plan.robust.eps]
    return {"sigma": plan.noise_sigma, **c, "n_images": len(x), "dimensions": d,
            "abstentions": int(sum(cert.prediction < 0 for cert in certs)),
            "curve": certified_accuracy(certs, y.numpy(), list(plan.certify_radii)),
            "linf_lower_bound": linf,
            "units": "L2 radius in [0, 1] pixel units of the stored image"}


def run_defend_task(plan: DefendPlan, cache: StageCache, data_root: Path, seed: int, monitor: Monitor = SILENT,
                    device: str = "cpu") -> dict[str, Any]:
    """Train, defend and evaluate one task; returns its study record (with ``defenses``)."""
    from medadv.study import trained_model

    task = get_task(plan.base.task)
    configs = training_configs(replace(plan, base=replace(plan.base, seed=seed)))
    paths = {name: trained_model(cfg, cache, data_root, monitor, device) for name, cfg in configs.items()}
    models = {name: load_checkpoint(path, device) for name, path in paths.items()}
    undefended, meta = models["undefended"]
    test_all = model_split(meta, "test", data_root=data_root)
    test = stratified_subset(test_all, plan.n_images, seed)
    x, y = test.stored(), torch.from_numpy(test.labels)
    levels = test.levels
    common = {"test": test.checksum, "seed": seed, "robust": plan.robust.to_json(), "masking": plan.masking_images,
              "evaluation": EVALUATION_VERSION}
    rows = []
    for name, (model, _) in models.items():
        model.eval()
        surrogate = None if name == "undefended" else undefended
        key = {**common, "model": model_fingerprint(paths[name])}
        kind = "none" if name == "undefended" else "training"
        rows.append(_json_stage(cache, "defense-" + name.replace(" ", "").replace("σ=", "s"), key,
                                lambda name=name, model=model, surrogate=surrogate, kind=kind: evaluate_defense(
                                    name, kind, model, x, y, plan, surrogate=surrogate, levels=levels, seed=seed,
                                    monitor=monitor)))
    base_fp = model_fingerprint(paths["undefended"])
    for pre in preprocessing_names(plan, task.modality):
        defended = defend(undefended, pre)
        key = {**common, "model": base_fp, "defense": defended.to_json()}
        rows.append(_json_stage(cache, f"defense-{pre}", key, lambda defended=defended, pre=pre: evaluate_defense(
            pre, "preprocessing (BPDA)" if not defended.fully_differentiable else "preprocessing",
            defended, x, y, plan, surrogate=undefended, levels=levels, seed=seed, monitor=monitor)))
    noise_name = next((n for n in models if n.startswith("noise")), None)
    smoothing = None
    if noise_name is not None:
        noisy, _ = models[noise_name]
        # the randomized defense an attacker faces at inference: Gaussian noise in front of the noise-trained
        # model (the base classifier smoothing averages); EOT is what breaks or fails to break it
        randomized = defend(noisy, [{"name": "gaussian-noise", "sigma": plan.noise_sigma}])
        key = {**common, "model": model_fingerprint(paths[noise_name]), "defense": randomized.to_json()}
        rows.append(_json_stage(cache, "defense-noise-randomized", key, lambda: evaluate_defense(
            f"{noise_name} + noise at inference", "randomized (EOT)", randomized, x, y, plan, surrogate=undefended,
            levels=levels, seed=seed, monitor=monitor)))
        key = {**common, "model": model_fingerprint(paths[noise_name]), "certify": plan.certify, "sigma": plan.noise_sigma,
               "radii": plan.certify_radii}
        smoothing = _json_stage(cache, "certify", key, lambda: certify_smoothed(noisy, x, y, plan, levels=levels, seed=seed,
                                                                                monitor=monitor))
    detectors = []
    if plan.detectors:
        val = model_split(meta, "val", data_root=data_root)
        x_val = stratified_subset(val, plan.detect_calibration, seed).stored()
        fit = stratified_subset(model_split(meta, "train", data_root=data_root), 2000, seed)
        for name in plan.detectors:
            key = {**common, "model": base_fp, "detector": name, "val": val.checksum, "fit": fit.checksum,
                   "fpr": plan.fpr, "eps": plan.detect_eps, "calibration": plan.detect_calibration}
            detectors.append(_json_stage(cache, f"detector-{name}", key, lambda name=name: evaluate_detector(
                name, undefended, x, y, x_val, fit.stored(), torch.from_numpy(fit.labels), plan, levels=levels,
                seed=seed, monitor=monitor)))
    table1 = evaluate_model(undefended, test_all)
    return {
        "task": task.name, "title": f"{task.title}: defenses",
        "victim": {"path": str(paths["undefended"]), "arch": undefended.spec.arch, "input_size": undefended.spec.input_size,
                   "class_names": list(undefended.spec.class_names), "pretrained": undefended.spec.pretrained,
                   "threshold": undefended.threshold, "training": meta["training"], "validation": meta["validation"],
                   "data": meta["data"]},
        "surrogate": None, "table1": table1, "table2": {}, "paper": None, "rows": {},
        "defenses": {"n_images": len(test), "test_checksum": test.checksum, "eps": list(plan.robust.eps),
                     "rows": rows, "detectors": detectors, "smoothing": smoothing,
                     "checkpoints": {name: str(p) for name, p in paths.items()},
                     "training": {name: models[name][1]["training"].get("history") for name in models}},
        "caveats": list(plan.caveats) + [
            f"Every defense is judged on the same {len(test)} test images (stratified, seed {seed}); robust accuracy "
            "counts an image misclassified before the attack as not robust.",
            "Preprocessing defenses keep the undefended model's operating threshold (not re-tuned through the "
            "defense), so part of their clean loss is calibration.",
            "Non-adaptive: PGD on the model as a naive evaluator sees it (masked gradients through "
            "non-differentiable steps, one draw of randomness). Adaptive: per-image worst case of the non-adaptive "
            "PGD itself, transfer from the undefended model, PGD with BPDA and EOT, and AutoAttack (" + str(plan.robust.autoattack) + ")."],
    }


def estimate_seconds(plan: DefendPlan, costs: Any, n_train: int, n_test: int) -> dict[str, float]:
    """Seconds per stage of ``plan`` on this machine (:func:`medadv.defense_budget.estimate_defend_seconds`
    over this study's models and preprocessing rows); ``costs``: :class:`medadv.budget.UnitCosts`."""
    from medadv.defense_budget import estimate_defend_seconds

    return estimate_defend_seconds(plan, costs, n_train, n_test, models=training_configs(plan),
                                   preprocessing=preprocessing_names(plan, get_task(plan.base.task).modality))


def size_plans(plans: list[DefendPlan], seconds: float, data_root: Path, device: str = "cpu",
               monitor: Monitor = SILENT, fixed: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One budget record per plan (:func:`medadv.budget.fit_plan`'s): each plan's share of ``seconds`` in
    proportion to its estimate on this machine, measured on its own network and data
    (:mod:`medadv.defense_budget`). ``fixed``: sizes the user set (knob names) that the budget keeps."""
    from medadv.budget import calibrate_config, fit_plan
    from medadv.data import load_split, resolve_source
    from medadv.defense_budget import DEFEND_KNOBS, DEFEND_SHRINK_ORDER, MIN_DEFEND_IMAGES

    measured = []
    for plan in plans:
        task = get_task(plan.base.task)
        cfg = replace(plan.base, source=resolve_source(task, plan.base.source, data_root, plan.base.size))
        read = dict(data_root=data_root, source=cfg.source, size=cfg.size, file_size=cfg.data_size)
        n_train, n_test = len(load_split(task, "train", **read)), len(load_split(task, "test", **read))
        # training runs at the plan's batch; the cascade's attacks at the survivors' batches, often 32
        # images or fewer, where a pass costs 15-35% more per image on a CPU than at 128: priced at 32
        small = calibrate_config(replace(cfg, batch_size=min(cfg.batch_size, MIN_DEFEND_IMAGES)), data_root, device)
        costs = replace(calibrate_config(cfg, data_root, device), grad_image_s=small.grad_image_s)
        monitor.log(f"budget: {task.name} measured {costs.train_image_s * 1e3:.2f} ms per training image, "
                    f"{costs.grad_image_s * 1e3:.2f} ms per attack gradient per image")
        measured.append((costs, n_train, n_test, estimate_seconds(plan, costs, n_train, n_test)["total"]))
    whole = sum(m[3] for m in measured) or 1.0
    records = []
    for plan, (costs, n_train, n_test, planned) in zip(plans, measured):
        share = seconds * planned / whole
        order = tuple((name, floor) for name, floor in DEFEND_SHRINK_ORDER if name not in fixed)
        _, record = fit_plan(plan, share, costs, n_train, n_test, estimate=estimate_seconds,
                             knobs=DEFEND_KNOBS, order=order)
        record["study_seconds"] = seconds
        monitor.log(f"budget: {plan.base.task} gets {share / 60:.1f} min; estimated "
                    f"{record['estimate_s']['chosen'] / 60:.1f} min (as planned {record['estimate_s']['as_planned'] / 60:.1f})"
                    + (f" after {'; '.join(record['changes'])}" if record["changes"] else ""))
        records.append(record)
    return records


def _budgeted(plans: list[DefendPlan], seconds: float, cache: StageCache, root: Path, device: str,
              monitor: Monitor, fixed: tuple[str, ...]) -> tuple[list[DefendPlan], list[dict[str, Any]]]:
    """The plans sized to ``seconds``; the sizing is cached like a stage, so a resumed or repeated run keeps
    its plan (and so its cached models and rows) instead of re-measuring a noisy machine."""
    from medadv.budget import apply_sizing, caveat
    from medadv.defense_budget import DEFEND_KNOBS, DEFEND_OVERHEAD_FRACTION, DEFEND_SHRINK_ORDER

    # the sizing policy is part of the key: a cached sizing made under other floors is not reused
    key = {"plans": [p.to_json() for p in plans], "seconds": seconds, "device": device, "data_root": str(root),
           "fixed": sorted(fixed), "policy": [DEFEND_SHRINK_ORDER, DEFEND_OVERHEAD_FRACTION]}
    folder = cache.path("defend-budget", key)
    if folder is not None and (folder / "budget.json").is_file():
        records = json.loads((folder / "budget.json").read_text())
        monitor.log(f"budget: reusing the sizing in {folder}")
    else:
        shard = current_shard()
        # under torchrun rank 0 alone measures (the others would disturb it) and every rank takes its sizing
        records = shard.gather([size_plans(plans, seconds, root, device, monitor, fixed) if shard.is_main else None])[0]
        if folder is not None and shard.is_main:
            from medadv.io import write_json

            write_json(folder / "budget.json", records)
    sized = []
    for plan, record in zip(plans, records):
        note = caveat(record)
        plan = apply_sizing(plan, record["plan"], DEFEND_KNOBS)
        sized.append(replace(plan, caveats=(*plan.caveats, note)) if note else plan)
    return sized, records


def run_defend(plans: list[DefendPlan], out: Path, *, data_root: str | Path | None = None,
               cache_dir: str | Path | None = None, seed: int = 0, monitor: Monitor = SILENT,
               device: str = "cpu", budget: float | None = None, fixed: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run ``plans`` and write ``out/results.json``, ``out/report.html`` (section "Defenses") and figures;
    ``budget`` (seconds) sizes the plans to this machine's measured throughput (:mod:`medadv.defense_budget`),
    leaving the sizes named in ``fixed`` (``n_images``, ``epochs``, ...) as given."""
    from medadv.report.html import write_report

    for plan in plans:  # every name is checked before any training starts
        check_plan(plan)
    root = resolve_data_root(data_root)
    cache = StageCache(Path(cache_dir) if cache_dir else out.parent / f".{out.name}.cache", shard=current_shard)
    t0 = time.perf_counter()
    seed_everything(seed)
    budgets: list[dict[str, Any] | None] = [None] * len(plans)
    if budget is not None:
        plans, budgets = _budgeted(plans, budget, cache, root, device, monitor, fixed)
        for plan in plans:
            check_plan(plan)
    tasks = []
    for plan, plan_budget in zip(plans, budgets):
        monitor.log(f"== defenses: {plan.base.task} ==")
        tasks.append({**run_defend_task(plan, cache, root, seed, monitor, device), "budget": plan_budget})
    study = {
        "schema": SCHEMA, "kind": "defend", "seed": seed,
        "config": {"plans": [p.to_json() for p in plans], "data_root": str(root), "cache": str(cache.root)},
        "config_hash": config_hash({"plans": [p.to_json() for p in plans], "seed": seed}),
        "environment": {**environment(), "device": device},
        "budget_seconds": budget,
        "seconds": round(time.perf_counter() - t0, 1),
        "tasks": tasks,
    }
    write_report(out, study)
    return study
