"""Pieces every experiment shares: data, the classifier (trained or reused), the RTS interpreter, the outputs."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ..aid import AIDModule
from ..classifier import ClassifierModule, load_reused_classifier, save_classifier
from ..data import BaseDataModule, DigitsDataModule
from ..io import atomic_write_text, refuse_conflicts, write_json
from ..models import GapClassifier, build_classifier
from ..trainer import make_trainer
from ..typed_config import check_class_options
from ..types import PositiveCount
from .config import ExperimentConfig

__all__ = ["ClassifierSpec", "ClassifierExperimentConfig", "default_data", "setup_data", "get_classifier",
           "classifier_outputs", "train_rts", "write_outputs"]


@dataclass
class ClassifierSpec:
    """The classifier an experiment attacks or explains.

    Reused from ``checkpoint`` when that file exists (it must hold the classifier ``module`` describes: architecture
    and model options), else a :class:`~defend.classifier.ClassifierModule` with the arguments ``module`` (checked
    against its signature; ``num_classes`` comes from the data) is trained for ``max_epochs`` and saved there.
    ``train: false`` uses the architecture as built (e.g. local pretrained ImageNet weights in ``model_options``).
    ``seed`` seeds that training: its own, not the experiment's, since the checkpoint is shared by every later run
    that names it and must not depend on which experiment (or ``--seed=``) happened to run first.
    """

    checkpoint: str | None = None
    retrain: bool = False
    train: bool = True
    max_epochs: PositiveCount = PositiveCount(10)
    module: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def reuses(self) -> bool:
        return bool(self.checkpoint) and Path(self.checkpoint).is_file() and not self.retrain

    def arch(self) -> str:
        return str(self.module.get("arch", "small_cnn" if self.train else "resnet50"))

    def check(self, dm: BaseDataModule) -> None:
        """Before anything runs: the module options fit ClassifierModule, a reused checkpoint fits them and the data."""
        check_class_options(ClassifierModule, self.module, "classifier.module", skip=("num_classes",))
        options = dict(self.module.get("model_options") or {})
        if self.reuses():
            load_reused_classifier(self.checkpoint, {"arch": self.arch(), "train": self.train, "model_options": options},
                                   num_classes=dm.num_classes, input_size=dm.image_shape[-1])
            return
        options.pop("pretrained", None)  # a local weights file is read when the model is built for the run
        try:
            with torch.random.fork_rng(devices=[]):  # building must not move the run's random stream
                build_classifier(self.arch(), dm.num_classes, **options)
        except TypeError as exc:
            raise ValueError(f"classifier.module.model_options: {exc}") from None


@dataclass
class ClassifierExperimentConfig(ExperimentConfig):
    """An experiment on a data module (the embedded digits when none is named) and a classifier it trains or reuses
    (:class:`ClassifierSpec`)."""

    data: BaseDataModule | None = None
    classifier: ClassifierSpec = field(default_factory=ClassifierSpec)


def default_data(cfg: Any) -> BaseDataModule:
    """The config's data module, the embedded digits (seed 0) when the config names none (filled in once)."""
    if cfg.data is None:
        cfg.data = DigitsDataModule(seed=0)
    return cfg.data


def setup_data(cfg: Any) -> BaseDataModule:
    """The config's data module (:func:`default_data`), set up."""
    dm = default_data(cfg)
    dm.setup("fit")
    return dm


def get_classifier(cfg: Any, dm: BaseDataModule, out: Path, progress: bool = True) -> tuple[GapClassifier, dict[str, Any]]:
    """Reuse ``cfg.classifier.checkpoint`` if it exists, else train the classifier it describes and save it there."""
    spec: ClassifierSpec = cfg.classifier
    options = dict(spec.module.get("model_options") or {})
    if spec.reuses():
        model = load_reused_classifier(spec.checkpoint, {"arch": spec.arch(), "train": spec.train,
                                                         "model_options": options},
                                       num_classes=dm.num_classes, input_size=dm.image_shape[-1])
        return model, {"trained": False, "checkpoint": spec.checkpoint}
    target = Path(spec.checkpoint) if spec.checkpoint else out / "classifier.pt"
    if not spec.train:  # e.g. ImageNet weights from a local file, used as they are
        model = build_classifier(spec.arch(), dm.num_classes, **options).eval()
        save_classifier(model, target, {k: v for k, v in options.items() if k != "pretrained"},
                        class_names=dm.class_names)
        return model, {"trained": False, "checkpoint": str(target)}
    print(f"[defend] no classifier at {target}: training {spec.arch()} for {int(spec.max_epochs)} epochs first "
          "(saved there and reused by every later run, --quick or not)", flush=True)
    pl.seed_everything(int(spec.seed), workers=True)
    module = ClassifierModule(num_classes=dm.num_classes, **spec.module)
    trainer = make_trainer(cfg.trainer, int(spec.max_epochs), enable_progress_bar=progress)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    model = module.model.eval()
    if trainer.is_global_zero:  # under DDP every rank holds the same weights; one writes them
        save_classifier(model, target, options, extra={"train_seconds": seconds}, class_names=dm.class_names)
    trainer.strategy.barrier("classifier saved")
    print(f"[defend] classifier trained in {seconds:.0f} s -> {target}", flush=True)
    return model, {"trained": True, "checkpoint": str(target), "train_seconds": seconds}


def train_rts(cfg: Any, dm: BaseDataModule, clf_path: str, options: dict[str, Any], target: Path, max_epochs: int,
              limit_train_batches: int | None = None, init_from: str | None = None, progress: bool = True,
              callbacks: Sequence[pl.Callback] = (), val_batches: int | None = 0) -> tuple[Any, float]:
    """Train one RTS interpreter (:class:`~defend.aid.AIDModule` with ``options``, seeded by ``cfg.seed``) on the
    frozen classifier at ``clf_path`` with the config's Trainer options, export it to ``target`` (a safe RTS
    artifact with its training seconds); return the trained module and those seconds. ``val_batches``: validation
    batches after each epoch (0: no validation, ``None``: the whole split)."""
    seed = int(cfg.seed)
    pl.seed_everything(seed, workers=True)
    module = AIDModule(classifier=clf_path, num_classes=dm.num_classes, init_from=init_from, seed=seed, **options)
    extra: dict[str, Any] = {"callbacks": list(callbacks), "num_sanity_val_steps": 0, "inference_mode": False,
                             "limit_val_batches": 1.0 if val_batches is None else int(val_batches),
                             "enable_progress_bar": progress}
    if limit_train_batches is not None:
        extra["limit_train_batches"] = int(limit_train_batches)
    trainer = make_trainer(cfg.trainer, int(max_epochs), **extra)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    seconds = time.perf_counter() - start
    module.export(target, {"train_seconds": seconds})
    return module, seconds


def classifier_outputs(cfg: Any, out: Path) -> list[Path]:
    """The classifier checkpoint an experiment will write (none when it reuses one)."""
    spec: ClassifierSpec = cfg.classifier
    return [] if spec.reuses() else [Path(spec.checkpoint) if spec.checkpoint else out / "classifier.pt"]


def write_outputs(out: Path, rows: list[dict[str, Any]], report: str) -> None:
    """``metrics.json`` (a list of flat rows) and ``report.md``, each written atomically (a full disk is a one-line
    ``cannot write <file>`` error that leaves the previous file intact). Under ``defend experiment`` both are checked
    against the output manifest before either is written, so a refused pair is not left half replaced."""
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (dict, list)):
                raise ValueError(f"metrics rows must be flat; field {k!r} is a {type(v).__name__}")
    refuse_conflicts(out / "metrics.json", out / "report.md")
    write_json(out / "metrics.json", rows)
    atomic_write_text(out / "report.md", report)
