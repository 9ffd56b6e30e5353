"""Micro-batching (concurrent requests share forward passes) and the real server: `medadv serve` on loopback,
an upload over HTTP, its receipt checked offline, and the web page in headless Chromium when installed."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from provenance_support import cli_env, pg_url, run_main  # noqa: F401
from test_serve_support import bearer, make_app, world  # noqa: F401


def test_concurrent_requests_are_batched_and_get_their_own_answers(world):  # noqa: F811
    app = make_app(world, policy="flag", max_batch=8, max_wait_ms=400, rate=1000, burst=1000)
    names = ["xray-0.png", "xray-1.png", "xray-2.png"] * 3  # 9 requests, batches of at most 8

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
            async def one(name):
                return await client.post("/v1/analyses", headers=bearer(world.tokens["submitter"]),
                                         files={"file": (name, world.images[name].read_bytes(), "image/png")})
            return await asyncio.wait_for(asyncio.gather(*(one(n) for n in names)), 120)

    try:
        responses = asyncio.run(go())
        stats = app.state.batcher.stats
        assert all(r.status_code == 201 for r in responses), [r.text for r in responses if r.status_code != 201]
        assert stats.images == len(names) and stats.largest <= 8
        assert stats.largest >= 2 and stats.batches < len(names), stats.to_dict()  # requests shared forward passes
        # each request got the answer for its own image: the same image gives the same P(disease) in any batch
        by_name: dict[str, set[float]] = {}
        for name, r in zip(names, responses, strict=True):
            assert r.json()["image"]["name"] == name
            by_name.setdefault(name, set()).add(round(r.json()["diagnosis"]["p_disease"], 4))
        assert all(len(v) == 1 for v in by_name.values()), by_name
        assert app.state.store.check_chain() == []
    finally:
        from medadv.serve.app import close_app

        close_app(app)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_medadv_serve_on_loopback_end_to_end(world, tmp_path, capsys):  # noqa: F811
    port = _free_port()
    cmd = [sys.executable, "-m", "medadv.cli", "serve", "--model", str(world.model), "--ledger", world.ledger,
           "--trust-root", str(world.trust_root), "--service-key", str(world.service_key), "--port", str(port),
           "--policy", "flag"]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:  # bounded: at most 90 s, one probe every 0.25 s
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{base}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up within 90 s"
            time.sleep(0.25)
        with httpx.Client(base_url=base, timeout=30) as client:
            assert client.get("/v1/model").status_code == 401
            r = client.post("/v1/analyses", headers=bearer(world.tokens["submitter"]),
                            files={"file": ("xray-1.png", world.images["xray-1.png"].read_bytes(), "image/png")})
            assert r.status_code == 201, r.text
            analysis = r.json()
            assert analysis["provenance"]["status"] == "verified" and analysis["diagnosis"] is not None
            assert client.get("/docs").status_code == 200
            (tmp_path / "receipt.json").write_text(json.dumps(analysis["receipt"]))
            shot = _screenshot(base, world.tokens["reader"], analysis["id"], tmp_path)
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    code, out, err = run_main(["provenance", "verify-receipt", tmp_path / "receipt.json", "--public-key",
                               world.service_key.with_suffix(".pub")], capsys)
    assert code == 0 and "verified" in out, err
    if shot is not None:
        from PIL import Image

        img = np.asarray(Image.open(shot).convert("RGB")).astype(float)
        assert img.std() > 10  # not a blank page
        green = (img[..., 1] > 100) & (img[..., 0] < 80) & (img[..., 2] < 80)
        assert green.sum() > 200  # the green "verified" badge was rendered from the API's answer


def _screenshot(base: str, token: str, analysis_id: str, tmp_path) -> object:
    browser = _chromium()
    if browser is None:
        if os.environ.get("MEDADV_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is required here (MEDADV_REQUIRE_CHROMIUM=1) but not installed")
        return None  # the page's HTML is tested in test_serve_api; no browser here to render it
    shot = tmp_path / "page.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--hide-scrollbars", "--window-size=1200,1000",
           "--virtual-time-budget=5000", f"--screenshot={shot}", f"{base}/#token={token}&analysis={analysis_id}"]
    subprocess.run(cmd, capture_output=True, timeout=120)
    assert shot.is_file(), "chromium wrote no screenshot"
    return shot


@pytest.mark.postgres
def test_several_workers_share_one_chain_on_postgresql(pg_url, tmp_path, capsys):  # noqa: F811
    """`medadv serve --workers 2` on a PostgreSQL ledger: concurrent uploads answered by both processes
    land in one intact analyses chain (skipped without MEDADV_TEST_POSTGRES_URL)."""
    from test_serve_support import make_world

    from medadv.serve.receipts import load_public_key_file, verify_receipt
    from medadv.serve.store import open_store

    w = make_world(tmp_path, ledger=pg_url)
    port = _free_port()
    cmd = [sys.executable, "-m", "medadv.cli", "serve", "--model", str(w.model), "--ledger", w.ledger, "--trust-root",
           str(w.trust_root), "--service-key", str(w.service_key), "--port", str(port), "--workers", "2",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{base}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the workers did not come up within 120 s"
            time.sleep(0.25)

        async def go():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                async def one(name):
                    return await client.post("/v1/analyses", headers=bearer(w.tokens["submitter"]),
                                             files={"file": (name, w.images[name].read_bytes(), "image/png")})
                return await asyncio.gather(*(one(n) for n in ["xray-0.png", "xray-1.png", "xray-2.png"] * 4))

        responses = asyncio.run(go())
    finally:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    assert all(r.status_code == 201 for r in responses), [r.text for r in responses]
    pub = load_public_key_file(w.service_key.with_suffix(".pub"))
    assert all(verify_receipt(r.json()["receipt"], pub)[0] for r in responses)
    with open_store(w.ledger, create=False) as store:
        assert store.count() == 12 and store.check_chain() == []
