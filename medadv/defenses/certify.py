"""The ``certify`` job: randomized-smoothing certificates for a checkpoint on a split, as results.json.

What the CLI and the Python API both call. Reads the checkpoint and the split it was trained on (as
stored), certifies every image (or a seeded, class-stratified subset of ``limit``), and writes
``<out>/results.json`` atomically: the settings, each image's certified class (or abstention) and L2
radius in [0, 1] units and in grey levels of the stored file, and certified accuracy against radius.

Under ``torchrun`` the images are sharded: image ``j`` of the certified list goes to rank ``j % N``. Each
image draws its noise from its own stream (``image_generator(seed, index in the split)``), so its
certificate is the same for any N; the certificates are gathered onto every rank, every rank builds the
same record, and only rank 0 writes results.json (atomically). The process count is recorded under
``run`` (``{"world_size": N}``), a key to leave out when comparing records, like ``summary.seconds``.

Resume: with a resume folder (by default under torchrun: ``.<out>.shards/<key>`` beside ``out``, keyed by
the weights, the data and every setting that decides a certificate) each finished certificate is written
at once as ``cert-<index in the split>.json``; a killed run restarted with the same command certifies only
the images that are missing, whatever the number of processes, and the folder is removed once
results.json is written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from medadv.data import ImageSet, load_split
from medadv.defenses.smoothing import (Certificate, Smoothed, certified_accuracy, check_smoothing_args,
                                       image_generator)
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


class CertStore:
    """Finished certificates on disk, one small JSON per image (named by its index in the split), so a
    killed certification resumes where each rank stopped; ``folder`` None keeps nothing."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"cert-{index:08d}.json"

    def load(self, index: int) -> Certificate | None:
        if self.folder is None or not self._path(index).is_file():
            return None
        try:
            return Certificate(**json.loads(self._path(index).read_text()))
        except (OSError, ValueError, TypeError):
            return None  # a damaged file is recomputed, not trusted

    def save(self, index: int, cert: Certificate) -> None:
        if self.folder is not None:
            write_json(self._path(index), cert.to_json())

    def done(self) -> list[int]:
        if self.folder is None:
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("cert-*.json"))


def resume_folder(out: str | Path, model_path: str | Path, data: ImageSet, split: str, sigma: float, n: int,
                  n0: int, alpha: float, seed: int, batch_size: int, threshold: float) -> Path:
    """Where a certification keeps its finished certificates: beside ``out``, keyed by everything that
    decides one (not ``limit``, not the process count), so a rerun of the same job resumes."""
    from medadv.cache import model_fingerprint
    from medadv.runinfo import config_hash

    key = config_hash({"format": FORMAT, "model": model_fingerprint(model_path), "data": data.checksum,
                       "split": split, "sigma": sigma, "n": n, "n0": n0, "alpha": alpha, "seed": seed,
                       "batch_size": batch_size, "threshold": threshold})
    out = Path(out)
    return out.parent / f".{out.name}.shards" / key


def _split_of(meta: dict[str, Any], split: str, data_root: str | Path | None) -> ImageSet:
    data = meta.get("data", {})
    source = data.get("source")
    size = data.get("image_size") if source and source.startswith("medmnist:") else None
    from medadv.data.model_split import model_task

    return load_split(model_task(meta), split, data_root=data_root, source=source, size=size,
                      split_seed=data.get("split_seed", 0))


def certify_model(model_path: str | Path, out: str | Path, *, sigma: float, n: int, alpha: float, n0: int = 100,
                  split: str = "test", limit: int | None = None, seed: int = 0, batch_size: int = 256,
                  data_root: str | Path | None = None, device: str = "cpu", monitor: Monitor = SILENT,
                  resume: bool | None = None) -> dict[str, Any]:
    """Certify a checkpoint; writes ``out/results.json`` (rank 0) and returns the same record (every rank).

    ``resume``: keep finished certificates in :func:`resume_folder` and skip those already there (True),
    keep nothing (False), or keep them only under torchrun (None, the default)."""
    check_smoothing_args(sigma, n, alpha, n0, batch_size)
    if limit is not None and limit <= 0:
        raise MedadvError(f"--limit must be > 0; got {limit}.", "pass e.g. --limit 100, or leave it out.")
    if split not in ("train", "val", "test"):
        raise MedadvError(f"--split {split!r} is not train, val or test.", "pass --split test.")
    check_output(out, kind="folder")  # refuse an unwritable --out before any computing
    from medadv import dist
    from medadv.models import load_checkpoint
    from medadv.runinfo import environment

    shard = dist.init_from_env(device)  # rank 0 of 1 unless started by torchrun
    device = dist.rank_device(device)
    if not shard.is_main:
        monitor = SILENT  # one log, not one per process
    model, meta = load_checkpoint(model_path, device)
    from medadv.models.interface import refuse_dense_or_volume

    # smoothing for segmentation needs per-pixel certification with abstention, not built: refused
    refuse_dense_or_volume(model, "medadv certify (randomized smoothing)")
    data = _split_of(meta, split, data_root)
    if data.channels != model.spec.data_channels:
        raise MedadvError(f"the model takes {model.spec.data_channels}-channel images but {data.source} has "
                          f"{data.channels}.", "certify it on the data it was trained on.")
    index = stratified_pick(data.labels, limit, seed) if limit else np.arange(len(data))
    subset = data.subset(index)
    smoothed = Smoothed(model, sigma, levels=data.levels, batch_size=batch_size)
    keep = shard.distributed if resume is None else resume
    folder = resume_folder(out, model_path, data, split, sigma, n, n0, alpha, seed, batch_size,
                           smoothed.threshold) if keep else None
    store = CertStore(folder)
    where = f" over {shard.world_size} processes" if shard.distributed else ""
    monitor.log(f"certifying {len(subset)} {split} images of {data.source}{where}: sigma {sigma}, n0 {n0}, n {n}, "
                f"alpha {alpha}")
    t0 = time.perf_counter()
    x = subset.tensor()
    mine = shard.mine(len(subset))  # image j of the list on rank j % N
    done: list[tuple[int, dict[str, Any]]] = []
    for j in monitor.track(mine, "certify", total=len(mine)):
        # noise streams follow the image's index in the whole split, so neither --limit nor N changes a certificate
        i = int(index[j])
        cert = store.load(i)
        if cert is None:
            cert = smoothed.certify(x[j], n0, n, alpha, image_generator(seed, i))
            store.save(i, cert)
        done.append((j, cert.to_json()))
    gathered = sorted(shard.gather(done), key=lambda r: r[0])
    if [j for j, _ in gathered] != list(range(len(subset))):
        raise MedadvError("a sharded certification lost images while gathering.",
                          "rerun the command; finished certificates are kept.")
    certs = [Certificate(**c) for _, c in gathered]
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
        "run": {"world_size": shard.world_size, "sharded": "images (image j of the list on rank j % N)"},
        "environment": environment(),
    }
    if shard.is_main:  # every rank holds the same record; rank 0 alone writes it
        write_json(Path(out) / "results.json", record)
        if folder is not None:
            import shutil

            shutil.rmtree(folder.parent, ignore_errors=True)  # the job is written: its certificates are not needed
    shard.barrier()  # results.json is complete before any rank returns
    return record
