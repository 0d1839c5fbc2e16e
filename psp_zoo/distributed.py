"""This process's place in a ``torchrun`` job: rank, world size, and the few collectives reproduce needs.

Run alone, every call is a no-op on one process. Under torchrun (RANK / WORLD_SIZE set) the
process joins a gloo (CPU) or nccl (CUDA) group; rank 0 measures and writes while the others wait.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist

from .constants import torchrun_rank

__all__ = ["Distributed"]


@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    started_here: bool = False

    @classmethod
    def from_env(cls, device: torch.device) -> Tuple["Distributed", torch.device]:
        """Join the job described by RANK / WORLD_SIZE (gloo on CPU, nccl on CUDA), if any."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls(), device
        rank = torchrun_rank()
        if device.type == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count()))
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        started = False
        if not dist.is_initialized():
            # rank 0 measures speed and memory while the others wait at a barrier: allow hours
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(hours=6))
            started = True
        return cls(rank, world_size, started), device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def errors(self, error: Optional[str]) -> List[str]:
        """Every process's error (so all of them agree whether a checkpoint failed)."""
        if self.world_size == 1:
            return [error] if error else []
        gathered: List[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(gathered, error)
        return [f"rank {rank}: {e}" for rank, e in enumerate(gathered) if e]

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.destroy_process_group()
