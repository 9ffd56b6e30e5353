"""Shared fixtures for the service tests (tests/test_serve_*.py): a tiny checkpoint, a ledger with a trust
root, an enrolled device and registered PNGs, tokens of every role, and an app factory.

Imported by the other test_serve_* modules (``from test_serve_support import ...``); holds no tests.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass
class World:
    root: Path
    model: Path
    ledger: str
    trust_root: Path
    service_key: Path
    images: dict[str, Path]  # registered PNGs by name
    tokens: dict[str, str]  # role (and "submitter2") -> token


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def xray(seed: int, size: int = 28) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    base = 120 + 60 * np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * (size / 4) ** 2))
    return np.clip(base + rng.normal(0, 8, (size, size)), 0, 255).astype(np.uint8)


def make_world(base: Path, ledger: str | None = None) -> World:
    """Everything the service needs, in ``base``; the ledger there (SQLite) or at ``ledger`` (a database URL)."""
    from medadv.models import save_checkpoint
    from medadv.models.train import TrainConfig, build_classifier
    from medadv.provenance.keys import generate_key
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.org import enroll, init_ledger, revoke
    from medadv.provenance.register import register_paths
    from medadv.provenance.trust import init_root
    from medadv.serve.store import open_store

    model = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia"))
    ck = save_checkpoint(model, base / "ck", {
        "task": "chest-xray", "seed": 0, "validation": {"auc": 0.5, "sensitivity": 0.5, "specificity": 0.5},
        "data": {"source": "medmnist:pneumoniamnist", "image_size": 28, "split_seed": 0}})
    keys = base / "keys"
    root_key, root_pub, log_key = init_root("hospital", keys)
    ledger = ledger or str(base / "ledger.sqlite")
    images = {}
    for i, name in enumerate(["xray-0.png", "xray-1.png", "xray-2.png", "chest scan #3.png"]):
        p = base / "acq" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(png_bytes(xray(i)))
        images[p.name] = p
    with open_ledger(ledger, create=True) as book:
        init_ledger(book, root_key, log_key)
        dev = generate_key("ct-1", keys)
        enroll(book, root_key, "ct-1", dev.public, log_key)
        register_paths(list(images.values()), book, dev, log_key)
        # a second device whose key is revoked from its enrollment on: its images are no longer vouched for
        stolen = generate_key("ct-2", keys)
        enrolled = enroll(book, root_key, "ct-2", stolen.public, log_key)
        p = base / "acq" / "stolen-0.png"
        p.write_bytes(png_bytes(xray(7)))
        register_paths([p], book, stolen, log_key)
        revoke(book, root_key, "ct-2", stolen.key_id, log_key, effective_seq=enrolled.last_seq + 1, reason="stolen")
        images[p.name] = p
    tokens = {}
    with open_store(ledger) as store:
        for role in ("submitter", "reader", "admin"):
            tokens[role] = store.create_token(role, f"test {role}").token
        tokens["submitter2"] = store.create_token("submitter", "second submitter").token
    return World(base, ck, ledger, root_pub, base / "svc" / "service.key", images, tokens)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("serve"))


def make_app(world: World, **overrides):
    from medadv.serve.app import ServiceConfig, create_app

    cfg = ServiceConfig(model=world.model, ledger=world.ledger, trust_root=str(world.trust_root),
                        service_key=str(world.service_key), **overrides)
    return create_app(cfg)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error_line(resp, status: int, *needles: str) -> dict:
    """A 4xx/5xx answer in medadv's one-line style: {"error": what, "fix": what to do}, no traceback."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error", "fix"}, body
    assert body["error"] and body["fix"] and "\n" not in body["error"] and "Traceback" not in resp.text
    for n in needles:
        assert n in body["error"], body
    return body
