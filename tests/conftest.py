"""Shared fixtures: the real data root and models trained once per test session.

Real-data tests read ``../shared/data`` (or ``$MEDADV_DATA``). Without it they are skipped with a
visible reason, except under CI (``MEDADV_REQUIRE_DATA=1``), where a missing data root is a failure.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MEDADV_OFFLINE", "1")  # tests never download

# Under pytest-xdist (`make test`: two worker processes on two cores) each worker computes on one thread:
# two threads per worker oversubscribe the cores (measured: the fast tests took 383 s so, 274 s with one).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# torch's intra-op thread count is process-wide: a test module that sets it at import (or a test that
# does not restore it) silently runs the rest of the suite on fewer cores. Both are caught below.
INITIAL_THREADS = torch.get_num_threads()


def pytest_collection_finish(session):
    if torch.get_num_threads() != INITIAL_THREADS:
        raise pytest.UsageError(
            f"a test module set torch's thread count to {torch.get_num_threads()} at import "
            f"(was {INITIAL_THREADS}): set it in a fixture that restores it, so the suite keeps every core")


# Tests that use these fixtures train a model or run a study (minutes on 2 cores): they are marked
# ``slow`` here, so `make test-fast` (-m "not slow") is the inner loop and `make test` runs everything.
SLOW_FIXTURES = {"chest_model", "study_cache", "grader", "reader", "own_reader"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


# `make test` runs two pytest-xdist workers of one torch thread each. The demo victim (`chest_model`) that a
# dozen files share is trained first, in the controlling process on every core, into a stage cache the
# workers inherit (MEDADV_TEST_CACHE): otherwise each worker would train it again, on one core. A run that
# selects no slow tests (`make test-fast`) skips it.
@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    config = session.config
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        return
    if "not slow" in (config.option.markexpr or "") or _data_root() is None:
        return
    if not os.environ.get("MEDADV_TEST_CACHE"):
        cache = Path(config._tmp_path_factory.getbasetemp()) / "study-cache"  # noqa: SLF001  (pytest's own)
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["MEDADV_TEST_CACHE"] = str(cache)
    try:
        _train_chest_model(_data_root(), Path(os.environ["MEDADV_TEST_CACHE"]))
    except Exception:  # noqa: BLE001  the tests that use it fail with the error, where a test reports it
        pass


def _train_chest_model(data_root: Path, cache: Path) -> Path:
    """The demo victim's checkpoint in ``cache``, trained once: a file lock keeps two processes that
    share the cache from training it side by side."""
    from filelock import FileLock

    from medadv.cache import StageCache
    from medadv.study import DEMO_PLAN, trained_model

    with FileLock(str(cache / ".chest_model.lock")), all_cores():
        return trained_model(DEMO_PLAN.train, StageCache(cache), data_root)


@pytest.fixture(scope="session", autouse=True)
def _decoded_cache(tmp_path_factory):
    """Decoded folders are cached in the session's temporary folder, never in the user's cache."""
    if "MEDADV_DECODED_CACHE" not in os.environ:
        os.environ["MEDADV_DECODED_CACHE"] = str(tmp_path_factory.mktemp("decoded"))
    yield


@pytest.fixture(autouse=True)
def _threads_restored(request):
    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    if after != before:
        torch.set_num_threads(before)
        pytest.fail(f"{request.node.nodeid} changed torch's thread count from {before} to {after} and "
                    "did not restore it", pytrace=False)


@contextlib.contextmanager
def all_cores():
    """Torch's thread count as the session started, restored after: for the shared models' training."""
    before = torch.get_num_threads()
    torch.set_num_threads(INITIAL_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _data_root() -> Path | None:
    for candidate in (os.environ.get("MEDADV_DATA"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "medmnist" / "pneumoniamnist.npz").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = _data_root()
    if root is None:
        if os.environ.get("MEDADV_REQUIRE_DATA") == "1":
            pytest.fail("real data not found: set MEDADV_DATA or place ../shared/data beside the checkout")
        pytest.skip("real data not found: set MEDADV_DATA or place ../shared/data beside the checkout")
    return root


@pytest.fixture(scope="session")
def study_cache(tmp_path_factory) -> Path:
    """One stage cache for the session: the demo test reuses the victim the other tests trained.

    ``MEDADV_TEST_CACHE`` keeps it across sessions (a developer's loop); CI starts empty.
    """
    if os.environ.get("MEDADV_TEST_CACHE"):
        path = Path(os.environ["MEDADV_TEST_CACHE"])
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("study-cache")


@pytest.fixture(scope="session")
def chest_model(data_root, study_cache):
    """The demo's victim: ResNet-18 (small stem) trained from scratch at 28 px on PneumoniaMNIST, 3 epochs."""
    from medadv.models import load_checkpoint

    path = _train_chest_model(data_root, study_cache)  # on every core, also when a one-thread module asks
    model, meta = load_checkpoint(path)
    return path, model, meta


@pytest.fixture(scope="session")
def chest_test(data_root):
    from medadv.data import load_split

    return load_split("chest-xray", "test", data_root=data_root)
