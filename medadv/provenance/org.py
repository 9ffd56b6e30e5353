"""The organisation's side of the root of trust: start a ledger, enrol, revoke and rotate device keys.

Every function here appends a trust entry signed by the root key (see :mod:`.trust`); the root key
is needed only for these, never for registering or verifying images.
"""

from __future__ import annotations

from typing import Any

from medadv.errors import MedadvError
from medadv.provenance.keys import DeviceKey, PublicKey, check_device_name, public_pem
from medadv.provenance.ledger import AppendResult, Entry, Ledger
from medadv.provenance.trust import LOG_KEY_NAME


def _body(subject: PublicKey, org: str, **extra: Any) -> dict[str, Any]:
    return {"org": org, "subject_key_id": subject.key_id, "public_key": public_pem(subject.public_key), **extra}


def init_ledger(ledger: Ledger, root: DeviceKey, log_key: DeviceKey) -> AppendResult:
    """Enrol the log key (a root-signed ``log-key`` entry) in a new ledger; the first signed head follows."""
    if ledger.count():
        raise MedadvError(f"ledger {ledger.display} already has records.",
                          "initialise a new ledger, or use this one with its existing trust root.")
    return ledger.append_entries([Entry.trust("log-key", LOG_KEY_NAME, _body(log_key.public, root.device))], root,
                                 log_key)


def enroll(ledger: Ledger, root: DeviceKey, device: str, key: PublicKey, log_key: DeviceKey) -> AppendResult:
    """A root-signed ``enroll`` entry: ``key`` may sign records for ``device`` after this position."""
    check_device_name(device)
    return ledger.append_entries([Entry.trust("enroll", device, _body(key, root.device, device=device))], root, log_key)


def revoke(ledger: Ledger, root: DeviceKey, device: str, key_id: str, log_key: DeviceKey, *,
           effective_seq: int | None = None, reason: str = "") -> AppendResult:
    """A root-signed ``revoke`` entry: records by ``key_id`` from ``effective_seq`` on (default: from this
    entry on) are ``revoked``. An earlier position revokes retroactively (a key stolen on a known day)."""
    seq, _ = ledger.head()
    eff = seq + 1 if effective_seq is None else effective_seq
    if not isinstance(eff, int) or eff < 1:
        raise MedadvError(f"effective position {eff} is not a positive record number.", "pass --from-seq 1 or more.")
    body = {"org": root.device, "subject_key_id": key_id, "effective_seq": eff, "reason": reason}
    return ledger.append_entries([Entry.trust("revoke", device, body)], root, log_key)


def rotate(ledger: Ledger, root: DeviceKey, device: str, new_key: PublicKey, log_key: DeviceKey,
           old_key_ids: list[str]) -> AppendResult:
    """Enrol ``new_key`` for ``device`` and revoke its old keys from the same position, in one transaction."""
    seq, _ = ledger.head()
    entries = [Entry.trust("enroll", device, _body(new_key, root.device, device=device))]
    entries += [Entry.trust("revoke", device, {"org": root.device, "subject_key_id": k, "effective_seq": seq + 2,
                                               "reason": "rotated"}) for k in old_key_ids]
    return ledger.append_entries(entries, root, log_key)
