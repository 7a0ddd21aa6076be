"""What every defence LightningModule shares: the data checks, the artifact metadata, the optimiser and its schedule,
and the frozen networks.

:class:`DefenceModule` is the base of :class:`~defend.classifier.ClassifierModule` (and its subclass
:class:`~defend.robust.RobustClassifierModule`), :class:`~defend.aid.AIDModule` and
:class:`~defend.detector.DetectorModule`:

* ``on_fit_start`` checks the class count and the input size of ``trainer.datamodule`` against
  :meth:`DefenceModule.data_contract` (one ``ValueError`` each);
* ``on_save_checkpoint`` writes ``idls_meta = {"kind": artifact_kind, "version": ..., **artifact_meta()}``;
* ``configure_optimizers`` builds the optimiser and the learning-rate schedule from ONE option group,
  :class:`Optimiser`, where each name has one meaning: ``"adam"`` = :class:`torch.optim.Adam`, ``"adamw"`` =
  :class:`torch.optim.AdamW`, ``"sgd"`` = Nesterov :class:`torch.optim.SGD`;
* :meth:`DefenceModule.save_options` stores the hyper-parameters as plain data (option groups as dicts), so that
  checkpoints load with ``torch.load(weights_only=True)`` and :func:`defend.checks.check_checkpoint_fits` can
  compare them with the configured ones.

Option groups are dataclasses in the modules' ``__init__`` signatures: LightningCLI / jsonargparse show them nested
(``--model.init_args.optimiser.lr``; ``optimiser: {name: adamw, lr: 0.003}`` in YAML) and refuse a misspelt nested
key. In Python a group is given as an instance or as a mapping of the fields that differ from the module's default
(:func:`as_options`).

Networks that must stay frozen whatever Lightning does (the classifier an RTS interpreter explains) are held in
:class:`FrozenModule`; temporary freezes (inner attacks, feature extraction) use :func:`attacks.frozen` /
:func:`attacks.eval_mode`, which restore every flag even after an exception.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from .io import project_version
from .typed_config import plain_dict as plain

__all__ = ["DefenceModule", "Optimiser", "FrozenModule", "OPTIMISERS", "SCHEDULES", "MIN_ONE_CYCLE_STEPS",
           "as_options", "plain", "check_milestones", "build_optimiser", "build_scheduler",
           "one_cycle_steps"]

OPTIMISERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "multistep", "constant")

# OneCycleLR divides by zero when its warm-up ends on step 0 (pct_start * total_steps == 1, i.e. 4 steps at
# pct_start 0.25) and spends a 1-step run at its final, 1e5 times smaller learning rate: shorter runs follow the
# first steps of a cycle of this many steps instead (see one_cycle_steps).
MIN_ONE_CYCLE_STEPS = 5

T = TypeVar("T")


@dataclass(frozen=True)
class Optimiser:
    """The optimiser and its learning-rate schedule (one option group of every defence module).

    Args:
        name: ``"adam"`` (torch.optim.Adam), ``"adamw"`` (torch.optim.AdamW, decoupled weight decay) or ``"sgd"``
            (Nesterov SGD).
        lr: learning rate (the peak of the one-cycle schedule).
        weight_decay: weight decay of the optimiser (L2 for adam / sgd, decoupled for adamw).
        momentum: SGD momentum (> 0 for Nesterov SGD; ignored by adam and adamw).
        schedule: ``"onecycle"`` (per step, warm-up over ``pct_start`` of the run, needs a finite run),
            ``"multistep"`` (per epoch: times ``decay`` at each of ``milestones``) or ``"constant"``.
        milestones: epochs (whole numbers >= 1) at which the multistep schedule multiplies the learning rate by
            ``decay``; only with ``schedule: multistep``.
        decay: factor of the multistep schedule.
        pct_start: share of the one-cycle schedule spent warming up.
    """

    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: Literal["onecycle", "multistep", "constant"] = "constant"
    milestones: list[int] = field(default_factory=list)
    decay: float = 0.1
    pct_start: float = 0.25

    def __post_init__(self) -> None:
        if self.name not in OPTIMISERS:
            raise ValueError(f"optimiser.name must be one of {', '.join(OPTIMISERS)}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimiser.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not self.lr > 0 or self.weight_decay < 0 or self.momentum < 0:
            raise ValueError(f"need optimiser.lr > 0, weight_decay >= 0 and momentum >= 0, got {self.lr}, "
                             f"{self.weight_decay} and {self.momentum}")
        if self.name == "sgd" and self.momentum <= 0:
            raise ValueError("Nesterov SGD needs optimiser.momentum > 0 (e.g. 0.9)")
        if not self.decay > 0 or not 0 < self.pct_start < 1:
            raise ValueError(f"need optimiser.decay > 0 and 0 < optimiser.pct_start < 1, got {self.decay} and "
                             f"{self.pct_start}")
        object.__setattr__(self, "milestones", _milestones(self.milestones))
        if self.milestones and self.schedule != "multistep":
            raise ValueError(f"optimiser.milestones {self.milestones} are only used by schedule 'multistep' (got "
                             f"{self.schedule!r}): set optimiser.schedule: multistep or drop the milestones")
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("optimiser.schedule 'multistep' needs optimiser.milestones (epochs >= 1), e.g. [6]")


def _milestones(values: Any) -> list[int]:
    """:func:`check_milestones` under this group's name."""
    if values is None or (isinstance(values, (list, tuple)) and not values):
        return []
    try:
        return check_milestones(list(values) if isinstance(values, (list, tuple)) else values)
    except ValueError:
        raise ValueError(f"optimiser.milestones must be whole epochs >= 1 (the learning rate is multiplied by "
                         f"optimiser.decay when that many epochs have ended), got {values}") from None


def as_options(value: Any, default: T, name: str | None = None) -> T:
    """An option group as an instance of ``default``'s dataclass: ``value`` itself, or ``default`` with the fields a
    mapping gives replaced (what ``load_from_checkpoint`` and the experiments pass); ``None`` gives ``default``."""
    cls = type(default)
    label = name or cls.__name__
    if value is None:
        return default
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{label} must be a {cls.__name__} or a mapping of its fields, got {type(value).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, value)) - known)
    if unknown:
        raise ValueError(f"{label}: unknown option(s) {', '.join(unknown)}; the options are {', '.join(sorted(known))}")
    return dataclasses.replace(default, **dict(value))


def check_milestones(milestones: Any) -> list[int]:
    """``lr_milestones`` as epochs (whole numbers >= 1); anything else is a ``ValueError``. A milestone at or after
    ``max_epochs`` is allowed: the run ends before the decay, as a shortened run of the same schedule would (e.g.
    ``--quick``, or ``--trainer.max_epochs`` lowered for a smoke test)."""
    values = plain(milestones)
    values = values if isinstance(values, list) else [values]
    bad = [m for m in values if isinstance(m, bool) or not isinstance(m, (int, float)) or m < 1 or int(m) != m]
    if bad:
        raise ValueError(f"lr_milestones must be whole epochs >= 1 (the learning rate is multiplied by lr_decay when "
                         f"that many epochs have ended), got {values}")
    return [int(m) for m in values]


# --------------------------------------------------------------------------------------------- optimisers
def build_optimiser(options: Optimiser, params: Iterable[Tensor], lr: float | None = None) -> torch.optim.Optimizer:
    """The optimiser ``options.name`` names over ``params`` (``lr`` overrides ``options.lr``)."""
    lr = options.lr if lr is None else float(lr)
    if options.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=options.momentum, weight_decay=options.weight_decay,
                               nesterov=True)
    if options.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=options.weight_decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=options.weight_decay)


def one_cycle_steps(steps: float, pct_start: float = 0.25) -> int:
    """Length of the one-cycle schedule of a run of ``steps`` optimiser steps: ``steps``, but at least
    :data:`MIN_ONE_CYCLE_STEPS` and long enough that the warm-up ends after step 0 (``pct_start * total > 1``).

    A shorter run follows the first steps of that cycle; it is never stepped past its end."""
    if not math.isfinite(steps):
        raise ValueError("the one-cycle learning-rate schedule needs a finite run: set trainer.max_epochs (>= 1) "
                         "or trainer.max_steps")
    return max(int(steps), MIN_ONE_CYCLE_STEPS, math.floor(1 / pct_start) + 1)


def build_scheduler(options: Optimiser, opt: torch.optim.Optimizer,
                    total_steps: float | None = None) -> dict[str, Any] | None:
    """The Lightning ``lr_scheduler`` entry of ``options.schedule`` (``None`` for ``"constant"``); the one-cycle
    schedule needs the run's ``total_steps`` (Lightning's ``estimated_stepping_batches``)."""
    if options.schedule == "onecycle":
        total = one_cycle_steps(float("inf") if total_steps is None else total_steps, options.pct_start)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=options.lr, total_steps=total,
                                                    pct_start=options.pct_start)
        return {"scheduler": sched, "interval": "step"}
    if options.schedule == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(options.milestones), gamma=options.decay)
        return {"scheduler": sched, "interval": "epoch"}
    return None


# --------------------------------------------------------------------------------------------- frozen networks
class FrozenModule(nn.Module):
    """Holds ``model`` frozen for good: eval mode and ``requires_grad=False`` on every parameter (what
    :func:`attacks.frozen` does for the length of a ``with`` block), and :meth:`train` cannot switch it back, so
    Lightning's ``module.train()`` at every epoch leaves it alone, the optimiser never sees it and DDP does not
    synchronise it (DDP only reduces parameters that require grad)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


# --------------------------------------------------------------------------------------------- the base
class DefenceModule(pl.LightningModule):
    """Base of the defence modules: data checks, artifact metadata, optimiser and schedule (see the module docstring).

    Subclasses set :attr:`artifact_kind` (the ``kind`` of their checkpoints), call ``super().__init__(optimiser)``
    with their :class:`Optimiser`, store their hyper-parameters with :meth:`save_options` and override
    :meth:`artifact_meta` (what the checkpoint describes), :meth:`data_contract` (what the data must be) and
    :meth:`trainable_parameters` where the defaults do not fit.

    Args:
        optimiser: the optimiser and its schedule.
    """

    artifact_kind: ClassVar[str] = "defence"
    #: what the checks call the network the data must fit, and how to fix a mismatch
    network_name: ClassVar[str] = "model"
    mismatch_fix: ClassVar[str] = "set the model's num_classes to the data's class count"

    def __init__(self, optimiser: Optimiser) -> None:
        super().__init__()
        if not isinstance(optimiser, Optimiser):
            raise ValueError(f"optimiser must be an Optimiser, got {type(optimiser).__name__}")
        self.optimiser = optimiser

    # ------------------------------------------------------------------ hyper-parameters
    def save_options(self, **values: Any) -> None:
        """Store ``values`` as the hyper-parameters (merged with any saved before), option groups as plain dicts, with
        the module's ``_class_path``: what checkpoints carry and what resuming compares."""
        cls = type(self)
        hp = {"_class_path": f"{cls.__module__}.{cls.__qualname__}",
              **{k: plain(v) for k, v in values.items()}}
        self.save_hyperparameters(hp)

    # ------------------------------------------------------------------ data checks
    def data_contract(self) -> tuple[int | None, int | None]:
        """``(class count, input side in px)`` the data must have (``None``: not checked); default: those of
        ``self.model``."""
        net = getattr(self, "model", None)
        k, size = getattr(net, "num_classes", None), getattr(net, "input_size", None)
        return (None if k is None else int(k)), (None if size is None else int(size))

    def check_data(self, datamodule: Any) -> None:
        """Raise ``ValueError`` when ``datamodule``'s ``num_classes`` or ``image_shape`` does not fit."""
        k, size = self.data_contract()
        k_data = getattr(datamodule, "num_classes", None)
        if k is not None and k_data is not None and int(k_data) != k:
            raise ValueError(f"class count mismatch: the {self.network_name} has {k} classes, the data has "
                             f"{k_data}; {self.mismatch_fix}")
        shape = getattr(datamodule, "image_shape", None)
        if size is not None and shape is not None and int(shape[-1]) != size:
            raise ValueError(f"input size mismatch: the {self.network_name} expects {size} px, the data is "
                             f"{shape[-1]} px; set the data's image_size to {size}")

    def on_fit_start(self) -> None:
        self.check_data(getattr(self.trainer, "datamodule", None))

    # ------------------------------------------------------------------ artifact metadata
    def artifact_meta(self) -> dict[str, Any]:
        """What a checkpoint of this module describes besides its kind and version (plain data)."""
        return {}

    def export(self, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
        """Write the trained defence as the safe artifact the experiments and ``load_*`` read (atomic write)."""
        raise NotImplementedError(f"{type(self).__name__} has no artifact to export")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["idls_meta"] = {"kind": self.artifact_kind, "version": project_version(), **self.artifact_meta()}

    # ------------------------------------------------------------------ optimisation
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters the optimiser updates (default: all of the module's)."""
        return list(self.parameters())

    def configure_optimizers(self) -> Any:
        """:class:`Optimiser` over :meth:`trainable_parameters`, with its schedule (none when constant)."""
        opt = build_optimiser(self.optimiser, self.trainable_parameters())
        steps = self.trainer.estimated_stepping_batches if self.optimiser.schedule == "onecycle" else None
        sched = build_scheduler(self.optimiser, opt, steps)
        return opt if sched is None else {"optimizer": opt, "lr_scheduler": sched}
