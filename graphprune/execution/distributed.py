"""Data parallelism under ``torchrun``: join the process group from the environment."""
from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import torch

__all__ = ["is_main", "process_group", "rank", "rank_and_world"]


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise.

    The backend is NCCL when torch sees a GPU, else gloo. On a normal exit the ranks meet at a
    barrier before the group is torn down, and the collectives' leftover objects are collected
    while the interpreter is alive: gloo aborts the process (SIGABRT) when they are only freed
    during interpreter shutdown.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or torch.distributed.is_initialized():
        yield
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend)
    try:
        yield
        torch.distributed.barrier()  # no rank tears the group down while another still talks to it
    finally:
        torch.distributed.destroy_process_group()
        gc.collect()


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside torchrun)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank() -> int:
    return rank_and_world()[0]


def is_main() -> bool:
    return rank() == 0
