"""Infrastructural defense (Finlayson et al., 2018): devices sign images at acquisition, a tamper-evident
ledger keeps the record, and medadv's entry points refuse images that fail verification.

* :mod:`~medadv.provenance.digest`: the canonical content digest (pixels + how to display them + DICOM
  study/series identity), for files and in-memory arrays;
* :mod:`~medadv.provenance.keys`: Ed25519 device keys (keystore, 0600 private keys, trusted public keys);
* :mod:`~medadv.provenance.ledger`: the append-only, hash-chained, signed ledger (SQLite or PostgreSQL);
* :mod:`~medadv.provenance.register`: registration at acquisition;
* :mod:`~medadv.provenance.verify`: per-image verdicts (verified, modified, unregistered, bad-signature,
  unknown-device, unreadable);
* :mod:`~medadv.provenance.gate`: :func:`check_imageset`, the gate the other commands call.
"""

from medadv.provenance.digest import ImageDigest, digest_array, digest_file, digest_npz, pixel_digest
from medadv.provenance.gate import GateReport, check_imageset
from medadv.provenance.keys import DeviceKey, PublicKey, generate_key, load_private_key, load_trusted_keys
from medadv.provenance.ledger import ChainReport, Ledger, open_ledger
from medadv.provenance.register import register_paths
from medadv.provenance.verify import Status, Verdict, verify_digests, verify_paths

__all__ = ["ChainReport", "DeviceKey", "GateReport", "ImageDigest", "Ledger", "PublicKey", "Status", "Verdict",
           "check_imageset", "digest_array", "digest_file", "digest_npz", "generate_key", "load_private_key",
           "load_trusted_keys", "open_ledger", "pixel_digest", "register_paths", "verify_digests", "verify_paths"]
