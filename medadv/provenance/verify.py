"""Per-image verdicts: is this the image a trusted device registered?

An image is looked up by its canonical digest. A record with that digest whose signature verifies
with its device's public key makes it ``verified``. Otherwise the verdict says why not:

* ``bad-signature``: a record has the digest but its signature does not verify (a forged or edited row);
* ``unknown-device``: a record has the digest but its key is neither in the ledger's ``devices`` table
  nor (with ``trusted``) among the trusted keys;
* ``modified``: no record has the digest, but one has the same name (file base name or npz member id),
  the same name stem (``x.png`` for a registered ``x.jpg``), the same DICOM SOPInstanceUID or the same
  DICOM series: the pixels, their display attributes or
  their study/series changed since registration, or an image was slipped into a registered series;
* ``unregistered``: nothing in the ledger matches;
* ``unreadable``: the file is missing, corrupt or not a supported image (the detail says which).

Verification reads the ledger only; it checks the records it uses, not the whole chain (that is
``check-ledger``'s job, O(ledger size)).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from medadv.errors import MedadvError
from medadv.progress import SILENT, Monitor
from medadv.provenance.digest import ImageDigest, digest_npz, digest_path, expand_inputs
from medadv.provenance.keys import PublicKey
from medadv.provenance.ledger import Ledger, Record, name_stem


class Status(str, Enum):
    VERIFIED = "verified"
    MODIFIED = "modified"
    UNREGISTERED = "unregistered"
    BAD_SIGNATURE = "bad-signature"
    UNKNOWN_DEVICE = "unknown-device"
    UNREADABLE = "unreadable"

    def __str__(self) -> str:
        return self.value


@dataclass
class Verdict:
    """The verdict on one image. ``id`` is the path as given (``path#split/index`` for npz members);
    ``seq``/``device`` name the record that verified it, or the one it was found to differ from."""

    id: str
    status: Status
    detail: str
    digest: str | None = None
    seq: int | None = None
    device: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is Status.VERIFIED

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d


def _signed_by(rec: Record) -> str:
    return f"record #{rec.seq}, signed by {rec.device} at {rec.created_at}"


def _judge(image_id: str, item: ImageDigest, matches: list[Record], keys: dict[str, PublicKey],
           identity: dict[str, dict[str, Record]]) -> Verdict:
    bad: Record | None = None
    unknown: Record | None = None
    for rec in matches:
        key = keys.get(rec.key_id)
        if key is None or key.device != rec.device:
            unknown = unknown or rec
        elif rec.signature_ok(key):
            return Verdict(image_id, Status.VERIFIED, _signed_by(rec), item.digest, rec.seq, rec.device)
        else:
            bad = bad or rec
    if bad is not None:
        return Verdict(image_id, Status.BAD_SIGNATURE,
                       f"record #{bad.seq} claims device {bad.device} but its signature does not verify "
                       "(forged or edited)",
                       item.digest, bad.seq, bad.device)
    if unknown is not None:
        return Verdict(image_id, Status.UNKNOWN_DEVICE,
                       f"record #{unknown.seq} is signed by device {unknown.device} (key {unknown.key_id}), "
                       "whose public key is not trusted", item.digest, unknown.seq, unknown.device)
    for column, value, what in (("name", item.name, "name"), ("stem", name_stem(item.name), "name stem"),
                                ("uid", item.uid, "SOPInstanceUID"), ("series_uid", item.series_uid, "DICOM series")):
        near = identity[column].get(value) if value else None
        if near is not None:
            return Verdict(image_id, Status.MODIFIED,
                           f"differs from the image registered with this {what} ({_signed_by(near)}): "
                           "pixels, display attributes or study/series changed",
                           item.digest, near.seq, near.device)
    return Verdict(image_id, Status.UNREGISTERED, "no ledger record has this image's digest, name or DICOM UIDs",
                   item.digest)


def verify_digests(ledger: Ledger, items: Sequence[tuple[str, ImageDigest]], *,
                   trusted: dict[str, PublicKey] | None = None) -> list[Verdict]:
    """Verdicts for ``(image id, digest)`` pairs, in order; a few queries for the whole batch."""
    keys = trusted if trusted is not None else ledger.device_keys()
    by_digest = ledger.by_digest(d.digest for _, d in items)
    misses = [d for _, d in items if d.digest not in by_digest]
    identity = ledger.by_identity((d.name for d in misses), (d.uid for d in misses if d.uid),
                                  (d.series_uid for d in misses if d.series_uid))
    return [_judge(i, d, by_digest.get(d.digest, []), keys, identity) for i, d in items]


def verify_paths(paths: Iterable[str | Path], ledger: Ledger, *, trusted: dict[str, PublicKey] | None = None,
                 monitor: Monitor = SILENT) -> list[Verdict]:
    """Verdicts for files (PNG, JPEG, DICOM; every member of an .npz; folders recursively).

    A file that cannot be read gets an ``unreadable`` verdict rather than an exception, so one bad
    file does not hide the verdicts on the others.
    """
    files = expand_inputs(paths)
    items: list[tuple[str, ImageDigest]] = []
    unreadable: dict[int, Verdict] = {}
    for path in monitor.track(files, "digesting", total=len(files)):
        try:
            digests = digest_path(path)
        except MedadvError as exc:
            unreadable[len(items) + len(unreadable)] = Verdict(str(path), Status.UNREADABLE, exc.what)
            continue
        if path.suffix.lower() == ".npz":
            items.extend((f"{path}#{d.name.split('#', 1)[1]}", d) for d in digests)
        else:
            items.extend((str(path), d) for d in digests)
    verdicts = iter(verify_digests(ledger, items, trusted=trusted))
    total = len(items) + len(unreadable)
    return [unreadable[k] if k in unreadable else next(verdicts) for k in range(total)]


def verify_npz_members(npz: str | Path, members: Sequence[tuple[str, int]], ledger: Ledger, *,
                       trusted: dict[str, PublicKey] | None = None) -> list[Verdict]:
    """Verdicts for chosen members ``(split, index)`` of one .npz file, in the order given."""
    digests = digest_npz(npz, members)
    return verify_digests(ledger, [(f"{npz}#{d.name.split('#', 1)[1]}", d) for d in digests], trusted=trusted)
