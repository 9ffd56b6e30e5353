"""Time budgets for studies: measure this machine's throughput, then size a plan to fit.

A demo that takes 6.5 minutes on a quiet 2-core machine took 37.5 on a busy AVX2-only one. Rather than
fix image counts and epochs, ``demo`` and ``reproduce`` take ``--budget`` (``8m``, ``90s``, ``1h``): before
training, :func:`calibrate` times a few real training steps and input-gradient passes of the plan's
network on its own data, :func:`estimate_seconds` turns the plan into a count of those units, and
:func:`fit_plan` shrinks the plan (curve images, then attacked images, then the fitted and query-bound
attacks' budgets, then training images, then epochs, in that order (:data:`SHRINK_ORDER`), because the
headline rows matter more than the curves and an undertrained victim changes the story most) until the
estimate fits. What was chosen, and why, is recorded in results.json and the report.

The estimate is a model, not a promise: it counts gradient passes, adds ``OVERHEAD_FRACTION`` for what
they leave out, and plans are fitted to ``SAFETY`` of the budget. Each battery row is priced by the attack
it runs, from what that attack declares at registration (``cost``, ``fit_cost`` in
:mod:`medadv.attacks.registry`), so a new attack is priced without an edit here.

Layering: this module sits below :mod:`medadv.study`. It takes any plan with ``train`` (a TrainConfig),
``battery`` (a BatteryConfig) and ``caveats`` (:class:`Plan`), and the study passes in how a plan is
resolved against the data root, so the two never import each other.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from medadv.attacks.registry import REGISTRY
from medadv.errors import MedadvError
from medadv.evaluate.battery import BatteryConfig, plan_battery
from medadv.models.train import TrainConfig


class Plan(Protocol):
    """What the budget reads of a study's plan (:class:`medadv.study.TaskPlan` is one); a dataclass, so
    :func:`dataclasses.replace` makes the smaller plans."""

    train: TrainConfig
    battery: BatteryConfig
    caveats: tuple[str, ...]
    surrogate_overrides: dict[str, Any]  # the surrogate's own TrainConfig fields (its epochs, its images)


TaskPlan = TypeVar("TaskPlan", bound=Plan)
P = TypeVar("P")  # any plan dataclass the knobs read and write

SAFETY = 0.8  # plan to this fraction of the budget: headroom for a machine that gets busier mid-run
# What the gradient count leaves out (data loading and augmentation, validation passes, metrics, figures,
# the report): on the development machine the demo took 390 s against 283 s of counted passes.
OVERHEAD_FRACTION = 0.4
MIN_IMAGES, MIN_CURVE_IMAGES, MIN_EPOCHS = 64, 32, 1
# the fitted and query-bound rows' floors, and the fewest training images a pretrained network is fine-tuned on
MIN_FIT_STEPS, MIN_FIT_IMAGES, MIN_QUERIES, MIN_QUERY_IMAGES, MIN_TRAIN = 50, 32, 200, 16, 1000

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_budget(text: str) -> float:
    """``"8m"`` -> 480.0 seconds; accepts s, m and h suffixes (a bare number is seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text or "")
    if not match or float(match.group(1)) <= 0:
        raise MedadvError(f"--budget {text!r} is not a positive duration.", "pass e.g. --budget 8m, 90s or 1h.")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per image on this machine: one training step (forward, backward, update) and one
    forward + input-gradient pass (an attack step) of the plan's network."""

    train_image_s: float
    grad_image_s: float

    def to_json(self) -> dict[str, float]:
        return {"train_image_s": self.train_image_s, "grad_image_s": self.grad_image_s}


def calibrate(plan: TaskPlan, data_root, device: str = "cpu", repeats: int = 3) -> UnitCosts:
    """Time ``repeats`` training steps and attack gradient passes of ``plan``'s network on its first
    training batch (median, after one warm-up each), as the study will run them."""
    return calibrate_config(plan.train, data_root, device, repeats)


def calibrate_config(cfg: TrainConfig, data_root, device: str = "cpu", repeats: int = 3) -> UnitCosts:
    """:func:`calibrate` for one training configuration (the defenses study's base model)."""
    import torch

    from medadv.data import get_task, load_split
    from medadv.models.recipes import pick_recipe
    from medadv.models.train import build_classifier

    task = get_task(cfg.task)
    data = load_split(task, "train", data_root=data_root, source=cfg.source, size=cfg.size, file_size=cfg.data_size)
    n = min(cfg.batch_size, len(data))
    x = data.subset(list(range(n))).tensor().to(device)
    y = torch.as_tensor(data.labels[:n], dtype=torch.long, device=device)
    model = build_classifier(replace(cfg, pretrained=None), data.channels, task.class_names).to(device)
    optimizer = pick_recipe(cfg.recipe, cfg.pretrained is not None).make_optimizer(model.parameters())
    loss_fn = torch.nn.CrossEntropyLoss()

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    def grad_pass() -> None:
        xa = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(model(xa), y), xa)
        del grad

    def median_seconds(fn) -> float:
        fn()  # warm-up: allocator and kernel selection
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    model.train()
    train_s = median_seconds(train_step)
    model.eval()
    grad_s = median_seconds(grad_pass)
    return UnitCosts(train_image_s=train_s / n, grad_image_s=grad_s / n)


def row_passes(battery: BatteryConfig, n_main: int, n_query: int) -> dict[str, float]:
    """Gradient-pass equivalents of each battery row (key -> passes), priced by the attack each row runs
    (its registered ``cost`` per attacked image and ``fit_cost``) under the row's own threat model and
    options; every row is priced as if it runs (a surrogate and training images present)."""
    out = {}
    for row in plan_battery(battery, 255, surrogate=True, fit=True, differentiable=True):
        n = n_main if row.images == "main" else n_query
        out[row.key] = REGISTRY[row.attack].passes(row.threat, row.params, n, battery.n_fit_images)
    return out


def estimate_seconds(plan: TaskPlan, costs: UnitCosts, n_train: int, n_test: int) -> dict[str, float]:
    """Seconds per stage of ``plan`` (victim and surrogate training, the battery rows, the curves);
    ``n_train`` is the training split's size (the plan's ``max_train`` caps it here)."""
    b = plan.battery
    n_main = min(b.n_images, n_test)
    n_query = min(b.n_query_images, n_test)
    n_curve = min(b.curve_images, n_test)
    g = costs.grad_image_s
    # victim and surrogate, each at its own epochs and images (a plan may give the attacker less), both
    # at the victim's measured cost per training image
    surrogate = replace(plan.train, **plan.surrogate_overrides)
    images = sum(cfg.epochs * (min(n_train, cfg.max_train) if cfg.max_train else n_train)
                 for cfg in (plan.train, surrogate))
    stages = {"training": images * costs.train_image_s}
    stages["attacks"] = sum(row_passes(b, n_main, n_query).values()) * g
    nonzero = [e for e in b.curve_eps if e > 0]
    kinds = 2 if "pgd_black" in b.rows else 1
    # the curves, plus two points of the breaking-eps search (it stops early once accuracy is <= 1%)
    stages["curves"] = (kinds * len(nonzero) + (2 if b.break_search else 0)) * n_curve * b.curve_steps * g
    stages["overhead"] = OVERHEAD_FRACTION * sum(stages.values())
    stages["total"] = sum(stages.values())
    return stages


@dataclass(frozen=True)
class Knob:
    """One size the budget may shrink: how to read it off a plan (the value in effect, capped by the
    data) and how to set it. Its name is the plan field it sets."""

    name: str
    read: Callable[[Any, int, int], int]  # (plan, n_train, n_test) -> value in effect
    write: Callable[[Any, int], Any]  # (plan, value) -> plan

    def shrink(self, value: int, floor: int) -> int:
        return max(floor, value - 1 if self.name == "epochs" else math.ceil(value / 2))


def _battery_knob(name: str, default: int | None = None, cap_by_test: bool = False) -> Knob:
    def read(p: Any, n_train: int, n_test: int) -> int:
        value = getattr(p.battery, name) or default
        return min(value, n_test) if cap_by_test else value
    return Knob(name, read, lambda p, v: replace(p, battery=replace(p.battery, **{name: v})))


KNOBS = {k.name: k for k in (
    _battery_knob("curve_images", cap_by_test=True),
    _battery_knob("n_images", cap_by_test=True),
    # the fitted rows (patch, universal perturbation) and the query-bound rows (Square, HopSkipJump); a
    # plan that leaves fit_steps unset uses the attacks' own (at most 300)
    _battery_knob("fit_steps", default=300),
    _battery_knob("n_fit_images"),
    _battery_knob("max_queries"),
    _battery_knob("n_query_images", cap_by_test=True),
    Knob("max_train", lambda p, n_train, n_test: min(p.train.max_train or n_train, n_train),
         lambda p, v: replace(p, train=replace(p.train, max_train=v))),
    Knob("epochs", lambda p, n_train, n_test: p.train.epochs, lambda p, v: replace(p, train=replace(p.train, epochs=v))),
)}

# The order says what is worth most, and each step's floor: curves first, then the attacked images, then
# the fitted and query-bound attacks' own budgets, then the training images (a pretrained network
# fine-tunes well on a thousand), then epochs (an undertrained victim changes the story most), and last
# the curves and the attacked images down to their minimum.
SHRINK_ORDER: tuple[tuple[str, int], ...] = (
    ("curve_images", MIN_CURVE_IMAGES * 2), ("n_images", MIN_IMAGES * 2),
    ("fit_steps", MIN_FIT_STEPS), ("n_fit_images", MIN_FIT_IMAGES), ("max_queries", MIN_QUERIES),
    ("n_query_images", MIN_QUERY_IMAGES),
    ("max_train", MIN_TRAIN), ("epochs", MIN_EPOCHS),
    ("curve_images", MIN_CURVE_IMAGES), ("n_images", MIN_IMAGES),
)


def apply_sizing(plan: P, sizes: dict[str, int], knobs: dict[str, Knob] = KNOBS) -> P:
    """``plan`` with the sizes a budget record chose (:func:`fit_plan`'s ``record["plan"]``)."""
    for name, value in sizes.items():
        plan = knobs[name].write(plan, value)
    return plan


# (plan, unit costs, n_train, n_test) -> seconds per stage, with "total"
Estimate = Callable[[Any, UnitCosts, int, int], dict[str, float]]


def fit_plan(plan: P, seconds: float, costs: UnitCosts, n_train: int, n_test: int, *,
             estimate: Estimate = estimate_seconds, knobs: dict[str, Knob] = KNOBS,
             order: tuple[tuple[str, int], ...] = SHRINK_ORDER) -> tuple[P, dict[str, Any]]:
    """``plan`` shrunk until its estimate fits ``SAFETY * seconds``, and the record of what was chosen;
    ``n_train``: the training split's size. ``estimate``, ``knobs`` and ``order`` default to the attack
    studies' (:func:`estimate_seconds`, :data:`KNOBS`, :data:`SHRINK_ORDER`); the defenses study passes
    its own (:mod:`medadv.defense_budget`)."""
    target = SAFETY * seconds
    original = estimate(plan, costs, n_train, n_test)
    steps_taken: list[str] = []

    def fits(p: P) -> bool:
        return estimate(p, costs, n_train, n_test)["total"] <= target

    current = plan
    changed: dict[str, int] = {}
    for name, floor in order:
        knob = knobs[name]
        while not fits(current) and knob.read(current, n_train, n_test) > floor:
            value = knob.read(current, n_train, n_test)
            smaller = knob.shrink(value, floor)
            current = knob.write(current, smaller)
            changed[name] = smaller
            steps_taken.append(f"{name} {value} -> {smaller}")
    final = estimate(current, costs, n_train, n_test)
    record = {
        "seconds": seconds,
        "safety": SAFETY,
        "unit_costs": costs.to_json(),
        "estimate_s": {"as_planned": round(original["total"], 1), "chosen": round(final["total"], 1),
                       "stages": {k: round(v, 1) for k, v in final.items() if k != "total"}},
        "changes": steps_taken,
        # what the run will use (capped at the splits) ...
        "chosen": {name: knob.read(current, n_train, n_test) for name, knob in knobs.items()},
        # ... and the plan's fields that changed, so a resumed run rebuilds exactly this plan (and its cache keys)
        "plan": changed,
        "fits": final["total"] <= target,
    }
    return current, record


def caveat(record: dict[str, Any]) -> str | None:
    """The report's sentence on a budget that changed the plan (None when it did not)."""
    if not record["changes"]:
        return None
    text = (f"Sized to a {record['seconds'] / 60:.1f}-minute budget from this machine's measured throughput: "
            + "; ".join(record["changes"]) + ".")
    if not record["fits"]:
        text += (f" Even the smallest plan was estimated at {record['estimate_s']['chosen'] / 60:.1f} minutes; "
                 "the run may exceed its budget.")
    return text


def fit_study(plans: list[TaskPlan], seconds: float, data_root, device: str = "cpu", monitor=None, *,
              resolve: Callable[[TaskPlan], TaskPlan] = lambda plan: plan
              ) -> tuple[list[TaskPlan], list[dict[str, Any]]]:
    """Each plan sized to its share of ``seconds`` (shares in proportion to the plans' own estimates on
    this machine), with one budget record per plan. ``resolve(plan)``: the plan reading the data it will
    read (the study's ``fit_to_data``), measured as it will run. The plans keep their data choices
    (run_task makes them); only epochs and image counts change."""
    from medadv.data import get_task, load_split

    measured = []
    for plan in plans:
        resolved = resolve(plan).train
        task = get_task(resolved.task)
        read = dict(data_root=data_root, source=resolved.source, size=resolved.size, file_size=resolved.data_size)
        n_train = len(load_split(task, "train", **read))
        n_test = len(load_split(task, "test", **read))
        costs = calibrate(replace(plan, train=resolved), data_root, device)
        measured.append((costs, n_train, n_test, estimate_seconds(plan, costs, n_train, n_test)["total"]))
        if monitor is not None:
            monitor.log(f"budget: {resolved.task} measured {costs.train_image_s * 1e3:.2f} ms per training image, "
                        f"{costs.grad_image_s * 1e3:.2f} ms per attack gradient per image")
    whole = sum(m[3] for m in measured) or 1.0
    fitted, records = [], []
    for plan, (costs, n_train, n_test, planned) in zip(plans, measured):
        share = seconds * planned / whole
        new_plan, record = fit_plan(plan, share, costs, n_train, n_test)
        record["study_seconds"] = seconds
        note = caveat(record)
        if note:
            new_plan = replace(new_plan, caveats=(*new_plan.caveats, note))
        if monitor is not None:
            monitor.log(f"budget: {plan.train.task} gets {share / 60:.1f} min; estimated "
                        f"{record['estimate_s']['chosen'] / 60:.1f} min"
                        + (f" after {'; '.join(record['changes'])}" if record["changes"] else " as planned"))
        fitted.append(new_plan)
        records.append(record)
    return fitted, records
