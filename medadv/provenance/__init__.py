"""Infrastructural defense (Finlayson et al., 2018): devices sign images at acquisition, a tamper-evident
Merkle log keeps the record, and medadv's entry points refuse images that fail verification. Trust
starts from an organisation's root key (TUF-like), never from the database.

* :mod:`~medadv.provenance.digest`: the canonical content digest (pixels + how to display them + DICOM
  identity and acquisition tags) and the view digest (the pixels as medadv hands them to a model);
* :mod:`~medadv.provenance.keys`: Ed25519 keys (keystore, 0600 private keys);
* :mod:`~medadv.provenance.trust`: the root of trust, enrollment requests, signed tree heads;
* :mod:`~medadv.provenance.org`: init a ledger, enrol, revoke and rotate device keys (root-signed);
* :mod:`~medadv.provenance.merkle`: RFC 9162 tree hash, inclusion and consistency proofs;
* :mod:`~medadv.provenance.ledger`: the append-only, hash-chained, Merkle-logged ledger (SQLite or PostgreSQL);
* :mod:`~medadv.provenance.register`: registration at acquisition;
* :mod:`~medadv.provenance.audit`: is the log read the log the newest signed head commits to (before any verdict);
* :mod:`~medadv.provenance.verify`: per-image verdicts with inclusion proofs;
* :mod:`~medadv.provenance.gate`: :func:`check_imageset`, the gate the other commands call.
"""

from medadv.provenance.digest import ImageDigest, digest_array, digest_file, digest_npz, pixel_digest, view_digest
from medadv.provenance.gate import GateReport, check_imageset
from medadv.provenance.keys import DeviceKey, PublicKey, generate_key, load_private_key
from medadv.provenance.ledger import ChainReport, Ledger, open_ledger
from medadv.provenance.register import register_paths
from medadv.provenance.trust import TrustRoot, load_trust_root
from medadv.provenance.verify import Status, Verdict, verify_digests, verify_paths

__all__ = ["ChainReport", "DeviceKey", "GateReport", "ImageDigest", "Ledger", "PublicKey", "Status", "TrustRoot",
           "Verdict", "check_imageset", "digest_array", "digest_file", "digest_npz", "generate_key",
           "load_private_key", "load_trust_root", "open_ledger", "pixel_digest", "register_paths", "verify_digests",
           "verify_paths", "view_digest"]
