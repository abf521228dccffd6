"""Checkpoint files: safetensors weights + JSON config, written atomically, read with clear errors.

A model folder holds ``config.json`` and ``model.safetensors``; the weights file also carries the config
in its metadata, so a folder whose two files come from different saves is detected, and a lone
``.safetensors`` file is loadable. Writes go to a temporary file in the same folder, are fsynced and
renamed over the target: a crash leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or doesn't fit the model; the message names what and where."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path next to ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    data = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}  # clone: no shared storage
    atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=metadata))


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; CheckpointError when missing or unreadable."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    return tensors, metadata


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def describe_mismatch(
    expected: Mapping[str, torch.Size], found: Mapping[str, torch.Tensor], source: str, limit: int = 8
) -> str | None:
    """A readable list of missing, unexpected and wrongly shaped tensors, or None if they match."""

    def clip(names):
        names = sorted(names)
        more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
        return ", ".join(names[:limit]) + more

    missing = set(expected) - set(found)
    unexpected = set(found) - set(expected)
    wrong = [
        f"{k} {tuple(found[k].shape)} (model expects {tuple(expected[k])})"
        for k in sorted(set(expected) & set(found))
        if tuple(found[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or wrong):
        return None
    lines = [f"{source} does not match the model:"]
    if missing:
        lines.append(f"  missing ({len(missing)}): {clip(missing)}")
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)}): {clip(unexpected)}")
    if wrong:
        lines.append(f"  wrong shape ({len(wrong)}): " + "; ".join(wrong[:limit]) + (" ..." if len(wrong) > limit else ""))
    return "\n".join(lines)
