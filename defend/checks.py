"""Checks that a defence module and a data module fit together, run before anything is trained or written.

``defend fit|validate|test|predict`` calls :func:`check_model_data` before the Trainer starts (so a mismatch
leaves no log directory or checkpoint behind): the class counts must agree, and the first item of the split the
command reads must follow the batch contract (float images in [0, 1], finite, ``[N, C, H, W]`` with the model's
channel count and input size, labels in ``[0, num_classes)``; every label of the split when the dataset exposes
``labels``). An explicit ``--ckpt_path`` must load safely and fit the module (:func:`check_resume_checkpoint`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from .data.base import BaseDataModule
from .data.batch import IMAGE, check_batch
from .io import CheckpointError
from .models import GapClassifier

__all__ = ["check_model_data", "check_resume_checkpoint", "load_checkpoint_file", "STAGE_SPLITS"]

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


_LIGHTNING_KEYWORDS = ("last", "best", "hpc")


def _explicit(path: Any) -> Path | None:
    """``path`` as a local file path, or None for Lightning's keywords, registry names and URLs."""
    if path is None or str(path) in _LIGHTNING_KEYWORDS or str(path).startswith(("registry", "http")):
        return None
    return Path(path)


def load_checkpoint_file(path: Any) -> dict[str, Any] | None:
    """Load a ``--ckpt_path`` file with ``weights_only`` (tensors memory-mapped, not read); raise
    :class:`CheckpointError` when it is corrupt, truncated, unsafe or not a Lightning checkpoint."""
    p = _explicit(path)
    if p is None:
        return None
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


def check_resume_checkpoint(path: Any, model: torch.nn.Module) -> None:
    """Raise :class:`CheckpointError` unless ``path`` (a ``--ckpt_path`` file) loads safely and its ``state_dict``
    has the keys and shapes of ``model``'s. Lightning's keywords (``last``, ``best``, ...) are left to Lightning."""
    ckpt = load_checkpoint_file(path)
    if ckpt is None:
        return
    own, theirs = model.state_dict(), ckpt["state_dict"]
    missing, unexpected = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
    shapes = [k for k in own if k in theirs and tuple(own[k].shape) != tuple(theirs[k].shape)]
    if missing or unexpected or shapes:
        meta = ckpt.get("idls_meta")
        kind = meta.get("kind", "foreign") if isinstance(meta, dict) else "foreign"
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes))
                           if keys)
        raise CheckpointError(f"{path} ({kind} checkpoint) does not fit the model: {detail}")
