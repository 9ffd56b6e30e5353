"""``medadv defend`` as a library call: the defenses study on a shipped or edited plan."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from medadv.errors import MedadvError
from medadv.jobs.common import StudyResult
from medadv.progress import SILENT, Monitor


@dataclass
class DefendJob:
    """The defenses study into ``out``: ``task`` a shipped plan (default chest-xray) or ``plan`` a plan
    file or shipped name (not both). The other fields override the plan when given: ``epochs`` of every
    model, ``n_images`` judged, ``adv_eps`` (adversarial-training L-inf budget, [0, 1] units), and the
    ``preprocessing`` defenses, ``trained`` defenses and ``detectors`` by registered name. ``budget``
    (seconds) sizes the plan to this machine (:mod:`medadv.defense_budget`; None: as planned); the epochs
    and image count given here are kept as given."""

    out: Path = Path("runs/defend")
    task: str | None = None
    plan: str | None = None
    epochs: int | None = None
    n_images: int | None = None
    adv_eps: float | None = None
    preprocessing: tuple[str, ...] | None = None
    trained: tuple[str, ...] | None = None
    detectors: tuple[str, ...] | None = None
    cache: Path | None = None
    data_root: Path | None = None
    seed: int = 0
    device: str = "cpu"
    budget: float | None = None


def defend_plan(job: DefendJob):
    """The job's plan, read and checked whole (with the job's overrides) before any training."""
    from medadv.defense_study import PLANS, check_plan, defend_plan as read_plan

    if job.plan is not None and job.task is not None:
        raise MedadvError("--plan and --task both name the plan to run.", "pass one of them.")
    if job.plan is None and (job.task or "chest-xray") not in PLANS:
        raise MedadvError(f"no defenses plan for task '{job.task}'.", f"choose from {', '.join(PLANS)}, or pass --plan FILE.")
    chosen = read_plan(job.plan or job.task or "chest-xray", job.epochs)  # a file is checked whole before any training
    given = {"n_images": job.n_images, "adv_eps": job.adv_eps, "trained": job.trained, "detectors": job.detectors,
             "preprocessing": job.preprocessing}
    chosen = replace(chosen, **{k: v for k, v in given.items() if v is not None})  # the fields given override
    check_plan(chosen)
    return chosen


def defend(job: DefendJob, *, monitor: Monitor = SILENT) -> StudyResult:
    """Train, defend and judge every defense with adaptive attacks (report.html section Defenses)."""
    from medadv.defense_study import run_defend
    from medadv.dist import current

    fixed = tuple(name for name, value in (("epochs", job.epochs), ("n_images", job.n_images)) if value is not None)
    study = run_defend([defend_plan(job)], job.out, data_root=job.data_root, cache_dir=job.cache, seed=job.seed,
                       monitor=monitor, device=job.device, budget=job.budget, fixed=fixed)
    return StudyResult(study, job.out, is_main=current().is_main)
