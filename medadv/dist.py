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
alike (same seed, same result). Training under torchrun is data parallel (DDP, in
:mod:`medadv.models.train`): each rank takes its share of every global batch, gradients are all-reduced,
and :func:`sync_batchnorm` makes BatchNorm use the statistics of the whole global batch, on the CPU
(gloo, :class:`CpuSyncBatchNorm`) as well as on CUDA (torch's SyncBatchNorm).
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

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (a picklable object; no-op alone)."""
        if not self.distributed:
            return obj
        import torch.distributed as td

        box = [obj if self.is_main else None]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, values: Sequence[float], device: str | torch.device = "cpu") -> list[float]:
        """The element-wise sum of every rank's ``values`` (float64), on every rank. ``device`` must be a
        CUDA device under NCCL."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as td

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        td.all_reduce(t)
        return t.cpu().tolist()

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Overwrite every buffer of ``module`` (BatchNorm running statistics) with rank 0's, in place."""
        if not self.distributed:
            return
        import torch.distributed as td

        with torch.no_grad():
            for buf in module.buffers():
                td.broadcast(buf, src=0)


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


def rank_device(device: str) -> str:
    """The device this rank computes on: ``cuda`` means this rank's GPU (``LOCAL_RANK``) under torchrun."""
    if device == "cuda" and _current.distributed:
        return f"cuda:{torch.cuda.current_device()}"
    return device


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


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the backward all-reduces the gradient (every rank's loss depends on
    every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as td

        out = tensor.clone(memory_format=torch.contiguous_format)
        td.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


class CpuSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Synchronized BatchNorm for the CPU (gloo), where :class:`torch.nn.SyncBatchNorm` refuses to run (its
    kernel is CUDA-only, and DDP rejects it in a CPU module).

    A training-mode forward in a process group of more than one rank computes the mean and (biased)
    variance of the whole global batch in two passes with differentiable all-reduces (whose backward
    all-reduces the gradient: the same collectives torch's backward does), updates the running statistics with the global unbiased variance
    as BatchNorm does, and normalizes. Otherwise (eval mode, one process) it is plain BatchNorm. Every rank
    must run the same training-mode forwards in the same order, as with torch's.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 (torch's name)
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        import torch.distributed as td

        if (not self.training or not self.track_running_stats or not td.is_available() or not td.is_initialized()
                or td.get_world_size() <= 1):
            return super().forward(input)
        all_reduce = _AllReduceSum.apply
        self._check_input_dim(input)
        dims = [d for d in range(input.dim()) if d != 1]
        channels = input.shape[1]
        count = torch.tensor([input.numel() / channels], dtype=input.dtype, device=input.device)
        both = all_reduce(torch.cat([input.sum(dims), count]))
        total = both[-1]
        mean = both[:channels] / total
        shape = [1, channels] + [1] * (input.dim() - 2)
        centered = input - mean.view(shape)
        var = all_reduce((centered * centered).sum(dims)) / total
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            unbiased = var.detach() * (total / (total - 1).clamp(min=1))
            self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out


_SYNC_TYPES = (torch.nn.SyncBatchNorm, CpuSyncBatchNorm)


def sync_batchnorm(module: torch.nn.Module, device: str | torch.device = "cpu") -> torch.nn.Module:
    """``module`` with every BatchNorm layer synchronized across the process group: torch's
    :class:`torch.nn.SyncBatchNorm` on CUDA, :class:`CpuSyncBatchNorm` elsewhere. Replaced in place below
    the root, as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does; the new layers share the old
    ones' parameters and buffers, so the state dict keeps its keys and values.
    :func:`revert_sync_batchnorm` undoes it."""
    cls = torch.nn.SyncBatchNorm if torch.device(device).type == "cuda" else CpuSyncBatchNorm
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, _SYNC_TYPES):
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        out._medadv_original = type(module)  # type: ignore[attr-defined]
        _share_state(module, out)
        return out
    for name, child in module.named_children():
        new = sync_batchnorm(child, device)
        if new is not child:
            module.add_module(name, new)
    return module


def revert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`sync_batchnorm`: each synchronized layer back to the BatchNorm class it replaced."""
    if isinstance(module, _SYNC_TYPES):
        cls = getattr(module, "_medadv_original", torch.nn.BatchNorm2d)
        out = cls(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        _share_state(module, out)
        return out
    for name, child in module.named_children():
        new = revert_sync_batchnorm(child)
        if new is not child:
            module.add_module(name, new)
    return module


def _share_state(src: torch.nn.Module, dst: torch.nn.Module) -> None:
    if src.affine:
        dst.weight = src.weight
        dst.bias = src.bias
    dst.running_mean = src.running_mean
    dst.running_var = src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.train(src.training)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
