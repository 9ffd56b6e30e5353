"""Device keys: Ed25519 (the ``cryptography`` package), stored as PEM in a keystore folder.

The keystore holds ``<device>.key`` (PKCS#8 private key, mode 0600, created with that mode: the secret
is never on disk with wider permissions) and ``<device>.pub`` (SubjectPublicKeyInfo public key). Its
folder is ``--keys``, else ``$MEDADV_KEYS``, else ``<user data dir>/medadv/keys`` (created with mode 0700).

A key is named by its *key id*, the SHA-256 of its raw 32-byte public key (hex, first 32 characters):
records carry the key id, so a device can rotate keys and its old records keep verifying. Whether a
key is *trusted* is decided by :mod:`medadv.provenance.trust` only: a device key counts when the
organisation's root key enrolled it (a root-signed ledger entry), never because its public key sits in
a database table or a folder.

Private keys are not encrypted at rest (a device signs unattended); protect the keystore with the
file system, and load refuses a private key that group or others can read, as ssh does.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medadv.errors import MedadvError
from medadv.io import atomic_path

_DEVICE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_device_name(device: str) -> str:
    """Device names are file-name safe: letters, digits, ``.``, ``_``, ``-``; 1-64 characters."""
    if not _DEVICE.match(device or ""):
        raise MedadvError(f"device name '{device}' is not allowed.",
                          "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
                          "(e.g. ct-scanner-3).")
    return device


def keystore_dir(keys: str | os.PathLike[str] | None = None) -> Path:
    """``keys``, else ``$MEDADV_KEYS``, else the user data folder's ``medadv/keys``."""
    if keys:
        return Path(keys).expanduser()
    if os.environ.get("MEDADV_KEYS"):
        return Path(os.environ["MEDADV_KEYS"]).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("medadv")) / "keys"


def raw_public(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """SHA-256 of the raw public key, first 32 hex characters (128 bits)."""
    return hashlib.sha256(raw_public(public_key)).hexdigest()[:32]


def public_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_pem(data: bytes | str, where: str, fix: str | None = None) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM; ``where`` names its origin in the error, ``fix`` (default: the
    device's .pub file) what to pass instead."""
    fix = fix or "use the <device>.pub file that `medadv provenance keygen` wrote."
    try:
        key = serialization.load_pem_public_key(data.encode() if isinstance(data, str) else data)
    except (ValueError, TypeError) as exc:
        raise MedadvError(f"{where} is not a PEM public key ({str(exc)[:80]}).", fix) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise MedadvError(f"{where} holds a {type(key).__name__}, not an Ed25519 public key.", fix)
    return key


@dataclass(frozen=True)
class PublicKey:
    """A device's public key: what verification needs."""

    device: str
    public_key: Ed25519PublicKey

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self.public_key.verify(signature, message)
            return True
        except InvalidSignature:
            return False


@dataclass(frozen=True)
class DeviceKey:
    """A device's private key: what registration (signing) needs."""

    device: str
    private_key: Ed25519PrivateKey
    path: Path | None = None

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.device, self.private_key.public_key())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)


def private_key_path(device: str, keys: str | os.PathLike[str] | None = None) -> Path:
    return keystore_dir(keys) / f"{check_device_name(device)}.key"


def private_pem(key: Ed25519PrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (what the keystore holds)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path`` with mode 0600, atomically, never replacing an existing file.

    The temporary file is created 0600 (O_EXCL) and hard-linked into place: ``link`` fails if ``path``
    exists, so a key is never overwritten, and a reader (another worker) never sees a half-written key.
    Raises FileExistsError when ``path`` exists (another process may have just made it: the caller
    decides whether that is an error); other OSErrors as they come.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_public_key(path: Path, public_key: Ed25519PublicKey) -> None:
    """``path`` (atomically replaced) holding the PEM public key, mode 0644 whatever the umask: public
    by design, readable by verifiers."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(public_pem(public_key).encode())
        os.chmod(tmp, 0o644)


def _write_secret(path: Path, data: bytes) -> None:
    """:func:`write_secret`, where an existing file is the user's error."""
    try:
        write_secret(path, data)
    except FileExistsError:
        raise MedadvError(f"a private key already exists at {path}.",
                          "use it, or move it away first to make a new one.") from None


def generate_key(device: str, keys: str | os.PathLike[str] | None = None) -> DeviceKey:
    """Make a new key for ``device``: ``<keystore>/<device>.key`` (0600) and ``<device>.pub``.

    Refuses to replace an existing private key (records it signed would stop being re-signable, and
    an overwritten secret is gone for good).
    """
    path = private_key_path(device, keys)
    if path.exists():
        raise MedadvError(f"device {device} already has a private key at {path}.",
                          "use it, or move it away first to make a new one (rotate with `medadv provenance rotate`: "
                          "records signed by the old key before the rotation keep verifying).")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise MedadvError(f"cannot create keystore folder {path.parent} ({exc.strerror}).",
                          "pass --keys DIR (or set MEDADV_KEYS) to a writable folder.") from exc
    key = Ed25519PrivateKey.generate()
    _write_secret(path, private_pem(key))
    try:
        write_public_key(path.with_suffix(".pub"), key.public_key())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return DeviceKey(device, key, path)


def load_private_key(device: str, keys: str | os.PathLike[str] | None = None, path: Path | None = None) -> DeviceKey:
    """``device``'s private key from the keystore (or from ``path``). Refuses keys others can read."""
    path = Path(path) if path else private_key_path(device, keys)
    if not path.is_file():
        raise MedadvError(f"no private key for device {device} at {path}.",
                          f"run `medadv provenance keygen --device {device}` on this device, or pass --keys DIR.")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise MedadvError(f"private key {path} is readable by others (mode {mode:04o}).", f"run `chmod 600 {path}`.")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise MedadvError(
            f"{path} is not a readable unencrypted PEM private key ({str(exc)[:80]}).",
            f"restore the key file, or make a new key with `medadv provenance keygen --device {device}`.",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise MedadvError(f"{path} holds a {type(key).__name__}, not an Ed25519 key.",
                          f"make a device key with `medadv provenance keygen --device {device}`.")
    return DeviceKey(device, key, path)
