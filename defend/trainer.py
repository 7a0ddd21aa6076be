"""The Lightning Trainer of ``defend experiment`` and ``defend evaluate``, from a config's ``trainer:`` options."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl

__all__ = ["make_trainer"]


def make_trainer(trainer: dict[str, Any], max_epochs: int, out: Path | None = None, **extra: Any) -> pl.Trainer:
    """A Trainer from the config's ``trainer:`` options (presets compose in), quiet by default."""
    opts = {"accelerator": "cpu", "devices": 1, "enable_model_summary": False, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": True, "deterministic": False}
    opts.update(trainer or {})
    opts.update(extra)
    opts["max_epochs"] = max_epochs
    if out is not None and opts.get("logger") is True:
        opts["logger"] = pl.loggers.CSVLogger(str(out), name="logs")
    return pl.Trainer(**opts)
