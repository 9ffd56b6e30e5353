"""Registration at acquisition: digest every image first, then sign and append the records.

Every input is decoded before the first write, so a missing, corrupt or unsupported file (or a key no
enrollment names) stops the registration with the ledger untouched. Records are then appended in
transactions of ``batch_size``, each extending the Merkle log and storing a head signed by the log
key; if the process dies part-way, running the same registration again adds only the missing ones.

A record binds the image's content digest, its view digest (the pixels as medadv loads them), its
name (file base name or npz member id) and DICOM SOPInstanceUID, and optionally a label entered at
acquisition (``labels``: name -> label, e.g. the task label ``0``/``1`` the gate compares with).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from medadv.errors import MedadvError
from medadv.progress import SILENT, Monitor
from medadv.provenance.digest import ImageDigest, digest_path, expand_inputs
from medadv.provenance.keys import DeviceKey
from medadv.provenance.ledger import AppendResult, Ledger, Record


@dataclass
class RegisterResult:
    files: int
    images: int
    appended: AppendResult
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (file, why), with skip_unreadable
    warnings: list[str] = field(default_factory=list)  # same pixels twice within one .npz (see refuse_second_copies)


def digest_inputs(paths: Iterable[str | Path], monitor: Monitor = SILENT, *,
                  unreadable: list[tuple[str, str]] | None = None) -> tuple[list[Path], list[ImageDigest]]:
    """Files (folders expanded) and the digests of all their images. Raises on the first unreadable file,
    unless ``unreadable`` is a list: then each unreadable file is noted there, (path, why), and skipped."""
    files = expand_inputs(paths)
    items: list[ImageDigest] = []
    for f in monitor.track(files, "digesting", total=len(files)):
        try:
            try:
                items.extend(digest_path(f, with_view=True))
            except MedadvError:
                raise
            except Exception as exc:  # noqa: BLE001 - a decoder's surprise on hostile input is still bad input
                raise MedadvError(f"cannot decode {f} ({type(exc).__name__}: {str(exc)[:80]}).",
                                  "replace the file with an intact copy, or leave it out.") from exc
        except MedadvError as exc:
            if unreadable is None:
                raise
            unreadable.append((str(f), exc.what))
    return files, items


def read_labels_csv(path: str | Path) -> dict[str, str]:
    """``name -> label`` from a CSV with ``path`` (or ``name``) and ``label`` columns (medadv's labels.csv)."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedadvError(f"cannot read labels file {path} ({exc}).", "pass a CSV with path and label columns.") from exc
    out = {}
    for row in rows:
        name, label = row.get("path") or row.get("name"), row.get("label")
        if not name or label is None or label == "":
            raise MedadvError(f"labels file {path} has a row without path and label: {row}.",
                              "give every row a path (or name) and a label.")
        out[Path(name).name] = label.strip()
    return out


def _file_of(name: str) -> str:
    return name.split("#", 1)[0]


def refuse_second_copies(ledger: Ledger, items: list[ImageDigest]) -> list[str]:
    """Refuse an image whose pixels (view digest) or content (digest) are already registered, or listed in
    this registration, under another file's name: two encodings (or copies) of one image would both verify
    as ``duplicate`` (which image is it?), so the second is refused, naming the first. The same image under
    the same name is fine (re-running a registration skips it). Two members of one .npz holding the same
    pixels are the data set's own duplicates: registered, with a warning (returned) naming both."""
    fix = "register each image once, under its original name; verify a copy against that name."
    warnings: list[str] = []

    def clash(item: ImageDigest, other: str, kind: str, where: str) -> None:
        if _file_of(item.name) == _file_of(other):
            warnings.append(f"{item.name} has the same {kind} as {other} ({where}): both will verify as `duplicate`")
            return
        raise MedadvError(f"{item.name} has the same {kind} as {other}, {where}: two copies of one image would both "
                          "verify as `duplicate`.", fix)

    first: dict[tuple[str, str], ImageDigest] = {}
    for item in items:
        for kind, key in (("pixels", item.view), ("content", item.digest)):
            if key is None:
                continue
            seen = first.setdefault((kind, key), item)
            if seen.name != item.name:
                clash(item, seen.name, kind, "both in this registration")
                break
    for kind, found in (("pixels", ledger.by_view(i.view for i in items if i.view)),
                        ("content", ledger.by_digest(i.digest for i in items))):
        for item in items:
            key = item.view if kind == "pixels" else item.digest
            for rec in found.get(key, []) if key else []:
                if isinstance(rec, Record) and rec.name != item.name:
                    clash(item, rec.name, kind, f"already registered as record #{rec.seq} by {rec.device}")
                    break
    return list(dict.fromkeys(warnings))


def register_paths(paths: Iterable[str | Path], ledger: Ledger, signer: DeviceKey, log_key: DeviceKey, *,
                   labels: Mapping[str, str] | None = None, label: str | None = None, batch_size: int = 256,
                   skip_unreadable: bool = False, monitor: Monitor = SILENT) -> RegisterResult:
    """Register PNG/JPEG/DICOM files and .npz members (folders recursively) under ``signer``'s device.

    ``label`` (every image) or ``labels`` (by file name or member id) is signed into the record.
    ``skip_unreadable``: register the readable files and list the others in the result (default: an
    unreadable file stops the registration before anything is written).
    """
    ledger.require_enrolled(signer)  # fail before the (slow) digesting, and before any write
    skipped: list[tuple[str, str]] | None = [] if skip_unreadable else None
    files, items = digest_inputs(paths, monitor, unreadable=skipped)
    if label is not None or labels:
        missing = [i.name for i in items if label is None and i.name not in (labels or {})]
        if missing:
            raise MedadvError(f"no label for {len(missing)} images (e.g. {missing[0]}).",
                              "add them to the labels file, or register them without labels.")
        items = [replace(i, meta={**i.meta, "label": str(label if label is not None else labels[i.name])})  # type: ignore[index]
                 for i in items]
    warnings = refuse_second_copies(ledger, items)
    appended = ledger.append(items, signer, log_key, batch_size=batch_size, monitor=monitor) if items else AppendResult()
    return RegisterResult(len(files), len(items), appended, skipped or [], warnings)
