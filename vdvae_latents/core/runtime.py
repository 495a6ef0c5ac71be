"""Where a job runs: the device it asks for, and torchrun's process group.

Every command that computes picks its device here and, under ``torchrun``, joins the
process group here, so training, analysis and encoding follow one rule. torch is
imported inside the functions: ``core`` is imported by the CLI's start-up path, which
must not pay for torch (``vdvl --help``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import ConfigError, UserError

if TYPE_CHECKING:
    import torch


@dataclass
class DistEnv:
    """This process's place in a torchrun job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistEnv:
    """Join the process group torchrun set up (no-op for a single process): NCCL on CUDA, gloo otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def launched_rank() -> int:
    """This process's rank as torchrun launched it (0 without torchrun), known before joining the group.

    For checks only the writing rank may make, such as "the store must not exist yet": when the
    process group is already up (a second job in one torchrun process), rank 0 may create the
    store before another rank gets to the check, which would then refuse its own job.
    """
    return int(os.environ.get("RANK", "0"))


def leave_process_group() -> None:
    """End the process group a command joined (a no-op when there is none or torch was never imported).

    Called after a command succeeds, never after a failure, where a rank would wait on the others.
    """
    import sys

    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def auto_device(name: str = "auto", *, setting: str = "--device") -> torch.device:
    """``auto``, ``cpu`` or ``cuda`` as a torch device: auto takes CUDA when there is one.

    ``setting`` names the option in the error when CUDA is asked for and absent (a
    ConfigError naming ``train setting 'device'`` for training, a UserError naming the flag
    for the other commands).
    """
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        if setting.startswith("train setting"):
            raise ConfigError(f"{setting} is cuda but no CUDA device is available.")
        raise UserError(f"{setting} cuda was asked for but no CUDA device is available.")
    return torch.device("cuda" if name in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def join_processes(dev: torch.device) -> tuple[torch.device, DistEnv]:
    """Join torchrun's process group if there is one: (this rank's device, its place in the job).

    Training and every job over a data set (analyze-kl, encode) start here; on CUDA each rank
    takes its own local GPU and makes it the current one.
    """
    import torch

    env = init_distributed(dev.type)
    if dev.type == "cuda":
        dev = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(dev)
    return dev, env


__all__ = ["DistEnv", "init_distributed", "launched_rank", "leave_process_group", "auto_device", "join_processes"]
