"""Shared helpers and fixtures for the provenance tests (imported by tests/test_provenance_*.py).

PostgreSQL tests run against the server named by ``MEDADV_TEST_POSTGRES_URL`` (``eval "$(.ci/postgres.sh)"``
starts one); each test gets a fresh database. Without the variable they are skipped, with the reason.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medadv.provenance.keys import DeviceKey, generate_key
from medadv.provenance.ledger import open_ledger

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


def make_device(where: str | Path, keys: Path, name: str = "ct-1") -> DeviceKey:
    """A device key in ``keys``, registered in the ledger at ``where`` (created if missing)."""
    key = generate_key(name, keys)
    with open_ledger(where, create=True) as ledger:
        ledger.add_device(name, key.public.public_key)
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
        raw_sql(where, "DROP TRIGGER records_append_only ON records", "DROP TRIGGER records_no_truncate ON records",
                "DROP TRIGGER devices_append_only ON devices")
    else:
        raw_sql(where, "DROP TRIGGER records_no_update", "DROP TRIGGER records_no_delete",
                "DROP TRIGGER devices_no_update", "DROP TRIGGER devices_no_delete")
