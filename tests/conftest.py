"""Shared fixtures: the real data root and models trained once per test session.

Real-data tests read ``../shared/data`` (or ``$MEDADV_DATA``). Without it they are skipped with a
visible reason, except under CI (``MEDADV_REQUIRE_DATA=1``), where a missing data root is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("MEDADV_OFFLINE", "1")  # tests never download


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
    from medadv.cache import StageCache
    from medadv.models import load_checkpoint
    from medadv.study import DEMO_PLAN, trained_model

    path = trained_model(DEMO_PLAN.train, StageCache(study_cache), data_root)
    model, meta = load_checkpoint(path)
    return path, model, meta


@pytest.fixture(scope="session")
def chest_test(data_root):
    from medadv.data import load_split

    return load_split("chest-xray", "test", data_root=data_root)
