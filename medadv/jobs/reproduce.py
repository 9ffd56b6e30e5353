"""``medadv reproduce`` and ``medadv demo`` as library calls: the paper's study on shipped or edited plans."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medadv.errors import MedadvError
from medadv.jobs.common import StudyResult
from medadv.progress import SILENT, Monitor


@dataclass
class ReproduceJob:
    """Reproduce the paper into ``out``: ``tasks`` names shipped plans (a sequence or comma-separated;
    default: every one), or ``plans``
    names plan files or shipped plan names (not both); ``defenses`` (``{"name": ..., **settings}``) go in
    front of every victim; ``budget`` (seconds) sizes the plans to this machine (None: as documented);
    ``cache`` keeps the stages (default: .<out>.cache beside ``out``)."""

    out: Path = Path("runs/reproduce")
    tasks: str | tuple[str, ...] | None = None
    plans: tuple[str, ...] = ()
    defenses: tuple[dict[str, Any], ...] = ()
    cache: Path | None = None
    budget: float | None = None
    data_root: Path | None = None
    seed: int = 0
    device: str = "cpu"


@dataclass
class DemoJob:
    """The paper's finding end to end into ``out``: ``plan`` a plan file or shipped name (default:
    demo-224, the paper's regime; ``demo`` is the 28 px run); ``budget`` in seconds (None: the documented
    plan)."""

    out: Path = Path("runs/demo")
    plan: str | None = None
    cache: Path | None = None
    budget: float | None = None
    data_root: Path | None = None
    seed: int = 0
    device: str = "cpu"


def reproduce_plans(job: ReproduceJob) -> list:
    """The job's task plans, each read and checked whole (keys, types, bounds, registry names)."""
    from medadv.study import REPRODUCE_PLANS, check_task_plan, reproduce_plan

    if job.plans and job.tasks is not None:
        raise MedadvError("--plan and --tasks both name the tasks to run.", "pass one of them.")
    tasks = job.tasks if job.tasks is None or isinstance(job.tasks, str) else ",".join(job.tasks)
    names = [t.strip() for t in (tasks or ",".join(REPRODUCE_PLANS)).split(",") if t.strip()]
    unknown = [t for t in names if t not in REPRODUCE_PLANS]
    if not job.plans and (unknown or not names):
        raise MedadvError(f"no reproduction plan for {', '.join(unknown) or 'an empty task list'}.",
                          f"choose from {', '.join(REPRODUCE_PLANS)}, or pass --plan FILE.")
    plans = [reproduce_plan(p) for p in job.plans] if job.plans else [REPRODUCE_PLANS[t] for t in names]
    plans = [replace(p, defense=tuple(job.defenses)) if job.defenses else p for p in plans]
    for p in plans:
        check_task_plan(p)
    return plans


def reproduce(job: ReproduceJob, *, monitor: Monitor = SILENT) -> StudyResult:
    """Check every plan before any training, then run the study (report.html, results.json, figures/)."""
    from medadv.dist import current
    from medadv.study import run_study

    plans = reproduce_plans(job)
    study = run_study("reproduce", plans, job.out, data_root=job.data_root, cache_dir=job.cache,
                      seed=job.seed, monitor=monitor, device=job.device, budget=job.budget)
    return StudyResult(study, job.out, is_main=current().is_main)


def demo(job: DemoJob, *, monitor: Monitor = SILENT) -> StudyResult:
    """The demo study: chest X-ray victim and surrogate, PGD white and black box, report."""
    from medadv.study import DEMO_DEFAULT, check_task_plan, reproduce_plan, run_study

    chosen = reproduce_plan(job.plan or DEMO_DEFAULT)
    check_task_plan(chosen)  # before the budget measures anything
    study = run_study("demo", [chosen], job.out, data_root=job.data_root, cache_dir=job.cache, seed=job.seed,
                      monitor=monitor, device=job.device, budget=job.budget)
    return StudyResult(study, job.out)
