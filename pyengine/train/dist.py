"""torch.distributed set-up for runs under torchrun (NCCL on GPU, gloo on CPU)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[DistInfo, torch.device]:
    """Joins the process group torchrun describes (WORLD_SIZE > 1); a no-op otherwise.

    Returns the rank information and the device this rank uses (cuda:LOCAL_RANK on GPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), torch.device(device)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistInfo(rank, world, local), dev


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def main_rank_first(enabled: bool = True):
    """Rank 0 runs the body first, the other ranks once it has finished (a dataset download or
    extraction into a folder they share: every rank writing the same files at once corrupts them).
    A no-op outside a process group or with ``enabled`` False. If rank 0 fails inside, its error
    ends the job (torchrun stops the other ranks waiting here)."""
    on = enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if on and dist.get_rank() != 0:
        dist.barrier()
    yield
    if on and dist.get_rank() == 0:
        dist.barrier()


def all_reduce_sum(values: list[float], device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
