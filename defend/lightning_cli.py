"""LightningCLI wiring: any LightningModule / LightningDataModule by class path, YAML configs.

Errors raise instead of exiting (``exit_on_error=False``) so that :func:`defend.cli.main` can print them on one
line; the model and the data are checked against each other (:func:`defend.checks.check_model_data`) and the
learning-rate schedule against the trainer (:func:`defend.checks.check_schedule`) before the Trainer runs, so a
mismatch writes nothing; every epoch is reseeded (:class:`defend.callbacks.EpochSeed`) so that
``--ckpt_path last`` resumes to the same result as an uninterrupted run.

Checkpoints: LightningCLI would merge the ``hyper_parameters`` of a ``--ckpt_path`` file into the config (importing
the class its ``_class_path`` names) and Lightning would resolve ``last`` / ``best`` / URLs and load them itself,
with ``--weights_only false`` on offer. Here nothing is taken from the file: ``--ckpt_path`` is resolved to a local
file, loaded with ``weights_only`` and compared with the configured model (:func:`defend.checks.checkpoint_for_run`)
before the Trainer starts, and Lightning gets that file with ``weights_only=True``; ``--weights_only`` is no option.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import pytorch_lightning as pl
from jsonargparse import DefaultHelpFormatter
from pytorch_lightning.cli import LightningCLI

from .callbacks import EpochSeed
from .checks import CKPT_KEYWORDS, check_model_data, check_schedule, checkpoint_for_run, load_checkpoint_file

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


CKPT_HELP = ("Local checkpoint file to resume training from (fit) or to take the weights from (validate, test, "
             "predict). 'last' = the newest last.ckpt in the dirpath of the config's ModelCheckpoint callbacks, "
             "'hpc' = Lightning's HPC checkpoint. It is loaded with weights_only=True (no code in the file runs) and "
             "must have been written for the configured model: its stored hyper-parameters, architecture and weight "
             "shapes are compared with the config, nothing is taken from it. 'best', URLs and registry names are "
             "refused (pass the file).")
WEIGHTS_ONLY_ERROR = ("--weights_only is not an option of defend: checkpoints are always loaded with "
                      "weights_only=True, so that a file cannot run code; a checkpoint that needs weights_only=false "
                      "cannot be used (re-save its state_dict with plain tensors)")


class DefendCLI(LightningCLI):
    """LightningCLI whose trainer defaults write logs under ``runs/`` (CSV logger), checked before it runs."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's subcommands without the ``weights_only`` argument (always ``True`` here)."""
        return {cmd: {*skip, "weights_only"} for cmd, skip in LightningCLI.subcommands().items()}

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        for action in parser._actions:
            if action.dest == "ckpt_path":
                action.help = CKPT_HELP
        return parser

    def parse_arguments(self, parser, args) -> None:
        """Parse; a key that does not exist carries the valid keys along, for :func:`defend.errors.one_line`'s
        did-you-mean."""
        try:
            super().parse_arguments(parser, args)
        except Exception as exc:
            sub = next((a for a in (args or []) if isinstance(a, str) and a in self.subcommands()), None)
            sub_parser = getattr(self, "_subcommand_parsers", {}).get(sub)
            if sub_parser is not None:
                try:
                    exc.valid_keys = sorted(sub_parser.get_defaults().keys())
                except Exception:  # pragma: no cover - the suggestion is a nicety, the error stands as it is
                    pass
            raise

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D401 - Lightning hook
        parser.set_defaults({
            "trainer.default_root_dir": "runs",
            "trainer.logger": {"class_path": "pytorch_lightning.loggers.CSVLogger",
                               "init_args": {"save_dir": "runs", "name": "fit"}},
        })

    def _parse_ckpt_path(self) -> None:
        """LightningCLI merges the hyper-parameters of ``--ckpt_path`` into the config here (importing the class
        its ``_class_path`` names): not here. A local file is checked right away (it loads with ``weights_only``);
        keywords are resolved once the trainer exists, and everything is compared with the configured model in
        :meth:`_check`."""
        sub = self.config.get("subcommand")
        value = self.config[sub].get("ckpt_path") if sub else None
        if value is not None and str(value) not in CKPT_KEYWORDS:
            load_checkpoint_file(value)  # also refuses URLs and registry names

    def _check(self, stage: str) -> None:
        self._ckpt_file = checkpoint_for_run(self.config_init[self.subcommand].get("ckpt_path"), self.trainer,
                                             self.model, stage)
        check_model_data(self.model, self.datamodule, stage)
        if stage == "fit":
            check_schedule(self.model, self.trainer)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        """Lightning gets the checked file (never a keyword it would resolve itself) and ``weights_only=True``."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        path = getattr(self, "_ckpt_file", None)
        kwargs["ckpt_path"] = str(path) if path is not None else None
        kwargs["weights_only"] = True
        return kwargs

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
    if any(a == "--weights_only" or str(a).startswith("--weights_only=") for a in argv):
        raise ValueError(WEIGHTS_ONLY_ERROR)
    strict = {"exit_on_error": False}
    parser_kwargs = {**strict, "formatter_class": _HelpFormatter, **{cmd: dict(strict) for cmd in SUBCOMMANDS}}
    parser_kwargs["fit"]["epilog"] = FIT_EPILOG  # subcommands inherit the main parser's formatter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended")
        return DefendCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         args=list(argv), save_config_kwargs={"overwrite": True}, auto_configure_optimizers=True,
                         parser_kwargs=parser_kwargs, trainer_defaults={"callbacks": [EpochSeed()]})
