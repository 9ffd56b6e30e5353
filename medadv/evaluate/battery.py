"""The attack battery behind ``medadv reproduce``, ``audit`` and ``demo``: clean metrics (Table 1), the
paper's PGD white and black box (Table 2), the rows the talks add (FGSM, Square, HopSkipJump, patch,
universal perturbation), robustness curves over eps, and the smallest eps that breaks the model.

Each row is a ``medadv-results/1`` record from :func:`medadv.evaluate.runner.run_attack`. Non-
differentiable victims (ONNX) get the rows that need no gradients of the victim: transfer from a
surrogate, score-based and label-only attacks.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from medadv.attacks import PAPER, ThreatModel
from medadv.data import ImageSet
from medadv.evaluate.metrics import clinical_metrics
from medadv.evaluate.runner import AttackRun, run_attack
from medadv.models.wrapper import MedicalClassifier
from medadv.progress import SILENT, Monitor


def stratified_subset(data: ImageSet, n: int, seed: int) -> ImageSet:
    """A seeded subset of ``n`` images keeping the class proportions (all images if n >= len)."""
    if n >= len(data):
        return data
    rng = np.random.default_rng(seed)
    picked = []
    for cls in (0, 1):
        idx = np.flatnonzero(data.labels == cls)
        k = int(round(n * len(idx) / len(data)))
        picked.append(rng.permutation(idx)[:k])
    return data.subset(np.sort(np.concatenate(picked)))


@dataclass
class BatteryConfig:
    """What the battery runs, and on how many images (budgets chosen for 2 CPU cores; see BENCHMARKS.md)."""

    rows: tuple[str, ...] = ("pgd_white", "pgd_black", "fgsm", "square", "hsja", "patch", "uap")
    n_images: int = 10_000  # test images for the paper rows (capped at the split)
    n_query_images: int = 64  # Square and HopSkipJump are query-bound: a subset
    n_fit_images: int = 512  # training images the patch and the universal perturbation are fitted on
    query_eps: float = 8 / 255  # eps of the Square, HopSkipJump and universal-perturbation rows
    max_queries: int = 1000
    patch_fraction: float = 0.1
    fit_steps: int | None = None  # optimization steps of the patch and the universal perturbation (None: theirs)
    curve_eps: tuple[float, ...] = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255)
    curve_images: int = 256
    curve_steps: int = 40  # curves and the breaking eps bound robustness from above: a stronger PGD than the paper's
    break_search: tuple[float, ...] = (12 / 255, 16 / 255, 24 / 255, 32 / 255, 48 / 255, 64 / 255)
    examples_per_class: int = 3
    fast: str | None = "fp32"  # FGSM/PGD craft on the accelerated copy (medadv.attacks.fast): same model up to
    # rounding; None crafts on the model as given

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BatteryOutput:
    results: dict[str, Any]
    examples: list[dict[str, Any]] = field(default_factory=list)  # for the figures (arrays, not JSON)


CURVE_PARAMS = {"loss": "margin"}  # the logit margin does not saturate on confident images as cross-entropy does


def _curve_threat(eps: float, steps: int, levels: int) -> ThreatModel:
    # PGD toward the opposite class, step eps/4 (at least one storage level): twice the paper's steps at half
    # its step ratio, so points on the curve are not limited by the step schedule
    return PAPER.with_(eps=eps, step_size=max(eps / 4, 1 / levels), steps=steps, levels=levels)


def _point(eps: float, run: AttackRun | None, data: ImageSet, victim: MedicalClassifier, p: np.ndarray) -> dict:
    if run is None:
        m = clinical_metrics(data.labels, p, victim.threshold)
        return {"eps": eps, "accuracy": m["accuracy"], "auc": m["auc"], "mean_confidence": m["mean_confidence"],
                "flips": {"healthy_to_disease": 0, "disease_to_healthy": 0, "total": 0}, "linf_max": 0.0}
    a = run.results["adversarial"]
    return {"eps": eps, "accuracy": a["accuracy"], "auc": a["auc"], "mean_confidence": a["mean_confidence"],
            "flips": run.results["flips"], "linf_max": run.results["perturbation"]["linf_max"]}


def pick_examples(run: AttackRun, data: ImageSet, per_class: int) -> list[dict[str, Any]]:
    """Images the attack flipped (else any), up to ``per_class`` of each true class, for the figures."""
    thr = run.results["clean"]["threshold"]
    pred_c, pred_a = run.p_clean >= thr, run.p_adv >= thr
    out = []
    for cls in (1, 0):
        idx = np.flatnonzero(data.labels == cls)
        flipped = [i for i in idx if pred_c[i] == cls and pred_a[i] != cls]
        chosen = (flipped + [i for i in idx if i not in flipped])[:per_class]
        for i in chosen:
            out.append({"index": int(i), "id": data.ids[i], "label": int(cls),
                        "clean": data.pixels[i].astype(np.float64) / data.levels,
                        "adv": run.adversarial[i].astype(np.float64) / data.levels,
                        "p_clean": float(run.p_clean[i]), "p_adv": float(run.p_adv[i])})
    return out


def run_battery(victim: MedicalClassifier, test: ImageSet, *, surrogate: MedicalClassifier | None = None,
                train: ImageSet | None = None, config: BatteryConfig | None = None, seed: int = 0,
                differentiable: bool = True, monitor: Monitor = SILENT) -> BatteryOutput:
    """Run the battery on ``test`` and return the ``rows``, ``curves`` and ``breaking_eps`` records."""
    cfg = config or BatteryConfig()
    levels = test.levels
    paper = PAPER.with_(levels=levels)
    from medadv.evaluate.clean import predict

    p_test = predict(victim, test)
    results: dict[str, Any] = {"battery": cfg.to_json(), "clean": clinical_metrics(test.labels, p_test, victim.threshold),
                               "rows": {}, "skipped": {}}
    main = stratified_subset(test, cfg.n_images, seed)
    queries = stratified_subset(test, cfg.n_query_images, seed + 1)
    fit = stratified_subset(train, cfg.n_fit_images, seed + 2) if train is not None else None
    query_threat = paper.with_(eps=cfg.query_eps, step_size=None)
    grad = {"fast": cfg.fast} if cfg.fast else {}
    fit_params = {"steps": cfg.fit_steps} if cfg.fit_steps else {}
    curve_params = {**CURVE_PARAMS, **grad}
    plan = {
        "pgd_white": ("pgd", paper, main, None, grad),
        "pgd_black": ("pgd", paper, main, surrogate, grad),
        "fgsm": ("fgsm", paper.with_(random_start=False), main, None, grad),
        "square": ("square", query_threat, queries, None, {"max_queries": cfg.max_queries}),
        "hsja": ("hsja", query_threat, queries, None, {"max_queries": cfg.max_queries}),
        "patch": ("patch", paper.with_(target="healthy"), main, None, {"patch_fraction": cfg.patch_fraction, **fit_params}),
        "uap": ("uap", query_threat, main, None, fit_params),
    }
    examples: list[dict[str, Any]] = []
    for row in cfg.rows:
        name, threat, data, crafter, params = plan[row]
        if row == "pgd_black" and surrogate is None:
            results["skipped"][row] = "no surrogate"
            continue
        if row in ("pgd_white", "fgsm", "patch", "uap") and not differentiable:
            if surrogate is None:
                results["skipped"][row] = "the victim has no gradients (ONNX) and no surrogate was given"
                continue
            crafter = surrogate  # transfer instead of white box
        if row in ("patch", "uap") and fit is None:
            results["skipped"][row] = "no training images to fit on"
            continue
        monitor.log(f"{row}: {name} on {len(data)} images")
        run = run_attack(name, victim, data, threat, seed=seed, surrogate=crafter, fit_data=fit, params=params,
                         monitor=monitor)
        results["rows"][row] = run.results
        if row == "pgd_white" or (row == "pgd_black" and not examples):
            examples = pick_examples(run, data, cfg.examples_per_class)

    curve_data = stratified_subset(test, cfg.curve_images, seed + 3)
    curves: dict[str, list[dict[str, Any]]] = {"white": [], "black": []}
    kinds = [k for k, ok in (("white", differentiable), ("black", surrogate is not None)) if ok and cfg.curve_eps]
    p_curve = predict(victim, curve_data) if kinds else None
    for kind in kinds:
        crafter = surrogate if kind == "black" else None
        for eps in monitor.track(cfg.curve_eps, f"robustness curve ({kind} box)"):
            run = None if eps == 0 else run_attack("pgd", victim, curve_data, _curve_threat(eps, cfg.curve_steps, levels),
                                                   seed=seed, surrogate=crafter, params=curve_params)
            curves[kind].append(_point(eps, run, curve_data, victim, p_curve))
    results["curves"] = curves
    results["curve_images"] = len(curve_data)
    results["breaking_eps"] = _breaking_eps(victim, curve_data, curves["white"], cfg, levels, seed, curve_params,
                                            differentiable, monitor)
    return BatteryOutput(results, examples)


def _breaking_eps(victim, data, white_curve, cfg, levels, seed, params, differentiable, monitor) -> dict:
    """The smallest eps (on the curve, then on a coarser extension) that brings white-box accuracy <= 1%."""
    for point in white_curve:
        if point["eps"] > 0 and point["accuracy"] <= 0.01:
            return {"eps": point["eps"], "accuracy": point["accuracy"], "searched_to": point["eps"]}
    if not differentiable:
        return {"eps": None, "accuracy": None, "searched_to": None, "note": "no gradients: not searched"}
    last = None
    for eps in monitor.track(cfg.break_search, "smallest eps to <= 1% accuracy"):
        run = run_attack("pgd", victim, data, _curve_threat(eps, cfg.curve_steps, levels), seed=seed,
                         params=params)
        last = (eps, run.results["adversarial"]["accuracy"])
        white_curve.append(_point(eps, run, data, victim, run.p_clean))
        if last[1] <= 0.01:
            return {"eps": eps, "accuracy": last[1], "searched_to": eps}
    return {"eps": None, "accuracy": last[1] if last else None, "searched_to": last[0] if last else None}
