"""Process rank helpers that work before, during and after a Lightning / torchrun / SLURM launch."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["global_rank", "is_global_zero", "rank_world", "shard_draw", "mean_over_ranks"]


def global_rank() -> int:
    """This process's global rank: ``RANK`` (torchrun, SLURM via Lightning) or ``NODE_RANK`` / ``LOCAL_RANK``
    (Lightning's own launcher); 0 outside a distributed launch."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1:
        return int(os.environ["SLURM_PROCID"])
    local, node = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("NODE_RANK", 0))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or (
        int(os.environ.get("WORLD_SIZE", 1)) // max(int(os.environ.get("NUM_NODES", 1)), 1))
    return node * per_node + local


def is_global_zero() -> bool:
    """Whether this process publishes results (rank 0)."""
    return global_rank() == 0


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group; ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_draw(draw: Callable[[int], Tensor], n_local: int) -> Tensor:
    """Seeded randomness that does not depend on the number of processes.

    ``draw(n)`` makes ``n`` random rows from a generator seeded identically on every rank; this draws the rows of
    the whole global batch and keeps this rank's, ``rank::world`` (the rows :class:`defend.data.EpochShuffleSampler`
    gives this rank). Every rank must hold ``n_local`` rows (the sampler pads the epoch to a multiple of the world).
    """
    rank, world = rank_world()
    return draw(n_local * world)[rank::world]


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a (detached) tensor over all ranks; the tensor itself without a process group. Every rank must
    call it at the same point (a collective)."""
    if rank_world()[1] == 1:
        return value.detach()
    out = value.detach().clone()
    torch.distributed.all_reduce(out)
    return out / rank_world()[1]
