"""Atomic file and folder writes, file hashes, JSON reading: one implementation for every writer.

A write goes to a temporary name in the target's folder, is fsynced and renamed over the target, so a
crash (or ``kill -9``) leaves the old file or the new one, never a torn one. Folders (an export, a
training checkpoint) are built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some file systems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path next to ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


@contextmanager
def atomic_folder(target: str | Path, replace: bool = False):
    """Yield a temporary folder beside ``target``; on success it is fsynced and renamed to ``target``.

    ``replace=False`` refuses a non-empty existing ``target`` (FileExistsError, before anything is
    written); ``replace=True`` moves an existing one aside and removes it once the new one is in place.
    On any error the temporary folder is removed and ``target`` is untouched.
    """
    target = Path(target)
    if not replace and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target}: exists and is not empty; choose a new folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        fsync_dir(tmp)
        stale = None
        if target.exists():
            if replace:
                stale = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, stale)
            else:
                target.rmdir()  # empty (checked above)
        os.replace(tmp, target)
        fsync_dir(target.parent)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file (the integrity field of manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class JSONFileError(ValueError):
    """A JSON file is missing or unreadable; the message names the file."""


def read_json(path: str | Path) -> dict:
    """A JSON object from ``path``, with one-line errors for a missing file, bad JSON or a non-object."""
    path = Path(path)
    if not path.exists():
        raise JSONFileError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise JSONFileError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise JSONFileError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
