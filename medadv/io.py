"""Atomic output: a reader never sees a half-written file or folder, and a failed run leaves nothing.

Files are written to a temporary sibling and moved into place with :func:`os.replace` (atomic on
POSIX when source and target share a file system). Folders are built under a temporary sibling name
and renamed at the end; an existing folder of the same name is replaced only once the new one is
complete. A temporary folder carries its writer's process id, so one left by a killed run is
removed by the next run that writes the same output (and never one a live process is still filling).

:func:`check_output` is the door check every command runs before computing anything: the output must
not be an existing file of the other kind, and its folder must be writable.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medadv.errors import MedadvError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "", *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` only if the block succeeds.

    ``replace`` False: a file that appeared at ``path`` meanwhile is kept and the write refused (the
    temporary file is hard-linked into place, which fails on an existing name, instead of renamed)."""
    path = Path(path)
    if path.is_dir():
        raise MedadvError(f"{path} is a folder, and a file was to be written there.",
                          "choose a file name that is not a folder, or remove the folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode (keys set their own)
    try:
        yield tmp_path
        if replace:
            os.replace(tmp_path, path)
        else:
            taken = MedadvError(f"{path} already exists; medadv does not replace an existing output.",
                                "choose another output name, or add --force to replace it.")
            try:
                os.link(tmp_path, path)  # fails on an existing name: no window between check and write
            except FileExistsError:
                raise taken from None
            except OSError:  # a file system without hard links: the narrow window is the price
                if path.exists():
                    raise taken from None
                os.replace(tmp_path, path)
            tmp_path.unlink(missing_ok=True)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike[str], data: bytes, *, replace: bool = True) -> Path:
    with atomic_path(path, replace=replace) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, *, replace: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), replace=replace)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def to_json(obj: Any) -> str:
    """JSON with numpy scalars and paths converted; NaN is written as null (strict JSON)."""
    return json.dumps(_nan_to_none(obj), indent=2, default=_json_default, allow_nan=False) + "\n"


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, np.floating) and np.isnan(obj):
        return None
    return obj


def write_json(path: str | os.PathLike[str], obj: Any, *, replace: bool = True) -> Path:
    return write_text(path, to_json(obj), replace=replace)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; it becomes ``path`` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MedadvError(f"{path} is an existing file, and a folder was to be written there.",
                          "choose another output folder, or remove the file.")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-{os.getpid()}-old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary folders that killed writers of ``path`` left beside it; return them.

    Only folders named ``.<name>.partial-<pid>-*`` whose process is gone are removed, so a writer that is
    still running (another process of this run, or a second run) keeps its work.
    """
    path = Path(path)
    removed = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        pid = candidate.name[len(path.name) + len("..partial-"):].split("-", 1)[0]
        if candidate.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
    return removed


def check_output(path: str | os.PathLike[str], *, kind: str = "folder", flag: str = "--out",
                 force: bool | None = None) -> Path:
    """The door check before any computing: ``path`` can be written as a ``kind`` ("folder" or "file").

    Refuses an existing file where a folder goes (and a folder where a file goes), and a location whose
    folder cannot be created or written, naming ``flag`` in the fix. Creates the parent folder.
    ``force`` False: an existing output of the same kind is refused too (the command has ``--force`` to
    replace it); None: the caller replaces it (folders written whole by :func:`atomic_dir`).
    """
    path = Path(path)
    if force is False and kind == "file" and path.is_file():
        raise MedadvError(f"{flag} {path} already exists; medadv does not replace an existing output.",
                          f"pass another {flag}, or add --force to replace it.")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise MedadvError(f"{flag} {path} is an existing file; it would be replaced by a folder.",
                          f"pass a folder name to {flag}, or remove the file.")
    if kind == "file" and path.is_dir():
        raise MedadvError(f"{flag} {path} is a folder; a file goes there.", f"pass a file name to {flag}.")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MedadvError(f"{flag} {path}: its folder {parent} cannot be written ({reason}).",
                          f"pass a writable location to {flag}, or fix the folder's permissions.") from None
    return path
