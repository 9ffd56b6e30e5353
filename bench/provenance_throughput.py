"""Provenance throughput: images per second to register and to verify, on SQLite and PostgreSQL.

    python bench/provenance_throughput.py [--images 500] [--repeats 5] [--postgres URL] [--json]

Images are real ISIC 2017 dermoscopy JPEGs (256x256 RGB) from ``$MEDADV_DATA`` or ``../shared/data``
(synthetic 256x256 PNGs when absent). Each repeat uses a fresh ledger (a new SQLite file; a new
PostgreSQL database). Reported per backend, as the median of the repeats (min and max beside it):

* ``register``: ``register_paths`` end to end (decode + digest + sign + append, default batch size);
* ``verify``: ``verify_paths`` on the same files (decode + digest + lookup + signature check);
* ``append``: ``Ledger.append`` of precomputed digests, i.e. the ledger's own cost (sign + insert + commit);
* ``digest``: ``digest_file`` alone (no ledger), for reference.

``--proof-sizes 1000,10000,100000,1000000`` measures instead the Merkle log alone: for synthetic logs of
those sizes (the ledger's ``nodes`` table filled directly), the inclusion-proof length and the time to
read and check one proof, as ``provenance verify`` does per image (it must grow logarithmically).

PostgreSQL runs when ``--postgres`` or ``$MEDADV_TEST_POSTGRES_URL`` names a server whose user may
create databases (``.ci/postgres.sh`` starts one); otherwise it is skipped, and the output says so.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medadv.io import to_json  # noqa: E402
from medadv.provenance.digest import digest_file  # noqa: E402
from medadv.provenance.keys import PublicKey, generate_key  # noqa: E402
from medadv.provenance.ledger import open_ledger  # noqa: E402
from medadv.provenance.org import enroll, init_ledger  # noqa: E402
from medadv.provenance.trust import TrustRoot, init_root  # noqa: E402
from medadv.provenance.register import register_paths  # noqa: E402
from medadv.provenance.verify import verify_paths  # noqa: E402


def images(n: int, tmp: Path) -> tuple[list[Path], str]:
    data = Path(os.environ.get("MEDADV_DATA") or REPO.parent / "shared" / "data")
    found = sorted((data / "isic2017" / "images").glob("*.jpg"))[:n]
    if len(found) == n:
        return found, f"ISIC 2017 JPEG 256x256 RGB ({data / 'isic2017' / 'images'})"
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        out.append(tmp / f"synthetic{i:05d}.png")
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(out[-1])
    return out, "synthetic PNG 256x256 RGB"


@contextmanager
def fresh_sqlite(tmp: Path) -> Iterator[str]:
    yield str(tmp / f"ledger-{secrets.token_hex(4)}.sqlite")


Fresh = Callable[[Path], AbstractContextManager[str]]  # tmp folder -> a new, empty ledger location


def pg_factory(base: str) -> Fresh:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    @contextmanager
    def fresh(_: Path) -> Iterator[str]:
        name = f"medadv_bench_{secrets.token_hex(4)}"
        admin = create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(base).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

    return fresh


def library_versions(postgres: str | None) -> dict[str, str]:
    """The ledger's stack: SQLAlchemy, cryptography, Pillow, pydicom, psycopg, SQLite and the PostgreSQL server."""
    import sqlite3
    from importlib import metadata

    out = {name: metadata.version(name) for name in ("sqlalchemy", "cryptography", "pillow", "pydicom", "psycopg")}
    out["sqlite"] = sqlite3.sqlite_version
    if postgres:
        from sqlalchemy import create_engine, text

        engine = create_engine(postgres)
        with engine.connect() as conn:
            out["postgresql_server"] = str(conn.execute(text("SHOW server_version")).scalar())
        engine.dispose()
    return out


def summary(rates: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(rates), 1), "min": round(min(rates), 1), "max": round(max(rates), 1)}


def bench_backend(fresh: Fresh, files: list[Path], repeats: int, batch: int,
                  tmp: Path) -> dict[str, dict[str, float]]:
    digests = [digest_file(f) for f in files]
    rates: dict[str, list[float]] = {"register": [], "verify": [], "append": []}
    for r in range(repeats):
        keys = tmp / f"keys-{secrets.token_hex(4)}"
        key = generate_key("bench-device", keys)
        root, _, log = init_root("bench-org", keys)
        trust = TrustRoot(PublicKey(root.device, root.private_key.public_key()), "bench")
        with fresh(tmp) as where:
            with open_ledger(where, create=True) as ledger:
                init_ledger(ledger, root, log)
                enroll(ledger, root, "bench-device", key.public, log)
                t = time.perf_counter()
                res = register_paths(files, ledger, key, log, batch_size=batch)
                rates["register"].append(len(files) / (time.perf_counter() - t))
                assert res.appended.added == len(files)
                t = time.perf_counter()
                verdicts = verify_paths(files, ledger, trust)  # with inclusion proofs against the signed head
                rates["verify"].append(len(files) / (time.perf_counter() - t))
                assert all(v.ok and v.proof for v in verdicts)
        with fresh(tmp) as where:
            with open_ledger(where, create=True) as ledger:
                init_ledger(ledger, root, log)
                enroll(ledger, root, "bench-device", key.public, log)
                t = time.perf_counter()
                ledger.append(digests, key, log, batch_size=batch)
                rates["append"].append(len(files) / (time.perf_counter() - t))
        print(f"  repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()),
              file=sys.stderr)
    return {k: summary(v) for k, v in rates.items()}


def bench_proofs(sizes: list[int], tmp: Path, samples: int = 200) -> dict[str, dict[str, float]]:
    """Inclusion-proof length and time (read the nodes + verify) for one leaf at a time, per log size."""
    import hashlib
    import random

    from sqlalchemy import insert

    from medadv.provenance import merkle
    from medadv.provenance.ledger import nodes

    out: dict[str, dict[str, float]] = {}
    for n in sizes:
        where = tmp / f"proofs-{n}.sqlite"
        tree = merkle.StreamingTree()
        leaves = []
        with open_ledger(where, create=True) as ledger:
            rows = []
            with ledger.engine.begin() as conn:
                for i in range(n):
                    leaf = merkle.leaf_hash(hashlib.sha256(i.to_bytes(8, "big")).digest())
                    if len(leaves) < 100_000:
                        leaves.append(leaf)
                    rows.extend({"level": lv, "idx": ix, "hash": h.hex()} for lv, ix, h in tree.append(leaf))
                    if len(rows) >= 50_000:
                        conn.execute(insert(nodes), rows)
                        rows = []
                if rows:
                    conn.execute(insert(nodes), rows)
            root = tree.root()
            rng = random.Random(0)
            picks = [rng.randrange(min(n, len(leaves))) for _ in range(samples)]
            lengths, times = [], []
            for i in picks:
                t = time.perf_counter()
                path = ledger.proofs({0: lambda p, i=i: merkle.inclusion_path(i, n, p)})[0]
                assert path is not None and merkle.verify_inclusion(leaves[i], i, n, path, root)
                times.append(time.perf_counter() - t)
                lengths.append(len(path))
        where.unlink(missing_ok=True)
        out[str(n)] = {"proof_hashes_max": max(lengths), "proof_bytes_max": 32 * max(lengths),
                       "ms_per_proof_median": round(1000 * statistics.median(times), 3)}
        print(f"  {n} leaves: {out[str(n)]}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=500, help="images per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256, help="records per ledger transaction")
    ap.add_argument("--postgres", default=os.environ.get("MEDADV_TEST_POSTGRES_URL"),
                    help="PostgreSQL URL of a user that may CREATE DATABASE (default $MEDADV_TEST_POSTGRES_URL)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--proof-sizes", default=None,
                    help="comma-separated log sizes: measure inclusion proofs (length, time) instead")
    args = ap.parse_args()
    if args.proof_sizes:
        try:
            sizes = [int(v) for v in args.proof_sizes.split(",")]
        except ValueError:
            ap.error("--proof-sizes takes comma-separated integers")
        if any(v < 1 or v > 10**8 for v in sizes):
            ap.error("--proof-sizes must be between 1 and 10^8")
        with tempfile.TemporaryDirectory(prefix="medadv-bench-") as tmpdir:
            res = bench_proofs(sizes, Path(tmpdir))
        if args.json:
            print(to_json({"proofs": res}), end="")
        else:
            for n, r in res.items():
                print(f"{n} leaves: proof {r['proof_hashes_max']} hashes ({r['proof_bytes_max']} bytes), "
                      f"{r['ms_per_proof_median']} ms to read and check")
        return

    from medadv.runinfo import environment

    with tempfile.TemporaryDirectory(prefix="medadv-bench-") as tmpdir:
        tmp = Path(tmpdir)
        files, source = images(args.images, tmp)
        t = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for f in files:
                digest_file(f)
            t.append(len(files) / (time.perf_counter() - start))
        results: dict[str, object] = {
            "config": {"images": len(files), "repeats": args.repeats, "batch_size": args.batch_size,
                       "source": source, "command": " ".join(["python", *sys.argv])},
            "environment": {**environment(), "libraries": library_versions(args.postgres),
                            "load_average_1m_at_start": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()},
            "digest_only": summary(t),
            "backends": {},
        }
        backends = results["backends"]
        assert isinstance(backends, dict)
        print("sqlite", file=sys.stderr)
        backends["sqlite"] = bench_backend(fresh_sqlite, files, args.repeats, args.batch_size, tmp)
        if args.postgres:
            print("postgresql", file=sys.stderr)
            backends["postgresql"] = bench_backend(pg_factory(args.postgres), files, args.repeats, args.batch_size, tmp)
        else:
            backends["postgresql"] = "skipped: no --postgres URL and MEDADV_TEST_POSTGRES_URL is unset"
    if args.json:
        print(to_json(results), end="")
        return
    print(f"{len(files)} images ({source}), median of {args.repeats} repeats, images/s [min-max]")
    d = summary(t)
    print(f"digest only: {d['median']:.0f} [{d['min']:.0f}-{d['max']:.0f}]")
    for name, res in backends.items():
        if isinstance(res, str):
            print(f"{name}: {res}")
            continue
        print(f"{name}: " + "; ".join(f"{k} {v['median']:.0f} [{v['min']:.0f}-{v['max']:.0f}]" for k, v in res.items()))


if __name__ == "__main__":
    main()
