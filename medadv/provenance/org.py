"""The organisation's side of the root of trust: start a ledger, enrol, revoke and rotate device keys.

Every function here appends a trust entry signed by the root key (see :mod:`.trust`); the root key
is needed only for these, never for registering or verifying images.
"""

from __future__ import annotations

from typing import Any

from medadv.errors import MedadvError
from medadv.provenance.keys import DeviceKey, PublicKey, check_device_name, public_pem
from medadv.provenance.ledger import AppendResult, Entry, Ledger
from medadv.provenance.trust import LOG_KEY_NAME, TrustRoot, load_trust_root, trust_root_default

_ROOT_FIX = ("pass --root-key ORG.root.key: the organisation's root private key that `medadv provenance init` "
             "wrote for this ledger (not a device key, not the log key).")


def configured_root(path: Any = None) -> TrustRoot | None:
    """The configured trust root (``path``, ``$MEDADV_TRUST_ROOT`` or the config file), or None when none is."""
    import os

    if path or os.environ.get("MEDADV_TRUST_ROOT") or trust_root_default().is_file():
        return load_trust_root(path)
    return None


def require_root(ledger: Ledger, root: DeviceKey, trust: TrustRoot | None = None) -> None:
    """Refuse, before anything is written, a signing key that is not the organisation's root: not the
    configured trust root's key (``trust``), or not the key that signed this ledger's root entries
    (``provenance init``). An entry signed by any other key would be ignored at verification, so the
    operator would believe a key enrolled or revoked when it is not."""
    where = f"{root.path}" if root.path else root.device
    if trust is not None and root.key_id != trust.key_id:
        raise MedadvError(f"{where} (key id {root.key_id}) is not the organisation's root key: the configured trust "
                          f"root {trust.source} is key {trust.key_id}.", _ROOT_FIX)
    public = PublicKey(root.device, root.private_key.public_key())
    found = ledger._lookup("kind", ["log-key"], kind=None).get("log-key", [])
    signers = sorted({r.key_id for r in found if not isinstance(r, Exception)})
    if not any(not isinstance(r, Exception) and r.key_id == root.key_id and r.signature_ok(public) for r in found):
        raise MedadvError(f"{where} (key id {root.key_id}) is not the root key that initialised ledger "
                          f"{ledger.display} (its root entries are signed by {', '.join(signers) or 'no key'}).",
                          _ROOT_FIX)


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
