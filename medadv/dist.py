"""Scale-out on ``torchrun``: images sharded by rank, results gathered, rank 0 writes.

``torchrun --nproc_per_node=N -m medadv attack ...`` starts N copies of the same command; each reads the
same data, takes every N-th attack batch (batch ``b`` goes to rank ``b % N``), and the adversarial images
are gathered onto every rank before the metrics, so every rank computes the same record and only rank 0
writes it. Each batch's randomness is seeded from ``(seed, b)`` alone (the runner's rule), and batches are
the same for any N, so every image's result is the same for any number of processes.

A sharded run can keep each finished batch under a resume folder (one ``.npz`` per batch, written
atomically): a killed run restarted with the same command skips the batches already done.

Only what is per image is sharded (the attack loop of ``attack``, ``audit`` and ``reproduce`` rows, and
certification); fitting a universal patch or perturbation is one optimisation and runs on every rank
alike (same seed, same result), and so does training outside DDP.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medadv.errors import MedadvError


@dataclass(frozen=True)
class Shard:
    """This process's place in the job: ``rank`` of ``world_size`` (1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def mine(self, n_batches: int) -> list[int]:
        """The batch indices this rank attacks: ``b % world_size == rank``."""
        return [b for b in range(n_batches) if b % self.world_size == self.rank]

    def gather(self, items: list) -> list:
        """Every rank's ``items``, concatenated in rank order, on every rank (no-op alone)."""
        if not self.distributed:
            return list(items)
        import torch.distributed as td

        out: list[list | None] = [None] * self.world_size
        td.all_gather_object(out, list(items))
        return [x for part in out for x in (part or [])]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as td

            td.barrier()


SINGLE = Shard()
_current: Shard = SINGLE


def current() -> Shard:
    """The shard this process runs as (set by :func:`init_from_env`)."""
    return _current


def init_from_env(device: str = "cpu") -> Shard:
    """Join the ``torchrun`` job described by the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...),
    with gloo on the CPU and NCCL on CUDA; a plain run is rank 0 of 1. Idempotent."""
    global _current
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        _current = SINGLE
        return _current
    import torch.distributed as td

    if not td.is_available():
        raise MedadvError("this torch build has no torch.distributed.", "run without torchrun, or install a full torch.")
    if not td.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend=backend)
    _current = Shard(rank=td.get_rank(), world_size=td.get_world_size())
    return _current


def shutdown() -> None:
    global _current
    if _current.distributed:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()
    _current = SINGLE


class BatchStore:
    """Finished attack batches on disk, so a killed sharded run resumes where each rank stopped.

    ``folder`` is keyed by the job's configuration (the caller hashes it); a batch file holds the
    adversarial pixels of its images and, for query attacks, the queries per image.
    """

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, b: int) -> Path:
        assert self.folder is not None
        return self.folder / f"batch-{b:06d}.npz"

    def load(self, b: int) -> tuple[np.ndarray, np.ndarray | None] | None:
        if self.folder is None or not self._path(b).is_file():
            return None
        try:
            with np.load(self._path(b), allow_pickle=False) as z:
                return z["adv"], (z["queries"] if "queries" in z.files else None)
        except (OSError, ValueError, KeyError):
            return None  # a damaged file is recomputed, not trusted

    def save(self, b: int, adv: np.ndarray, queries: np.ndarray | None) -> None:
        if self.folder is None:
            return
        from medadv.io import atomic_path

        arrays = {"adv": adv} if queries is None else {"adv": adv, "queries": queries}
        with atomic_path(self._path(b), suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    def done(self) -> list[int]:
        if self.folder is None:
            return []
        return sorted(int(p.stem.split("-")[1]) for p in self.folder.glob("batch-*.npz"))


def run_batches(batches: Sequence[np.ndarray], attack_batch, shard: Shard = SINGLE,
                store: BatchStore | None = None, progress=None) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray | None]]:
    """Attack this rank's batches (or load them from ``store``), then yield every batch of the job.

    ``attack_batch(b, idx) -> (adv, queries or None)`` attacks batch ``b``; ``progress`` wraps the
    iterable of this rank's batches (a monitor's ``track``). Yields ``(b, idx, adv, queries)`` for all
    batches, in batch order, on every rank.
    """
    store = store or BatchStore(None)
    mine = shard.mine(len(batches))
    results = []
    for b in (progress(mine) if progress else mine):
        cached = store.load(b)
        if cached is None:
            adv, queries = attack_batch(b, batches[b])
            store.save(b, adv, queries)
        else:
            adv, queries = cached
        results.append((b, adv, queries))
    everything = sorted(shard.gather(results), key=lambda r: r[0])
    if [r[0] for r in everything] != list(range(len(batches))):
        raise MedadvError("a sharded run lost batches while gathering.", "rerun the command; finished batches are kept.")
    for b, adv, queries in everything:
        yield b, batches[b], adv, queries
