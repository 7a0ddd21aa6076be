"""Checks that a defence module and a data module fit together, run before anything is trained or written.

``defend fit|validate|test|predict`` calls :func:`check_model_data` before the Trainer starts (so a mismatch
leaves no log directory or checkpoint behind): the class counts must agree, and the first item of the split the
command reads must follow the batch contract (float images in [0, 1], finite, ``[N, C, H, W]`` with the model's
channel count and input size, labels in ``[0, num_classes)``; every label of the split when the dataset exposes
``labels``).

``--ckpt_path`` goes through one route (:func:`checkpoint_for_run`): the value is resolved to a local file first
(``last`` = the newest ``last*.ckpt`` in the ``dirpath`` of the configured ``ModelCheckpoint`` callbacks, ``hpc``
= Lightning's HPC checkpoint; ``best`` cannot be known by a new run, URLs and registry names are not fetched: both
are refused), loaded with ``weights_only`` (:func:`load_checkpoint_file`: no code in the file runs), and compared
with the configured module (:func:`check_checkpoint_fits`): the stored hyper-parameters (the module's class
included), the model described by ``idls_meta`` and the weights' keys and shapes must all agree, so a checkpoint
never changes the configured model. The CLI hands Lightning that resolved file, with ``weights_only=True``.
:func:`check_schedule` refuses learning-rate schedules that cannot run as configured.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from .classifier import state_differences, value_differences
from .data.base import BaseDataModule
from .data.batch import IMAGE, check_batch
from .io import CheckpointError
from .models import GapClassifier
from .module_base import check_milestones

__all__ = ["check_model_data", "load_checkpoint_file", "resolve_ckpt_path",
           "check_checkpoint_fits", "checkpoint_for_run", "check_schedule", "CKPT_KEYWORDS",
           "STAGE_SPLITS", "TRAINING_ONLY"]

STAGE_SPLITS = {"fit": "train", "validate": "val", "test": "test", "predict": "test"}


def _classifier(model: Any) -> GapClassifier | None:
    """The zoo classifier a defence module trains or explains (``.model``), if any."""
    net = getattr(model, "model", None)
    return net if isinstance(net, GapClassifier) else None


def _split(datamodule: BaseDataModule, stage: str) -> tuple[str, Dataset]:
    split = STAGE_SPLITS.get(stage, "train")
    return split, getattr(datamodule, f"{split}_dataset")


def check_model_data(model: Any, datamodule: Any, stage: str = "fit") -> None:
    """Raise ``ValueError`` naming the problem when ``model`` cannot be run on ``datamodule`` for ``stage``."""
    net = _classifier(model)
    k_model = int(net.num_classes) if net is not None else None
    k_data = getattr(datamodule, "num_classes", None) or None
    if k_model is not None and k_data is not None and k_model != int(k_data):
        raise ValueError(f"class count mismatch: the model has {k_model} classes, the data has {k_data}")
    if not isinstance(datamodule, BaseDataModule):
        return
    split, ds = _split(datamodule, stage)
    if len(ds) == 0:
        raise ValueError(f"the {split} split of {datamodule.name} data is empty")
    k = k_model or int(k_data or 0)
    try:
        batch = default_collate([ds[0]])
        check_batch(batch, k if k > 0 else 2**62)
        labels = getattr(ds, "labels", None)
        if k > 0 and isinstance(labels, torch.Tensor) and labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= k:
                raise ValueError(f"labels out of range: expected values in [0, {k}), got [{lo}, {hi}]")
    except ValueError as exc:
        raise ValueError(f"bad {split} data ({datamodule.name}): {exc}") from None
    if net is not None:
        image = batch[IMAGE]
        if image.shape[1] != net.in_channels:
            raise ValueError(f"channel count mismatch: the model takes {net.in_channels}-channel images, "
                             f"the {split} images have {image.shape[1]} channels")
        if image.shape[-1] != net.input_size or image.shape[-2] != net.input_size:
            raise ValueError(f"input size mismatch: the model expects {net.input_size} px, the {split} images are "
                             f"{image.shape[-2]}x{image.shape[-1]} px (set the model's input_size or the data's "
                             "image_size)")


CKPT_KEYWORDS = ("last", "best", "hpc")  # Lightning's keywords of --ckpt_path


def _remote(path: Any) -> bool:
    text = str(path)
    return "://" in text or text.startswith("registry")


def load_checkpoint_file(path: Any) -> dict[str, Any] | None:
    """Load a local ``--ckpt_path`` file with ``weights_only`` (tensors memory-mapped, not read); raise
    :class:`CheckpointError` when it is corrupt, truncated, unsafe or not a Lightning checkpoint. ``None`` gives
    ``None``; Lightning's keywords must be resolved first (:func:`resolve_ckpt_path`) and URLs are refused."""
    if path is None:
        return None
    if str(path) in CKPT_KEYWORDS:
        raise ValueError(f"--ckpt_path {path} must be resolved to a file before it is loaded")
    if _remote(path):
        raise ValueError(f"--ckpt_path {path}: only local checkpoint files are accepted; download it first and pass "
                         "its path")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt, truncated, not a zip archive, or a pickle that wants to run code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot load {p} safely: {first[:200]}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{p} is not a Lightning checkpoint (no state_dict); an exported artifact is given to a "
                              "module option such as init_from or classifier, not to --ckpt_path")
    return ckpt


# --------------------------------------------------------------------------------------------- --ckpt_path
def _model_checkpoints(trainer: Any) -> list[Any]:
    from pytorch_lightning.callbacks import ModelCheckpoint

    return [cb for cb in getattr(trainer, "callbacks", []) if isinstance(cb, ModelCheckpoint)]


def _last_candidates(trainer: Any) -> tuple[list[Path], list[str]]:
    """``(files, places)``: the ``last`` checkpoints Lightning would consider, and where they were looked for."""
    from pytorch_lightning.callbacks import OnExceptionCheckpoint

    files: list[Path] = []
    places: list[str] = []
    for cb in _model_checkpoints(trainer):
        if cb.dirpath is None:
            places.append("a ModelCheckpoint without dirpath (it writes into a new logger version directory, so a "
                          "new run finds nothing there)")
            continue
        folder = Path(cb.dirpath)
        places.append(f"{folder}/{cb.CHECKPOINT_NAME_LAST}*{cb.FILE_EXTENSION}")
        pattern = re.compile(rf"^{re.escape(cb.CHECKPOINT_NAME_LAST)}(-(\d+))?")  # Lightning's own rule
        if folder.is_dir():
            files += [f for f in folder.iterdir()
                      if f.is_file() and f.suffix == cb.FILE_EXTENSION and pattern.match(f.stem)]
    for cb in getattr(trainer, "callbacks", []):
        if isinstance(cb, OnExceptionCheckpoint):
            places.append(str(cb.ckpt_path))
            if Path(cb.ckpt_path).is_file():
                files.append(Path(cb.ckpt_path))
    return sorted(set(files)), places


def resolve_ckpt_path(value: Any, trainer: Any, stage: str = "fit") -> Path | None:
    """The local file a ``--ckpt_path`` value names, or ``None`` (no checkpoint: the configured model as built).

    ``last``: the newest ``last*.ckpt`` in the ``dirpath`` of the trainer's ``ModelCheckpoint`` callbacks (or an
    ``OnExceptionCheckpoint`` file), as Lightning picks it; none there is an error saying where it looked (Lightning
    would silently start from scratch). ``hpc``: Lightning's HPC checkpoint of ``default_root_dir``. ``best`` is
    only known inside the ``fit`` that wrote it, URLs and registry names would be fetched and loaded unchecked:
    each is an error naming what to pass instead. ``None`` stays ``None``, except where Lightning would pick a
    checkpoint by itself (an ``OnExceptionCheckpoint`` while fitting, an HPC checkpoint under SLURM): that file is
    resolved here so that it goes through the same checks."""
    connector = getattr(trainer, "_checkpoint_connector", None)
    if value is None:
        from lightning_fabric.plugins.environments import SLURMEnvironment
        from pytorch_lightning.callbacks import OnExceptionCheckpoint

        if stage == "fit" and any(isinstance(cb, OnExceptionCheckpoint) for cb in getattr(trainer, "callbacks", [])):
            files, _ = _last_candidates(trainer)
            return max(files, key=lambda f: f.stat().st_mtime) if files else None
        hpc = getattr(connector, "_hpc_resume_path", None) if SLURMEnvironment.detect() else None
        return Path(hpc) if hpc else None
    text = str(value)
    if text == "last":
        files, places = _last_candidates(trainer)
        if files:
            return max(files, key=lambda f: f.stat().st_mtime)
        if not places:
            raise FileNotFoundError("--ckpt_path last needs a ModelCheckpoint callback with a dirpath that holds "
                                    "last.ckpt (trainer.callbacks); the config has none: pass --ckpt_path FILE")
        raise FileNotFoundError(f"--ckpt_path last: no last checkpoint to resume from: looked for {'; '.join(places)}; "
                                "start the run without --ckpt_path, or pass --ckpt_path FILE")
    if text == "best":
        found = sorted({str(f) for cb in _model_checkpoints(trainer) if cb.dirpath and Path(cb.dirpath).is_dir()
                        for f in Path(cb.dirpath).glob(f"*{cb.FILE_EXTENSION}")})
        hint = f" (checkpoints found: {', '.join(found[:3])}{' ...' if len(found) > 3 else ''})" if found else ""
        raise ValueError("--ckpt_path best cannot be resolved by a new run (Lightning knows the best checkpoint only "
                         f"inside the fit that wrote it): pass the checkpoint file, --ckpt_path FILE{hint}")
    if text == "hpc":
        hpc = getattr(connector, "_hpc_resume_path", None)
        if not hpc:
            raise FileNotFoundError(f"--ckpt_path hpc: no HPC checkpoint (hpc_ckpt_*.ckpt) in "
                                    f"{getattr(trainer, 'default_root_dir', '.')}; pass --ckpt_path FILE")
        return Path(hpc)
    if _remote(value):
        raise ValueError(f"--ckpt_path {value}: only local checkpoint files are accepted; download it first and pass "
                         "its path")
    return Path(value)


# hyper-parameters that only steer the optimisation: a checkpoint may be validated, tested or used for prediction
# with other values (while resuming a fit they must match: Lightning restores the optimiser and the schedule). A
# group name (``optimiser``) covers all its keys; ``aid.lr`` is one key of a group. The flat names are those of
# checkpoints written before the options were grouped.
TRAINING_ONLY = frozenset({"optimiser", "aid.lr", "aid.anchor_from", "label_smoothing", "init_from", "new_head",
                           "seed", "optimizer", "lr", "weight_decay", "momentum", "lr_milestones", "lr_decay",
                           "aid_lr", "anchor_from"})
#: mappings among the hyper-parameters that are values, not option groups (compared as a whole)
_NOT_GROUPS = frozenset({"model_options"})


def _flat_hparams(hp: Mapping[str, Any]) -> dict[str, Any]:
    """Option groups (mappings, e.g. ``optimiser``) spread into dotted keys (``optimiser.lr``), so that a difference
    is named by its key and shown in full; ``model_options`` stays whole (compared with the arch's defaults)."""
    out: dict[str, Any] = {}
    for k, v in hp.items():
        if isinstance(v, Mapping) and k not in _NOT_GROUPS:
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _training_only(key: str) -> bool:
    return key in TRAINING_ONLY or key.split(".", 1)[0] in TRAINING_ONLY


def _configured_hparams(model: Any) -> dict[str, Any]:
    hp = dict(getattr(model, "hparams", {}) or {})
    hp.setdefault("_class_path", f"{type(model).__module__}.{type(model).__qualname__}")
    return {k: v for k, v in hp.items() if not k.startswith("_") or k == "_class_path"}


def check_checkpoint_fits(path: Any, ckpt: Mapping[str, Any], model: torch.nn.Module, stage: str = "fit") -> None:
    """Raise :class:`CheckpointError` unless the checkpoint ``ckpt`` (loaded from ``path``) was written for the
    configured ``model``: the same class and hyper-parameters (for ``validate`` / ``test`` / ``predict`` the
    optimiser settings of :data:`TRAINING_ONLY` may differ), the same classifier as its ``idls_meta`` describes
    (arch, class count, input size, channels, normalisation, ``model_options`` with defaults filled in) and a
    ``state_dict`` with the keys and shapes of ``model``'s. Nothing in the checkpoint is imported or merged."""
    verb = "resume from" if stage == "fit" else f"{stage} with"
    fix = ("run with the config (and --model options) the checkpoint was trained with, or start a new run without "
           "--ckpt_path (model.init_args.init_from fine-tunes from a classifier's weights)")
    stored = ckpt.get("hyper_parameters")
    if isinstance(stored, Mapping) and stored:
        stored = _flat_hparams({k: v for k, v in stored.items() if not str(k).startswith("_") or k == "_class_path"})
        configured = _flat_hparams(_configured_hparams(model))
        if "_class_path" not in stored:
            configured.pop("_class_path")
        if stage != "fit":
            stored = {k: v for k, v in stored.items() if not _training_only(k)}
            configured = {k: v for k, v in configured.items() if not _training_only(k)}
        diff = value_differences(stored, configured)
        if diff:
            shown = "; ".join(d.replace("_class_path:", "module class:", 1) for d in diff[:4])
            more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
            raise CheckpointError(f"cannot {verb} {path}: it was written for another model than the config "
                                  f"describes: {shown}{more}; {fix}")
    meta = ckpt.get("idls_meta")
    net = _classifier(model)
    if isinstance(meta, Mapping) and net is not None:
        ours = {**net.describe(), "model_options": dict(getattr(model, "hparams", {}).get("model_options") or {})}
        theirs = {k: meta[k] for k in ours if k in meta}
        ours = {k: ours[k] for k in theirs}
        diff = value_differences(theirs, ours)
        if diff:
            raise CheckpointError(f"cannot {verb} {path}: its classifier differs from the configured one: "
                                  f"{'; '.join(diff[:4])}; {fix}")
    detail = state_differences(model.state_dict(), ckpt["state_dict"])
    if detail:
        kind = meta.get("kind", "foreign") if isinstance(meta, Mapping) else "foreign"
        raise CheckpointError(f"{path} ({kind} checkpoint) does not fit the model: {detail}")


def checkpoint_for_run(value: Any, trainer: Any, model: torch.nn.Module, stage: str = "fit") -> Path | None:
    """The one route of ``--ckpt_path``: resolve (:func:`resolve_ckpt_path`), load safely
    (:func:`load_checkpoint_file`) and compare with the configured model (:func:`check_checkpoint_fits`); returns
    the file to hand to Lightning (with ``weights_only=True``), or ``None``."""
    path = resolve_ckpt_path(value, trainer, stage)
    if path is None:
        return None
    ckpt = load_checkpoint_file(path)
    check_checkpoint_fits(path, ckpt, model, stage)
    return path


# --------------------------------------------------------------------------------------------- schedules
def check_schedule(model: Any, trainer: Any) -> None:
    """Raise ``ValueError`` when the run cannot train as configured, before the Trainer starts: no training batch
    (``limit_train_batches=0``); a one-cycle schedule (``optimiser.schedule: onecycle`` of a
    :class:`defend.module_base.DefenceModule`) needs a finite run (``max_epochs`` or ``max_steps``); milestones must
    be epochs (:func:`check_milestones`)."""
    limit = getattr(trainer, "limit_train_batches", None)
    if limit is not None and not isinstance(limit, bool) and limit == 0:
        raise ValueError("trainer.limit_train_batches is 0: nothing would be trained (the checkpoint would hold the "
                         "initial weights); set it > 0, or run `defend validate` to evaluate")
    max_epochs = getattr(trainer, "max_epochs", None)
    max_steps = getattr(trainer, "max_steps", -1)
    endless = max_epochs is not None and max_epochs < 0 and (max_steps is None or max_steps < 0)
    options = getattr(model, "optimiser", None)
    if getattr(options, "schedule", None) == "onecycle" and endless:
        raise ValueError("the one-cycle learning-rate schedule needs a finite run: set trainer.max_epochs (>= 1) or "
                         "trainer.max_steps")
    milestones = getattr(options, "milestones", None)
    if milestones:
        check_milestones(milestones)
