"""``medadv certify`` as a library call: randomized smoothing certificates (Cohen et al. 2019)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medadv.progress import SILENT, Monitor


@dataclass
class CertifyJob:
    """Certify ``model`` on ``split`` into ``out/results.json``: Gaussian noise ``sigma`` in [0, 1] pixel
    units, ``n`` samples for the certificate and ``n0`` to pick the class, failure probability ``alpha``
    per certificate; ``limit`` certifies a seeded, class-stratified subset; ``batch_size`` noisy samples
    per forward pass."""

    model: Path
    out: Path
    sigma: float = 0.25
    n: int = 1000
    n0: int = 100
    alpha: float = 0.001
    split: str = "test"
    limit: int | None = None
    batch_size: int = 256
    data_root: Path | None = None
    seed: int = 0
    device: str = "cpu"


@dataclass
class CertifyResult:
    """The certificates record (as written to ``results``) on every rank; rank 0 alone wrote it."""

    record: dict[str, Any]
    results: Path
    is_main: bool = True


def certify(job: CertifyJob, *, monitor: Monitor = SILENT) -> CertifyResult:
    """Certify ``job`` (under torchrun the images are dealt by rank and rank 0 writes)."""
    from medadv.defenses.certify import certify_model
    from medadv.dist import current

    record = certify_model(job.model, job.out, sigma=job.sigma, n=job.n, n0=job.n0, alpha=job.alpha, split=job.split,
                           limit=job.limit, seed=job.seed, batch_size=job.batch_size, data_root=job.data_root,
                           device=job.device, monitor=monitor)
    return CertifyResult(record, Path(job.out) / "results.json", is_main=current().is_main)
