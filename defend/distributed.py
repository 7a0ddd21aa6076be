"""Process rank helpers that work before, during and after a Lightning / torchrun / SLURM launch."""
from __future__ import annotations

import os

__all__ = ["global_rank", "is_global_zero"]


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
