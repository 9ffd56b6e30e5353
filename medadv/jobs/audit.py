"""``medadv audit`` as a library call: the reproduce battery and report for a user's own model and data."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medadv.errors import MedadvError
from medadv.jobs.common import DataOptions, Provenance, StudyResult
from medadv.progress import SILENT, Monitor


@dataclass
class AuditJob:
    """A model (checkpoint folder, TorchScript .pt or ONNX .onnx) and its data, audited into ``out``.

    ``rows``: battery rows (default: every row a registered attack adds); ``limit``: at most this many
    test images per row; ``curves``: robustness curves and the smallest breaking eps. The network's
    description for files without medadv metadata: ``input_size`` (px), ``channels`` of the stored images,
    ``net_channels`` the network takes (default: ``channels``), per-channel ``mean``/``std`` in [0, 1]
    units, the operating ``threshold`` on P(disease)."""

    model: Path
    out: Path
    source: str | None = None
    task: str | None = None
    surrogate: Path | None = None
    train_surrogate: str | None = None
    input_size: int | None = None
    channels: int | None = None
    net_channels: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    threshold: float | None = None
    rows: tuple[str, ...] | None = None
    limit: int | None = None
    curves: bool = True
    image_size: int | None = None
    data: DataOptions = field(default_factory=DataOptions)
    provenance: Provenance = field(default_factory=Provenance)
    data_root: Path | None = None
    seed: int = 0
    device: str = "cpu"


def battery_config(rows: tuple[str, ...] | None, limit: int | None, curves: bool):
    """The battery for these rows (checked against the attack registry), image limit and curves setting."""
    from medadv.evaluate.battery import BatteryConfig, default_rows, known_rows

    # the default rows and the known ones come from the attack registry (register(..., battery=...))
    battery = BatteryConfig(rows=default_rows() if rows is None else tuple(rows))
    known = known_rows()
    unknown = set(battery.rows) - set(known)
    if unknown:
        raise MedadvError(f"unknown battery rows: {', '.join(sorted(unknown))}.", f"choose from {', '.join(known)}.")
    if not curves:
        battery.curve_eps, battery.break_search = (), ()
    if limit is not None:
        battery.n_images = limit
        battery.n_query_images = min(battery.n_query_images, limit)
        battery.curve_images = min(battery.curve_images, limit)
    return battery


def audit(job: AuditJob, *, monitor: Monitor = SILENT) -> StudyResult:
    """Run the battery on ``job.model`` and write ``out/results.json``, ``out/report.html`` and figures."""
    from medadv.dist import current
    from medadv.study import run_audit

    overrides = {"input_size": job.input_size, "data_channels": job.channels,
                 "net_channels": job.net_channels or job.channels, "mean": job.mean, "std": job.std,
                 "threshold": job.threshold, "task": job.task}
    battery = battery_config(job.rows, job.limit, job.curves)
    study = run_audit(job.model, job.out, task=job.task, source=job.source, data_root=job.data_root,
                      surrogate_path=job.surrogate, train_surrogate=job.train_surrogate, overrides=overrides,
                      battery=battery, image_size=job.image_size, seed=job.seed, gate=job.provenance.gate(monitor),
                      monitor=monitor, device=job.device, data_options=job.data.to_dict())
    return StudyResult(study, job.out, is_main=current().is_main)
