"""Shared helpers and fixtures for the provenance tests (imported by tests/test_provenance_*.py).

PostgreSQL tests run against the server named by ``MEDADV_TEST_POSTGRES_URL`` (``eval "$(.ci/postgres.sh)"``
starts one); each test gets a fresh database. Without the variable they are skipped, with the reason.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medadv.provenance.keys import DeviceKey, PublicKey, generate_key
from medadv.provenance.ledger import open_ledger
from medadv.provenance.org import enroll, init_ledger
from medadv.provenance.trust import TrustRoot, init_root

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDADV_DATA") or REPO.parent / "shared" / "data")
PG_ENV = "MEDADV_TEST_POSTGRES_URL"
PG_SKIP = f"PostgreSQL tests need a server: set {PG_ENV} (e.g. eval \"$(.ci/postgres.sh)\" as root)"


def isic_jpegs(n: int) -> list[Path]:
    folder = DATA / "isic2017" / "images"
    if not folder.is_dir():
        pytest.skip(f"real ISIC 2017 images not found at {folder} (set MEDADV_DATA)")
    return sorted(folder.glob("*.jpg"))[:n]


def pneumonia_npz() -> Path:
    path = DATA / "medmnist" / "pneumoniamnist.npz"
    if not path.is_file():
        pytest.skip(f"real PneumoniaMNIST file not found at {path} (set MEDADV_DATA)")
    return path


def small_npz(tmp: Path, per_split: int = 6, name: str = "pneumoniamnist.npz") -> Path:
    """A MedMNIST-style .npz with the first ``per_split`` real PneumoniaMNIST images of each split."""
    out = {}
    with np.load(pneumonia_npz(), allow_pickle=False) as z:
        for split in ("train", "val", "test"):
            out[f"{split}_images"] = z[f"{split}_images"][:per_split]
            out[f"{split}_labels"] = z[f"{split}_labels"][:per_split]
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return path


def save_png(path: Path, arr: np.ndarray, **kwargs: object) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


@dataclass
class Org:
    """An organisation's root key, trust root file and log key, and the ledger it initialised."""

    where: str
    root: DeviceKey
    root_pub: Path
    log: DeviceKey

    @property
    def trust(self) -> TrustRoot:
        return TrustRoot(PublicKey(self.root.device, self.root.private_key.public_key()), str(self.root_pub))


_ORGS: dict[str, Org] = {}


def make_org(where: str | Path, keys: Path, org: str = "acme") -> Org:
    """Root key, log key (both in ``keys``, where the CLI finds log.key) and a ledger initialised with them."""
    where = str(where)
    root, pub, log = init_root(org, keys)
    with open_ledger(where, create=True) as ledger:
        init_ledger(ledger, root, log)
    _ORGS[where] = Org(where, root, pub, log)
    return _ORGS[where]


def org_of(where: str | Path) -> Org:
    return _ORGS[str(where)]


def trust(where: str | Path) -> TrustRoot:
    """The trust root of the organisation that initialised the ledger at ``where``."""
    return _ORGS[str(where)].trust


def log_key(where: str | Path) -> DeviceKey:
    return _ORGS[str(where)].log


def make_device(where: str | Path, keys: Path, name: str = "ct-1") -> DeviceKey:
    """A device key in ``keys``, enrolled by the root in the ledger at ``where`` (org and ledger made if missing)."""
    where = str(where)
    if where not in _ORGS or not Path(_ORGS[where].log.path or "").is_file():
        make_org(where, keys)
    key = generate_key(name, keys)
    org = _ORGS[where]
    with open_ledger(where) as ledger:
        enroll(ledger, org.root, name, key.public, org.log)
    return key


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MEDADV_LEDGER", None)
    env.pop("MEDADV_KEYS", None)
    env.update(extra)
    return env


def medadv_cli(*args: str | Path, cwd: Path | None = None, **popen: object) -> subprocess.Popen:
    """Start ``python -m medadv.cli ARGS`` as a separate process (this worktree's medadv first)."""
    return subprocess.Popen([sys.executable, "-m", "medadv.cli", *map(str, args)], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


_AT_SIGNAL = """
import pathlib, sys, time
import medadv.cli, medadv.provenance.ledger, medadv.provenance.register, medadv.provenance.verify
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
ready.touch()
t0 = time.monotonic()
while not go.exists():
    if time.monotonic() - t0 > 120:
        sys.exit("no start signal within 120 s")
    time.sleep(0.005)
medadv.cli.main(sys.argv[3:])
"""


def medadv_cli_together(n: int, argv_for, folder: Path, timeout: float = 120.0) -> list[subprocess.Popen]:
    """Start ``n`` CLI processes (``argv_for(i)``) that import everything first, then begin at the same
    moment: a concurrency test must not depend on how long each process takes to import torch."""
    folder.mkdir(parents=True, exist_ok=True)
    go = folder / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _AT_SIGNAL, str(folder / f"ready-{i}"), str(go),
                               *map(str, argv_for(i))], env=cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    deadline = time.monotonic() + timeout
    while not all((folder / f"ready-{i}").exists() for i in range(n)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            errors = [p.communicate()[1][-500:] for p in procs]
            pytest.fail(f"the writers did not get ready to start together: {errors}")
        time.sleep(0.01)
    go.touch()
    return procs


def run_main(argv: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI in-process through ``main`` (as the console script does): (exit code, stdout, stderr)."""
    from medadv.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(PG_SKIP)
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"medadv_t_{secrets.token_hex(5)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # a configured but unreachable server is a failure, not a skip
        admin.dispose()
        pytest.fail(f"{PG_ENV} is set but PostgreSQL is not usable: {exc}")
    try:
        yield make_url(base).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_where(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a fresh ledger lives: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return str(tmp_path / "ledger.sqlite")


def raw_sql(where: str, *statements: str) -> None:
    """Run SQL on the ledger's database directly, as someone with database access (an attacker) would."""
    if "://" in where:
        from sqlalchemy import create_engine, text

        engine = create_engine(where)
        with engine.begin() as conn:
            for s in statements:
                conn.execute(text(s))
        engine.dispose()
    else:
        import sqlite3

        conn = sqlite3.connect(where)
        with conn:
            for s in statements:
                conn.execute(s)
        conn.close()


def drop_guards(where: str) -> None:
    """Remove the append-only triggers: the first thing an attacker with database rights would do."""
    if "://" in where:
        raw_sql(where, *(f"DROP TRIGGER {t}_append_only ON {t}" for t in ("records", "devices", "nodes", "heads")),
                *(f"DROP TRIGGER {t}_no_truncate ON {t}" for t in ("records", "devices", "nodes", "heads")))
    else:
        raw_sql(where, *(f"DROP TRIGGER {t}_no_{op}" for t in ("records", "devices", "nodes", "heads")
                         for op in ("update", "delete")))


def cli_enrolled_device(cli, ledger: str | Path, keys: str | Path, device: str, org: str = "acme") -> Path:
    """Through a CLI runner ``cli(argv) -> exit code``: ``init`` (if ``keys`` has no root yet), ``keygen``
    and ``enroll`` ``device`` in ``ledger``. Returns the trust root file: pass it as ``--trust-root`` or
    set ``MEDADV_TRUST_ROOT`` to it (the gate and ``verify`` trust nothing else)."""
    keys, ledger = Path(keys), str(ledger)
    root_key = keys / f"{org}.root.key"
    if not root_key.exists():
        assert cli(["provenance", "init", "--org", org, "--keys", str(keys), "--ledger", ledger]) == 0
    assert cli(["provenance", "keygen", "--device", device, "--keys", str(keys)]) == 0
    assert cli(["provenance", "enroll", str(keys / f"{device}.request.json"), "--root-key", str(root_key),
                "--keys", str(keys), "--ledger", ledger]) == 0
    return keys / f"{org}.root.pub"
