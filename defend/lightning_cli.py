"""LightningCLI wiring: any LightningModule / LightningDataModule by class path, YAML configs."""
from __future__ import annotations

from typing import Sequence

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

__all__ = ["DefendCLI", "run_lightning_cli"]


class DefendCLI(LightningCLI):
    """LightningCLI whose trainer defaults write logs under ``runs/`` (CSV logger) and checkpoints under ``checkpoints/``."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D401 - Lightning hook
        parser.set_defaults({
            "trainer.default_root_dir": "runs",
            "trainer.logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                               "init_args": {"save_dir": "runs", "name": "fit"}},
        })


def run_lightning_cli(argv: Sequence[str]) -> DefendCLI:
    return DefendCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     args=list(argv), save_config_kwargs={"overwrite": True}, auto_configure_optimizers=True)
