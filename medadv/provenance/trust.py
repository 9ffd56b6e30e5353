"""The root of trust (in the manner of TUF): an organisation's root key delegates to device keys and to
the log's key; nothing in the ledger's database is trusted because it is there.

* ``medadv provenance init --org NAME`` makes the root key (``<org>.root.key``, 0600, kept offline) and
  its public key ``<org>.root.pub``: the *trust root* every verifier and gate is configured with
  (``--trust-root FILE``, else ``$MEDADV_TRUST_ROOT``, else ``<user config dir>/medadv/trust-root.pub``).
  It also makes the log key (``log.key``) that signs the ledger's tree heads, and enrols it (a
  root-signed ``log-key`` entry).
* ``keygen`` makes a device key and an *enrollment request* (``<device>.request.json``: the device
  name and public key, signed by the device key itself as proof of possession).
* ``enroll REQUEST --root-key K`` appends a root-signed ``enroll`` entry to the ledger and writes it
  beside the request (``<device>.enrollment.json``). A device key is trusted only for records after
  its enrollment's position in the log.
* ``revoke`` appends a root-signed ``revoke`` entry effective from a log position: records signed by
  that key from that position on are ``revoked``. ``rotate`` is enroll-new-then-revoke-old in one step.

Trust entries are ledger records like image records (same hash chain, same Merkle log, same ledger
id), signed by the root instead of a device, so deleting or rewriting one breaks the chain and the
log's consistency with any head kept before.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medadv import strictjson
from medadv.errors import MedadvError
from medadv.io import atomic_path
from medadv.provenance.digest import canonical_json
from medadv.provenance.keys import (
    DeviceKey,
    PublicKey,
    _write_secret,
    check_device_name,
    keystore_dir,
    load_private_key,
    load_public_pem,
    public_pem,
)

REQUEST_TYPE = "medadv-enroll-request/1"
REQUEST_DOMAIN = b"medadv-enroll-request/1\n"
HEAD_TYPE = "medadv-tree-head/1"
HEAD_DOMAIN = b"medadv-tree-head/1\n"
LOG_KEY_NAME = "log"
TRUST_KINDS = ("enroll", "revoke", "log-key")
REQUEST_MAX_BYTES = 65536
ROOT_PUB_FIX = ("pass the organisation's root public key <org>.root.pub that `medadv provenance init --org ORG` "
                "wrote (not a device's .pub, not a private key).")
HEAD_FILE_MAX_BYTES = 65536


# ------------------------------------------------------------------------------------------ key files


def _write_public(path: Path, pub: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(public_pem(pub).encode())
        os.chmod(tmp, 0o644)


def _new_private(path: Path) -> DeviceKey:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise MedadvError(f"cannot create folder {path.parent} ({exc.strerror}).", "pass a writable --keys DIR.") from exc
    _write_secret(path, pem)
    name = path.name.split(".")[0]
    return DeviceKey(name, key, path)


def init_root(org: str, keys: str | os.PathLike[str] | None = None) -> tuple[DeviceKey, Path, DeviceKey]:
    """Make ``<keystore>/<org>.root.key`` (0600), ``<org>.root.pub`` and the log key ``log.key`` (0600).

    Refuses to overwrite any of them. Returns (root key, root public key file, log key).
    """
    check_device_name(org)
    folder = keystore_dir(keys)
    root_path, log_path = folder / f"{org}.root.key", folder / f"{LOG_KEY_NAME}.key"
    for p in (root_path, log_path):
        if p.exists():
            raise MedadvError(f"{p} already exists.", "use it, or move it away first to make a new one.")
    root = _new_private(root_path)
    pub = root_path.with_suffix(".pub")
    _write_public(pub, root.private_key.public_key())
    log = _new_private(log_path)
    _write_public(log_path.with_suffix(".pub"), log.private_key.public_key())
    return DeviceKey(org, root.private_key, root_path), pub, DeviceKey(LOG_KEY_NAME, log.private_key, log_path)


def load_root_key(path: str | os.PathLike[str]) -> DeviceKey:
    """The root private key from a ``<org>.root.key`` file (0600 enforced). Errors name the organisation's
    root key (never a device key: keygen cannot make a root)."""
    path = Path(path)
    org = path.name.split(".")[0]
    fix = ("pass --root-key ORG.root.key, the organisation's root private key that `medadv provenance init "
           "--org ORG` wrote (keep it offline; it is not a device key).")
    if not path.is_file():
        raise MedadvError(f"no organisation root key at {path}.", fix)
    try:
        return load_private_key(org, path=path)
    except MedadvError as exc:
        if "readable by others" in exc.what:
            raise
        raise MedadvError(exc.what.replace("private key", "root key", 1), fix) from None


def load_log_key(path: str | os.PathLike[str] | None = None, keys: str | os.PathLike[str] | None = None) -> DeviceKey:
    """The log key: ``path``, else ``$MEDADV_LOG_KEY``, else ``<keystore>/log.key``."""
    if path is None and os.environ.get("MEDADV_LOG_KEY"):
        path = os.environ["MEDADV_LOG_KEY"]
    p = Path(path) if path else keystore_dir(keys) / f"{LOG_KEY_NAME}.key"
    if not p.is_file():
        raise MedadvError(f"no log key at {p}.", "pass --log-key FILE (the log.key that `medadv provenance init` wrote) "
                                                 "or set MEDADV_LOG_KEY.")
    return load_private_key(LOG_KEY_NAME, path=p)


@dataclass(frozen=True)
class TrustRoot:
    """The configured root public key (and the file it came from)."""

    public: PublicKey
    source: str

    @property
    def key_id(self) -> str:
        return self.public.key_id


def trust_root_default() -> Path:
    import platformdirs

    return Path(platformdirs.user_config_dir("medadv")) / "trust-root.pub"


def load_trust_root(path: str | os.PathLike[str] | None = None) -> TrustRoot:
    """``path``, else ``$MEDADV_TRUST_ROOT``, else the config file ``<user config dir>/medadv/trust-root.pub``."""
    where = "--trust-root"
    if not path and os.environ.get("MEDADV_TRUST_ROOT"):
        path, where = os.environ["MEDADV_TRUST_ROOT"], "MEDADV_TRUST_ROOT"
    if not path:
        default = trust_root_default()
        if not default.is_file():
            raise MedadvError("no trust root is configured, so no device key can be trusted.",
                              "pass --trust-root ORG.root.pub (written by `medadv provenance init`), set "
                              f"MEDADV_TRUST_ROOT, or copy it to {default}.")
        path, where = default, "the config file"
    p = Path(path)
    if not p.is_file():
        raise MedadvError(f"trust root {p} (from {where}) does not exist.",
                          "pass the <org>.root.pub file that `medadv provenance init` wrote.")
    try:
        data = p.read_bytes()[:65536]
    except OSError as exc:
        raise MedadvError(f"cannot read trust root {p} ({exc.strerror}).", "check its permissions.") from exc
    pub = load_public_pem(data, f"trust root {p}", ROOT_PUB_FIX)
    return TrustRoot(PublicKey(p.name.split(".")[0], pub), str(p))


# ------------------------------------------------------------------------------------- enrollment


def request_bytes(device: str, public_key_pem: str) -> bytes:
    return REQUEST_DOMAIN + canonical_json({"device": device, "public_key": public_key_pem})


def write_request(key: DeviceKey, out: Path) -> Path:
    """``<device>.request.json``: device name and public key, signed by the device key (proof of possession)."""
    pem = public_pem(key.private_key.public_key())
    body = {"type": REQUEST_TYPE, "device": key.device, "public_key": pem, "key_id": key.key_id,
            "proof": key.sign(request_bytes(key.device, pem)).hex()}
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        os.chmod(tmp, 0o644)
    return out


def read_request(path: str | os.PathLike[str]) -> tuple[str, PublicKey]:
    """(device, public key) from an enrollment request, after checking its proof of possession."""
    path = Path(path)
    fix = "pass the <device>.request.json that `medadv provenance keygen` wrote."
    try:
        data = path.read_bytes()[:REQUEST_MAX_BYTES + 1]
    except OSError as exc:
        raise MedadvError(f"cannot read enrollment request {path} ({exc.strerror}).", fix) from exc
    body = strictjson.loads(data, max_bytes=REQUEST_MAX_BYTES, max_depth=4, what=f"enrollment request {path}", fix=fix)
    if not isinstance(body, dict) or body.get("type") != REQUEST_TYPE or not all(
            isinstance(body.get(k), str) for k in ("device", "public_key", "proof")):
        raise MedadvError(f"{path} is not a medadv enrollment request.",
                          "pass the <device>.request.json that `medadv provenance keygen` wrote.")
    device = check_device_name(body["device"])
    pub = PublicKey(device, load_public_pem(body["public_key"], str(path)))
    try:
        proof = bytes.fromhex(body["proof"])
    except ValueError:
        proof = b""
    if len(proof) != 64 or not pub.verify(proof, request_bytes(device, body["public_key"])):
        raise MedadvError(f"enrollment request {path} is not signed by the key it names.",
                          "make a fresh request with `medadv provenance keygen` on the device.")
    return device, pub


# ---------------------------------------------------------------------------------------- tree heads


def head_signed_bytes(head: dict[str, Any]) -> bytes:
    return HEAD_DOMAIN + canonical_json({k: head[k] for k in ("type", "ledger_id", "size", "root", "timestamp",
                                                               "log_key_id")})


def sign_head(log_key: DeviceKey, ledger_id: str, size: int, root: bytes, timestamp: str) -> dict[str, Any]:
    head = {"type": HEAD_TYPE, "ledger_id": ledger_id, "size": size, "root": root.hex(), "timestamp": timestamp,
            "log_key_id": log_key.key_id}
    head["signature"] = log_key.sign(head_signed_bytes(head)).hex()
    return head


def head_problem(head: Any, log_keys: dict[str, PublicKey], ledger_id: str | None = None) -> str | None:
    """Why ``head`` is not a valid signed tree head by a trusted log key (None when it is)."""
    if not isinstance(head, dict) or head.get("type") != HEAD_TYPE:
        return "it is not a medadv signed tree head"
    if not (isinstance(head.get("size"), int) and not isinstance(head.get("size"), bool) and head["size"] >= 0):
        return "its size is not a non-negative integer"
    for k in ("ledger_id", "root", "timestamp", "log_key_id", "signature"):
        if not isinstance(head.get(k), str):
            return f"its {k} is missing or not text"
    try:
        root, sig = bytes.fromhex(head["root"]), bytes.fromhex(head["signature"])
    except ValueError:
        return "its root or signature is not hex"
    if len(root) != 32 or len(sig) != 64:
        return "its root or signature has the wrong length"
    if ledger_id is not None and head["ledger_id"] != ledger_id:
        return f"it is a head of ledger {head['ledger_id']}, not of this ledger ({ledger_id})"
    key = log_keys.get(head["log_key_id"])
    if key is None:
        return f"its log key {head['log_key_id']} is not enrolled by the trust root"
    if not key.verify(sig, head_signed_bytes(head)):
        return "its signature does not verify with the log key"
    return None


def read_head_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A kept signed head (strict, bounded JSON; whether it is a valid head is :func:`head_problem`'s word)."""
    p = Path(path)
    fix = "pass a head saved with `medadv provenance head --out FILE`."
    try:
        data = p.read_bytes()[:HEAD_FILE_MAX_BYTES + 1]
    except OSError as exc:
        raise MedadvError(f"cannot read head file {p} ({exc.strerror}).", fix) from exc
    return strictjson.loads(data, max_bytes=HEAD_FILE_MAX_BYTES, max_depth=4, what=f"head file {p}", fix=fix)


# ------------------------------------------------------------------------------------------ trust state


@dataclass
class Enrollment:
    device: str
    key: PublicKey
    seq: int  # the enroll entry's position: the key signs validly only after it
    entry: Any = None  # the root-signed ledger record (for offline proof bundles)


@dataclass
class TrustState:
    """What the trust root vouches for in one ledger, read from its root-signed entries."""

    root: TrustRoot
    ledger_id: str
    enrolled: dict[str, Enrollment] = field(default_factory=dict)  # by key id
    revoked: dict[str, int] = field(default_factory=dict)  # key id -> first seq it may no longer sign
    log_keys: dict[str, PublicKey] = field(default_factory=dict)
    log_entries: dict[str, Any] = field(default_factory=dict)  # key id -> the root-signed log-key record
    problems: list[tuple[int | None, str]] = field(default_factory=list)  # trust entries that were ignored
