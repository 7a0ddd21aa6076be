"""Data modules for the defence framework and the batch contract they share.

Items are dicts ``{"image", "label", "index"}`` (+ ``"mask"`` where available);
see :mod:`defend.data.batch`.
"""

from __future__ import annotations

from typing import Any

from .base import BaseDataModule, TensorImageDataset
from .batch import check_batch, quantize
from .cifar import CIFAR10DataModule
from .digits import DigitsDataModule, EmbeddedDigits
from .folder import ImageFolderDataModule

__all__ = [
    "BaseDataModule",
    "TensorImageDataset",
    "EmbeddedDigits",
    "DigitsDataModule",
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "DATAMODULES",
    "build_datamodule",
    "check_batch",
    "quantize",
]

DATAMODULES: dict[str, type[BaseDataModule]] = {
    "digits": DigitsDataModule,
    "cifar10": CIFAR10DataModule,
    "folder": ImageFolderDataModule,
}


def build_datamodule(name: str, **kwargs: Any) -> BaseDataModule:
    """Instantiate the data module registered under ``name`` with ``kwargs``."""
    try:
        cls = DATAMODULES[name]
    except KeyError:
        raise ValueError(f"unknown dataset '{name}'; choose one of: {', '.join(DATAMODULES)}") from None
    return cls(**kwargs)
