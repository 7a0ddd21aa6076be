"""Lightning callbacks of the ``defend`` command.

:class:`EpochSeed` makes every training epoch a function of the weights, the optimiser state, the seed and the
epoch number alone: at the start of epoch ``e`` it reseeds Python, NumPy and torch (CPU and CUDA) from
``(seed, e, rank)``. Together with the data modules' per-epoch shuffle (:class:`defend.data.EpochShuffleSampler`)
a run resumed from an end-of-epoch checkpoint (``defend fit ... --ckpt_path last``) ends with the same weights as
an uninterrupted run with the same seed.
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytorch_lightning as pl
import torch

__all__ = ["EpochSeed", "epoch_seed"]


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of epoch ``epoch`` on process ``rank`` (distinct streams per epoch and per rank)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + int(rank) * 104_729) % (2**32)


class EpochSeed(pl.Callback):
    """Reseed every RNG at the start of each training epoch (and of a resumed run).

    Args:
        seed: base seed; ``None`` uses the run's ``seed_everything`` value (``PL_GLOBAL_SEED``) and does nothing
            when no seed was set.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def _base(self) -> int | None:
        if self.seed is not None:
            return int(self.seed)
        env = os.environ.get("PL_GLOBAL_SEED")
        return int(env) if env not in (None, "") else None

    def _reseed(self, trainer: pl.Trainer) -> None:
        base = self._base()
        if base is None:
            return
        s = epoch_seed(base, trainer.current_epoch, trainer.global_rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)  # also seeds every CUDA device

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a run restored from a checkpoint written at the end of an epoch goes on with the next epoch without
        # calling on_train_epoch_start for it (Lightning's "restarted on epoch end"): seed that epoch here
        self._reseed(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reseed(trainer)
