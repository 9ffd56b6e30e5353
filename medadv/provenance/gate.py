"""The entry-point gate: verify an :class:`~medadv.data.imageset.ImageSet` before any model sees it.

``evaluate``, ``attack`` and ``audit`` call :func:`check_imageset` when given
``--require-provenance LEDGER``: by default an image that does not verify stops the run with one error
naming the first failing images; with ``only_flag=True`` (``--provenance-flag-only``) the run goes on and
the returned :class:`GateReport` says which images failed, for the results file.

One verification path (issue 22): each image's verdict is ``medadv provenance verify``'s verdict on its
stored source (the file, or the npz member: content digest, name, DICOM UIDs, trust through the
configured root ``trust_root``, see :mod:`.trust`), with the ImageSet's label compared when a label was
signed; so the gate and ``verify`` never disagree on a source. A verified source must then be bound to
*the pixels handed to the model*: their view digest is the registered one, or medadv's reader renders
the source to exactly these pixels (resized on load). A file swapped after loading therefore fails
(its source no longer verifies): the gate fails closed rather than vouch for a file it cannot match.
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
from medadv.provenance.digest import ImageDigest, digest_npz, parse_member, view_digest
from medadv.provenance.ledger import open_ledger
from medadv.provenance.trust import TrustRoot, load_trust_root, read_head_file
from medadv.provenance.verify import Status, Verdict, digest_sources, judge_sources, prepare

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


def _member_render(imageset: ImageSet, k: int, size: int) -> list[str]:
    """View digests of npz member ``k`` resized to ``size`` as medadv's npz reader does."""
    import torch

    from medadv.data.folder import resize
    from medadv.data.imageset import to_storage

    _, split, index = parse_member(imageset.ids[k])
    with np.load(imageset.source, allow_pickle=False) as z:
        img = np.asarray(z[f"{split}_images"][index])
    chw = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
    return [view_digest(to_storage(resize(torch.from_numpy(np.ascontiguousarray(chw))[None].float().div_(255),
                                          size), 255)[0])]


def _file_renders(path: Path, h: int, w: int, fit: str) -> list[str]:
    """View digests of ``path`` as medadv's folder reader can hand it to a model: at its stored size, and
    at ``h`` (square) by both of the reader's routes, fitted from the decoded values (``--image-size``) and
    fitted from the quantized stored values (a folder of mixed sizes fitted to the model's input). The
    two differ by a grey level here and there (16-bit, non-square), so both are the reader's own output."""
    import torch

    from medadv.data.folder import Layout, load_images_full, resize

    native = load_images_full([path], None, str(path))
    win = None if native.window is None else native.window[0]
    views = [view_digest(native.pixels[0], win)]
    if h != w:
        return views
    direct = load_images_full([path], h, str(path), fit)
    views.append(view_digest(direct.pixels[0], None if direct.window is None else direct.window[0]))
    a = native.pixels[0]
    levels = int(np.iinfo(a.dtype).max)
    t = torch.from_numpy(a.astype(np.float32) / levels)[None]
    shape = native.shapes[0]
    t = Layout.of(shape, h, fit).to_square(t) if shape[0] != shape[1] else resize(t, h)
    views.append(view_digest(torch.round(t[0] * levels).numpy().astype(a.dtype), win))
    return views


def _sources(imageset: ImageSet, names: list[str], monitor: Monitor) -> list[tuple[str, ImageDigest] | Verdict]:
    """What verify judges, per image of ``imageset``: the content digest of its stored source (file or npz
    member), under the ImageSet's id; or an ``unreadable`` verdict."""
    ids = list(imageset.ids)
    if imageset.files is not None:
        got = digest_sources([Path(f) for f in imageset.files], monitor)
        if len(got) != len(ids):  # a multi-image file: cannot align its images with the ImageSet's
            raise MedadvError(f"{imageset.source}: {len(got)} images in {len(ids)} files.",
                              "check the provenance of single-image files (or an .npz) only.")
        return [replace(g, id=ids[k]) if isinstance(g, Verdict) else (ids[k], g[1]) for k, g in enumerate(got)]
    try:
        members = [parse_member(i)[1:] for i in names]
        digests = digest_npz(imageset.source, members)
    except MedadvError as exc:
        return [Verdict(i, Status.UNREADABLE, exc.what) for i in ids]
    return list(zip(ids, digests, strict=True))


def _bind(imageset: ImageSet, k: int, v: Verdict, item: ImageDigest, window: Any) -> Verdict:
    """A verified verdict holds for the model's input only if the pixels in the ImageSet are what medadv's
    reader makes of the verified source (as registered, or resized on load); else ``modified``."""
    if not v.ok or v.proof is None:
        return v
    pix = view_digest(imageset.pixels[k], None if window is None else window[k])
    if pix in {v.proof["record"].get("view_digest"), item.view} - {None}:
        return v
    h, w = imageset.size
    try:
        if imageset.files is not None:
            fit = str((imageset.meta or {}).get("fit") or "letterbox")
            renders = _file_renders(Path(imageset.files[k]), h, w, fit)
        else:
            renders = _member_render(imageset, k, h) if h == w else []
    except Exception:  # noqa: BLE001 - a source that cannot be rendered again cannot vouch for these pixels
        renders = []
    if pix in renders:
        return v
    return Verdict(v.id, Status.MODIFIED, f"the pixels handed to the model are not what medadv's reader makes of "
                   f"{item.name} ({v.detail}): changed after loading", v.digest, v.seq, v.device)


def check_imageset(imageset: ImageSet, ledger_url: str | os.PathLike[str], *, only_flag: bool,
                   trust_root: TrustRoot | str | os.PathLike[str] | None = None,
                   kept_head: dict[str, Any] | str | os.PathLike[str] | None = None,
                   monitor: Monitor = SILENT) -> GateReport:
    """Verify every image of ``imageset`` (its sources, its names, its labels, its pixels) against the ledger.

    The verdict on each image is ``medadv provenance verify``'s verdict on its source file or npz member
    (:func:`~medadv.provenance.verify.judge_sources`, the one verification path), with the ImageSet's
    label; a verified one must then be bound to the pixels handed to the model (:func:`_bind`).

    ``trust_root``: the root public key (or its file; default ``$MEDADV_TRUST_ROOT`` or the config
    file). ``kept_head``: a signed head kept earlier (or its file): the log must extend it. Raises
    :class:`MedadvError` naming the first failing images (and how many) unless ``only_flag``; a missing
    ledger or trust root is always an error.
    """
    root = trust_root if isinstance(trust_root, TrustRoot) else load_trust_root(trust_root)
    if kept_head is not None and not isinstance(kept_head, dict):
        kept_head = read_head_file(kept_head)
    names = _names(imageset)
    lab = np.asarray(imageset.labels)
    labels = [str(int(v)) for v in (lab[:, 0] if lab.ndim > 1 else lab)]
    window = getattr(imageset, "window", None)  # DICOM: the VOI window the model applies, part of its input
    with open_ledger(ledger_url, readonly=True) as ledger:
        monitor.log(f"checking provenance of {len(imageset)} images against {ledger.display}")
        ctx = prepare(ledger, root, kept_head=kept_head)
        sources = _sources(imageset, names, monitor)
        verdicts = judge_sources(ctx, sources, labels=labels)
        verdicts = [v if isinstance(sources[k], Verdict) else _bind(imageset, k, v, sources[k][1], window)  # type: ignore[index]
                    for k, v in enumerate(verdicts)]
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
