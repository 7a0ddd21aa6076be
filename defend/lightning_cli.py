"""LightningCLI wiring: any LightningModule / LightningDataModule by class path, YAML configs.

Errors raise instead of exiting (``exit_on_error=False``) so that :func:`defend.cli.main` can print them on one
line; the model and the data are checked against each other (:func:`defend.checks.check_model_data`) before the
Trainer runs, so a mismatch writes nothing; every epoch is reseeded (:class:`defend.callbacks.EpochSeed`) so that
``--ckpt_path last`` resumes to the same result as an uninterrupted run.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import pytorch_lightning as pl
from jsonargparse import DefaultHelpFormatter
from pytorch_lightning.cli import LightningCLI

from .callbacks import EpochSeed
from .checks import check_model_data, check_resume_checkpoint, load_checkpoint_file

__all__ = ["DefendCLI", "run_lightning_cli", "SUBCOMMANDS", "FIT_EPILOG"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")

FIT_EPILOG = """examples:
  defend fit -c configs/classifier/digits.yaml                      train from a YAML config
  defend fit -c configs/classifier/digits.yaml --trainer.max_epochs=2 --data.init_args.batch_size=64
  defend fit -c configs/classifier/digits.yaml --ckpt_path last     resume an interrupted run from the last
                                                                    checkpoint of its ModelCheckpoint dirpath
  defend fit -c configs/classifier/digits.yaml --print_config       show the merged config and exit

Every option above can be given in the YAML (-c) or on the command line (--section.key=value; later wins).
--model / --data take a class_path and its init_args; `--model.help CLASS` (e.g. --model.help
defend.classifier.ClassifierModule) and `--data.help CLASS` explain every argument of a class;
--trainer.* are pytorch_lightning.Trainer arguments. Logs go to runs/ (CSV logger) unless --trainer.logger says
otherwise; the configs in configs/ write checkpoints (including last.ckpt after every epoch) under checkpoints/.
Set DEFEND_DEBUG=1 to see full tracebacks of configuration and data errors.
"""


class _HelpFormatter(DefaultHelpFormatter):
    """Keeps the line breaks of the epilog (the examples)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class DefendCLI(LightningCLI):
    """LightningCLI whose trainer defaults write logs under ``runs/`` (CSV logger), checked before it runs."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D401 - Lightning hook
        parser.set_defaults({
            "trainer.default_root_dir": "runs",
            "trainer.logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                               "init_args": {"save_dir": "runs", "name": "fit"}},
        })

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads the hyper-parameters of ``--ckpt_path`` while parsing: check the file first."""
        sub = self.config.get("subcommand")
        load_checkpoint_file(self.config[sub].get("ckpt_path") if sub else None)
        super()._parse_ckpt_path()

    def _check(self, stage: str) -> None:
        check_model_data(self.model, self.datamodule, stage)
        check_resume_checkpoint(self.config_init[self.subcommand].get("ckpt_path"), self.model)

    def before_fit(self) -> None:
        self._check("fit")

    def before_validate(self) -> None:
        self._check("validate")

    def before_test(self) -> None:
        self._check("test")

    def before_predict(self) -> None:
        self._check("predict")


def run_lightning_cli(argv: Sequence[str]) -> DefendCLI:
    """Run ``defend <subcommand> ...``; configuration errors raise ``argparse.ArgumentError`` / ``ValueError``."""
    strict = {"exit_on_error": False}
    parser_kwargs = {**strict, "formatter_class": _HelpFormatter, **{cmd: dict(strict) for cmd in SUBCOMMANDS}}
    parser_kwargs["fit"]["epilog"] = FIT_EPILOG  # subcommands inherit the main parser's formatter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended")
        return DefendCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         args=list(argv), save_config_kwargs={"overwrite": True}, auto_configure_optimizers=True,
                         parser_kwargs=parser_kwargs, trainer_defaults={"callbacks": [EpochSeed()]})
