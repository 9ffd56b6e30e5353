"""The ``certify`` job: randomized-smoothing certificates for a checkpoint on a split, as results.json.

What the CLI and the Python API both call. Reads the checkpoint and the split it was trained on (as
stored), certifies every image (or a seeded, class-stratified subset of ``limit``), and writes
``<out>/results.json`` atomically: the settings, each image's certified class (or abstention) and L2
radius in [0, 1] units and in grey levels of the stored file, and certified accuracy against radius.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from medadv.data import ImageSet, load_split
from medadv.defenses.smoothing import Smoothed, certified_accuracy, certify_batch, check_smoothing_args
from medadv.errors import MedadvError
from medadv.io import check_output, write_json
from medadv.progress import SILENT, Monitor

FORMAT = "medadv-certify/1"
# Radii of the certified-accuracy curve, in [0, 1] pixel units (x255 for 8-bit grey levels).
RADII = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0)


def stratified_pick(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of ``limit`` images keeping the class proportions (>= 1 each)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    if limit >= len(labels):
        return np.arange(len(labels))
    picks = []
    classes = np.unique(labels)
    for c in classes:
        idx = np.flatnonzero(labels == c)
        k = max(1, round(limit * len(idx) / len(labels)))
        picks.append(rng.permutation(idx)[:k])
    pick = np.concatenate(picks)
    return np.sort(rng.permutation(pick)[:limit])


def _split_of(meta: dict[str, Any], split: str, data_root: str | Path | None) -> ImageSet:
    data = meta.get("data", {})
    source = data.get("source")
    size = data.get("image_size") if source and source.startswith("medmnist:") else None
    return load_split(meta["task"], split, data_root=data_root, source=source, size=size,
                      split_seed=data.get("split_seed", 0))


def certify_model(model_path: str | Path, out: str | Path, *, sigma: float, n: int, alpha: float, n0: int = 100,
                  split: str = "test", limit: int | None = None, seed: int = 0, batch_size: int = 256,
                  data_root: str | Path | None = None, device: str = "cpu", monitor: Monitor = SILENT) -> dict[str, Any]:
    """Certify a checkpoint; writes ``out/results.json`` and returns the same record."""
    check_smoothing_args(sigma, n, alpha, n0, batch_size)
    if limit is not None and limit <= 0:
        raise MedadvError(f"--limit must be > 0; got {limit}.", "pass e.g. --limit 100, or leave it out.")
    if split not in ("train", "val", "test"):
        raise MedadvError(f"--split {split!r} is not train, val or test.", "pass --split test.")
    check_output(out, kind="folder")  # refuse an unwritable --out before any computing
    from medadv.models import load_checkpoint
    from medadv.runinfo import environment

    model, meta = load_checkpoint(model_path, device)
    data = _split_of(meta, split, data_root)
    if data.channels != model.spec.data_channels:
        raise MedadvError(f"the model takes {model.spec.data_channels}-channel images but {data.source} has "
                          f"{data.channels}.", "certify it on the data it was trained on.")
    index = stratified_pick(data.labels, limit, seed) if limit else np.arange(len(data))
    subset = data.subset(index)
    smoothed = Smoothed(model, sigma, levels=data.levels, batch_size=batch_size)
    monitor.log(f"certifying {len(subset)} {split} images of {data.source}: sigma {sigma}, n0 {n0}, n {n}, alpha {alpha}")
    t0 = time.perf_counter()
    # noise streams follow the image's index in the whole split, so --limit does not change a certificate
    certs = certify_batch(smoothed, subset.tensor(), n0, n, alpha, seed, indices=index.tolist(), monitor=monitor)
    seconds = time.perf_counter() - t0
    labels = subset.labels
    images = [{"id": subset.ids[j], "label": int(labels[j]), **c.to_json(),
               "abstained": c.prediction < 0, "correct": c.prediction == int(labels[j])} for j, c in enumerate(certs)]
    abstained = sum(c.prediction < 0 for c in certs)
    curve = certified_accuracy(certs, labels, list(RADII))
    for row in curve:
        row["radius_levels"] = row["radius"] * data.levels
    record = {
        "format": FORMAT,
        "kind": "certify",
        "method": "randomized smoothing (Cohen et al. 2019), Gaussian noise on stored pixels",
        "model": str(model_path),
        "task": meta["task"],
        "split": split,
        "source": data.source,
        "levels": data.levels,
        "settings": {"sigma": sigma, "sigma_levels": sigma * data.levels, "n0": n0, "n": n, "alpha": alpha,
                     "seed": seed, "batch_size": batch_size, "limit": limit, "threshold": smoothed.threshold},
        "summary": {
            "n_images": len(certs),
            "abstentions": int(abstained),
            "abstain_rate": abstained / max(len(certs), 1),
            "certified_accuracy": curve,
            "mean_radius_correct": float(np.mean([c.radius for c, im in zip(certs, images) if im["correct"]] or [0.0])),
            "seconds": round(seconds, 2),
        },
        "images": images,
        "environment": environment(),
    }
    write_json(Path(out) / "results.json", record)
    return record
