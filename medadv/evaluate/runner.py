"""Run one attack over a dataset and measure the damage in clinical terms: the engine behind
``medadv attack`` and every row of the reproduce / audit battery.

The attack sees batches of stored pixels in [0, 1]; the victim is handed over according to the
attack's access (the model for white-box attacks, a probability oracle for score-based ones, a label
oracle for label-only ones). With a surrogate, the attack is crafted on the surrogate and evaluated on
the victim (the paper's "black box": transfer). Universal attacks (patch, UAP) are first fitted on
training images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medadv.attacks import ATTACKS, LabelOracle, ProbabilityOracle, ThreatModel
from medadv.attacks.base import Attack
from medadv.data import ImageSet, to_storage
from medadv.errors import MedadvError
from medadv.evaluate.metrics import clinical_metrics
from medadv.evaluate.perceptibility import flips, perturbation_stats
from medadv.models.wrapper import MedicalClassifier
from medadv.progress import SILENT, Monitor

SCHEMA = "medadv-results/1"


@dataclass
class AttackRun:
    """The outcome of one attack over a dataset: the results record and the adversarial images as stored."""

    results: dict[str, Any]
    adversarial: np.ndarray  # N×C×H×W, the data's storage dtype
    p_clean: np.ndarray  # victim's P(disease) per image
    p_adv: np.ndarray
    universal: dict[str, torch.Tensor] = field(default_factory=dict)  # fitted patch / perturbation


def make_attack(name: str, threat: ThreatModel, seed: int, **params: Any) -> Attack:
    try:
        cls, norm = ATTACKS[name]
    except KeyError:
        raise MedadvError(f"unknown attack '{name}'.", f"choose one of {', '.join(ATTACKS)}.") from None
    if norm is not None and threat.norm != norm:
        threat = threat.with_(norm=norm)
    try:
        return cls(threat, seed, **params)
    except TypeError as exc:
        raise MedadvError(f"attack {name} does not take these parameters: {exc}.", "check the attack's options.") from exc


def victim_for(attack: Attack, model: MedicalClassifier):
    """What an attack may touch: the model (white box), probabilities, or labels only."""
    if attack.access == "white-box":
        return model
    oracle = ProbabilityOracle.from_model(model)
    return oracle if attack.access == "score" else LabelOracle(oracle, model.threshold)


def _probabilities(model: MedicalClassifier, pixels: np.ndarray, levels: int, batch_size: int) -> np.ndarray:
    device = model.device
    out = []
    for i in range(0, len(pixels), batch_size):
        x = torch.from_numpy(pixels[i:i + batch_size]).to(device=device, dtype=torch.float32).div_(levels)
        out.append(model.probabilities(x, batch_size))
    return torch.cat(out).double().numpy()


def run_attack(
    name: str,
    victim: MedicalClassifier,
    data: ImageSet,
    threat: ThreatModel,
    *,
    seed: int = 0,
    surrogate: MedicalClassifier | None = None,
    fit_data: ImageSet | None = None,
    params: dict[str, Any] | None = None,
    batch_size: int = 128,
    monitor: Monitor = SILENT,
) -> AttackRun:
    """Attack every image of ``data`` and return the results record (schema ``medadv-results/1``)."""
    params = dict(params or {})
    if threat.levels is not None and threat.levels != data.levels:
        raise MedadvError(f"the threat model's storage grid has {threat.levels} levels but {data.source} stores "
                          f"{data.levels}.", "leave the grid at the data's own bit depth.")
    crafter = surrogate if surrogate is not None else victim
    for m in {id(victim): victim, id(crafter): crafter}.values():
        if m.spec.data_channels != data.channels:
            raise MedadvError(f"model {m.spec.arch} takes {m.spec.data_channels}-channel images; {data.source} has "
                              f"{data.channels}.", "attack the model with the data it was trained on.")
    if name in ATTACKS and ATTACKS[name][0].access == "score":
        params.setdefault("threshold", victim.threshold)  # success is judged at the victim's operating point
    attack = make_attack(name, threat, seed, **params)
    device = victim.device
    t0 = time.perf_counter()
    universal: dict[str, torch.Tensor] = {}
    if hasattr(attack, "fit"):
        if fit_data is None:
            raise MedadvError(f"the {name} attack is fitted on training images.", "pass the training split.")
        attack.fit(crafter, fit_data.tensor().to(device), torch.from_numpy(fit_data.labels).to(device),
                   monitor=monitor)
        universal = attack.state()
        params["fit_images"] = len(fit_data)
    if surrogate is not None and attack.access != "white-box" and not hasattr(attack, "fit"):
        raise MedadvError(f"{name} is a query attack; transfer needs a white-box or universal attack.",
                          "drop --surrogate or pick fgsm, pgd, pgd-l2, patch or uap.")
    target = victim_for(attack, crafter)
    adversarial = np.empty_like(data.pixels)
    queries: list[torch.Tensor] = []
    batches = [np.arange(i, min(i + batch_size, len(data))) for i in range(0, len(data), batch_size)]
    for b, idx in enumerate(monitor.track(batches, f"{name} on {len(data)} images")):
        x = data.tensor(idx).to(device)
        y = torch.from_numpy(data.labels[idx]).to(device)
        attack.seed = seed * 1_000_003 + b  # each batch its own stream, reproducible per (seed, batch)
        result = attack(target, x, y)
        adversarial[idx] = to_storage(result.x_adv, data.levels)
        if result.queries is not None:
            queries.append(result.queries.cpu())
    seconds = time.perf_counter() - t0

    p_clean = _probabilities(victim, data.pixels, data.levels, 256)
    p_adv = _probabilities(victim, adversarial, data.levels, 256)
    pred_clean, pred_adv = victim.predict(p_clean), victim.predict(p_adv)
    y = torch.from_numpy(data.labels)
    success = threat.succeeded(torch.from_numpy(pred_adv), y).numpy()
    correct = pred_clean == data.labels
    q = torch.cat(queries).double().numpy() if queries else None
    x_clean = torch.from_numpy(data.pixels.astype(np.float32) / data.levels)
    x_adv = torch.from_numpy(adversarial.astype(np.float32) / data.levels)
    results = {
        "schema": SCHEMA,
        "attack": {
            "name": name, "access": "transfer" if surrogate is not None else attack.access,
            "threat_model": threat_record(threat, attack), "params": params, "seed": seed,
        },
        "n_images": len(data),
        "clean": clinical_metrics(data.labels, p_clean, victim.threshold),
        "adversarial": clinical_metrics(data.labels, p_adv, victim.threshold),
        "perturbation": perturbation_stats(x_clean, x_adv, data.levels),
        "flips": flips(pred_clean, pred_adv),
        "success_rate": float(success.mean()),
        "success_rate_on_correct": float(success[correct].mean()) if correct.any() else None,
        "queries": None if q is None else {"median": float(np.median(q)), "mean": float(q.mean()),
                                           "max": float(q.max()), "total": float(q.sum())},
        "fit_success_rate": getattr(attack, "fit_success", None),  # universal attacks: on the training images
        "seconds": round(seconds, 3),
        "data": {"task": data.task, "split": data.split, "source": data.source, "checksum": data.checksum,
                 "image_size": list(data.size), "levels": data.levels, "counts": data.counts()},
    }
    return AttackRun(results, adversarial, p_clean, p_adv, universal)


def threat_record(threat: ThreatModel, attack: Attack | None = None) -> dict[str, Any]:
    """The threat model as JSON: eps in [0, 1] units, and the eps the storage grid leaves (radius)."""
    record = {
        "norm": threat.norm, "eps": threat.eps, "eps_on_grid": threat.radius, "step_size": threat.alpha,
        "steps": threat.steps, "random_start": threat.random_start, "target": threat.target,
        "levels": threat.levels, "mask": threat.mask is not None, "units": "[0, 1] pixel units",
    }
    if attack is not None and getattr(attack, "bounded", True) is False:
        record["eps"] = None  # a patch is a region attack: eps does not bound it
        record["eps_on_grid"] = None
    return record
