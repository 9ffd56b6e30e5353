"""What every job shares: the warning hook and the data checks said before any computing."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from medadv.jobs.gate import Gate, provenance_gate
from medadv.progress import Monitor


class Warn(Protocol):
    """Receives one warning line (without the ``medadv: warning:`` prefix); ``loud`` marks one that changes
    what the figures mean (the checkpoint's own training images in the measured split)."""

    def __call__(self, line: str, loud: bool = False) -> None: ...


def ignore(line: str, loud: bool = False) -> None:
    """The default :class:`Warn`: library callers read the same facts from the result's records."""


def split_leakage(data: Any, warn: Warn) -> None:
    """Patient leakage found on load: one warning (the record is also in ``data.meta['leakage']``)."""
    from medadv.data.leakage import warning

    line = warning(data.meta.get("leakage"), data.split)
    if line:
        warn(line)


def training_overlap(meta: dict, data: Any, data_root: str | Path | None, allow: bool, warn: Warn,
                     say: bool = True) -> None:
    """Check ``data`` against the images the checkpoint was trained and validated on (refuses an overlap
    unless ``allow``); the counts go into data.meta['leakage'], a shared image or patient is warned loudly."""
    from medadv.data.trained_on import check, merge_into, warning

    overlap = check(meta, data, data_root=data_root, allow_overlap=allow)
    merge_into(data, overlap)
    line = warning(overlap)
    if line and say:
        warn(line, loud=True)


@dataclass
class Provenance:
    """``--require-provenance``: verify every image against ``ledger`` (a SQLite path or database URL)
    before any model sees it, trusting only ``trust_root`` (default: $MEDADV_TRUST_ROOT, else the config
    file); ``flag_only`` reports unverified images instead of refusing them."""

    ledger: str | None = None
    flag_only: bool = False
    trust_root: str | None = None

    def gate(self, monitor: Monitor) -> Gate | None:
        return provenance_gate(self.ledger, self.flag_only, monitor, self.trust_root)


@dataclass
class DataOptions:
    """How a split is read beyond its source (see :func:`medadv.evaluate.clean.model_split`)."""

    resplit_by_patient: bool = False
    patient_pattern: str | None = None
    allow_outside_paths: bool = False
    fit: str = "letterbox"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StudyResult:
    """A study's record (results.json: Tables 1-2, the battery, curves...) and the report folder it is in.

    ``is_main`` is False on the other ranks of a torchrun job, which print nothing."""

    record: dict[str, Any]
    out: Path
    is_main: bool = True

    @property
    def report(self) -> Path:
        return self.out / "report.html"


def count_unit(task: str) -> str:
    """What a task's counts count: volumes for a 3D task, else images (unknown names: images)."""
    from medadv.data import TASKS

    return "volumes" if task in TASKS and TASKS[task].volumes else "images"
