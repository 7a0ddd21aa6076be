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

Outputs: logs go to ``runs/<config name>/version_N/`` (the stem of the last ``-c`` file; ``runs/fit/`` without one),
under ``trainer.default_root_dir`` when the config moves it, or where ``trainer.logger`` says; losses are logged at
least once per epoch (:class:`defend.callbacks.LogCadence`). The merged config is written as ``config.yaml`` in the
log folder through :func:`defend.io.atomic_path` and the folder's output manifest (:class:`GuardedConfig`): a file
there that defend did not write is never replaced without ``--overwrite``, a symbolic link never followed. The end of
``fit`` prints the final validation figures and the log folder.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from jsonargparse import ActionYesNo, DefaultHelpFormatter
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback

from .callbacks import EpochSeed, ExportArtifact, LogCadence
from .checks import CKPT_KEYWORDS, check_model_data, check_schedule, checkpoint_for_run, load_checkpoint_file
from .class_paths import allow_imports, check_argv, enforce_in_jsonargparse, split_imports
from .io import OutputConflictError, OutputGuard, atomic_write_text, guarded_outputs

__all__ = ["DefendCLI", "run_lightning_cli", "SUBCOMMANDS", "FIT_EPILOG"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")

FIT_EPILOG = """examples:
  defend fit -c configs/classifier/digits.yaml                      train from a YAML config
  defend fit -c configs/classifier/digits.yaml --trainer.max_epochs=2 --data.init_args.batch_size=64
  defend fit -c configs/classifier/digits.yaml --ckpt_path last     resume an interrupted run from the last
                                                                    checkpoint of its ModelCheckpoint dirpath
  defend fit -c configs/classifier/digits.yaml --print_config       show the merged config and exit

Every option above can be given in the YAML (-c) or on the command line (--section.key=value after the -c
files; later wins; the same rule as experiment and evaluate: README.md, section Overrides).
--model / --data take a class_path and its init_args; `--model.help CLASS` (e.g. --model.help
defend.classifier.ClassifierModule) and `--data.help CLASS` explain every argument of a class;
--trainer.* are pytorch_lightning.Trainer arguments. A class_path may name registered classes and classes of defend,
attacks, torch, torchvision and (pytorch_)lightning; give --import MODULE (repeatable, e.g. --import my_pkg.data)
to use your own module's classes: no config file makes defend import a module. Logs (metrics.csv, config.yaml) go to
runs/<config name>/version_N/ (CSV logger; under --trainer.default_root_dir when it is set) unless --trainer.logger
says otherwise; the configs in configs/ write checkpoints (including last.ckpt after every epoch) under checkpoints/.
--overwrite lets the run replace files defend did not write (config.yaml, the exported artifact) and a full run's
artifact with a shorter run's (a smoke run with --trainer.max_epochs=1 is refused otherwise).
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


def config_problem(path: Path, overwrite: bool) -> str | None:
    """Why ``config.yaml`` may not be written at ``path`` (one line), or ``None``: a symbolic link is never written
    through; an existing file defend's manifest does not list unchanged is replaced only with ``overwrite``."""
    if path.is_symlink():
        return (f"refusing to write {path}: it is a symbolic link (to {os.readlink(path)}) and defend does not write "
                "through links; remove the link or log elsewhere (--trainer.default_root_dir or --trainer.logger)")
    if path.exists() and OutputGuard(path.parent, overwrite=overwrite).conflicts([path]):
        return (f"refusing to overwrite {path}: defend did not write it (or it changed since); move it away, log "
                "elsewhere (--trainer.default_root_dir or --trainer.logger) or pass --overwrite")
    return None


class GuardedConfig(SaveConfigCallback):
    """Lightning's config saving, written atomically through the log folder's output manifest: a ``config.yaml``
    that is a link, or that defend did not write, is refused before training (:func:`config_problem`)."""

    def path(self, trainer: pl.Trainer) -> Path:
        return Path(trainer.log_dir or ".") / self.config_filename

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        path = self.path(trainer)
        problem = config_problem(path, self.overwrite) if trainer.is_global_zero else None
        problem = trainer.strategy.broadcast(problem)
        if problem:
            raise OutputConflictError(problem)
        if trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            with guarded_outputs(OutputGuard(path.parent, overwrite=self.overwrite)):
                atomic_write_text(path, text)
        self.already_saved = trainer.strategy.broadcast(True)


def _is_default_logger(logger: Any) -> bool:
    """Whether the config's ``trainer.logger`` is defend's default CSV logger (not one the config chose)."""
    try:
        return (logger.class_path == DEFAULT_LOGGER and str(logger.init_args.save_dir) == "runs")
    except AttributeError:
        return False


DEFAULT_LOGGER = "pytorch_lightning.loggers.CSVLogger"


def run_name(argv: Sequence[str]) -> str:
    """The log folder's name: the stem of the last ``-c`` / ``--config`` file on the command line, else ``fit``."""
    name = "fit"
    args = [str(a) for a in argv]
    for i, a in enumerate(args):
        if a in ("-c", "--config") and i + 1 < len(args):
            name = Path(args[i + 1]).stem or name
        elif a.startswith("--config="):
            name = Path(a.split("=", 1)[1]).stem or name
    return name


class DefendCLI(LightningCLI):
    """LightningCLI whose trainer defaults write logs under ``runs/<config name>/`` (CSV logger), checked before it
    runs; ``run_name`` names the log folder (:func:`run_name`)."""

    def __init__(self, *args: Any, run_name: str = "fit", **kwargs: Any) -> None:
        self.run_name = run_name
        super().__init__(*args, **kwargs)

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
        parser.add_argument("--overwrite", action=ActionYesNo, default=False,
                            help="Replace files defend did not write (config.yaml in the log folder, the exported "
                                 "artifact) and a full run's artifact with a shorter run's; refused without it.")
        parser.set_defaults({
            "trainer.default_root_dir": "runs",
            "trainer.logger": {"class_path": DEFAULT_LOGGER, "init_args": {"save_dir": "runs", "name": self.run_name}},
        })

    def before_instantiate_classes(self) -> None:
        """The default logger writes under ``trainer.default_root_dir`` when the config moves it."""
        sub = self.config.get("subcommand")
        trainer = self.config[sub].trainer if sub else self.config.trainer
        root = trainer.get("default_root_dir")
        if root is not None and str(root) != "runs" and _is_default_logger(trainer.get("logger")):
            trainer.logger.init_args.save_dir = str(root)

    def _config_max_epochs(self) -> int | None:
        """``trainer.max_epochs`` of the ``-c`` files alone (the last that sets it), before command-line overrides."""
        from .safe_yaml import load_file

        value = None
        for path in self.config[self.subcommand].get("config") or []:
            try:  # the file was read (and checked) by the parser already
                data = load_file(str(getattr(path, "absolute", path)))
            except (OSError, ValueError):
                continue
            trainer = data.get("trainer") if isinstance(data, dict) else None
            if isinstance(trainer, dict) and isinstance(trainer.get("max_epochs"), int):
                value = trainer["max_epochs"]
        return value

    def _outputs(self) -> None:
        """``--overwrite`` reaches the config writer and every exported artifact; the artifacts learn the configured
        ``max_epochs`` (what a full run of the config is)."""
        overwrite = bool(self.config_init[self.subcommand].get("overwrite"))
        for cb in self.trainer.callbacks:
            if isinstance(cb, ExportArtifact):
                cb.config_max_epochs = self._config_max_epochs()
            if overwrite and isinstance(cb, (GuardedConfig, ExportArtifact)):
                cb.overwrite = True

    def _check_outputs(self) -> None:
        """Every output refusal before Lightning starts (and creates a log folder): the config file, the artifacts."""
        if not self.trainer.is_global_zero:
            return
        for cb in self.trainer.callbacks:
            if isinstance(cb, ExportArtifact):
                cb.check(self.trainer, self.model)
            elif isinstance(cb, GuardedConfig) and (problem := config_problem(cb.path(self.trainer), cb.overwrite)):
                raise OutputConflictError(problem)

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
        self._outputs()
        self._check("fit")
        self._check_outputs()

    def after_fit(self) -> None:
        """The final validation figures and where the logs are."""
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        figures = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val")}
        text = ", ".join(f"{k} {v:.4f}" for k, v in figures.items()) or "none logged"
        print(f"[defend] final validation figures: {text}", flush=True)
        if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
            print(f"[defend] logs (metrics.csv, config.yaml): {trainer.logger.log_dir}", flush=True)

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
    argv, modules = split_imports(argv)
    enforce_in_jsonargparse()  # before any config is read: YAML limits, import paths denied outside the allowed
    allow_imports(modules)
    check_argv(argv)  # the class paths of -c files and of --model / --data values, before jsonargparse imports any
    strict = {"exit_on_error": False, "allow_abbrev": False}  # a misspelt key is an error, never a guessed one
    parser_kwargs = {**strict, "formatter_class": _HelpFormatter, **{cmd: dict(strict) for cmd in SUBCOMMANDS}}
    parser_kwargs["fit"]["epilog"] = FIT_EPILOG  # subcommands inherit the main parser's formatter
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LightningCLI's args parameter is intended")
        warnings.filterwarnings("ignore", message=r".*log_every_n_steps")  # LogCadence lowers it to fit the epoch
        return DefendCLI(pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                         args=list(argv), save_config_callback=GuardedConfig, auto_configure_optimizers=True,
                         parser_kwargs=parser_kwargs, run_name=run_name(argv),
                         trainer_defaults={"callbacks": [EpochSeed(), LogCadence()]})
