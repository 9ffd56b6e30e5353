"""Training-step hooks for robust training: PGD-AT, TRADES, fast FGSM-AT and Gaussian noise augmentation.

``make_step_loss(...)`` returns the loss one training step minimizes, given the model (in train mode),
a batch ``x`` (N×C×H×W in [0, 1], already augmented), its soft targets (N×2; one-hot, or mixed by mixup)
and hard labels ``y`` (N); the generator must be on x's device. :mod:`medadv.models.train` calls it instead of plain cross-entropy when the
training configuration names a defense, and records that configuration in the checkpoint.

Units: eps and step sizes are in stored-pixel [0, 1] units (4/255 is four grey levels of an 8-bit file),
the same unit every attack's threat model uses. Adversarial examples are crafted with the model in eval
mode and its parameters frozen (the attacks' own loop, :func:`medadv.attacks.gradient.ascend`), so the
crafting passes neither update BatchNorm statistics nor form weight gradients.

* ``pgd`` (Madry et al. 2018): minimize CE on the worst case of ``steps`` PGD steps (step 2.5·eps/steps,
  random start) inside the L-inf eps-ball.
* ``trades`` (Zhang et al. 2019): CE on the clean image + β·KL(p(x) ‖ p(x')), x' maximizing the KL.
* ``fast`` (Wong, Rice and Kolter 2020): one FGSM step of 1.25·eps from a uniform random start.
* ``noise_sigma`` > 0 (Cohen et al. 2019): Gaussian noise N(0, σ²) on the input before the step, the
  training that randomized smoothing needs; it combines with the methods above (noise first).

Each training defense is registered (:data:`TRAINING_DEFENSES`, :func:`register_training`) with its report
title, its step loss and the training-configuration fields it sets; the defenses study, ``--adversarial``'s
check and :func:`make_step_loss` read the registry, so adding one is one registration. PGD steps follow
medadv's one step rule (:func:`medadv.attacks.steps.pgd_step`) and the ball is the geometry's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medadv.errors import MedadvError

# (model, x, soft_target, y, generator) -> scalar loss to minimize
StepLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Settings:
    """An adversarial method's settings: eps and step size in [0, 1] pixel units, PGD steps, TRADES β."""

    eps: float
    steps: int
    trades_beta: float
    step_size: float | None = None
    kind: Any = None  # the task kind (medadv.kinds) for a reader; None: a classifier (softmax, CE)


# (model, x, soft_target, y, generator, settings) -> scalar loss: one adversarial method's training step
MethodLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator, Settings], torch.Tensor]


@dataclass(frozen=True)
class TrainingDefense:
    """A registered training defense. ``title``: the report's row name, formatted with the plan's fields
    (``"noise σ={noise_sigma:g}"``); ``loss``: an adversarial method's step loss (None for an
    augmentation, such as noise, that :func:`make_step_loss` applies from the configuration);
    ``fields(plan)``: the :class:`~medadv.models.train.TrainConfig` fields it sets, read from a plan with
    ``adv_eps``, ``adv_steps``, ``trades_beta`` and ``noise_sigma``; ``cost(cfg)``: what one training
    image costs under the configuration it trains, as (gradient passes crafting its example, training
    steps), which time budgets price (:mod:`medadv.defense_budget`)."""

    name: str
    title: str
    loss: MethodLoss | None
    fields: Callable[[Any], dict[str, Any]]
    cost: Callable[[Any], tuple[float, float]] = lambda cfg: (0.0, 1.0)  # noqa: E731

    def row_name(self, plan: Any) -> str:
        return self.title.format(**{k: getattr(plan, k) for k in ("adv_eps", "adv_steps", "trades_beta", "noise_sigma")})


TRAINING_DEFENSES: dict[str, TrainingDefense] = {}


def register_training(name: str, *, title: str, loss: MethodLoss | None = None,
                      fields: Callable[[Any], dict[str, Any]] | None = None,
                      cost: Callable[[Any], tuple[float, float]] | None = None, replace: bool = False) -> TrainingDefense:
    """Register a training defense. An adversarial method (``loss`` given) sets ``adversarial=name`` and
    the plan's eps, steps and β unless ``fields`` says otherwise; ``cost`` (see :class:`TrainingDefense`)
    defaults to ``adv_steps`` gradient passes and one step for an adversarial method, one plain step for an
    augmentation; ``replace`` allows re-registering."""
    if name in TRAINING_DEFENSES and not replace:
        raise MedadvError(f"a training defense named '{name}' is already registered.", "pick another name, or pass replace=True.")
    if fields is None:
        if loss is None:
            raise MedadvError(f"training defense '{name}' sets nothing.", "pass loss= or fields=.")
        fields = lambda plan: {"adversarial": name, "adv_eps": plan.adv_eps, "adv_steps": plan.adv_steps,  # noqa: E731
                               "trades_beta": plan.trades_beta}
    if cost is None:
        cost = (lambda cfg: (float(cfg.adv_steps), 1.0)) if loss is not None else (lambda cfg: (0.0, 1.0))
    TRAINING_DEFENSES[name] = spec = TrainingDefense(name, title, loss, fields, cost)
    return spec


def unregister_training(name: str) -> None:
    TRAINING_DEFENSES.pop(name, None)


def methods() -> tuple[str, ...]:
    """The adversarial methods ``--adversarial`` accepts (registered training defenses with a step loss)."""
    return tuple(n for n, d in TRAINING_DEFENSES.items() if d.loss is not None)


def training_defense(name: str) -> TrainingDefense:
    try:
        return TRAINING_DEFENSES[name]
    except KeyError:
        raise MedadvError(f"unknown training defense '{name}'.", f"choose from {', '.join(TRAINING_DEFENSES)}.") from None


def check_settings(method: str | None, eps: float, steps: int, trades_beta: float, noise_sigma: float) -> None:
    """Raise a :class:`MedadvError` naming the flag when a robust-training setting is out of range."""
    if method is not None and method not in methods():
        raise MedadvError(f"unknown adversarial training '{method}'.", f"pass --adversarial {' | '.join(methods())}.")
    if method is not None:
        if not 0 < eps <= 1:
            raise MedadvError(f"--adv-eps must be in (0, 1] pixel units; got {eps}.", "pass e.g. --adv-eps 4/255.")
        if steps < 1:
            raise MedadvError(f"--adv-steps must be >= 1; got {steps}.", "pass e.g. --adv-steps 7.")
        if method == "trades" and not trades_beta > 0:
            raise MedadvError(f"--trades-beta must be > 0; got {trades_beta}.", "pass e.g. --trades-beta 6.")
    if not noise_sigma >= 0:
        raise MedadvError(f"--noise-sigma must be >= 0 in pixel units; got {noise_sigma}.", "pass e.g. --noise-sigma 0.25.")


def _threat(eps: float, steps: int, step_size: float):
    from medadv.attacks.threat_model import ThreatModel

    # continuous (levels None): training examples need not lie on the 8-bit grid
    return ThreatModel(norm="linf", eps=eps, step_size=step_size, steps=steps, random_start=True,
                       target="none", levels=None)


def _reader(kind: Any) -> bool:
    return kind is not None and kind.name == "multilabel"


def _own_loss(kind: Any) -> bool:
    """Trained on its kind's own loss (a reader's masked BCE, a segmenter's Dice + BCE), not softmax CE."""
    return kind is not None and kind.name in ("multilabel", "segmentation")


def _training_loss_gradient(model: nn.Module, kind: Any, outputs: int):
    """The gradient (to ascend) of the kind's own training loss at labels ``goal`` (a reader's N×F labels,
    unknown ones MISSING and left out): Madry's inner maximization of the loss the model is trained on."""
    def gradient(x_adv: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        x_adv = x_adv.detach().requires_grad_(True)
        loss = kind.loss(model(x_adv), kind.soft_targets(goal, outputs)) * len(x_adv)  # per-image scale
        return torch.autograd.grad(loss, x_adv)[0]

    return gradient


def pgd_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                 generator: torch.Generator, step_size: float | None = None, kind: Any = None) -> torch.Tensor:
    """Untargeted L-inf PGD (random start) against ``model``, ascending CE (a classifier), the reader's
    masked BCE (``kind`` multilabel; ``y`` N×F with MISSING unknown) or the segmenter's Dice + BCE (``kind``
    segmentation; ``y`` N×H×W masks); returns x' (detached, in [0, 1])."""
    from medadv.attacks.gradient import ascend, autograd_gradient, frozen
    from medadv.attacks.steps import pgd_step

    threat = _threat(eps, steps, step_size or pgd_step(eps, steps))
    with frozen(model):
        gradient = _training_loss_gradient(model, kind, y.shape[-1]) if _own_loss(kind) else \
            autograd_gradient(model, targeted=False)
        x_adv, _ = ascend(x.detach(), y, gradient, threat, generator)
    return x_adv.detach()


def bernoulli_kl(clean_logits: torch.Tensor, adv_logits: torch.Tensor) -> torch.Tensor:
    """Sum over findings of KL(Bernoulli(σ(clean)) ‖ Bernoulli(σ(adv))), per image (N), in nats:
    TRADES's divergence for a reader's independent sigmoid outputs (softmax's KL for a classifier)."""
    p = torch.sigmoid(clean_logits)
    log_p, log_1p = F.logsigmoid(clean_logits), F.logsigmoid(-clean_logits)
    log_q, log_1q = F.logsigmoid(adv_logits), F.logsigmoid(-adv_logits)
    return (p * (log_p - log_q) + (1 - p) * (log_1p - log_1q)).sum(1)


def trades_examples(model: nn.Module, x: torch.Tensor, eps: float, steps: int, generator: torch.Generator,
                    step_size: float | None = None, kind: Any = None) -> torch.Tensor:
    """x' maximizing KL(p(x) ‖ p(x')) in the L-inf eps-ball, from x + 0.001·N(0, 1) (Zhang et al.'s start)."""
    from medadv.attacks.gradient import ascend, frozen
    from medadv.attacks.steps import pgd_step

    threat = _threat(eps, steps, step_size or pgd_step(eps, steps))
    with frozen(model):
        with torch.no_grad():
            clean_logits = model(x)
            p_clean = F.softmax(clean_logits, dim=1)

        def kl_gradient(x_adv: torch.Tensor, _goal: torch.Tensor) -> torch.Tensor:
            x_adv = x_adv.detach().requires_grad_(True)
            if _reader(kind):
                kl = bernoulli_kl(clean_logits, model(x_adv)).sum()
            else:
                kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), p_clean, reduction="sum")
            return torch.autograd.grad(kl, x_adv)[0]

        start = 0.001 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x0 = (x + start).clamp(0, 1).detach()
        x_adv, _ = ascend(x0, torch.zeros(len(x), dtype=torch.long, device=x.device), kl_gradient, threat,
                          generator, start=False)
        # ascend's ball was around x0: back into the geometry's ball around x (and [0, 1]); the L-inf ball is
        # a per-pixel box, so the projection is one exact clamp (no x + (x' - x) rounding)
        lo, hi = threat.geometry.box(x, threat.radius)
        x_adv = torch.max(torch.min(x_adv, hi), lo)
    return x_adv.detach()


def fast_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, generator: torch.Generator,
                  kind: Any = None) -> torch.Tensor:
    """Wong et al.'s FGSM with random start: uniform δ in the ball, one signed step of 1.25·eps, clip."""
    from medadv.attacks.gradient import ascend, autograd_gradient, frozen

    threat = _threat(eps, 1, 1.25 * eps)
    with frozen(model):
        gradient = _training_loss_gradient(model, kind, y.shape[-1]) if _reader(kind) else \
            autograd_gradient(model, targeted=False)
        x_adv, _ = ascend(x.detach(), y, gradient, threat, generator)
    return x_adv.detach()


def make_step_loss(method: str | None, *, eps: float = 4 / 255, steps: int = 7, trades_beta: float = 6.0,
                   noise_sigma: float = 0.0, step_size: float | None = None, kind: Any = None) -> StepLoss | None:
    """The training-step loss of a robust recipe, or None for plain training (no method, no noise).
    ``kind``: a reader's or segmenter's task kind (its own loss replaces the classifier's CE throughout)."""
    check_settings(method, eps, steps, trades_beta, noise_sigma)
    if method is None and noise_sigma == 0:
        return None

    if method == "trades" and kind is not None and kind.name == "segmentation":
        raise MedadvError("TRADES is not implemented for segmentation models (its KL term is a classifier's).",
                          "train the segmenter with --adversarial pgd or fast.")
    settings = Settings(eps, steps, trades_beta, step_size, kind if _own_loss(kind) else None)
    method_loss = TRAINING_DEFENSES[method].loss if method is not None else None

    def step_loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor,
                  generator: torch.Generator) -> torch.Tensor:
        if noise_sigma > 0:
            # not clipped to [0, 1]: the smoothed classifier sees unclipped noise at certification too
            x = x + noise_sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            if method is not None:
                x = x.clamp(0, 1)  # the attacks' box is [0, 1]
        if method_loss is not None:
            return method_loss(model, x, target, y, generator, settings)
        return _loss(settings, model(x), target)

    return step_loss


def _loss(s: Settings, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The training loss: a reader's masked BCE, else (a classifier) cross-entropy on soft targets."""
    return s.kind.loss(logits, target) if s.kind is not None else F.cross_entropy(logits, target)


def _pgd_loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor,
              generator: torch.Generator, s: Settings) -> torch.Tensor:
    return _loss(s, model(pgd_examples(model, x, y, s.eps, s.steps, generator, s.step_size, s.kind)), target)


def _trades_loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor,
                 generator: torch.Generator, s: Settings) -> torch.Tensor:
    x_adv = trades_examples(model, x, s.eps, s.steps, generator, s.step_size, s.kind)
    logits = model(torch.cat([x, x_adv]))
    clean, adv = logits[: len(x)], logits[len(x):]
    if s.kind is not None:
        kl = bernoulli_kl(clean, adv).mean()
    else:
        kl = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
    return _loss(s, clean, target) + s.trades_beta * kl


def _fast_loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor,
               generator: torch.Generator, s: Settings) -> torch.Tensor:
    return _loss(s, model(fast_examples(model, x, y, s.eps, generator, s.kind)), target)


# registration order is the defenses study's row order
register_training("pgd", title="PGD-AT", loss=_pgd_loss)
# TRADES: the clean forward before crafting (a third of a pass), and its step trains on clean and adversarial
register_training("trades", title="TRADES", loss=_trades_loss, cost=lambda cfg: (cfg.adv_steps + 1 / 3, 2.0))
register_training("fast", title="fast AT", loss=_fast_loss, cost=lambda cfg: (1.0, 1.0))
register_training("noise", title="noise σ={noise_sigma:g}", fields=lambda plan: {"noise_sigma": plan.noise_sigma})
METHODS = methods()  # the built-in adversarial methods (the live list is methods())


def robust_predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, seed: int,
                       batch_size: int = 256, kind: Any = None) -> torch.Tensor:
    """P(disease) on untargeted PGD examples (validation; model selection on robust accuracy, Rice et al.
    2020). x: N×C×H×W in [0, 1] on the model's device; returns N floats on the CPU (a reader, ``kind``
    multilabel: N×F finding probabilities on PGD examples against its BCE; a segmenter: N×H×W P(foreground)
    on PGD examples against its Dice + BCE)."""
    from medadv.models.interface import eval_mode

    generator = torch.Generator(device=x.device).manual_seed(seed)
    own = _own_loss(kind)
    out = []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        x_adv = pgd_examples(model, xb, yb, eps, steps, generator, kind=kind if own else None)
        with torch.no_grad(), eval_mode(model):
            logits = model(x_adv)
            out.append((kind.probabilities(logits) if own else F.softmax(logits, dim=1)[:, 1]).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


@dataclass(frozen=True)
class RobustTraining:
    """What :func:`medadv.models.train.train` needs from a training defense, handed in by the caller (the
    models layer never imports the defenses): the step loss and the attacked-validation predictions."""

    step_loss: StepLoss
    predictions: Callable[..., torch.Tensor]


def robust_training(cfg) -> RobustTraining | None:
    """The training defense a :class:`~medadv.models.train.TrainConfig` asks for (None for plain training)."""
    if not cfg.defended:
        return None
    from functools import partial

    from medadv.data import get_task
    from medadv.kinds import get_kind

    kind = get_kind(get_task(cfg.task).kind)
    kind = kind if _own_loss(kind) else None  # a classifier keeps the CE path exactly as it was
    step = make_step_loss(cfg.adversarial, eps=cfg.adv_eps, steps=cfg.adv_steps, trades_beta=cfg.trades_beta,
                          noise_sigma=cfg.noise_sigma, kind=kind)
    return RobustTraining(step, partial(robust_predictions, kind=kind) if kind is not None else robust_predictions)
