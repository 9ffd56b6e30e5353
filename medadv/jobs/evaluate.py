"""``medadv evaluate`` as a library call: a checkpoint's clinical metrics at its saved threshold (Table 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medadv.jobs.common import DataOptions, Provenance, Warn, ignore, split_leakage, training_overlap
from medadv.progress import SILENT, Monitor


@dataclass
class EvaluateJob:
    """Evaluate ``model`` (a checkpoint folder, defended or not) on ``split`` of its data (or ``source``).

    ``out``: also write the metrics there as JSON (an existing file is refused unless ``force``);
    ``image_size`` fits every image on load; ``allow_overlap`` measures a split holding images the model
    was trained or validated on (refused by default; recorded)."""

    model: Path
    split: str = "test"
    out: Path | None = None
    source: str | None = None
    image_size: int | None = None
    batch_size: int = 256
    data: DataOptions = field(default_factory=DataOptions)
    allow_overlap: bool = False
    force: bool = False
    provenance: Provenance = field(default_factory=Provenance)
    data_root: Path | None = None


@dataclass
class EvaluateResult:
    """The metrics record (as written to ``out``), the task and split it measures."""

    metrics: dict[str, Any]
    task: str
    split: str
    out: Path | None = None


def evaluate(job: EvaluateJob, *, monitor: Monitor = SILENT, warn: Warn = ignore) -> EvaluateResult:
    """Load the checkpoint through its defenses, check the split (leakage, overlap, provenance), measure."""
    if job.out is not None:
        from medadv.io import check_output

        check_output(job.out, kind="file", force=job.force)
    from medadv.defenses.checkpoint import load_defended
    from medadv.evaluate.clean import evaluate_model, model_split
    from medadv.io import write_json

    net, meta = load_defended(job.model)  # a defended checkpoint is evaluated through its defenses
    data = model_split(meta, job.split, data_root=job.data_root, source=job.source, image_size=job.image_size,
                       fit_to_model=True, **job.data.to_dict())
    split_leakage(data, warn)
    training_overlap(meta, data, job.data_root, job.allow_overlap, warn)
    gate = job.provenance.gate(monitor)
    provenance = gate(data) if gate else None
    metrics = evaluate_model(net, data, job.batch_size)
    metrics["model"] = str(job.model)
    if meta.get("defense"):
        metrics["defense"] = meta["defense"]
    if provenance is not None:
        metrics["provenance"] = provenance
    if job.out is not None:
        from medadv.results import EVALUATE_SCHEMA, EvaluateResults

        # written from the typed record (medadv.results), its schema first; the returned metrics stay as measured
        record = EvaluateResults.from_json({"schema": EVALUATE_SCHEMA, **metrics}, what=f"the evaluate record for {job.out}")
        write_json(job.out, record.to_json(), replace=job.force)
    return EvaluateResult(metrics, meta["task"], job.split, job.out)
