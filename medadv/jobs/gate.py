"""``--require-provenance``: the gate every command that reads images puts in front of the model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medadv.progress import Monitor

Gate = Callable[[Any], dict]
"""A provenance gate: verifies an ImageSet (every image, before any model sees it), returns its record."""


def provenance_gate(ledger: str | None, flag_only: bool, monitor: Monitor, trust_root: str | None = None,
                    kept_head: str | None = None) -> Gate | None:
    """A callable that verifies an ImageSet against the ledger before any model sees it (or None).

    The trust root (and a kept head: ``kept_head``, else ``$MEDADV_KEPT_HEAD``, which the log must extend)
    is loaded here, before any computing, so a missing one fails fast."""
    if ledger is None:
        return None
    import os

    from medadv.provenance.gate import check_imageset
    from medadv.provenance.trust import load_trust_root, read_head_file

    root = load_trust_root(trust_root)
    kept_head = kept_head or os.environ.get("MEDADV_KEPT_HEAD") or None
    kept = read_head_file(kept_head) if kept_head else None

    def gate(images):
        report = check_imageset(images, ledger, only_flag=flag_only, monitor=monitor, trust_root=root,
                                kept_head=kept)
        if not report.ok:
            monitor.log(report.summary())
        return report.to_dict()

    return gate
