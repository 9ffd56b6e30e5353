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

from medadv.attacks import PAPER, REGISTRY, Access, ThreatModel, row_title
from medadv.attacks.steps import pgd_step
from medadv.data import ImageSet
from medadv.errors import MedadvError
from medadv.evaluate.clean import kind_metrics
from medadv.evaluate.runner import AttackRun, run_attack
from medadv.models.wrapper import MedicalClassifier
from medadv.progress import SILENT, Monitor


def stratified_subset(data: ImageSet, n: int, seed: int) -> ImageSet:
    """A seeded subset of ``n`` images keeping the class proportions (all images if n >= len); a
    multi-label set keeps the proportion of images with some finding against those with none; a segmentation
    set (masks, no class) is a seeded random subset."""
    if n >= len(data):
        return data
    rng = np.random.default_rng(seed)
    if data.labels.ndim == 3:
        return data.subset(np.sort(rng.permutation(len(data))[:n]))
    picked = []
    strata = data.labels if data.labels.ndim == 1 else (data.labels == 1).any(1).astype(np.int64)
    for cls in range(max(2, int(strata.max()) + 1)):  # every class of the task kind (binary: 0, 1)
        idx = np.flatnonzero(strata == cls)
        k = int(round(n * len(idx) / len(data)))
        picked.append(rng.permutation(idx)[:k])
    return data.subset(np.sort(np.concatenate(picked)))


@dataclass
class BatteryConfig:
    """What the battery runs, and on how many images (budgets chosen for 2 CPU cores; see BENCHMARKS.md)."""

    rows: tuple[str, ...] = field(default_factory=lambda: default_rows())
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


# The rows with the paper's fixed settings (plan_battery's ``special``), in the order of its table; any other
# registered attack name is a row too, with settings derived from its access kind.
PAPER_ROWS = ("pgd_white", "pgd_black", "fgsm", "square", "hsja", "patch", "uap")


def default_rows() -> tuple[str, ...]:
    """Every row a registered attack adds to the default battery (``register(..., battery=...)``): the
    paper's rows in the order of its table, then the others in registration order."""
    rows = [row for s in REGISTRY.values() for row in s.battery]
    return tuple(sorted(dict.fromkeys(rows), key=lambda r: PAPER_ROWS.index(r) if r in PAPER_ROWS else len(PAPER_ROWS)))


def known_rows() -> tuple[str, ...]:
    """Every row name the battery accepts: the paper's rows and every registered attack."""
    return (*PAPER_ROWS, *(n for n in REGISTRY if n not in PAPER_ROWS))


def row_attack(key: str) -> str:
    """The registered attack a battery row runs (``pgd_white`` -> ``pgd``)."""
    return {"pgd_white": "pgd", "pgd_black": "pgd"}.get(key, key)


def needs_fit(rows: tuple[str, ...] | list[str]) -> bool:
    """Whether any of ``rows`` runs an attack fitted on training images (the registry's ``needs_fit``)."""
    return any(REGISTRY[row_attack(r)].needs_fit for r in rows if row_attack(r) in REGISTRY)


@dataclass(frozen=True)
class PlannedRow:
    """One battery row before it runs: which attack, under which threat model, on which images
    (``main`` or the ``queries`` subset), crafted on the ``victim`` or the ``surrogate``."""

    key: str
    attack: str
    threat: ThreatModel
    images: str  # main | queries
    crafter: str  # victim | surrogate
    params: dict[str, Any]
    skip: str | None = None  # why it will not run

    @property
    def title(self) -> str:
        """The report's title for this row, derived from the attack and its own threat model."""
        return row_title(self.attack, self.threat, access="transfer" if self.crafter == "surrogate" else None,
                         params=self.params)


def plan_battery(cfg: BatteryConfig, levels: int, *, surrogate: bool, fit: bool,
                 differentiable: bool) -> list[PlannedRow]:
    """What :func:`run_battery` runs for ``cfg.rows``: the paper's rows (fixed settings) and, for any other
    registered attack name, a row built from its access kind (white-box and universal rows on the main
    images under the paper's threat model; score and label rows on the query subset at the query eps,
    with ``cfg.max_queries`` when the attack takes it)."""
    paper = PAPER.with_(levels=levels)
    query_threat = paper.with_(eps=cfg.query_eps, step_size=None)
    grad = {"fast": cfg.fast} if cfg.fast else {}
    fit_params = {"steps": cfg.fit_steps} if cfg.fit_steps else {}
    special = {
        "pgd_white": ("pgd", paper, "main", "victim", grad),
        "pgd_black": ("pgd", paper, "main", "surrogate", grad),
        "fgsm": ("fgsm", paper.with_(random_start=False), "main", "victim", grad),
        "square": ("square", query_threat, "queries", "victim", {"max_queries": cfg.max_queries}),
        "hsja": ("hsja", query_threat, "queries", "victim", {"max_queries": cfg.max_queries}),
        "patch": ("patch", paper.with_(target="healthy"), "main", "victim",
                  {"patch_fraction": cfg.patch_fraction, **fit_params}),
        "uap": ("uap", query_threat, "main", "victim", fit_params),
    }
    plan = []
    for key in cfg.rows:
        if key in special:
            name, threat, images, crafter, params = special[key]
        elif key in REGISTRY:
            name, kind, takes = key, REGISTRY[key].kind, REGISTRY[key].params
            params, crafter = {}, "victim"
            if kind in (Access.SCORE, Access.LABEL):
                threat, images = query_threat, "queries"
                if "max_queries" in takes:
                    params["max_queries"] = cfg.max_queries
            else:
                threat, images = paper, "main"
                if REGISTRY[key].needs_fit:
                    params.update({k: v for k, v in fit_params.items() if k in takes})
        else:
            raise MedadvError(f"unknown battery row '{key}'.",
                              f"use {', '.join(PAPER_ROWS)} or a registered attack ({', '.join(REGISTRY)}).")
        spec = REGISTRY[name]
        if spec.norm is not None:
            threat = threat.with_(norm=spec.norm)
        universal = spec.kind is Access.UNIVERSAL
        fitted = spec.needs_fit
        skip = None
        if crafter == "surrogate" and not surrogate:
            skip = "no surrogate"
        elif (spec.kind is Access.WHITE_BOX or universal) and not differentiable:
            if surrogate:
                crafter = "surrogate"  # transfer instead of white box
            else:
                skip = "the victim has no gradients (ONNX) and no surrogate was given"
        if skip is None and fitted and not fit:
            skip = "no training images to fit on"
        plan.append(PlannedRow(key, name, threat, images, crafter, dict(params), skip))
    return plan


CURVE_PARAMS = {"loss": "margin"}  # the logit margin does not saturate on confident images as cross-entropy does


def _curve_threat(eps: float, steps: int, levels: int) -> ThreatModel:
    # PGD toward the opposite class, medadv's step rule with a floor of one storage level (eps/4 for the
    # curves' 20-40 steps): twice the paper's steps at half its step ratio, so points on the curve are not
    # limited by the step schedule
    return PAPER.with_(eps=eps, step_size=pgd_step(eps, steps, floor=1 / levels), steps=steps, levels=levels)


def _point(eps: float, run: AttackRun | None, data: ImageSet, victim: MedicalClassifier, p: np.ndarray) -> dict:
    # "auc" on a curve: the binary AUC, or a multi-class model's (a reader's) macro AUC; a reader's point
    # adds the sensitivity of its "any finding" decision, which its curves (hide every finding) drive down
    if run is None:
        m = kind_metrics(victim, data.labels, p)
        point = {"eps": eps, "accuracy": m["accuracy"], "auc": m.get("auc", m.get("macro_auc")),
                 "mean_confidence": m["mean_confidence"],
                 "flips": {"healthy_to_disease": 0, "disease_to_healthy": 0, "total": 0}, "linf_max": 0.0}
    else:
        m = run.results["adversarial"]
        point = {"eps": eps, "accuracy": m["accuracy"], "auc": m.get("auc", m.get("macro_auc")),
                 "mean_confidence": m["mean_confidence"],
                 "flips": run.results["flips"], "linf_max": run.results["perturbation"]["linf_max"]}
    if "any_finding" in m:
        point["any_finding_sensitivity"] = m["any_finding"]["sensitivity"]
    return point


def _broken(point: dict) -> bool:
    """The breaking criterion: accuracy <= 1%; a reader's: its "any finding" sensitivity <= 1% (the abnormal
    images read "no finding"; its exact-match accuracy is often near 0 before any attack)."""
    if "any_finding_sensitivity" in point:
        return point["any_finding_sensitivity"] is not None and point["any_finding_sensitivity"] <= 0.01
    return point["accuracy"] <= 0.01


def pick_examples(run: AttackRun, data: ImageSet, per_class: int) -> list[dict[str, Any]]:
    """Images the attack flipped (else any), up to ``per_class`` of each true class, for the figures.

    Binary examples carry P(disease); multi-class ones (scores N×K) carry their decisions (``pred_clean``,
    ``pred_adv``) and the probability of each decided class."""
    if "per_finding" in run.results["clean"]:
        return _finding_examples(run, data, per_class)
    multiclass = run.p_clean.ndim == 2
    if multiclass:
        pred_c, pred_a = run.p_clean.argmax(1), run.p_adv.argmax(1)
        classes = range(run.p_clean.shape[1] - 1, -1, -1)  # the most severe first, as binary shows disease first
    else:
        thr = run.results["clean"]["threshold"]
        pred_c, pred_a = run.p_clean >= thr, run.p_adv >= thr
        classes = (1, 0)
    out = []
    for cls in classes:
        idx = np.flatnonzero(data.labels == cls)
        flipped = [i for i in idx if pred_c[i] == cls and pred_a[i] != cls]
        chosen = (flipped + [i for i in idx if i not in flipped])[:per_class]
        for i in chosen:
            ex = {"index": int(i), "id": data.ids[i], "label": int(cls),
                  "clean": data.pixels[i].astype(np.float64) / data.levels,
                  "adv": run.adversarial[i].astype(np.float64) / data.levels}
            if multiclass:
                ex |= {"pred_clean": int(pred_c[i]), "pred_adv": int(pred_a[i]),
                       "p_clean": float(run.p_clean[i, pred_c[i]]), "p_adv": float(run.p_adv[i, pred_a[i]])}
            else:
                ex |= {"p_clean": float(run.p_clean[i]), "p_adv": float(run.p_adv[i])}
            out.append(ex)
    return out


def _finding_examples(run: AttackRun, data: ImageSet, per_class: int) -> list[dict[str, Any]]:
    """A multi-label reader's examples: abnormal images (some true finding) first, then normal ones, each
    preferring the images whose report the attack changed most; with every finding's probability before
    and after, its threshold and its true label (the figure draws them side by side)."""
    thresholds = np.asarray(run.results["clean"]["thresholds"])
    before, after = run.p_clean >= thresholds, run.p_adv >= thresholds
    changed = (before != after).sum(1)
    abnormal = (data.labels == 1).any(1)
    out = []
    for group, label in ((abnormal, 1), (~abnormal, 0)):
        idx = np.flatnonzero(group)
        for i in idx[np.argsort(-changed[idx], kind="stable")][:per_class]:
            out.append({"index": int(i), "id": data.ids[i], "label": label,
                        "clean": data.pixels[i].astype(np.float64) / data.levels,
                        "adv": run.adversarial[i].astype(np.float64) / data.levels,
                        "findings": list(run.results["clean"]["findings"]), "thresholds": thresholds.tolist(),
                        "truth": data.labels[i].tolist(), "probs_clean": run.p_clean[i].tolist(),
                        "probs_adv": run.p_adv[i].tolist(), "changed": int(changed[i])})
    return out


def _for_kind(threat: ThreatModel, victim: MedicalClassifier) -> ThreatModel:
    """A row's threat model for the victim's task kind. A multi-label reader's paper rows hide every finding
    (the image reads "no finding": the clinically first harm) where a classifier's go to the opposite class."""
    spec = victim.spec
    if getattr(spec, "kind", "binary") != "multilabel" or threat.target != "opposite":
        return threat
    return threat.with_(target="hide", kind="multilabel", classes=len(spec.class_names))


def run_battery(victim: MedicalClassifier, test: ImageSet, *, surrogate: MedicalClassifier | None = None,
                train: ImageSet | None = None, config: BatteryConfig | None = None, seed: int = 0,
                differentiable: bool = True, monitor: Monitor = SILENT,
                clean_scores: np.ndarray | None = None) -> BatteryOutput:
    """Run the battery on ``test`` and return the ``rows``, ``curves`` and ``breaking_eps`` records.
    ``clean_scores``: the victim's scores on all of ``test`` when the caller has them (Table 1's)."""
    cfg = config or BatteryConfig()
    levels = test.levels
    from medadv.evaluate.clean import checked_scores, predict

    p_test = predict(victim, test) if clean_scores is None else checked_scores(clean_scores, test)
    results: dict[str, Any] = {"battery": cfg.to_json(), "clean": kind_metrics(victim, test.labels, p_test),
                               "rows": {}, "skipped": {}}
    main = stratified_subset(test, cfg.n_images, seed)
    queries = stratified_subset(test, cfg.n_query_images, seed + 1)
    fit = stratified_subset(train, cfg.n_fit_images, seed + 2) if train is not None else None
    grad = {"fast": cfg.fast} if cfg.fast else {}
    curve_params = {**CURVE_PARAMS, **grad}
    subsets = {"main": main, "queries": queries}
    plan = plan_battery(cfg, levels, surrogate=surrogate is not None, fit=fit is not None,
                        differentiable=differentiable)
    examples: list[dict[str, Any]] = []
    for row in plan:
        if row.skip is not None:
            results["skipped"][row.key] = row.skip
            continue
        data = subsets[row.images]
        crafter = surrogate if row.crafter == "surrogate" else None
        monitor.log(f"{row.key}: {row.attack} on {len(data)} images")
        run = run_attack(row.attack, victim, data, _for_kind(row.threat, victim), seed=seed, surrogate=crafter,
                         fit_data=fit, params=dict(row.params), monitor=monitor)
        results["rows"][row.key] = run.results
        if row.key == "pgd_white" or (row.key == "pgd_black" and not examples):
            examples = pick_examples(run, data, cfg.examples_per_class)

    # the curves' eps-0 point must be comparable with Table 2: when the curves may use as many images as
    # the paper rows (always under `audit --limit N` with N <= curve_images), they use the same images
    if cfg.curve_images >= len(main):
        curve_data, curve_subset = main, "the images of the paper rows (Table 2)"
    else:
        curve_data = stratified_subset(test, cfg.curve_images, seed + 3)
        curve_subset = (f"a separate seeded, class-stratified subset of {len(curve_data)} test images "
                        f"(the paper rows use {len(main)})")
    curves: dict[str, list[dict[str, Any]]] = {"white": [], "black": []}
    kinds = [k for k, ok in (("white", differentiable), ("black", surrogate is not None)) if ok and cfg.curve_eps]
    p_curve = predict(victim, curve_data) if kinds else None
    for kind in kinds:
        crafter = surrogate if kind == "black" else None
        for eps in monitor.track(cfg.curve_eps, f"robustness curve ({kind} box)"):
            run = None if eps == 0 else run_attack("pgd", victim, curve_data,
                                                   _for_kind(_curve_threat(eps, cfg.curve_steps, levels), victim),
                                                   seed=seed, surrogate=crafter, params=curve_params)
            curves[kind].append(_point(eps, run, curve_data, victim, p_curve))
    results["curves"] = curves
    results["curve_images"] = len(curve_data)
    results["curve_subset"] = curve_subset
    results["breaking_eps"] = _breaking_eps(victim, curve_data, curves["white"], cfg, levels, seed, curve_params,
                                            differentiable, monitor)
    return BatteryOutput(results, examples)


def _breaking_eps(victim, data, white_curve, cfg, levels, seed, params, differentiable, monitor) -> dict:
    """The smallest eps (on the curve, then on a coarser extension) that brings white-box accuracy <= 1% (a
    reader: its "any finding" sensitivity, see :func:`_broken`)."""
    reader = getattr(victim.spec, "kind", "binary") == "multilabel"
    extra = {"criterion": "any-finding sensitivity <= 1% (every abnormal image reads 'no finding')"} if reader else {}
    for point in white_curve:
        if point["eps"] > 0 and _broken(point):
            return {"eps": point["eps"], "accuracy": point["accuracy"], "searched_to": point["eps"], **extra}
    if not differentiable:
        return {"eps": None, "accuracy": None, "searched_to": None, "note": "no gradients: not searched"}
    last = None
    for eps in monitor.track(cfg.break_search, "smallest eps to <= 1% accuracy"):
        run = run_attack("pgd", victim, data, _for_kind(_curve_threat(eps, cfg.curve_steps, levels), victim),
                         seed=seed, params=params)
        last = (eps, run.results["adversarial"]["accuracy"])
        white_curve.append(_point(eps, run, data, victim, run.p_clean))
        if _broken(white_curve[-1]):
            return {"eps": eps, "accuracy": last[1], "searched_to": eps, **extra}
    return {"eps": None, "accuracy": last[1] if last else None, "searched_to": last[0] if last else None, **extra}
