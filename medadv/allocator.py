"""Keep freed tensor memory in the process (glibc): the fix for system time above user time at 224 px.

glibc's malloc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB) with a
fresh ``mmap`` and hands it back with ``munmap`` on free, and trims the top of the heap whenever 128 KiB
lie free there. A forward and backward pass at 224 px allocates and frees hundreds of activations of
several MiB each, so every step page-faults its whole working set back in, zero-filled by the kernel:
on 2 cores the PGD-20 run of issue 19 spent more time in the kernel than in the network. PyTorch's CPU
performance guide gives the same diagnosis and swaps in jemalloc or tcmalloc; neither ships with a Python
wheel, so medadv tells glibc itself, through ``mallopt``, to serve large blocks from the heap and keep
what is freed (no mmap for big blocks, no trimming, 256 MiB of top padding). Memory that a step frees is
reused by the next step instead of being returned and faulted back; the process's resident size stays
at its peak rather than falling between steps. Measured in BENCHMARKS.md (``bench/allocator.py``).

Applied once, by the CLI and by the job layer's entry points; a library user calls :func:`keep_freed_memory`.
Skipped, and said so in :func:`state`, where the C library is not glibc, where the user already tunes
malloc through ``MALLOC_*`` variables or preloads another allocator (``LD_PRELOAD``), or where
``MEDADV_MALLOC=default`` asks for glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4

_TOP_PAD = 256 << 20  # grow the heap in 256 MiB steps: fewer brk calls while the first step warms up
_NO_TRIM = 2**31 - 1  # mallopt takes a C int: 2 GiB free at the top before any trim, i.e. never in practice

_state: dict[str, object] = {"applied": False, "why": "not requested"}


def keep_freed_memory() -> dict[str, object]:
    """Tell glibc to keep freed memory (idempotent); returns :func:`state`."""
    if _state["why"] != "not requested":  # decided once: applied, refused or skipped
        return state()
    why = _skip_reason()
    if why:
        _state["why"] = why
        return state()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NO_TRIM), (_M_TOP_PAD, _TOP_PAD)))
    _state.update(applied=ok, why="mallopt: no mmap for large blocks, no trim, 256 MiB top pad" if ok
                  else "mallopt refused a setting; glibc defaults kept")
    return state()


def state() -> dict[str, object]:
    """What was done to the allocator and why (recorded in every run's ``runinfo``)."""
    return dict(_state)


def _skip_reason() -> str | None:
    if os.environ.get("MEDADV_MALLOC", "").lower() == "default":
        return "MEDADV_MALLOC=default: glibc defaults kept"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: the platform allocator is kept"
    if os.environ.get("LD_PRELOAD"):
        return "LD_PRELOAD is set (another allocator, e.g. jemalloc): left as it is"
    tuned = sorted(k for k in os.environ if k.startswith("MALLOC_") and k.endswith("_"))
    if tuned:
        return f"{', '.join(tuned)} set by the user: left as it is"
    return None
