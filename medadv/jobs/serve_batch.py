"""``medadv serve batch``: the config and result of the service's offline batch job.

The job itself is :func:`medadv.serve.offline.run_batch`: it runs the service's own analysis, and the
service sits above the jobs in the layer order, so the function lives with it and takes this config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ServeBatchJob:
    """Analyse ``images`` (files, or folders of PNG, JPEG and DICOM files) with ``model`` as
    ``POST /v1/analyses`` would, receipts in ``ledger``'s service store, written to ``out`` (results.json and
    receipts/). ``policy``: require-provenance (no diagnosis for images that do not verify) or flag;
    ``submitter``: who the receipts name; ``max_upload_mb`` in MiB; ``screen_threshold``: the
    feature-squeezing score (max L1, 0-2; for a multi-label reader 0-F, F its findings) above which an
    image is flagged; ``resume`` reuses this
    submitter's receipts for files already analysed with the same settings."""

    images: list[Path]
    model: Path
    out: Path
    ledger: str = "medadv-ledger.sqlite"
    policy: str = "require-provenance"
    trust_root: Path | None = None
    service_key: Path | None = None
    submitter: str = "batch"
    max_upload_mb: float = 20.0
    max_pixels: int = 4096 * 4096
    screen_threshold: float = 0.5
    resume: bool = True


@dataclass
class ServeBatchResult:
    """What ``out/results.json`` holds (``settings``, ``summary``, ``files``) on every rank; rank 0 wrote it.
    For a multi-label reader each analysed row's ``diagnosis`` lists every finding, and ``summary`` adds
    ``any_finding`` and ``findings`` (images per finding called present); ``positive`` then counts the images
    with any finding present."""

    record: dict[str, Any]
    out: Path
    is_main: bool = True

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The rows of files that could not be analysed (each with its one-line ``error``)."""
        return [row for row in self.record["files"] if row["status"] == "error"]


__all__ = ["ServeBatchJob", "ServeBatchResult"]
