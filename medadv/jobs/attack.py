"""``medadv attack`` as a library call: data, victim, threat model and attack assembled, run and saved.

The victim is loaded through its defenses (adaptively, with BPDA, unless ``non_adaptive``); the split is
checked for patient leakage and for the checkpoint's own training images, then verified against the
provenance ledger when asked, before the attack sees it. Under torchrun every rank attacks its batches
and rank 0 alone writes ``out`` (results.json, schema medadv-results/1, and the adversarial images)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medadv.errors import MedadvError
from medadv.jobs.common import DataOptions, Provenance, Warn, ignore, split_leakage, training_overlap
from medadv.progress import SILENT, Monitor


@dataclass
class AttackJob:
    """One attack run. Pixel quantities (``eps``, ``step_size``) are in [0, 1] units (L2: whole-image norm).

    ``attack``: a registered attack name; ``surrogate``: craft on this checkpoint and evaluate on ``model``
    (transfer black box); ``preset``: None or 'paper' (eps 0.01, step 0.005, 20 steps, opposite class);
    ``target``: opposite, disease, healthy, none or class:K; ``mask``: a PNG at the stored image size whose
    nonzero pixels may change; ``grid``: 'data' (the images' own bit depth; the images are saved) or
    'none' (continuous; nothing is saved); ``max_queries``, ``patch_fraction``, ``fast`` (fp32, bf16) and
    ``version`` (AutoAttack's standard or fast) go to the attacks that take them; ``limit`` attacks a
    seeded, class-stratified subset; ``non_adaptive`` attacks a defended checkpoint as a naive evaluator
    would."""

    model: Path
    attack: str
    out: Path
    task: str | None = None
    surrogate: Path | None = None
    preset: str | None = None
    eps: float | None = None
    steps: int | None = None
    step_size: float | None = None
    norm: str | None = None
    target: str | None = None
    random_start: bool = True
    mask: Path | None = None
    grid: str = "data"
    max_queries: int | None = None
    patch_fraction: float | None = None
    fast: str | None = None
    version: str | None = None
    split: str = "test"
    limit: int | None = None
    save_images: bool = True
    source: str | None = None
    image_size: int | None = None
    batch_size: int = 128
    non_adaptive: bool = False
    data: DataOptions = field(default_factory=DataOptions)
    allow_overlap: bool = False
    provenance: Provenance = field(default_factory=Provenance)
    data_root: Path | None = None
    seed: int = 0
    device: str = "cpu"


@dataclass
class AttackResult:
    """The attack's record (what ``out/results.json`` holds) on every rank; rank 0 alone wrote ``out``."""

    results: dict[str, Any]
    out: Path
    is_main: bool = True

    @property
    def results_file(self) -> Path:
        return self.out / "results.json"


def read_mask(path: Path | None):
    """A PNG/JPEG mask (nonzero = may change) as an H×W tensor of 0/1."""
    if path is None:
        return None
    import numpy as np
    import torch

    from medadv.data.folder import read_image

    x, _ = read_image(path)
    return torch.from_numpy((x.max(axis=0) > 0).astype(np.float32))


def threat_model(job: AttackJob, levels: Any, spec: Any = None):
    """The job's threat model: the preset (or the default, 8/255, 20 steps, opposite) with the job's changes;
    ``levels`` are the data's storage levels (None with grid 'none'); ``spec``: the victim's, whose task kind
    and classes give the target its meaning (a finding named in the target becomes its column)."""
    from medadv.attacks import PAPER, ThreatModel
    from medadv.kinds import parse_target

    if job.preset not in (None, "paper"):
        raise MedadvError(f"unknown preset '{job.preset}'.", "use --preset paper or set --eps/--steps yourself.")
    base = PAPER if job.preset == "paper" else ThreatModel(eps=8 / 255, steps=20, target="opposite")
    target = job.target
    victim: dict[str, Any] = {}
    if spec is not None:
        from medadv.kinds import get_kind

        if target is not None:
            target = str(parse_target(target, tuple(spec.class_names)))
        elif job.preset is None:  # the kind's own default goal (a segmentation model's: destroy the mask)
            target = get_kind(getattr(spec, "kind", "binary")).default_target or None
        victim = dict(classes=len(spec.class_names), kind=getattr(spec, "kind", "binary"))
    changes = {k: v for k, v in dict(eps=job.eps, steps=job.steps, norm=job.norm, target=target,
                                     step_size=job.step_size).items() if v is not None}
    if victim:  # the victim's kind and its target in one change: a class target never meets a mask's kind
        base = base.with_(**victim, **({"target": changes.pop("target")} if "target" in changes else {}))
    if job.grid not in ("data", "none"):
        raise MedadvError(f"--grid {job.grid!r} is not 'data' or 'none'.", "pass --grid data or --grid none.")
    return base.with_(**changes, random_start=base.random_start and job.random_start,
                      levels=levels if job.grid == "data" else None, mask=read_mask(job.mask))


def attack_params(job: AttackJob) -> tuple[Any, dict[str, Any]]:
    """The attack's registration and the settings it takes; a flag it does not take is refused."""
    # which flags an attack takes, and whether it is fitted, come from its registration (medadv.attacks.registry)
    from medadv.attacks.registry import spec as attack_spec, takes

    params: dict[str, Any] = {"max_queries": job.max_queries} if job.max_queries is not None else {}
    if job.patch_fraction is not None:
        if not 0 < job.patch_fraction < 1:
            raise MedadvError(f"--patch-fraction {job.patch_fraction} is not between 0 and 1.",
                              "pass e.g. --patch-fraction 0.1.")
        params["patch_fraction"] = job.patch_fraction
    chosen = attack_spec(job.attack)
    if job.fast is not None:
        if not chosen.takes("fast") or job.fast not in ("fp32", "bf16"):
            raise MedadvError(f"--fast {job.fast} with --attack {job.attack}: the fast path is fp32 or bf16, for "
                              f"{', '.join(takes('fast'))}.",
                              "pass --fast fp32 or --fast bf16 with a gradient attack, or leave --fast out.")
        params["fast"] = job.fast
    if job.version is not None:
        if not chosen.takes("version"):
            raise MedadvError(f"--version is not an option of {job.attack}.",
                              f"pass --attack {' or '.join(takes('version'))}, or leave --version out.")
        params["version"] = job.version
    if chosen.needs_fit and job.steps is not None:
        params["steps"] = job.steps  # optimization steps of the fitted perturbation
    return chosen, params


def shard_folder(job: AttackJob, data: Any, threat: Any, params: dict) -> Path:
    """Where a sharded attack keeps its finished batches: beside ``out``, keyed by everything that decides
    them, so a rerun of the same job resumes and any other job starts afresh."""
    from medadv.cache import model_fingerprint
    from medadv.evaluate.runner import threat_record
    from medadv.runinfo import config_hash

    key = config_hash({"model": model_fingerprint(job.model),
                       "surrogate": job.surrogate and model_fingerprint(job.surrogate),
                       "data": data.checksum, "ids": list(data.ids), "attack": job.attack,
                       "threat": threat_record(threat), "params": params, "seed": job.seed,
                       "batch_size": job.batch_size})
    return job.out.parent / f".{job.out.name}.shards" / key


def attack(job: AttackJob, *, monitor: Monitor = SILENT, warn: Warn = ignore) -> AttackResult:
    """Run the attack and (rank 0) write ``job.out``; returns the results record on every rank."""
    import numpy as np

    from medadv.defenses.checkpoint import load_defended
    from medadv.dist import current
    from medadv.evaluate.clean import model_split
    from medadv.evaluate.runner import run_attack
    from medadv.report.save import save_attack

    shard = current()  # rank 0 of 1 unless started by torchrun (medadv.dist.init_from_env)
    device = job.device
    # a defended checkpoint is attacked as the whole pipeline; adaptively (BPDA) unless asked otherwise
    victim, meta = load_defended(job.model, device, adaptive=not job.non_adaptive)
    if job.task is not None and job.task != meta["task"]:
        raise MedadvError(f"--task {job.task} does not match the model, which was trained for {meta['task']}.",
                          f"pass --task {meta['task']} or another model.")
    from medadv.data.tasks import TASKS

    volumes = meta["task"] in TASKS and TASKS[meta["task"]].volumes
    if volumes:  # at the door: an attack that assumes 2D images is refused before any data is read
        from medadv.attacks.registry import check_volumes

        check_volumes(job.attack)
    crafter = load_defended(job.surrogate, device, adaptive=True)[0] if job.surrogate else None
    options = dict(job.data.to_dict(), fit_to_model=True)
    data = model_split(meta, job.split, data_root=job.data_root, source=job.source, image_size=job.image_size,
                       **options)
    split_leakage(data, warn)
    # every rank checks (and refuses) alike; rank 0 alone says so
    training_overlap(meta, data, job.data_root, job.allow_overlap, warn, say=shard.is_main)
    full = None
    if job.limit is not None and job.limit < len(data):
        from medadv.evaluate.battery import stratified_subset

        full, data = data, stratified_subset(data, job.limit, job.seed)
    gate = job.provenance.gate(monitor)
    provenance = gate(data) if gate else None
    threat = threat_model(job, data.levels, victim.spec)
    chosen, params = attack_params(job)
    fit_data = model_split(meta, "train", data_root=job.data_root, source=job.source, image_size=job.image_size,
                           **options) if chosen.needs_fit else None
    if fit_data is not None and gate:
        gate(fit_data)
    randomized = False
    if meta.get("defense") and not job.non_adaptive:  # randomness detected -> expectation over transformation
        from medadv.evaluate.adaptive import adaptive_victim

        victim, randomized = adaptive_victim(victim, data.stored(np.arange(min(len(data), 16))).to(device))
    resume = shard_folder(job, data, threat, params) if shard.distributed else None
    run = run_attack(job.attack, victim, data, threat, seed=job.seed, surrogate=crafter, fit_data=fit_data,
                     params=params, batch_size=job.batch_size, monitor=monitor, shard=shard, resume_dir=resume)
    if not shard.is_main:  # every rank holds the same record; rank 0 alone writes it
        return AttackResult(run.results, job.out, is_main=False)
    if full is not None:  # the split's clean figure, apart from the attacked subset's (clean and adversarial)
        from medadv.evaluate.clean import evaluate_model

        run.results["clean_full_split"] = evaluate_model(victim, full)
    if data.volumes:  # the budget in stored and real units, and the memory the 3D attack took
        import resource

        from medadv.data.nifti import budget_record

        tm = run.results["attack"]["threat_model"]
        run.results["volumes"] = budget_record(data, tm.get("eps"), tm.get("norm"))
        # ru_maxrss is KiB on Linux: the process's peak, so it bounds the attack's (loading included)
        run.results["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    run.results["model"] = {"path": str(job.model), "arch": victim.spec.arch, "task": meta["task"],
                            "threshold": victim.threshold, "input_size": victim.spec.input_size}
    if meta.get("defense"):
        from medadv.evaluate.adaptive import defense_record

        run.results["defense"] = defense_record(victim, meta["defense"], data, job.seed, job.non_adaptive,
                                                randomized=randomized)
    if job.surrogate:
        run.results["surrogate"] = {"path": str(job.surrogate), "arch": crafter.spec.arch}
    if provenance is not None:
        run.results["provenance"] = provenance
    if shard.distributed:
        run.results["distributed"] = {"world_size": shard.world_size, "sharded": "attack batches (batch b on rank b % N)"}
    save_attack(job.out, data, run, victim, save_images=job.save_images and job.grid == "data", monitor=monitor,
                stored=job.grid == "data")
    if resume is not None:
        import shutil

        shutil.rmtree(resume.parent, ignore_errors=True)  # the job is written: its finished batches are not needed
    return AttackResult(run.results, job.out)
