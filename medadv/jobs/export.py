"""``medadv export`` as a library call: a checkpoint's network as a torch.export program or ONNX."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medadv.errors import MedadvError


@dataclass
class ExportJob:
    """Export ``model`` to ``out``; ``format`` pt2 or onnx (default: from the suffix); an existing file
    is refused unless ``force`` (the write is atomic)."""

    model: Path
    out: Path
    format: str | None = None
    force: bool = False


@dataclass
class ExportResult:
    out: Path
    format: str


def export(job: ExportJob) -> ExportResult:
    """Write the export with medadv's metadata embedded (TorchScript is no longer written)."""
    from medadv.io import check_output

    check_output(job.out, kind="file", force=job.force)  # an existing file is refused unless force
    from medadv.models import load_checkpoint
    from medadv.models.external import export_format, export_model

    fmt = export_format(job.out, job.format)  # before loading: a TorchScript or unknown suffix fails fast
    net, meta = load_checkpoint(job.model)
    from medadv.models.interface import refuse_dense_or_volume

    refuse_dense_or_volume(net, "medadv export")
    if (meta.get("defense") or {}).get("kind") == "preprocessing":  # the export would silently drop it
        raise MedadvError(f"{job.model} is a network behind preprocessing defenses, which an export cannot carry.",
                          "export the undefended checkpoint and apply the defenses in your pipeline.")
    export_model(net, fmt, job.out)
    return ExportResult(job.out, fmt)
