"""SHA-256 checksums of data sources, recorded in every checkpoint and results file."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path], root: Path) -> str:
    """One checksum over many files: each file's relative path and content hash, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        rel = p.relative_to(root).as_posix() if p.is_relative_to(root) else p.as_posix()
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
        h.update(b"\n")
    return h.hexdigest()


def sha256_arrays(*arrays) -> str:
    """One checksum over arrays (dtype, shape and bytes of each): a split of an npz, not the whole file,
    so two files that share a test split share its checksum."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a if not isinstance(a, list) else np.array(a, dtype=str))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
