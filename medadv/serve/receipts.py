"""Receipts: what the service signs for every analysis, and the offline check of one.

A receipt is a JSON object::

    {"type": "medadv-analysis-receipt/1", "analysis_id", "time", "submitter", "image_digest", "model_digest",
     "result": {provenance, screening, diagnosis, policy},
     "ledger": {"table": "serve_analyses", "seq", "prev_hash", "entry_hash"},
     "service_key_id", "signature"}

``signature`` is Ed25519 over ``DOMAIN + canonical_json(receipt without "signature")`` with the service
key; ``entry_hash`` is ``sha256(ENTRY_DOMAIN + canonical_json(entry))`` where the entry is the receipt's
analysis id, time, submitter, digests, result, seq and prev_hash: the same hash the service's analyses
table chains on. So :func:`verify_receipt` needs only the receipt and the service's public key, and any
edited field (result, digests, time, position, key id or signature) fails.

``result.diagnosis`` is what the served model's task kind answers (:func:`medadv.serve.model.diagnosis`):

* binary (and multi-class, unchanged): ``{"p_disease", "threshold", "positive", "label", "model_digest"}``;
* a multi-label reader: ``{"kind": "multilabel", "findings": [{"name", "probability", "threshold",
  "decision": "present" | "absent"}, ...] (one per finding, the model's order), "any_finding", "present"
  (names), "model_digest"}``, and ``result.screening`` adds ``probabilities`` ("sigmoid per finding") and
  ``range`` ([0, F]).

The signature and the entry hash cover the whole result, so every finding's probability, threshold and
decision is signed: changing, adding or removing any one of them fails verification
(tests/test_serve_multilabel.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medadv.db import row_digest
from medadv.errors import MedadvError
from medadv.provenance.digest import canonical_json
from medadv.provenance.keys import (
    DeviceKey,
    PublicKey,
    load_private_key,
    load_public_pem,
    private_pem,
    write_public_key,
    write_secret,
)

RECEIPT_TYPE = "medadv-analysis-receipt/1"
DOMAIN = b"medadv-analysis-receipt/1\n"
ENTRY_DOMAIN = b"medadv-analysis-entry/1\n"
SERVICE_NAME = "service"
_ENTRY_FIELDS = ("analysis_id", "time", "submitter", "image_digest", "model_digest", "result")
_MAX_RECEIPT = 1 << 20


def entry_hash(entry: dict[str, Any]) -> str:
    """The chain hash of one analysis entry (the fields of :data:`_ENTRY_FIELDS` plus seq and prev_hash)."""
    return row_digest(ENTRY_DOMAIN, canonical_json(entry))


def chain_entry(receipt_or_fields: dict[str, Any], seq: int, prev_hash: str) -> dict[str, Any]:
    out = {k: receipt_or_fields[k] for k in _ENTRY_FIELDS}
    out.update(seq=seq, prev_hash=prev_hash)
    return out


def _signed_bytes(receipt: dict[str, Any]) -> bytes:
    return DOMAIN + canonical_json({k: v for k, v in receipt.items() if k != "signature"})


def sign_receipt(key: DeviceKey, fields: dict[str, Any], seq: int, prev_hash: str) -> dict[str, Any]:
    """The signed receipt for one analysis at chain position ``seq`` after ``prev_hash``."""
    entry = chain_entry(fields, seq, prev_hash)
    receipt: dict[str, Any] = {"type": RECEIPT_TYPE, **{k: fields[k] for k in _ENTRY_FIELDS},
                               "ledger": {"table": "serve_analyses", "seq": seq, "prev_hash": prev_hash,
                                          "entry_hash": entry_hash(entry)},
                               "service_key_id": key.key_id}
    receipt["signature"] = key.sign(_signed_bytes(receipt)).hex()
    return receipt


def load_receipt_json(data: str | bytes, what: str = "the receipt") -> Any:
    """A receipt's JSON, strictly (:func:`medadv.strictjson.loads`: no NaN, no duplicate keys, at most
    1 MiB and 32 levels deep; a receipt nests about 8): raises :class:`MedadvError` for anything else."""
    from medadv.strictjson import loads

    return loads(data, max_bytes=_MAX_RECEIPT, max_depth=32, what=what,
                 fix="use the receipt the service returned, unedited.")


def verify_receipt(receipt: Any, public: PublicKey) -> tuple[bool, str]:
    """(ok, why) for a receipt against the service's public key; never raises on a malformed receipt."""
    if not isinstance(receipt, dict):
        return False, "the receipt is not a JSON object"
    if receipt.get("type") != RECEIPT_TYPE:
        return False, f"the receipt's type is {str(receipt.get('type'))[:40]!r}, not {RECEIPT_TYPE!r}"
    missing = [k for k in (*_ENTRY_FIELDS, "ledger", "service_key_id", "signature") if k not in receipt]
    if missing:
        return False, f"the receipt has no {', '.join(missing)}"
    if receipt["service_key_id"] != public.key_id:
        return False, (f"the receipt names service key {str(receipt['service_key_id'])[:40]}, but the given public "
                       f"key is {public.key_id}")
    sig = receipt["signature"]
    try:
        raw = bytes.fromhex(sig) if isinstance(sig, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 64:
        return False, "the signature is not 64 hex-encoded bytes"
    try:
        signed = _signed_bytes(receipt)
    except (TypeError, ValueError) as exc:
        return False, f"the receipt cannot be put in canonical form ({exc})"
    if not public.verify(raw, signed):
        return False, "the signature does not verify: the receipt was edited or not signed by this key"
    led = receipt["ledger"]
    if not isinstance(led, dict) or not isinstance(led.get("seq"), int) or not isinstance(led.get("prev_hash"), str):
        return False, "the receipt's ledger position is malformed"
    if entry_hash(chain_entry(receipt, led["seq"], led["prev_hash"])) != led.get("entry_hash"):
        return False, "the ledger entry hash does not match the receipt's content"
    return True, f"signed by service key {public.key_id}; analysis {receipt['analysis_id']} at position #{led['seq']}"


def load_public_key_file(path: str | os.PathLike[str]) -> PublicKey:
    p = Path(path)
    if not p.is_file():
        raise MedadvError(f"public key {p} does not exist.", "pass the service's .pub file (`medadv serve` prints it).")
    return PublicKey(SERVICE_NAME, load_public_pem(p.read_bytes()[:65536], f"public key {p}"))


def verify_receipt_file(path: str | os.PathLike[str], public_key: str | os.PathLike[str]) -> tuple[bool, str, Any]:
    """(ok, why, receipt) for a receipt file. Raises MedadvError only for unreadable files."""
    p = Path(path)
    pub = load_public_key_file(public_key)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise MedadvError(f"cannot read receipt {p} ({exc.strerror}).", "check the path.") from exc
    if len(data) > _MAX_RECEIPT:
        return False, f"{p} is larger than a receipt can be ({len(data)} bytes)", None
    try:
        receipt = load_receipt_json(data)
    except MedadvError as exc:
        return False, exc.what.rstrip("."), None
    ok, why = verify_receipt(receipt, pub)
    return ok, why, receipt


def load_or_create_service_key(path: str | os.PathLike[str]) -> tuple[DeviceKey, Path, bool]:
    """The service's Ed25519 key at ``path`` (0600; made, with ``<path>.pub`` beside it, when missing).

    Returns (key, public key file, created)."""
    p = Path(path).expanduser()
    pub = p.with_suffix(".pub")
    created = False
    if not p.exists():
        try:
            p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_secret(p, private_pem(Ed25519PrivateKey.generate()))  # 0600, atomic, never replaces
        except FileExistsError:
            pass  # another process made it first: use theirs
        except OSError as exc:
            raise MedadvError(f"cannot create the service key {p} ({exc.strerror}).",
                              "pass --service-key FILE in a writable folder.") from exc
        else:
            created = True
    key = load_private_key(SERVICE_NAME, path=p)
    if created or not pub.is_file():
        write_public_key(pub, key.public.public_key)
    return key, pub, created
