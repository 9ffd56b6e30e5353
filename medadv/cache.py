"""Stage caching by configuration hash, so a killed study resumes where it stopped and a second run
reuses what the first computed.

A stage is stored in ``<root>/<stage>-<hash>/`` and appears only when complete (atomic folder). The hash
covers everything that determines the result: the configuration, the seed, and the checksums of the
inputs (data and model weights).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from medadv.data.checksums import sha256_file
from medadv.io import atomic_dir
from medadv.runinfo import config_hash

T = TypeVar("T")


class StageCache:
    """``root`` None disables caching (every stage runs)."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None

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
            from medadv.dist import current

            shard = current()  # under torchrun every rank computed the same value: rank 0 alone writes it
            if shard.is_main:
                with atomic_dir(folder) as tmp:
                    save(value, tmp)
                    (tmp / ".complete").write_text(config_hash(config) + "\n")
            shard.barrier()
        return value


def model_fingerprint(checkpoint: str | Path) -> str:
    """The checksum of a checkpoint's weights: what a cached attack on that model depends on."""
    return sha256_file(Path(checkpoint) / "model.safetensors")
