"""Training checkpoints that survive ``kill -9``: one folder per step, completed by a rename.

``OUT/checkpoints/step_00001000/`` holds one safetensors file per model and optimizer (model, ema,
optimizer, ...), rng.safetensors and state.json (step, configs, optimizer hyper-parameters). The folder
is built under a temporary name by ``gpstoken_core.files.atomic_folder`` and renamed when complete, then
``latest`` is rewritten atomically. A folder without the final name never counts, so a kill at any
moment leaves the previous checkpoint usable; at most one checkpoint interval is lost.

Any trainer saves with ``save_training_state(root, step, modules, optimizers, state)`` and resumes with
``load_checkpoint`` + ``restore_training_state``; the names of ``modules`` / ``optimizers`` are the files.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from gpstoken_core.files import atomic_folder, atomic_write_text

from gpstoken.checkpoint import load_tensors, save_tensors

STEP_PREFIX = "step_"

# Crash testing: "after_ckpt:N" kills the process with SIGKILL right after checkpoint N is complete,
# "during_ckpt:N" while checkpoint N is half written (tests/test_training.py uses both).
CRASH_TEST_ENV = "GPSTOKEN_TRAIN_CRASH_TEST"


def crash_point(point: str, step: int) -> None:
    """Die here, as ``kill -9`` would, when the crash-test variable names this point and step."""
    if os.environ.get(CRASH_TEST_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


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
    final = root / f"{STEP_PREFIX}{step:08d}"
    # replace=True: a checkpoint of the same step (a run restarted from an earlier one) is superseded
    with atomic_folder(final, replace=True) as tmp:
        for stem, tensors in parts.items():
            save_tensors(tmp / f"{stem}.safetensors", tensors)
            if on_part_written is not None:
                on_part_written()
        atomic_write_text(tmp / "state.json", json.dumps(state, indent=1))
    atomic_write_text(root / "latest", final.name + "\n")
    for old in completed_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_training_state(
    root: str | Path,
    step: int,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    state: dict,
    keep: int = 3,
) -> Path:
    """Checkpoint ``step``: each module's weights, each optimizer's state, torch's RNG and ``state``.

    An OSError (full disk, ...) says whether an earlier checkpoint is still there to resume from.
    """
    parts = {name: m.state_dict() for name, m in modules.items()}
    meta = {}
    for name, opt in optimizers.items():
        parts[name], meta[name] = optimizer_to_tensors(opt)
    parts["rng"] = {"torch": torch.get_rng_state()}
    try:
        return save_checkpoint(
            root, step, parts, {"step": step, **state, **meta}, keep=keep,
            on_part_written=lambda: crash_point("during_ckpt", step),
        )
    except OSError as err:
        previous = latest_checkpoint(root)
        raise OSError(
            f"could not write the checkpoint at step {step} ({err}); "
            + (f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists")
        ) from None


def restore_training_state(
    path: str | Path,
    parts: dict[str, dict[str, torch.Tensor]],
    state: dict,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
) -> int:
    """Load what ``save_training_state`` wrote (``load_checkpoint(path)`` gives parts and state); returns the step."""
    for name, module in modules.items():
        # a module with its own checked loader (GPSTokenizer.load_weights) names the file in its errors
        load = getattr(module, "load_weights", None)
        if load is not None:
            load(parts[name], source=f"{path}/{name}.safetensors")
        else:
            module.load_state_dict(parts[name])
    for name, opt in optimizers.items():
        optimizer_from_tensors(opt, parts[name], state[name])
    torch.set_rng_state(parts["rng"]["torch"])
    return int(state["step"])


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
    """Remove the temporary folders a killed run left behind; returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    # atomic_folder's names: .step_N.tmp-* (being written), .step_N.old-* (being replaced); step_N.tmp-* are
    # from checkpoints written before atomic_folder was used
    patterns = (f".{STEP_PREFIX}*.tmp-*", f".{STEP_PREFIX}*.old-*", f"{STEP_PREFIX}*.tmp-*")
    removed = [p for pattern in patterns for p in root.glob(pattern)]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def find_resume_checkpoint(root: str | Path, cfg, resume: bool, fixed: tuple[str, ...], main: bool, barrier=lambda: None):
    """The checkpoint a run continues from, or None for a new run, with the refusals every trainer needs.

    ``resume``: clear leftovers of a killed save (rank 0), take the latest complete checkpoint and refuse
    one written with other values of the ``fixed`` config fields; without ``resume``: refuse to start
    over existing checkpoints. Returns (path, tensors, state) or None."""
    from gpstoken.checkpoint import CheckpointError

    from .config import changed_on_resume
    from .progress import log

    root = Path(root)
    if not resume:
        if latest_checkpoint(root) is not None:
            raise CheckpointError(f"{root} already has checkpoints: pass --resume to continue, or choose another --out")
        return None
    for p in cleanup_partial(root) if main else []:
        log.info(f"removed an incomplete checkpoint {p.name} (the run was killed while writing it)")
    barrier()
    ckpt = latest_checkpoint(root)
    if ckpt is None:
        raise CheckpointError(f"--resume: no checkpoint in {root}")
    parts, state = load_checkpoint(ckpt)
    changed = changed_on_resume(state["train_config"], cfg, fixed)
    if changed:
        raise CheckpointError(f"{ckpt}: was written with a different {', '.join(changed)}; resume with the same settings or start a new --out")
    return ckpt, parts, state
