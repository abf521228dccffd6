"""Checkpoint files: safetensors weights + JSON config, written atomically, read with clear errors.

A model folder holds ``config.json`` and ``model.safetensors``; the weights file also carries the config
in its metadata, so a folder whose two files come from different saves is detected, and a lone
``.safetensors`` file is loadable. Writes go to a temporary file in the same folder, are fsynced and
renamed over the target: a crash leaves the old file or the new one, never a torn one.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from gpstoken_core.files import JSONFileError, atomic_write, atomic_write_text
from gpstoken_core.files import read_json as _read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or doesn't fit the model; the message names what and where."""


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
    try:
        return _read_json(path)
    except JSONFileError as err:
        raise CheckpointError(str(err)) from None


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
