"""Decoded image folders, cached: a folder of 224 px JPEGs is decoded once into an array on disk and read
back memory-mapped, keyed by the checksum of its files.

Decoding 4,694 chest X-rays at 224 px takes about 15 s on one core, every time a model is trained,
evaluated or attacked; hashing the same files (which every load does anyway, for the data checksum)
takes a fraction of a second. The key covers the checksum of labels.csv and every file of the split,
the size and fit they are brought to, and the decoder's version, so a changed file, row or option is a
different entry. Entries are written atomically (a folder that appears complete or not at all) and an
entry that cannot be read back is decoded again. Folders under ``CACHE_FROM`` images are decoded each
time (cheap, and they would fill the cache with one-off test folders).

Where: ``$MEDADV_DECODED_CACHE``, else ``<user cache>/medadv/decoded``; ``MEDADV_DECODED_CACHE=off``
turns the cache off.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from medadv.data.folder import Loaded
from medadv.io import atomic_dir
from medadv.runinfo import config_hash

CACHE_FROM = 500  # images
DECODER_VERSION = 2  # 2: RGB files with equal channels read as gray


def cache_dir() -> Path | None:
    """The decoded-folder cache, or None when ``MEDADV_DECODED_CACHE=off``."""
    where = os.environ.get("MEDADV_DECODED_CACHE", "")
    if where.lower() == "off":
        return None
    if where:
        return Path(where).expanduser()
    import pooch

    return Path(pooch.os_cache("medadv")) / "decoded"


def cached_decode(checksum: str, count: int, options: dict[str, Any], decode: Callable[[], Loaded]) -> Loaded:
    """``decode()``'s result for the files whose checksum is ``checksum``, from the cache when it holds it."""
    root = cache_dir()
    if root is None or count < CACHE_FROM:
        return decode()
    key = {"checksum": checksum, "count": count, "decoder": DECODER_VERSION, **options}
    entry = root / f"{checksum[:16]}-{config_hash(key)[:16]}"
    found = _read(entry, key)
    if found is not None:
        return found
    loaded = decode()
    try:
        with atomic_dir(entry) as tmp:
            np.save(tmp / "pixels.npy", loaded.pixels)
            if loaded.window is not None:
                np.save(tmp / "window.npy", loaded.window)
            (tmp / "meta.json").write_text(json.dumps({
                "key": key, "levels": loaded.levels, "stored_levels": loaded.stored_levels,
                "shapes": [list(s) for s in loaded.shapes], "shape": list(loaded.pixels.shape),
                "dtype": str(loaded.pixels.dtype)}))
    except OSError:
        pass  # a full or read-only cache costs only the next decode
    return loaded


def _read(entry: Path, key: dict[str, Any]) -> Loaded | None:
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta["key"] != key:
            return None
        # copy-on-write: callers may write into their batch without touching the file
        pixels = np.load(entry / "pixels.npy", mmap_mode="c", allow_pickle=False)
        if list(pixels.shape) != meta["shape"] or str(pixels.dtype) != meta["dtype"]:
            return None
        window = np.load(entry / "window.npy", allow_pickle=False) if (entry / "window.npy").is_file() else None
        return Loaded(pixels, int(meta["levels"]), window, list(meta["stored_levels"]),
                      [tuple(s) for s in meta["shapes"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None
