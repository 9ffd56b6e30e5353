"""The third-party analysis service (Finlayson et al., 2018: "raw clinical images could be processed and
analyzed on a third-party system"): HTTP in, provenance gate -> feature-squeezing screen -> model ->
a hash-chained record and an Ed25519-signed receipt.

* :mod:`~medadv.serve.store`: the service's own tables beside the ledger (hash-chained analyses, hashed
  bearer tokens), same database URL (SQLite or PostgreSQL);
* :mod:`~medadv.serve.receipts`: the service key, signing and offline verification of receipts;
* :mod:`~medadv.serve.analysis`: upload decoding and limits, the provenance check, squeezing, the model;
* :mod:`~medadv.serve.batching`: micro-batching of concurrent requests for the model;
* :mod:`~medadv.serve.app`: the FastAPI application (``/v1`` API, ``/docs``, the web page at ``/``).

FastAPI and uvicorn are imported only by :mod:`~medadv.serve.app`, so the receipt and token code
works without them.
"""

from medadv.serve.receipts import load_or_create_service_key, sign_receipt, verify_receipt, verify_receipt_file
from medadv.serve.store import ROLES, ServiceStore, open_store

__all__ = ["ROLES", "ServiceStore", "load_or_create_service_key", "open_store", "sign_receipt", "verify_receipt",
           "verify_receipt_file"]
