"""The entry-point gate: verify an :class:`~medadv.data.imageset.ImageSet` before any model sees it.

``evaluate``, ``attack`` and ``audit`` call :func:`check_imageset` when given
``--require-provenance LEDGER``: by default an image that does not verify stops the run with one error
naming the first failing images; with ``only_flag=True`` (``--provenance-flag-only``) the run goes on and
the returned :class:`GateReport` says which images failed, for the results file.

Folder sources are verified file by file (``imageset.files``); npz sources member by member, by
re-reading ``imageset.source`` (the pixels in the ImageSet may have been resized). The files are
re-read at the time of the check: call the gate right before or after loading, not minutes apart.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medadv.errors import MedadvError
from medadv.progress import SILENT, Monitor
from medadv.provenance.digest import ImageDigest, digest_file, digest_npz, parse_member
from medadv.provenance.keys import load_trusted_keys
from medadv.provenance.ledger import open_ledger
from medadv.provenance.verify import Status, Verdict, verify_digests

if TYPE_CHECKING:
    from medadv.data.imageset import ImageSet

_NAMED = 5  # failing images named in the error line


@dataclass
class GateReport:
    """Provenance of one ImageSet. ``statuses`` is aligned with ``imageset.ids``; ``failing`` lists
    the ids of images that did not verify, in ImageSet order."""

    ledger: str
    source: str
    total: int
    counts: dict[str, int]
    failing: list[str]
    statuses: list[str]
    verdicts: list[Verdict] = field(repr=False, default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failing

    def summary(self) -> str:
        parts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()) if n)
        return f"provenance of {self.total} images from {self.source} against ledger {self.ledger}: {parts or 'none'}"

    def to_dict(self) -> dict[str, Any]:
        """For results.json: counts per status and the failing ids with their status."""
        return {"ledger": self.ledger, "source": self.source, "total": self.total, "counts": self.counts,
                "failing": [{"id": v.id, "status": v.status.value, "detail": v.detail}
                            for v in self.verdicts if not v.ok]}


def _file_items(imageset: ImageSet) -> tuple[list[tuple[str, ImageDigest]], dict[int, Verdict]]:
    items: list[tuple[str, ImageDigest]] = []
    unreadable: dict[int, Verdict] = {}
    for k, (image_id, path) in enumerate(zip(imageset.ids, imageset.files or [], strict=True)):
        try:
            items.append((image_id, digest_file(path)))
        except MedadvError as exc:
            unreadable[k] = Verdict(image_id, Status.UNREADABLE, exc.what)
    return items, unreadable


def _npz_items(imageset: ImageSet) -> tuple[list[tuple[str, ImageDigest]], dict[int, Verdict]]:
    npz = Path(imageset.source)
    members = []
    for image_id in imageset.ids:
        file, split, index = parse_member(image_id)
        if file != npz.name:
            raise MedadvError(f"image id {image_id} does not belong to {npz}.",
                              "load the images with medadv's readers.")
        members.append((split, index))
    return list(zip(imageset.ids, digest_npz(npz, members), strict=True)), {}


def check_imageset(imageset: ImageSet, ledger_url: str | os.PathLike[str], *, only_flag: bool,
                   trusted_keys: str | os.PathLike[str] | None = None, monitor: Monitor = SILENT) -> GateReport:
    """Verify every image of ``imageset`` against the ledger at ``ledger_url`` (path or URL).

    ``trusted_keys``: a folder of ``<device>.pub`` files to verify signatures with instead of the
    ledger's ``devices`` table. Raises :class:`MedadvError` naming the first failing images (and how
    many) unless ``only_flag``; a missing or unreadable ledger is always an error.
    """
    if imageset.files is not None:
        items, unreadable = _file_items(imageset)
    elif str(imageset.source).endswith(".npz"):
        items, unreadable = _npz_items(imageset)
    else:
        raise MedadvError(f"cannot check the provenance of images from {imageset.source}: they have no files.",
                          "load them from image files or a .npz with medadv's readers.")
    trusted = load_trusted_keys(trusted_keys) if trusted_keys else None
    with open_ledger(ledger_url) as ledger:
        monitor.log(f"checking provenance of {len(imageset)} images against {ledger.display}")
        verdicts = iter(verify_digests(ledger, items, trusted=trusted))
        display = ledger.display
    ordered = [unreadable[k] if k in unreadable else next(verdicts) for k in range(len(imageset))]
    counts = Counter(v.status.value for v in ordered)
    report = GateReport(display, str(imageset.source), len(ordered), {s.value: counts.get(s.value, 0) for s in Status},
                        [v.id for v in ordered if not v.ok], [v.status.value for v in ordered], ordered)
    if report.failing and not only_flag:
        bad = [v for v in ordered if not v.ok]
        named = ", ".join(f"{v.id} ({v.status.value})" for v in bad[:_NAMED])
        more = f" and {len(bad) - _NAMED} more" if len(bad) > _NAMED else ""
        raise MedadvError(
            f"{len(bad)} of {len(ordered)} images from {imageset.source} did not verify against ledger {display}: "
            f"{named}{more}.",
            "use images registered at acquisition (`medadv provenance verify FILES` explains each), "
            "or pass --provenance-flag-only to run with them flagged.",
        )
    return report
