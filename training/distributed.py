"""Process groups as torchrun sets them up: one process per device, gloo on CPU, nccl on GPUs.

``setup()`` reads RANK / WORLD_SIZE / LOCAL_RANK (absent: a single process, no process group), so the
same trainer runs under ``python -m`` and ``torchrun``. The helpers below are no-ops in a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    def seed(self, seed: int, per_rank: bool = False) -> int:
        """Seed torch's generators: the same seed everywhere (identical model init), or DiT's
        ``seed * world + rank`` (different noise per rank); returns the seed used."""
        used = seed * self.world + self.rank if per_rank else seed
        torch.manual_seed(used)
        return used


def setup(device: str = "auto") -> Distributed:
    """Join torchrun's process group (if any) and pick this process's device (auto, cpu or cuda)."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        where = torch.device("cuda", local)
    else:
        where = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Distributed(rank, world, where)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of ``t`` over processes (a new tensor; ``t`` itself in a single process)."""
    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over processes (a new tensor; ``t`` itself in a single process)."""
    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def wrap(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when there are several processes, else itself."""
    return torch.nn.parallel.DistributedDataParallel(module) if dist.is_initialized() else module


def replica_difference(model: torch.nn.Module) -> float:
    """Largest absolute difference between any rank's parameters and rank 0's (0 in a single process)."""
    if not dist.is_initialized():
        return 0.0
    # on the parameters' device: nccl only moves GPU tensors, gloo CPU ones
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    diff = (flat - reference).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def run_trainer(train, cfg, errors: tuple[type[Exception], ...]) -> int:
    """A trainer's ``main``: processes set up from torchrun's environment, rank-0 logging, torch threads,
    ``train(cfg, ddp)``; the expected ``errors`` become one logged line and exit status 2."""
    import torch

    from .progress import log, setup_logging

    ddp = setup(cfg.device)
    setup_logging(ddp.main)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return train(cfg, ddp)
    except errors as err:
        log.error(f"error: {err}")
        return 2
    finally:
        cleanup()
