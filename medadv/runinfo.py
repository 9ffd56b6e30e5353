"""What every run records about itself: seed, configuration, package versions, data checksums."""

from __future__ import annotations

import hashlib
import json
import platform
import random
import sys
import time
from importlib import metadata
from typing import Any

import numpy as np
import torch

from medadv import allocator

PACKAGES = ("medadv", "torch", "numpy", "monai", "scikit-learn", "scikit-image", "pydicom", "safetensors",
            "efficientnet-lite-pytorch", "onnxruntime")


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def environment() -> dict[str, Any]:
    return {
        "versions": package_versions(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "allocator": allocator.state()["why"],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able configuration (the cache key of a stage)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
