"""Service load: throughput and latency of `medadv serve` at 1, 8 and 32 concurrent clients, and a fault run.

    python bench/service_load.py [--requests 300] [--max-seconds 60] [--clients 1,8,32] [--model DIR]
                                 [--max-batch 32] [--max-wait-ms 5] [--fault] [--json]
                                 [--postgres URL --workers N] [--stacks auto,asyncio] [--rounds N]

Everything runs on loopback (127.0.0.1). The server is a real `medadv serve` subprocess (uvicorn, one
worker) on a fresh SQLite ledger with a trust root, an enrolled device and the uploads registered, so
every request is verified, screened (3 forward passes: image, 5-bit, 2x2 median), diagnosed, chained
and signed. Uploads are 28 px PNGs: real PneumoniaMNIST test images from ``$MEDADV_DATA`` or
``../shared/data`` (synthetic when absent). The model is ``--model`` or a randomly initialised ResNet-18
chest-xray checkpoint at 28 px (the speed does not depend on the weights). Clients are async httpx
clients, one connection each; each level sends ``--requests`` uploads after a warm-up, or stops at
``--max-seconds``. Reported per level: analyses/s, p50/p99 latency, the mean model batch.

``--postgres URL``: the ledger in a fresh database on that server (dropped afterwards), which lets
``--workers N`` run N server processes.

``--stacks auto,asyncio --rounds N``: the server on what uvicorn picks (uvloop and httptools when they are
installed, as ``uvicorn[standard]`` brings them) beside the pure-Python stack (asyncio's loop, h11), in N
interleaved rounds; per level, the round with the median throughput.

``--fault``: under 8 clients, SIGKILL the server after ``--kill-after`` seconds, restart it, and count
the analyses that were answered 201 but are missing from the analyses table (goal 0), and whether the
provenance ledger's check and the analyses chain still pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _images(n: int) -> tuple[list[np.ndarray], str]:
    data = Path(os.environ.get("MEDADV_DATA") or REPO.parent / "shared" / "data") / "medmnist" / "pneumoniamnist.npz"
    if data.is_file():
        with np.load(data, allow_pickle=False) as z:
            return list(z["test_images"][:n]), "pneumoniamnist test (28 px)"
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(n)], "synthetic 28 px"


def setup(base: Path, model: str | None, n_images: int, ledger_url: str | None = None) -> dict:
    from PIL import Image

    from medadv.models import save_checkpoint
    from medadv.models.train import TrainConfig, build_classifier
    from medadv.provenance.keys import generate_key
    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.org import enroll, init_ledger
    from medadv.provenance.register import register_paths
    from medadv.provenance.trust import init_root
    from medadv.serve.store import open_store

    if model is None:
        net = build_classifier(TrainConfig(task="chest-xray"), 1, ("normal", "pneumonia"))
        model = str(save_checkpoint(net, base / "model", {"task": "chest-xray", "seed": 0}))
    imgs, what = _images(n_images)
    files = []
    for i, arr in enumerate(imgs):
        p = base / "scans" / f"scan-{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(p)
        files.append(p)
    root, root_pub, log = init_root("bench", base / "keys")
    ledger = ledger_url or str(base / "ledger.sqlite")
    with open_ledger(ledger, create=True) as book:
        init_ledger(book, root, log)
        dev = generate_key("scanner", base / "keys")
        enroll(book, root, "scanner", dev.public, log)
        register_paths(files, book, dev, log)
    with open_store(ledger) as store:
        tokens = {r: store.create_token(r, "bench").token for r in ("submitter", "reader", "admin")}
    bodies = []
    for p in files:
        bodies.append((p.name, p.read_bytes()))
    return {"model": model, "ledger": ledger, "trust_root": str(root_pub), "key": str(base / "svc" / "svc.key"),
            "tokens": tokens, "bodies": bodies, "images": what}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pure_python_stack() -> str:
    """A folder whose ``uvloop`` and ``httptools`` refuse to import: uvicorn's "auto" then picks asyncio's
    event loop and h11 (pure Python), the server as it ran before those two were dependencies."""
    folder = Path(tempfile.gettempdir()) / "medadv-bench-pure-stack"
    folder.mkdir(exist_ok=True)
    for name in ("uvloop", "httptools"):
        (folder / f"{name}.py").write_text(f"raise ImportError('{name} left out by bench/service_load.py')\n")
    return str(folder)


def start_server(w: dict, port: int, args: argparse.Namespace) -> subprocess.Popen:
    import httpx

    cmd = [sys.executable, "-m", "medadv.cli", "serve", "--model", w["model"], "--ledger", w["ledger"],
           "--trust-root", w["trust_root"], "--service-key", w["key"], "--port", str(port), "--host", "127.0.0.1",
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--rate", "100000",
           "--burst", "100000", "--threads", str(args.threads), "--workers", str(args.workers)]
    path = [str(REPO)]
    if getattr(args, "stack", "auto") == "asyncio":
        path.insert(0, _pure_python_stack())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    # its own process group, so a kill reaches uvicorn's worker processes too (a whole-service crash)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the server's own group (start_new_session): uvicorn and its workers
    except ProcessLookupError:
        pass


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    kill_group(proc, sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        kill_group(proc, signal.SIGKILL)
        proc.wait()


async def load(base_url: str, w: dict, clients: int, requests: int, max_seconds: float,
               answered: list | None = None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {w['tokens']['submitter']}"}
    lat: list[float] = []
    codes: dict[int, int] = {}
    errors = 0
    counter = iter(range(requests))
    t_end = time.monotonic() + max_seconds

    async def worker(k: int) -> None:
        nonlocal errors
        async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=httpx.Limits(max_connections=1)) as c:
            for i in counter:
                if time.monotonic() > t_end:
                    return
                name, body = w["bodies"][i % len(w["bodies"])]
                t0 = time.perf_counter()
                try:
                    r = await c.post("/v1/analyses", headers=headers, files={"file": (name, body, "image/png")})
                except httpx.TransportError:
                    errors += 1
                    if answered is not None:
                        return  # the server is gone (fault run)
                    continue
                lat.append(time.perf_counter() - t0)
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if answered is not None and r.status_code == 201:
                    answered.append(r.json()["id"])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    ok = codes.get(201, 0)
    q = np.quantile(lat, [0.5, 0.99]) if lat else [float("nan")] * 2
    return {"clients": clients, "requests": len(lat), "ok": ok, "codes": codes, "transport_errors": errors,
            "seconds": round(wall, 2), "per_second": round(ok / wall, 1) if wall else 0.0,
            "p50_ms": round(float(q[0]) * 1000, 1), "p99_ms": round(float(q[1]) * 1000, 1)}


def batch_stats(base_url: str, w: dict) -> dict:
    import httpx

    return httpx.get(f"{base_url}/v1/stats", headers={"Authorization": f"Bearer {w['tokens']['admin']}"},
                     timeout=10).json()["batching"]


def _median_levels(rounds: list[list[dict]]) -> list[dict]:
    """Per client count, the round with the median throughput (so its latencies belong to one run)."""
    out = []
    for k in range(len(rounds[0])):
        rows = sorted((r[k] for r in rounds), key=lambda row: row["per_second"])
        out.append(rows[(len(rows) - 1) // 2])
    return out


def run_levels(w: dict, args: argparse.Namespace) -> list[dict]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(w, port, args)
    rows = []
    try:
        asyncio.run(load(url, w, 2, 20, 60))  # warm-up
        for c in args.clients:
            before = batch_stats(url, w)
            row = asyncio.run(load(url, w, c, args.requests, args.max_seconds))
            after = batch_stats(url, w)
            nb = after["batches"] - before["batches"]
            # /v1/stats is per process: with several workers it shows one of them, so it is left out
            row["mean_batch"] = round((after["images"] - before["images"]) / nb, 2) if nb and args.workers == 1 else None
            rows.append(row)
            print(f"{c:>3} clients: {row['per_second']:7.1f} analyses/s  p50 {row['p50_ms']:7.1f} ms  "
                  f"p99 {row['p99_ms']:7.1f} ms  mean batch {row['mean_batch']}  ({row['ok']} ok, "
                  f"codes {row['codes']}, {row['seconds']} s)", file=sys.stderr, flush=True)
    finally:
        stop(proc)
    return rows


def fault_run(w: dict, args: argparse.Namespace) -> dict:
    """SIGKILL the server under load, restart it, and look for every answered analysis."""
    import httpx

    from medadv.provenance.ledger import open_ledger
    from medadv.provenance.trust import load_trust_root
    from medadv.serve.store import open_store

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(w, port, args)
    answered: list[str] = []

    async def attack() -> dict:
        task = asyncio.create_task(load(url, w, 8, 100_000, args.kill_after + 30, answered))
        await asyncio.sleep(args.kill_after)
        kill_group(proc, signal.SIGKILL)
        return await task

    try:
        asyncio.run(attack())
    finally:
        stop(proc, signal.SIGKILL)
    proc = start_server(w, port, args)
    try:
        missing = 0
        bad_receipts = 0
        from medadv.serve.receipts import load_public_key_file, verify_receipt

        pub = load_public_key_file(Path(w["key"]).with_suffix(".pub"))
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {w['tokens']['reader']}"}, timeout=10) as c:
            for aid in answered:
                r = c.get(f"/v1/analyses/{aid}/receipt")
                if r.status_code != 200:
                    missing += 1
                elif not verify_receipt(r.json(), pub)[0]:
                    bad_receipts += 1
    finally:
        stop(proc)
    with open_store(w["ledger"], create=False) as store:
        chain = store.check_chain()
        rows = store.count()
    with open_ledger(w["ledger"]) as book:
        ledger_ok = book.check(load_trust_root(w["trust_root"])).ok
    out = {"answered_201": len(answered), "missing": missing, "bad_receipts": bad_receipts, "rows_after": rows,
           "analyses_chain_problems": len(chain), "check_ledger_ok": ledger_ok, "kill_after_s": args.kill_after}
    print(f"fault: {len(answered)} answered before SIGKILL, {missing} missing after restart, {bad_receipts} bad "
          f"receipts, chain problems {len(chain)}, check-ledger {'ok' if ledger_ok else 'FAILED'}",
          file=sys.stderr, flush=True)
    return out


def model_ceiling(w: dict, threads: int, batch: int = 32, repeats: int = 5) -> dict:
    """The model alone, in this process: analyses/s when every analysis is 3 images in batches of ``batch``."""
    import torch

    from medadv.serve.model import load_model, probabilities

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loaded = load_model(w["model"])
        spec = loaded.classifier.spec  # the batcher's rows are already at the network's input (model_rows)
        x = torch.rand(3 * batch, spec.net_channels, spec.input_size, spec.input_size)
        probabilities(loaded, x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            probabilities(loaded, x)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    best = min(times)
    out = {"batch": batch, "forward_ms": round(best * 1000, 1), "analyses_per_second": round(batch / best, 1)}
    print(f"model alone: {3 * batch} images in {out['forward_ms']} ms (best of {repeats}) = "
          f"{out['analyses_per_second']} analyses/s ceiling", file=sys.stderr, flush=True)
    return out


@contextlib.contextmanager
def fresh_database(server: str | None) -> Iterator[str | None]:
    """A new, empty PostgreSQL database on ``server`` (dropped afterwards), or None for SQLite."""
    if not server:
        yield None
        return
    import secrets

    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"medadv_bench_{secrets.token_hex(4)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300, help="uploads per concurrency level")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="time cap per level")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--workers", type=int, default=1, help="server processes (more than 1 needs --postgres)")
    ap.add_argument("--postgres", default=None,
                    help="a PostgreSQL server URL whose user may create databases: the ledger goes in a fresh one")
    ap.add_argument("--images", type=int, default=64, help="distinct registered uploads")
    ap.add_argument("--fault", action="store_true")
    ap.add_argument("--fault-only", action="store_true", help="only the fault run")
    ap.add_argument("--kill-after", type=float, default=4.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stacks", default="auto",
                    help="comma list of server stacks: auto (what uvicorn picks: uvloop and httptools when "
                         "installed) and asyncio (asyncio's loop and h11, pure Python); several run side by side")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every stack")
    args = ap.parse_args()
    args.clients = [int(c) for c in args.clients.split(",")]
    if not 1 <= args.requests <= 100_000 or not 1 <= args.max_seconds <= 600 or max(args.clients) > 256:
        raise SystemExit("keep --requests in 1..100000, --max-seconds in 1..600 and clients <= 256")
    if not set(args.stacks.split(",")) <= {"auto", "asyncio"} or not 1 <= args.rounds <= 20:
        raise SystemExit("--stacks takes auto and/or asyncio; --rounds 1..20")
    with tempfile.TemporaryDirectory(prefix="medadv-service-bench-") as tmp, fresh_database(args.postgres) as url:
        w = setup(Path(tmp), args.model, args.images, url)
        if args.fault_only:
            print(json.dumps(fault_run(w, args), indent=1) if args.json else "", end="")
            return
        result = {"images": w["images"], "ledger": "postgresql" if url else "sqlite", "workers": args.workers,
                  "threads": args.threads, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                  "cpus": os.cpu_count()}
        stacks = args.stacks.split(",")
        runs: dict[str, list[list[dict]]] = {s: [] for s in stacks}
        for r in range(args.rounds):  # interleaved, the order rotated each round
            for stack in stacks[r % len(stacks):] + stacks[:r % len(stacks)]:
                print(f"round {r + 1}, server stack {stack}:", file=sys.stderr, flush=True)
                runs[stack].append(run_levels(w, argparse.Namespace(**{**vars(args), "stack": stack})))
        result["levels"] = _median_levels(runs[stacks[0]])
        if len(stacks) > 1 or args.rounds > 1:
            result["stacks"] = {s: {"median": _median_levels(v), "rounds": v} for s, v in runs.items()}
        result["model_ceiling"] = model_ceiling(w, args.threads, args.max_batch)
        if args.fault:
            result["fault"] = fault_run(w, args)
    if args.json:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
