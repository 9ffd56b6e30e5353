"""Robust accuracy the honest way: a non-adaptive attack beside the per-image worst case of adaptive ones.

A defense is only as strong as the best attack that knows it (Athalye, Carlini and Wagner 2018; Carlini
et al. 2019, "On evaluating adversarial robustness"). For a defended model this module runs, per L-inf
eps in increasing order:

* **non-adaptive**: PGD-``steps`` on the model as a naive evaluator attacks it (gradients masked by a
  non-differentiable defense; one random draw of a randomized one);
* **adaptive**, each on the images the previous ones left unbroken, judged on the stored image,
  starting from the non-adaptive attack's own successes (``non-adaptive pgd`` in ``broken_by``):
  ``transfer`` (PGD crafted on an undefended surrogate), ``pgd`` (PGD with BPDA through
  non-differentiable steps and expectation over transformation (EOT) through randomness), and
  ``autoattack`` (APGD-CE, APGD-margin and Square, through the same BPDA/EOT model).

The reported adaptive robust accuracy is the per-image worst case over all of them. Robustness is
monotone in eps (an image broken inside a small ball is broken inside every larger one), so each eps
attacks only the images still robust at the smaller one, and keeps the broken ones broken: this is
both exact and what keeps the evaluation inside a CPU budget. An image misclassified before any attack
counts as not robust (robust accuracy is over all images, as in RobustBench).

Decisions are at the model's operating threshold; for a randomized model, on the logits averaged over
``eot_samples`` draws (:class:`~medadv.defenses.eot.EOT`: its expected decision, less noisy than one draw).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medadv.defenses.eot import EOT, is_randomized
from medadv.errors import MedadvError
from medadv.progress import SILENT, Monitor


# broken_by's name for the images the non-adaptive PGD broke first (the adaptive cascade starts from them)
NON_ADAPTIVE = "non-adaptive pgd"
# bumped when the evaluation's definition changes, so cached results of the old one are not reused
EVALUATION_VERSION = 2


@dataclass
class AdaptiveConfig:
    """Budgets of the evaluation (per image, per eps). Eps in [0, 1] units of the stored pixels."""

    eps: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
    steps: int = 20  # the non-adaptive PGD and the transfer PGD
    adaptive_steps: int = 40  # the adaptive PGD
    autoattack: str | None = "fast"  # AutoAttack version (None: leave it out)
    autoattack_steps: int | None = None  # override the version's APGD steps
    square_queries: int = 200  # AutoAttack's Square budget per image
    eot_samples: int = 4  # draws averaged per forward of a randomized model
    batch_size: int = 128

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


@dataclass
class RobustResult:
    """Per eps: robust accuracy non-adaptive and adaptive (over all n images), and which attack broke
    how many; ``adversarial[eps]``: the non-adaptive adversarial images (N×C×H×W, [0, 1]) for detectors."""

    n: int
    clean_correct: np.ndarray
    rows: list[dict[str, Any]]
    randomized: bool
    adversarial: dict[float, torch.Tensor] = field(default_factory=dict)
    adaptive_correct: dict[float, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"n_images": self.n, "clean_accuracy": float(self.clean_correct.mean()), "randomized": self.randomized,
                "rows": self.rows,
                "definition": "robust accuracy: fraction of all n images classified correctly after the attack "
                              "(images wrong before it count as not robust); adaptive: per-image worst case over "
                              "the attacks listed in broken_by"}


def decide(model: nn.Module, x: torch.Tensor, threshold: float, batch_size: int) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = [(F.softmax(model(x[i:i + batch_size]), dim=1)[:, 1] >= threshold).long()
               for i in range(0, len(x), batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def in_batches(craft: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               batch_size: int) -> torch.Tensor:
    """``craft(b, x_b, y_b)`` over fixed batches of x (N×C×H×W) and y, the whole N×C×H×W result on every
    process. Under torchrun, batch b runs on rank b % world_size and the results are gathered
    (:func:`medadv.dist.run_batches`); batches and their seeds do not depend on the number of processes,
    so neither does any image's result."""
    from medadv.dist import current, run_batches

    if len(x) == 0:
        return x.clone()
    batches = [np.arange(i, min(i + batch_size, len(x))) for i in range(0, len(x), batch_size)]
    out = torch.empty_like(x)

    def one(b: int, idx: np.ndarray):
        return craft(b, x[idx], y[idx]).detach().cpu().numpy(), None

    for _, idx, adv, _ in run_batches(batches, one, current()):
        out[idx] = torch.from_numpy(adv).to(out.device)
    return out


def attack_images(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, pgd_steps: int, seed: int,
                  levels: int, batch_size: int, **params: Any) -> torch.Tensor:
    """``name`` (a registered attack) untargeted at L-inf ``eps`` on x, batch b seeded from (seed, b); the
    threat model's schedule is PGD's (``pgd_steps``, step :func:`~medadv.attacks.steps.pgd_step`); ``params`` go to the
    attack. Returns the adversarial images on the storage grid (sharded under torchrun)."""
    from medadv.attacks import ThreatModel
    from medadv.attacks.steps import pgd_step
    from medadv.evaluate.runner import make_attack

    threat = ThreatModel(norm="linf", eps=eps, steps=pgd_steps, step_size=pgd_step(eps, pgd_steps),
                         random_start=True, target="none", levels=levels)
    return in_batches(lambda b, xb, yb: make_attack(name, threat, seed * 1_000_003 + b, **params)(model, xb, yb).x_adv,
                      x, y, batch_size)


def non_adaptive_view(model: nn.Module) -> nn.Module:
    """The model as a naive evaluator attacks it: masked gradients through non-differentiable defenses."""
    return model.with_adaptive(False)


def adaptive_view(model: nn.Module, randomized: bool, eot_samples: int) -> nn.Module:
    """BPDA through non-differentiable defenses; EOT over ``eot_samples`` draws when randomized."""
    m = model.with_adaptive(True)
    return EOT(m, eot_samples) if randomized else m


def evaluate_robustness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, surrogate: nn.Module | None = None,
                        config: AdaptiveConfig | None = None, levels: int = 255, seed: int = 0,
                        monitor: Monitor = SILENT) -> RobustResult:
    """Robust accuracy of ``model`` on x (N×C×H×W in [0, 1], on the storage grid of ``levels``) with labels y.

    ``surrogate``: an undefended model for the transfer attack (None leaves transfer out).
    """
    cfg = config or AdaptiveConfig()
    if x.ndim != 4 or len(x) != len(y) or len(x) == 0:
        raise MedadvError(f"robust accuracy needs N×C×H×W images and N labels; got {tuple(x.shape)} and {tuple(y.shape)}.",
                          "pass a batch of test images with one label each.")
    if list(cfg.eps) != sorted(cfg.eps) or any(e <= 0 for e in cfg.eps):
        raise MedadvError(f"eps {cfg.eps} must be positive and increasing.", "pass e.g. 1/255, 2/255, 4/255, 8/255.")
    threshold = float(getattr(model, "threshold", 0.5))
    randomized = is_randomized(model, x[: min(len(x), 16)])
    judge = EOT(model, cfg.eot_samples) if randomized else model
    naive = non_adaptive_view(model)
    strong = adaptive_view(model, randomized, cfg.eot_samples)
    clean = (decide(judge, x, threshold, cfg.batch_size) == y).numpy()
    alive_na, alive_ad = clean.copy(), clean.copy()
    rows, adversarial, adaptive_correct = [], {}, {}
    plan = (["transfer"] if surrogate is not None else []) + ["pgd"] + (["autoattack"] if cfg.autoattack else [])
    for k, eps in enumerate(cfg.eps):
        rng_seed = seed * 101 + k
        # non-adaptive: every image is attacked (detectors are judged on these images at every eps)
        x_na = attack_images("pgd", naive, x, y, eps, cfg.steps, rng_seed, levels, cfg.batch_size)
        adversarial[eps] = x_na
        ok_na = (decide(judge, x_na, threshold, cfg.batch_size) == y).numpy()
        # the non-adaptive images are legal perturbations judged by the same judge, so they belong to the
        # adaptive worst case too: the adaptive column can never read above the non-adaptive one, and the
        # costlier attacks below only spend their steps on the images the cheap one left standing
        broken_by: dict[str, int] = {NON_ADAPTIVE: int((alive_ad & ~ok_na).sum())}
        alive_na &= ok_na
        alive_ad &= ok_na
        for name in plan:
            todo = np.flatnonzero(alive_ad)
            if len(todo) == 0:
                break
            xs, ys = x[todo], y[todo]
            if name == "transfer":
                x_adv = attack_images("pgd", surrogate, xs, ys, eps, cfg.steps, rng_seed, levels, cfg.batch_size)
            elif name == "pgd":
                x_adv = attack_images("pgd", strong, xs, ys, eps, cfg.adaptive_steps, rng_seed, levels, cfg.batch_size)
            else:
                params: dict[str, Any] = {"version": cfg.autoattack, "max_queries": cfg.square_queries}
                if cfg.autoattack_steps:
                    params["steps"] = cfg.autoattack_steps
                x_adv = attack_images("autoattack", strong, xs, ys, eps, cfg.adaptive_steps, rng_seed, levels,
                                cfg.batch_size, **params)
            hit = (decide(judge, x_adv, threshold, cfg.batch_size) != ys).numpy()
            alive_ad[todo[hit]] = False
            broken_by[name] = int(hit.sum())
        adaptive_correct[eps] = alive_ad.copy()
        rows.append({"eps": eps, "eps_255": round(eps * 255, 3),
                     "non_adaptive": float(alive_na.mean()), "adaptive": float(alive_ad.mean()),
                     "broken_by": broken_by})
        monitor.log(f"  eps {eps * 255:.0f}/255: robust accuracy {100 * alive_na.mean():.1f}% non-adaptive, "
                    f"{100 * alive_ad.mean():.1f}% adaptive ({len(x)} images)")
    return RobustResult(len(x), clean, rows, randomized, adversarial, adaptive_correct)


def adaptive_victim(model: nn.Module, x: torch.Tensor, eot_samples: int = 8) -> tuple[nn.Module, bool]:
    """``model`` made ready for an adaptive attack: wrapped in EOT when it is randomized (two passes over
    the images x differ). Returns the model and whether it was randomized."""
    randomized = is_randomized(model, x[: min(len(x), 16)])
    return (EOT(model, eot_samples) if randomized else model), randomized


def defense_record(model: nn.Module, recorded: dict[str, Any], data, seed: int, non_adaptive: bool,
                   n_masking: int = 48, randomized: bool = False) -> dict[str, Any]:
    """What results.json says about an attacked defended model: the checkpoint's defense record, how the
    attack saw it, and the gradient-masking checks on up to ``n_masking`` of the attacked images (run on the
    model as a naive evaluator sees it: a warning there means non-adaptive numbers overstate robustness)."""
    from medadv.defenses.masking import check_gradient_masking

    k = min(n_masking, len(data))
    x, y = data.stored(np.arange(k)).to(getattr(model, "device", "cpu")), torch.from_numpy(data.labels[:k])
    try:
        masking = {**check_gradient_masking(non_adaptive_view(model), x, y.to(x.device), seed=seed).to_json(),
                   "n_images": k}
    except MedadvError as exc:
        masking = {"flagged": None, "checks": [], "skipped": exc.what, "n_images": k}
    gradient = "masked (non-adaptive)" if non_adaptive else (
        "BPDA through non-differentiable defenses" if recorded.get("kind") == "preprocessing" else "exact")
    return {**recorded, "attacked_with": {"gradient": gradient, "eot": randomized}, "masking": masking}
