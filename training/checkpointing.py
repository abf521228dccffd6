"""Training checkpoints that survive ``kill -9``: one folder per step, completed by a rename.

``OUT/checkpoints/step_00001000/`` holds model.safetensors, ema.safetensors, optimizer.safetensors
(+ disc.safetensors, disc_optimizer.safetensors) and state.json (step, configs, RNG). Files are written
into ``step_00001000.tmp-*`` and fsynced; the folder is renamed when complete and ``latest`` is updated
atomically. A folder without the final name never counts, so a kill at any moment leaves the previous
checkpoint usable; at most one checkpoint interval is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from gpstoken.checkpoint import atomic_write_text, load_tensors, save_tensors

STEP_PREFIX = "step_"


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able metadata."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]  # JSON made it a list
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(
    root: str | Path,
    step: int,
    parts: dict[str, dict[str, torch.Tensor]],
    state: dict,
    keep: int = 3,
    on_part_written: Callable[[], None] | None = None,
) -> Path:
    """Write ``parts`` (file stem -> tensors) and ``state`` (JSON) as checkpoint ``step``; keep the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=root))
    try:
        for stem, tensors in parts.items():
            save_tensors(tmp / f"{stem}.safetensors", tensors)
            if on_part_written is not None:
                on_part_written()
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
        _fsync_dir(tmp)
        stale = None
        if final.exists():  # an older checkpoint of the same step: moved aside, removed once replaced
            stale = final.with_name(final.name + f".tmp-old-{os.getpid()}")
            os.replace(final, stale)
        os.replace(tmp, final)
        _fsync_dir(root)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / "latest", final.name + "\n")
    for old in completed_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def completed_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX) and ".tmp" not in p.name]
    return sorted((p for p in found if (p / "state.json").exists()), key=lambda p: p.name)


def latest_checkpoint(root: str | Path) -> Path | None:
    done = completed_checkpoints(root)
    return done[-1] if done else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(parts, state) of a checkpoint folder."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    parts = {p.stem: load_tensors(p)[0] for p in sorted(path.glob("*.safetensors"))}
    return parts, state


def cleanup_partial(root: str | Path) -> list[Path]:
    """Remove ``*.tmp-*`` folders a killed run left behind; returns what was removed."""
    root = Path(root)
    removed = [p for p in root.glob(f"{STEP_PREFIX}*.tmp-*")] if root.is_dir() else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
