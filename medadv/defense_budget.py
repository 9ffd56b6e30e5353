"""Time budget for the defenses study (``medadv defend --budget 30m``): :mod:`medadv.budget`'s
measure-then-shrink, priced for what ``defend`` runs.

The study trains five models and judges a dozen defenses with an adaptive cascade; on 2 cores the
shipped chest X-ray plan took 71 minutes (BENCHMARKS.md). A budget measures this machine's training
step and attack gradient pass (:func:`medadv.budget.calibrate_config`), prices the plan in those units
(:func:`estimate_defend_seconds`) and shrinks it in :data:`DEFEND_SHRINK_ORDER` until it fits.

The price is an upper bound: every image the non-adaptive PGD leaves standing meets the whole cascade
(transfer, PGD with BPDA/EOT, AutoAttack), and the estimate assumes every image survives it. Training is
priced from what each training defense declares at registration (``cost`` in
:mod:`medadv.defenses.training`), an attack row from the attacks' registered costs, so a new defense or
attack is priced without an edit here.

Layering: this module sits beside :mod:`medadv.budget`, below :mod:`medadv.defense_study`. The study
hands in what it runs (its models' training configurations and its preprocessing rows), so the two
never import each other (the study's ``estimate_seconds`` binds them).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from medadv.attacks.registry import FORWARD_FRACTION, REGISTRY
from medadv.attacks.steps import pgd_step
from medadv.attacks.threat_model import ThreatModel
from medadv.budget import Knob, UnitCosts

# the gradient-masking checks' passes per image at their defaults (medadv.defenses.masking): the input
# gradient, PGD-10 unbounded and on a 3-eps grid, a doubled-steps check, and 100 Square queries
MASKING_PASSES = 1 + 10 + 3 * 10 + 20 + 100 * FORWARD_FRACTION
# an adaptive attack on a detector differentiates the network and the detector's own passes (feature
# squeezing runs the network on each squeezed copy): priced as this many network passes per step
DETECTOR_PASS_FACTOR = 3.0
DETECTOR_FIT_IMAGES = 2000  # the detectors' fitting images (defense_study: stratified_subset(train, 2000))
MIN_DEFEND_IMAGES, MIN_CERTIFY_N, MIN_DEFEND_EPOCHS, MIN_DEFEND_TRAIN = 32, 100, 2, 2000
# What the counted passes leave out (data loading, decisions, metrics, the report). Smaller than the attack
# studies' 0.4 because the rows are priced as if every image survived to the end of the cascade: on the
# chest-xray plan (2-core EPYC, BENCHMARKS.md) the counted stages came to 80 minutes at the machine's
# measured unit costs against 71 minutes of the whole run.
DEFEND_OVERHEAD_FRACTION = 0.1


def _training(configs: Any, costs: UnitCosts, n_train: int) -> float:
    from medadv.defenses.training import training_defense

    total = 0.0
    for cfg in configs:
        crafting, steps = training_defense(cfg.adversarial).cost(cfg) if cfg.adversarial else (0.0, 1.0)
        images = min(n_train, cfg.max_train) if cfg.max_train else n_train
        per_epoch = images * (steps * costs.train_image_s + crafting * costs.grad_image_s)
        if cfg.adversarial:  # robust model selection: PGD at the training eps on validation images each epoch
            per_epoch += cfg.robust_val_images * cfg.adv_steps * costs.grad_image_s
        total += cfg.epochs * per_epoch
    return total


def _row_passes(plan: Any, n: int, *, transfer: bool, draws: int) -> float:
    """Gradient passes of one Defenses row on ``n`` images (every image assumed to survive to the end of
    the cascade); ``draws``: EOT samples per pass for a randomized defense, else 1."""
    r = plan.robust
    passes = 0.0
    for eps in r.eps:
        passes += r.steps * n  # the non-adaptive PGD, on every image
        if transfer:
            passes += r.steps * n  # on the undefended surrogate
        passes += r.adaptive_steps * n * draws
        if r.autoattack:
            threat = ThreatModel(norm="linf", eps=eps, steps=r.adaptive_steps, step_size=pgd_step(eps, r.adaptive_steps),
                                 random_start=True, target="none", levels=255)
            params: dict[str, Any] = {"version": r.autoattack, "max_queries": r.square_queries}
            if r.autoattack_steps:
                params["steps"] = r.autoattack_steps
            passes += REGISTRY["autoattack"].passes(threat, params, n) * draws
    return passes + min(plan.masking_images, n) * MASKING_PASSES * draws


def estimate_defend_seconds(plan: Any, costs: UnitCosts, n_train: int, n_test: int, *,
                            models: dict[str, Any], preprocessing: list[str]) -> dict[str, float]:
    """Seconds per stage of a :class:`~medadv.defense_study.DefendPlan` on this machine: training (every
    model), the Defenses rows, the detectors and the smoothing certificates, plus
    :data:`DEFEND_OVERHEAD_FRACTION`; ``n_train``/``n_test``: the splits' sizes. ``models``: the study's
    models by row name (name -> TrainConfig, the undefended one named ``undefended``); ``preprocessing``:
    its preprocessing defenses' names."""
    g = costs.grad_image_s
    n = min(plan.n_images, n_test)
    noise = any(cfg.noise_sigma > 0 for cfg in models.values())
    rows = sum(_row_passes(plan, n, transfer=name != "undefended", draws=1) for name in models)
    rows += len(preprocessing) * _row_passes(plan, n, transfer=True, draws=1)
    if noise:  # the noise-trained model with noise at inference, attacked with EOT
        rows += _row_passes(plan, n, transfer=True, draws=plan.robust.eot_samples)
    detect = len(plan.detectors) * (
        len(plan.detect_eps) * n * (plan.robust.steps + DETECTOR_PASS_FACTOR * plan.robust.adaptive_steps)
        + (DETECTOR_FIT_IMAGES + plan.detect_calibration) * FORWARD_FRACTION)
    certify = n * (plan.certify["n0"] + plan.certify["n"]) * FORWARD_FRACTION if noise else 0.0
    stages = {"training": _training(models.values(), costs, n_train), "defenses": rows * g, "detectors": detect * g,
              "certify": certify * g}
    stages["overhead"] = DEFEND_OVERHEAD_FRACTION * sum(stages.values())
    stages["total"] = sum(stages.values())
    return stages


def _trained_field(name: str) -> tuple[Any, Any]:
    """A knob on the training defenses' own TrainConfig field (``trained_overrides``): read as in effect,
    written capped, never raised. The undefended model keeps its plan: it is cheap (a fifth of the
    training time), it is the transfer attacks' surrogate, and an undertrained one reads as robust (a
    2-epoch, 2,000-image undefended ResNet-18 kept 53% at 8/255 on 32 images, where the planned one keeps
    2%), which would hide what adversarial training buys."""

    def read(p: Any, n_train: int, n_test: int) -> int:
        value = p.trained_overrides.get(name, getattr(p.base, name)) or n_train
        return min(value, n_train) if name == "max_train" else value

    def write(p: Any, value: int) -> Any:
        current = p.trained_overrides.get(name, getattr(p.base, name))
        return replace(p, trained_overrides={**p.trained_overrides, name: value if not current else min(current, value)})

    return read, write


DEFEND_KNOBS = {k.name: k for k in (
    Knob("n_images", lambda p, n_train, n_test: min(p.n_images, n_test), lambda p, v: replace(p, n_images=v)),
    Knob("certify_n", lambda p, n_train, n_test: p.certify["n"],
         lambda p, v: replace(p, certify={**p.certify, "n": v})),
    Knob("max_train", *_trained_field("max_train")),
    Knob("epochs", *_trained_field("epochs")),
)}

# What is worth most: the judged images down to 64, the certificates' samples, the training defenses'
# images down to 2,000, the judged images down to 32 (paired on the same images, the defenses still
# compare), then the training defenses' epochs down to 2. It stops there: below those floors the models are not what the study is about (PGD-AT
# for 2 epochs on 2,048 PneumoniaMNIST images read 85.7% clean and 70% under AutoAttack in the ART
# comparison, BENCHMARKS.md; one epoch on 1,000 images is 8 optimizer steps), so a budget that cannot be
# met at the floors runs the floors and says it may exceed, rather than judging untrained models. The
# adaptive cascade itself is never weakened to fit.
DEFEND_SHRINK_ORDER: tuple[tuple[str, int], ...] = (
    ("n_images", 64), ("certify_n", MIN_CERTIFY_N), ("max_train", MIN_DEFEND_TRAIN), ("n_images", MIN_DEFEND_IMAGES),
    ("epochs", MIN_DEFEND_EPOCHS),
)
