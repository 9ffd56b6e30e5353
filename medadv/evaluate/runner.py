"""Run one attack over a dataset and measure the damage in clinical terms: the engine behind
``medadv attack`` and every row of the reproduce / audit battery.

The attack sees batches of stored pixels in [0, 1]; the victim is handed over according to the
attack's access (the model for white-box attacks, a probability oracle for score-based ones, a label
oracle for label-only ones). With a surrogate, the attack is crafted on the surrogate and evaluated on
the victim (the paper's "black box": transfer). Universal attacks (patch, UAP) are first fitted on
training images.

DICOM images are attacked in their stored values (one-to-one with the file's integers); each file's VOI
window is the model's input transform (:class:`medadv.models.wrapper.Windowed`), so images are batched
by window and eps bounds the change a reader sees under any window. Success is counted over the images
the victim classified correctly before the attack; the flips are counts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medadv.attacks import ATTACKS, LabelOracle, ProbabilityOracle, ThreatModel
from medadv.attacks.base import Attack
from medadv.attacks.registry import REGISTRY
from medadv.data import ImageSet, apply_window, to_storage
from medadv.data.imageset import snap_to_stored
from medadv.dist import BatchStore, Shard, run_batches
from medadv.dist import current as current_shard
from medadv.errors import MedadvError
from medadv.evaluate.clean import kind_metrics
from medadv.kinds import parse_target
from medadv.evaluate.perceptibility import flips, perturbation_stats
from medadv.models.interface import memory_batch
from medadv.models.wrapper import MedicalClassifier, Windowed
from medadv.progress import SILENT, Monitor
from medadv.results import SCHEMA  # the one schema string: the typed records of medadv.results hold it



@dataclass
class AttackRun:
    """The outcome of one attack over a dataset: the results record and the adversarial images as stored."""

    results: dict[str, Any]
    adversarial: np.ndarray  # N×C×H×W, the data's storage dtype
    p_clean: np.ndarray  # victim's scores per image (the task kind's: binary P(disease), N; multi-class N×K)
    p_adv: np.ndarray
    universal: dict[str, torch.Tensor] = field(default_factory=dict)  # fitted patch / perturbation
    threat: ThreatModel | None = None  # what success means: the written files are judged alike (report.save)


def outcome(victim: MedicalClassifier, threat: ThreatModel, labels: np.ndarray, p_clean: np.ndarray,
            p_adv: np.ndarray) -> dict[str, Any]:
    """The adversarial side of a results record from the victim's scores before and after the attack:
    metrics, flips, and success over the images it classified correctly before. One function, so the
    in-memory images and the written files (re-read) are judged alike."""
    pred_clean, pred_adv = victim.predict(p_clean), victim.predict(p_adv)
    kind, target = victim.kind, parse_target(threat.target)
    # what success is measured against (a multi-label "finding" target: the model's own decisions before
    # the attack), and which images count: a classifier's correct ones; a reader's, per target (the kind's)
    goal_labels = kind.attack_labels(target, labels, pred_clean)
    success = threat.succeeded(torch.from_numpy(pred_adv), torch.from_numpy(goal_labels)).numpy()
    correct = kind.eligible(target, labels, pred_clean)
    details = kind.attack_details(target, labels, pred_clean, pred_adv, tuple(victim.spec.class_names))
    return {
        "adversarial": kind_metrics(victim, labels, p_adv),
        "flips": flips(pred_clean, pred_adv, threat.classes),
        **({kind.details_key: details} if details is not None else {}),
        # an image the victim already got wrong is no success of the attack's: the rate is over correct ones
        "success_rate": float(success[correct].mean()) if correct.any() else None,
        "success": {"correct_before": int(correct.sum()), "succeeded": int(success[correct].sum()),
                    "wrong_before": int((~correct).sum()), "n": len(labels),
                    "definition": kind.success_definition(target)},
        "success_rate_on_correct": float(success[correct].mean()) if correct.any() else None,
    }


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
    return oracle if attack.access == "score" else LabelOracle(oracle, model.operating_point, model.kind)


def _probabilities(model: MedicalClassifier, pixels: np.ndarray, levels: int, batch_size: int,
                   window: np.ndarray | None = None) -> np.ndarray:
    device = model.device
    out = []
    for i in range(0, len(pixels), batch_size):
        x = torch.from_numpy(pixels[i:i + batch_size]).to(device=device, dtype=torch.float32).div_(levels)
        w = None if window is None else torch.from_numpy(window[i:i + batch_size]).float()
        out.append(model.probabilities(apply_window(x, w), batch_size))
    return torch.cat(out).double().numpy()


def labels_for_attack(model: MedicalClassifier, data: ImageSet, threat: ThreatModel) -> np.ndarray:
    """The labels an attack is handed: the true ones, or (a multi-label target defined relative to the
    model's own report, e.g. add one finding and keep the rest) the decisions of ``model``, the one the
    attack is crafted on, before the attack (:meth:`medadv.kinds.TaskKind.attack_labels`)."""
    target = parse_target(threat.target)
    if not model.kind.needs_decisions(target):
        return data.labels
    decisions = model.predict(_probabilities(model, data.pixels, data.levels, 256, data.window))
    return model.kind.attack_labels(target, data.labels, decisions)


def window_batches(data: ImageSet, batch_size: int) -> list[np.ndarray]:
    """Index batches of at most ``batch_size`` images that share one VOI window (all, without windows)."""
    if data.window is None:
        return [np.arange(i, min(i + batch_size, len(data))) for i in range(0, len(data), batch_size)]
    _, group = np.unique(data.window, axis=0, return_inverse=True)
    out = []
    for g in np.unique(group):
        idx = np.flatnonzero(group.ravel() == g)
        out += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return out


def _through_window(model, data: ImageSet, idx: np.ndarray):
    return model if data.window is None else Windowed(model, tuple(data.window[idx[0]]))


def stored_record(data: ImageSet, eps: float | None, x_clean: np.ndarray, x_adv: np.ndarray) -> dict | None:
    """eps and the L-inf change in the file's own stored units (DICOM: 2**BitsStored - 1 steps over the
    full stored range), beside the [0, 1] units they are the same fraction of."""
    if data.stored_levels is None:
        return None
    L = np.asarray(data.stored_levels, dtype=np.float64)
    delta = np.abs(x_adv.astype(np.float64) - x_clean.astype(np.float64)).reshape(len(L), -1).max(axis=1) / data.levels
    bits = sorted({int(v).bit_length() for v in L if v})
    return {"bits_stored": bits, "stored_levels": sorted({int(v) for v in L if v}),
            "eps_stored": None if eps is None else [round(eps * v, 6) for v in sorted({float(v) for v in L if v})],
            # the largest whole change of a stored value within eps: what the written files can differ by
            "max_change_stored": None if eps is None else [int(np.floor(eps * v + 1e-6)) for v in sorted({float(v) for v in L if v})],
            "linf_max_stored": float(np.rint(delta * L).max()) if len(L) else 0.0,
            "linf_max": float(delta.max()) if len(L) else 0.0,
            "units": "stored values after rescale (eps_stored: per bit depth present, eps × (2**BitsStored - 1))"}


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
    shard: Shard | None = None,
    resume_dir: str | Path | None = None,
) -> AttackRun:
    """Attack every image of ``data`` and return the results record (schema ``medadv-results/1``).

    ``shard`` (default: the torchrun job this process belongs to, see :mod:`medadv.dist`) splits the
    batches across processes; every rank returns the same record. ``resume_dir`` keeps finished batches,
    so a killed run resumes; the caller keys it by the job's configuration."""
    shard = shard if shard is not None else current_shard()
    params = dict(params or {})
    if threat.levels is not None and threat.levels != data.levels:
        raise MedadvError(f"the threat model's storage grid has {threat.levels} levels but {data.source} stores "
                          f"{data.levels}.", "leave the grid at the data's own bit depth.")
    classes = len(victim.spec.class_names)  # the task kind's targets (class:k, "disease") need K
    kind = getattr(victim.spec, "kind", "binary")  # and the kind gives them, and success, their meaning
    if (threat.classes, threat.kind) != (classes, kind):
        threat = threat.with_(classes=classes, kind=kind)
    crafter = surrogate if surrogate is not None else victim
    for m in {id(victim): victim, id(crafter): crafter}.values():
        if m.spec.data_channels != data.channels:
            raise MedadvError(f"model {m.spec.arch} takes {m.spec.data_channels}-channel images; {data.source} has "
                              f"{data.channels}.", "attack the model with the data it was trained on.")
    if data.volumes:
        from medadv.attacks.registry import check_volumes

        check_volumes(name)
    if name in REGISTRY:  # refused at the door when the kind cannot express the attack's objective
        chosen = REGISTRY[name]
        threat.task_kind.check_attack(name, chosen.kind.value, chosen.needs_fit)
    if name in ATTACKS and ATTACKS[name][0].access == "score":
        point = victim.operating_point  # success is judged at the victim's operating point
        params.setdefault("threshold", list(point) if isinstance(point, tuple) else point)
    attack = make_attack(name, threat, seed, **params)
    device = victim.device
    t0 = time.perf_counter()
    universal: dict[str, torch.Tensor] = {}
    fast = params.get("fast")
    if data.window is not None and fast:
        # the accelerated copy is built once here, under the window wrapper (accelerate() would drop it)
        from medadv.attacks.pgd import crafting_model

        crafter = crafting_model(crafter, fast)  # a defended model keeps its defenses around the fast copy
        attack = make_attack(name, threat, seed, **{k: v for k, v in params.items() if k != "fast"})
    fitted = name in REGISTRY and REGISTRY[name].needs_fit  # the registry says, not an attribute probe
    if fitted:
        if fit_data is None:
            raise MedadvError(f"the {name} attack is fitted on training images.", "pass the training split.")
        fit_model = crafter
        if fit_data.window is not None:
            if len(np.unique(fit_data.window, axis=0)) > 1:
                raise MedadvError(f"the {name} attack fits one perturbation, but the training DICOMs of {fit_data.source} "
                                  "come with different VOI windows.",
                                  "use a per-image attack (fgsm, pgd, square, hsja) on these files.")
            fit_model = Windowed(crafter, tuple(fit_data.window[0]))
        attack.fit(fit_model, fit_data.stored().to(device),
                   torch.from_numpy(labels_for_attack(crafter, fit_data, threat)).to(device), monitor=monitor)
        universal = attack.state()
        params["fit_images"] = len(fit_data)
    if surrogate is not None and attack.access != "white-box" and not fitted:
        raise MedadvError(f"{name} is a query attack; transfer needs a white-box or universal attack.",
                          "drop --surrogate or pick fgsm, pgd, pgd-l2, patch or uap.")
    attack_labels = labels_for_attack(crafter, data, threat)
    adversarial = np.empty_like(data.pixels)
    queries: list[torch.Tensor] = []
    batches = window_batches(data, memory_batch(crafter, batch_size))

    def attack_batch(b: int, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = data.stored(idx).to(device)
        y = torch.from_numpy(attack_labels[idx]).to(device)
        attack.seed = seed * 1_000_003 + b  # each batch its own stream, reproducible per (seed, batch)
        result = attack(victim_for(attack, _through_window(crafter, data, idx)), x, y)
        q = None if result.queries is None else result.queries.cpu().numpy()
        return to_storage(result.x_adv, data.levels), q

    # under torchrun each rank attacks every world_size-th batch; every rank then holds all of them
    track = (lambda mine: monitor.track(mine, f"{name} on {len(data)} images"
                                        + (f" (rank {shard.rank}/{shard.world_size})" if shard.distributed else "")))
    for _, idx, adv, q in run_batches(batches, attack_batch, shard, BatchStore(resume_dir), track):
        adversarial[idx] = adv
        if q is not None:
            queries.append(torch.from_numpy(q))
    # DICOM: onto each file's own stored grid, so what is measured is what the written file holds
    adversarial = snap_to_stored(adversarial, data.pixels, data.stored_levels)
    seconds = time.perf_counter() - t0

    p_clean = _probabilities(victim, data.pixels, data.levels, 256, data.window)
    p_adv = _probabilities(victim, adversarial, data.levels, 256, data.window)
    q = torch.cat(queries).double().numpy() if queries else None
    x_clean = torch.from_numpy(data.pixels.astype(np.float32) / data.levels)
    x_adv = torch.from_numpy(adversarial.astype(np.float32) / data.levels)
    record = threat_record(threat, attack)
    stored = stored_record(data, record["eps"] if threat.norm == "linf" else None, data.pixels, adversarial)
    if stored is not None:
        record["stored"] = stored
    results = {
        "schema": SCHEMA,
        "attack": {
            "name": name, "access": "transfer" if surrogate is not None else attack.access,
            "threat_model": record, "params": params, "seed": seed,
            # AutoAttack's checks (randomness, zero gradients, Square stronger than the white box), per rank
            "flags": getattr(attack, "flags", None),
        },
        "n_images": len(data),
        # clean and adversarial are measured on the same images: the ones attacked here
        "clean": kind_metrics(victim, data.labels, p_clean),
        **outcome(victim, threat, data.labels, p_clean, p_adv),
        # of the images in memory; report.save.save_attack judges the written files and says which it reports
        "judged_on": "the attacked images in memory",
        "perturbation": {**perturbation_stats(x_clean, x_adv, data.levels), **({"stored": stored} if stored else {})},
        "queries": None if q is None else {"median": float(np.median(q)), "mean": float(q.mean()),
                                           "max": float(q.max()), "total": float(q.sum())},
        "fit_success_rate": getattr(attack, "fit_success", None),  # universal attacks: on the training images
        "seconds": round(seconds, 3),
        "data": {"task": data.task, "split": data.split, "source": data.source, "checksum": data.checksum,
                 "image_size": list(data.size), "levels": data.levels, "counts": data.counts(),
                 "bits_stored": data.meta.get("bits_stored"), "leakage": data.meta.get("leakage"),
                 "fit": data.meta.get("fit"), "stored_shapes": data.meta.get("stored_shapes")},
    }
    return AttackRun(results, adversarial, p_clean, p_adv, universal, threat)


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
