"""Stage caching by configuration hash, so a killed study resumes where it stopped and a second run
reuses what the first computed.

A stage is stored in ``<root>/<stage>-<hash>/`` and appears only when complete (atomic folder). The hash
covers everything that determines the result: the configuration, the seed, and the checksums of the
inputs (data and model weights).

A base utility: it imports only ``io`` and ``runinfo``. Under torchrun the caller passes the process's
shard (:func:`medadv.dist.current`), so the cache needs no import of ``dist``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from medadv.io import atomic_dir
from medadv.runinfo import config_hash

T = TypeVar("T")


class Shard(Protocol):
    """What the cache needs of a process under torchrun (:class:`medadv.dist.Shard` is one)."""

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...


class _Alone:
    """A single process: it writes, and there is no one to wait for."""

    is_main = True

    def barrier(self) -> None:
        pass


class StageCache:
    """``root`` None disables caching (every stage runs). ``shard``: a zero-argument callable returning
    the process's shard (pass ``medadv.dist.current`` from a command that may run under torchrun, so
    that rank 0 alone writes a stage and the others wait); default: a single process."""

    def __init__(self, root: str | Path | None, shard: Callable[[], Shard] | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self._shard = shard or _Alone

    def path(self, stage: str, config: dict[str, Any]) -> Path | None:
        return None if self.root is None else self.root / f"{stage}-{config_hash(config)}"

    def run(self, stage: str, config: dict[str, Any], compute: Callable[[], T],
            save: Callable[[T, Path], None], load: Callable[[Path], T]) -> T:
        """``load`` the stage if it is cached, else ``compute`` it and ``save`` it atomically."""
        folder = self.path(stage, config)
        if folder is not None and (folder / ".complete").is_file():
            return load(folder)
        value = compute()
        if folder is not None:
            shard = self._shard()  # under torchrun every rank computed the same value: rank 0 alone writes it
            if shard.is_main:
                with atomic_dir(folder) as tmp:
                    save(value, tmp)
                    (tmp / ".complete").write_text(config_hash(config) + "\n")
            shard.barrier()
        return value


def model_fingerprint(checkpoint: str | Path) -> str:
    """The SHA-256 of a checkpoint's weights (hex): what a cached attack on that model depends on (the
    same value as :func:`medadv.data.checksums.sha256_file`, computed here so the cache needs no data)."""
    h = hashlib.sha256()
    with open(Path(checkpoint) / "model.safetensors", "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
