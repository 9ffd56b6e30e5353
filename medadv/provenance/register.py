"""Registration at acquisition: digest every image first, then sign and append the records.

Every input is decoded before the first write, so a missing, corrupt or unsupported file (or a key the
ledger does not know) stops the registration with the ledger untouched. Records are then appended in
transactions of ``batch_size``; if the process dies part-way, the records already committed form a
valid chain and running the same registration again adds only the missing ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medadv.progress import SILENT, Monitor
from medadv.provenance.digest import ImageDigest, digest_path, expand_inputs
from medadv.provenance.keys import DeviceKey
from medadv.provenance.ledger import AppendResult, Ledger


@dataclass
class RegisterResult:
    files: int
    images: int
    appended: AppendResult


def digest_inputs(paths: Iterable[str | Path], monitor: Monitor = SILENT) -> tuple[list[Path], list[ImageDigest]]:
    """Files (folders expanded) and the digests of all their images; raises on the first unreadable file."""
    files = expand_inputs(paths)
    items: list[ImageDigest] = []
    for f in monitor.track(files, "digesting", total=len(files)):
        items.extend(digest_path(f))
    return files, items


def register_paths(paths: Iterable[str | Path], ledger: Ledger, signer: DeviceKey, *, batch_size: int = 256,
                   monitor: Monitor = SILENT) -> RegisterResult:
    """Register PNG/JPEG/DICOM files and .npz members (folders recursively) under ``signer``'s device."""
    ledger.require_device(signer)  # fail before the (slow) digesting, and before any write
    files, items = digest_inputs(paths, monitor)
    appended = ledger.append(items, signer, batch_size=batch_size, monitor=monitor)
    return RegisterResult(len(files), len(items), appended)
