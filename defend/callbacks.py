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
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from .checks import load_checkpoint_file
from .data.base import require_development
from .io import CheckpointError, OutputConflictError, OutputGuard, guarded_outputs, load_artifact

__all__ = ["EpochSeed", "epoch_seed", "ExportArtifact", "KeepBest", "LogCadence", "run_record", "export_problem"]


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


class LogCadence(pl.Callback):
    """Log at least once per epoch: ``log_every_n_steps`` is lowered to the optimiser steps of one training epoch
    when an epoch has fewer (small data would otherwise leave the loss columns of ``metrics.csv`` empty)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = trainer.num_training_batches
        if not isinstance(n, int) or n <= 0 or not trainer.log_every_n_steps:
            return
        steps = max(1, n // max(1, int(trainer.accumulate_grad_batches)))
        trainer.log_every_n_steps = min(int(trainer.log_every_n_steps), steps)


def _limits(trainer: pl.Trainer) -> list[str]:
    """What shortens a run below whole epochs of the whole training split (a smoke run), as ``key value``."""
    out = []
    if trainer.fast_dev_run:
        out.append(f"fast_dev_run {trainer.fast_dev_run}")
    if trainer.limit_train_batches not in (None, 1.0):
        out.append(f"limit_train_batches {trainer.limit_train_batches}")
    if trainer.max_steps not in (None, -1):
        out.append(f"max_steps {trainer.max_steps}")
    return out


def run_record(trainer: pl.Trainer, config_max_epochs: int | None, epochs_run: int | None = None) -> dict[str, Any]:
    """The artifact's ``training_run`` metadata: epochs run and planned, the configured ``max_epochs`` (the config
    files', before command-line overrides), the limits, and ``full``: whole epochs of the whole split, as many as
    configured."""
    limits = _limits(trainer)
    planned = trainer.max_epochs
    short = config_max_epochs is not None and planned is not None and planned >= 0 and planned < config_max_epochs
    return {"epochs_run": epochs_run, "max_epochs": planned, "config_max_epochs": config_max_epochs,
            "limits": limits, "full": not limits and not short}


def _recorded_run(path: Path, kind: str) -> dict[str, Any] | None:
    """The ``training_run`` of the artifact at ``path``; ``{"full": True}`` (presumed) for one that records none."""
    try:
        meta = load_artifact(path, kind).get("meta") or {}
    except (CheckpointError, OSError):
        return None  # not an artifact of this kind: the manifest decides
    rec = meta.get("training_run")
    return dict(rec) if isinstance(rec, dict) else {"full": True, "max_epochs": None}


def export_problem(path: Path) -> str | None:
    """Why the artifact cannot be written at ``path`` (one line), or ``None``: the target must not be a directory,
    its nearest existing parent must be a writable directory."""
    if path.is_dir():
        return f"the export path {path} is a directory; give a file name (ExportArtifact init_args.path)"
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return (f"cannot export to {path}: {parent} is not a directory; choose another ExportArtifact "
                "init_args.path")
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot export to {path}: the folder {parent} is not writable; choose another ExportArtifact path"
    return None


class ExportArtifact(pl.Callback):
    """At the end of ``fit``, write the trained defence as the artifact every experiment reads
    (:meth:`DefenceModule.export`: ``load_classifier`` / ``load_rts``), and say where each file went.

    Args:
        path: the artifact, e.g. ``checkpoints/digits_small_cnn.pt`` (what ``configs/experiments/*`` reuse).
        weights: ``best`` (the weights of the best checkpoint of a monitored ``ModelCheckpoint``; the final weights
            when there is none) or ``last`` (the final weights).
        overwrite: replace a file at ``path`` that defend did not write (or that changed since), and a full run's
            artifact with a shorter run's; without it the run refuses before training (the manifest
            ``.defend-manifest.json`` beside the artifact lists defend's files; ``defend fit --overwrite`` sets it).

    The artifact's metadata records ``training_run`` (:func:`run_record`); a run shortened below its config (fewer
    epochs, ``limit_train_batches``, ``max_steps``, ``fast_dev_run``) never replaces a full run's artifact (or one
    that records nothing) unless ``overwrite``. ``config_max_epochs`` (the config files' ``trainer.max_epochs``)
    is set by ``defend fit``.
    """

    def __init__(self, path: str, weights: str = "best", overwrite: bool = False) -> None:
        if weights not in ("best", "last"):
            raise ValueError(f"ExportArtifact weights must be 'best' or 'last', got {weights!r}")
        self.path, self.weights, self.overwrite = Path(path), weights, bool(overwrite)
        self.config_max_epochs: int | None = None

    def _guard(self) -> OutputGuard:
        return OutputGuard(self.path.parent, overwrite=self.overwrite)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:  # refuse before any training, not after it
            self.check(trainer, pl_module)

    def check(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Refuse (one line) an export path that cannot be written, a file defend did not write there and a full
        run's artifact about to be replaced by a shorter run (``defend fit`` calls it before the Trainer starts)."""
        problem = export_problem(self.path)
        if problem:
            raise ValueError(problem)
        if self._guard().conflicts([self.path]):
            raise OutputConflictError(
                f"refusing to overwrite {self.path}: defend did not write it (or it changed since); move it away, "
                "export elsewhere (ExportArtifact init_args.path) or pass --overwrite")
        self._refuse_shorter(trainer, getattr(pl_module, "artifact_kind", "model"))

    def _refuse_shorter(self, trainer: pl.Trainer, kind: str) -> None:
        """A shorter run than the one that made the existing artifact does not replace it without ``overwrite``."""
        if self.overwrite or not self.path.is_file():
            return
        old, new = _recorded_run(self.path, kind), run_record(trainer, self.config_max_epochs)
        if old is None or not old.get("full"):
            return
        fewer = old.get("max_epochs") is not None and new["max_epochs"] is not None and \
            0 <= new["max_epochs"] < old["max_epochs"]
        if new["full"] and not fewer:
            return
        why = ", ".join(new["limits"] + [f"max_epochs {new['max_epochs']}" + (
            f" of the config's {new['config_max_epochs']}" if new["config_max_epochs"] is not None else "")])
        made = f"a full {old['max_epochs']}-epoch run" if old.get("max_epochs") is not None else "a full run"
        raise OutputConflictError(
            f"refusing to replace {self.path}, the artifact of {made}, with a shorter run ({why}); pass --overwrite "
            "to replace it, or export elsewhere (ExportArtifact init_args.path)")

    def _best(self, trainer: pl.Trainer) -> str | None:
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "monitor", None) and getattr(cb, "best_model_path", ""):
                return str(cb.best_model_path)
        return None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        best = self._best(trainer) if self.weights == "best" else None
        current = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        try:
            if best:

                pl_module.load_state_dict(load_checkpoint_file(best)["state_dict"])
            self.path.parent.mkdir(parents=True, exist_ok=True)
            record = run_record(trainer, self.config_max_epochs, int(trainer.current_epoch))
            with guarded_outputs(self._guard()):
                pl_module.export(self.path, extra={"training_run": record})
        finally:
            pl_module.load_state_dict(current)
        for folder in dict.fromkeys(str(cb.dirpath) for cb in trainer.checkpoint_callbacks):
            print(f"[defend] Lightning checkpoints (resume with --ckpt_path last): {folder}")
        print(f"[defend] exported the trained {getattr(pl_module, 'artifact_kind', 'model')} to {self.path} "
              f"({'weights of ' + best if best else 'final weights'})")


class KeepBest(pl.Callback):
    """Keep in memory the module's weights at the best value of a validation metric and put them back at the end of
    ``fit`` (early stopping by selection, for runs that write no checkpoint files, such as the experiments;
    ``ModelCheckpoint`` + ``ExportArtifact(weights=best)`` does the same with files).

    Args:
        monitor: the logged metric, e.g. ``val/aid_score``: a metric of the development split (``val/...``); a
            ``test/...`` or ``train/...`` metric is refused (selection never reads the test split).
        mode: ``max`` or ``min``.
        record: further logged metrics to keep for each validation (``history``).

    Each validation (after every epoch, or every ``val_check_interval`` batches) is a candidate; its ``history`` row
    has the epoch in progress and ``batches``, the training batches done so far (which tells candidates apart).
    """

    def __init__(self, monitor: str, mode: str = "max", record: tuple[str, ...] = ()) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"KeepBest mode must be 'max' or 'min', got {mode!r}")
        require_development(monitor.split("/")[0] if "/" in monitor else "unnamed", f"KeepBest({monitor!r})")
        self.monitor, self.mode, self.record = monitor, mode, tuple(record)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_batches: int | None = None
        self.batches = 0
        self.history: list[dict[str, float]] = []
        self._state: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.batches += 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        if self.monitor not in metrics:
            raise ValueError(f"KeepBest: the module logged no {self.monitor!r} in validation (logged: "
                             f"{', '.join(sorted(metrics)) or 'nothing'})")
        value = float(metrics[self.monitor])
        self.history.append({"epoch": trainer.current_epoch + 1, "batches": self.batches, self.monitor: value,
                             **{k: float(metrics[k]) for k in self.record if k in metrics}})
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better:
            self.best, self.best_epoch, self.best_batches = value, trainer.current_epoch + 1, self.batches
            self._state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is not None:
            pl_module.load_state_dict(self._state)
