"""The entry-point gate: verify an :class:`~medadv.data.imageset.ImageSet` before any model sees it.

``evaluate``, ``attack`` and ``audit`` call :func:`check_imageset` when given
``--require-provenance LEDGER``: by default an image that does not verify stops the run with one error
naming the first failing images; with ``only_flag=True`` (``--provenance-flag-only``) the run goes on and
the returned :class:`GateReport` says which images failed, for the results file.

What is verified is *the pixels handed to the model*: the view digest of each image of the ImageSet,
in memory, no second read of the files (a file swapped after loading changes nothing the model sees,
and a file swapped before loading is what the gate judges). The record found must be trusted through
the configured trust root (``trust_root``; see :mod:`.trust`), be registered under this image's name
(file base name or npz member id), and carry the ImageSet's label when a label was signed.

When the ImageSet was resized on load (``--image-size``), its pixels are not what was registered: the
gate then reads each source once, checks that medadv's reader renders it to exactly the pixels in
the ImageSet, and judges the source's own view digest.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medadv.errors import MedadvError
from medadv.progress import SILENT, Monitor
from medadv.provenance.digest import ImageDigest, digest_npz, loaded_view, parse_member, view_digest
from medadv.provenance.ledger import open_ledger
from medadv.provenance.trust import TrustRoot, load_trust_root
from medadv.provenance.verify import Status, Verdict, judge, prepare

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
    head: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.failing

    def summary(self) -> str:
        parts = ", ".join(f"{n} {s}" for s, n in sorted(self.counts.items()) if n)
        return f"provenance of {self.total} images from {self.source} against ledger {self.ledger}: {parts or 'none'}"

    def to_dict(self) -> dict[str, Any]:
        """For results.json: counts per status, the signed head checked against, the failing ids."""
        return {"ledger": self.ledger, "source": self.source, "total": self.total, "counts": self.counts,
                "head": self.head,
                "failing": [{"id": v.id, "status": v.status.value, "detail": v.detail}
                            for v in self.verdicts if not v.ok]}


def _names(imageset: ImageSet) -> list[str]:
    if imageset.files is not None:
        return [Path(f).name for f in imageset.files]
    if str(imageset.source).endswith(".npz"):
        npz = Path(imageset.source).name
        for image_id in imageset.ids:
            file, _, _ = parse_member(image_id)
            if file != npz:
                raise MedadvError(f"image id {image_id} does not belong to {imageset.source}.",
                                  "load the images with medadv's readers.")
        return list(imageset.ids)
    raise MedadvError(f"cannot check the provenance of images from {imageset.source}: they have no files.",
                      "load them from image files or a .npz with medadv's readers.")


def _rendered_source(imageset: ImageSet, k: int, size: int) -> tuple[np.ndarray, str | None] | None:
    """(the source of image ``k`` rendered at ``size`` as medadv's reader does, its native view digest)."""
    import torch

    from medadv.data.folder import resize
    from medadv.data.imageset import to_storage

    if imageset.files is not None:
        path = Path(imageset.files[k])
        fit = str((imageset.meta or {}).get("fit") or "letterbox")
        rendered, _ = loaded_view(path, size, fit)
        return rendered, loaded_view(path)[1]
    _, split, index = parse_member(imageset.ids[k])
    member = digest_npz(imageset.source, [(split, index)])[0]
    with np.load(imageset.source, allow_pickle=False) as z:
        img = np.asarray(z[f"{split}_images"][index])
    chw = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
    out = to_storage(resize(torch.from_numpy(np.ascontiguousarray(chw))[None].float().div_(255), size), 255)[0]
    return out, member.view


def check_imageset(imageset: ImageSet, ledger_url: str | os.PathLike[str], *, only_flag: bool,
                   trust_root: TrustRoot | str | os.PathLike[str] | None = None,
                   monitor: Monitor = SILENT) -> GateReport:
    """Verify every image of ``imageset`` (its pixels, its names, its labels) against the ledger.

    ``trust_root``: the root public key (or its file; default ``$MEDADV_TRUST_ROOT`` or the config
    file). Raises :class:`MedadvError` naming the first failing images (and how many) unless
    ``only_flag``; a missing ledger or trust root is always an error.
    """
    root = trust_root if isinstance(trust_root, TrustRoot) else load_trust_root(trust_root)
    names = _names(imageset)
    lab = np.asarray(imageset.labels)
    labels = [str(int(v)) for v in (lab[:, 0] if lab.ndim > 1 else lab)]
    window = getattr(imageset, "window", None)  # DICOM: the VOI window the model applies, part of its input
    views = [view_digest(imageset.pixels[k], None if window is None else window[k]) for k in range(len(imageset))]
    items = [(image_id, ImageDigest(views[k], names[k], view=views[k])) for k, image_id in enumerate(imageset.ids)]
    with open_ledger(ledger_url, readonly=True) as ledger:
        monitor.log(f"checking provenance of {len(imageset)} images against {ledger.display}")
        ctx = prepare(ledger, root)
        verdicts = judge(ctx, items, labels=labels, by="view")
        h, w = imageset.size
        retry = [k for k, v in enumerate(verdicts) if v.status in (Status.UNREGISTERED, Status.MODIFIED) and h == w]
        if retry:  # resized on load? judge the sources, if they render to exactly these pixels
            again: list[tuple[int, tuple[str, ImageDigest]]] = []
            for k in retry:
                try:
                    got = _rendered_source(imageset, k, h)
                except Exception:  # noqa: BLE001 - an unreadable source keeps its verdict
                    continue
                w = None if window is None else window[k]
                if got is None or got[1] is None or view_digest(got[0], w) != items[k][1].view:
                    continue
                again.append((k, (items[k][0], replace(items[k][1], digest=got[1], view=got[1]))))
            if again:
                redo = judge(ctx, [it for _, it in again], labels=[labels[k] for k, _ in again], by="view")
                for (k, _), v in zip(again, redo, strict=True):
                    verdicts[k] = v
        display, head = ledger.display, ctx.head
    counts = Counter(v.status.value for v in verdicts)
    report = GateReport(display, str(imageset.source), len(verdicts), {s.value: counts.get(s.value, 0) for s in Status},
                        [v.id for v in verdicts if not v.ok], [v.status.value for v in verdicts], verdicts, head)
    if report.failing and not only_flag:
        bad = [v for v in verdicts if not v.ok]
        named = ", ".join(f"{v.id} ({v.status.value})" for v in bad[:_NAMED])
        more = f" and {len(bad) - _NAMED} more" if len(bad) > _NAMED else ""
        raise MedadvError(
            f"{len(bad)} of {len(verdicts)} images from {imageset.source} did not verify against ledger {display}: "
            f"{named}{more}.",
            "use images registered at acquisition (`medadv provenance verify FILES` explains each), "
            "or pass --provenance-flag-only to run with them flagged.",
        )
    return report
