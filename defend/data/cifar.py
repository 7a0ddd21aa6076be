"""CIFAR-10 from the standard on-disk python format (``cifar-10-batches-py``).

Safety note: the CIFAR-10 python batches are *pickle* files (the dataset's standard format), and
unpickling executes code embedded in the file.  Only point ``root`` at data you trust (e.g. the
official archive, which ``download=True`` fetches through ``torchvision.datasets.CIFAR10`` and
verifies by md5).  Files are read here directly (no md5 check), so a re-packed copy also loads.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from .base import BaseDataModule, TensorImageDataset

__all__ = ["CIFAR10DataModule", "CIFAR10_CLASSES", "read_cifar10"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_FOLDER = "cifar-10-batches-py"
_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_FILES = ["test_batch"]


def _missing_files(root: Path) -> list[Path]:
    folder = root / _FOLDER
    return [folder / name for name in _TRAIN_FILES + _TEST_FILES if not (folder / name).is_file()]


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")  # standard CIFAR format; see module docstring
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 batch (missing 'data' or 'labels')")
    data = np.asarray(data, dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != data.shape[0]:
        raise ValueError(f"{path}: expected data [n, 3072] and n labels, got {data.shape} / {len(labels)}")
    return data.reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)


def read_cifar10(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the train (5 batches) or test split as uint8 images [N, 3, 32, 32] and int64 labels."""
    folder = Path(root) / _FOLDER
    parts = [_read_batch(folder / name) for name in (_TRAIN_FILES if train else _TEST_FILES)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


class CIFAR10DataModule(BaseDataModule):
    """CIFAR-10 with a seeded train/val split; train augmentation = random crop (pad 4) + h-flip.

    Args:
        root: folder holding ``cifar-10-batches-py`` (the extracted ``cifar-10-python.tar.gz``).
        download: fetch the archive with torchvision when it is missing (needs network access).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        val_size: training images held out (seeded) for validation.
        seed: seeds the train/val split and the per-epoch shuffle.
        augment: random crop (pad 4) + horizontal flip on the training split.
    """

    name = "cifar10"
    has_mask = False

    def __init__(
        self,
        root: str = "data/cifar10",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        self.save_hyperparameters()
        self.root = Path(root)
        self.download = bool(download)
        self.val_size = int(val_size)
        self.augment = bool(augment)
        self.num_classes = 10
        self.image_shape = (3, 32, 32)
        self.class_names = list(CIFAR10_CLASSES)
        if not self.download:
            self._check_files()

    def _check_files(self) -> None:
        missing = _missing_files(self.root)
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 not found: looked for the python batches in '{self.root / _FOLDER}' "
                f"(missing: {', '.join(p.name for p in missing)}). Pass download=True when online, "
                f"or place the extracted 'cifar-10-python.tar.gz' under '{self.root}'."
            )

    def prepare_data(self) -> None:
        """Download through torchvision if requested and the files are not there yet."""
        if self.download and _missing_files(self.root):
            from torchvision.datasets import CIFAR10

            self.root.mkdir(parents=True, exist_ok=True)
            CIFAR10(str(self.root), train=True, download=True)
            CIFAR10(str(self.root), train=False, download=True)
        self._check_files()

    def _train_transform(self) -> Optional[transforms.Compose]:
        if not self.augment:
            return None
        return transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()])

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        self.prepare_data()
        images, labels = read_cifar10(self.root, train=True)
        if not 0 <= self.val_size < len(images):
            raise ValueError(f"val_size must be in [0, {len(images)}), got {self.val_size}")
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.seed))
        tr, va = perm[: len(images) - self.val_size], perm[len(images) - self.val_size :]
        test_images, test_labels = read_cifar10(self.root, train=False)
        return (
            TensorImageDataset(images[tr], labels[tr], transform=self._train_transform()),
            TensorImageDataset(images[va], labels[va]),
            TensorImageDataset(test_images, test_labels),
        )
