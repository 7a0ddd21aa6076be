"""CIFAR-10 from the standard on-disk python format (``cifar-10-batches-py``).

Safety: the CIFAR-10 python batches are *pickle* files (the dataset's standard format), and a plain
``pickle.load`` would run whatever code a crafted file asks for.  They are read here with a restricted
unpickler (:class:`_BatchUnpickler`) that resolves only the few names a genuine batch refers to (numpy's
array and dtype reconstruction, and ``_codecs.encode`` with latin-1 for batches re-pickled by Python 3 with
protocol < 3); a file that asks for anything else is refused with a one-line error naming the file and the
name, before anything is built from it.  The structure is checked as well: a dict with ``data`` (uint8
``[n, 3072]``) and ``labels`` (``n`` integers in ``[0, 10)``).  Every batch is checked this way when the data
module is created (so a bad folder fails before any work starts) and read again by ``setup``.  Files are read
directly (no md5 check), so a re-packed copy also loads; ``download=True`` fetches the official archive
through ``torchvision.datasets.CIFAR10``, which verifies it by md5.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from .base import BaseDataModule, TensorImageDataset, image_digests

__all__ = ["CIFAR10DataModule", "CIFAR10_CLASSES", "read_cifar10"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_FOLDER = "cifar-10-batches-py"
_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
_TEST_FILES = ["test_batch"]


def _missing_files(root: Path) -> list[Path]:
    folder = root / _FOLDER
    return [folder / name for name in _TRAIN_FILES + _TEST_FILES if not (folder / name).is_file()]


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as Python 3 uses it to pickle ``bytes`` with protocol < 3 (latin-1 only)."""
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1" or errors != "strict":
        raise pickle.UnpicklingError(f"_codecs.encode({type(obj).__name__}, {encoding!r}) is not a bytes literal")
    return obj.encode("latin-1")


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
    """The names a genuine batch refers to, mapped to numpy's own objects (found from an array, so that both the
    numpy 1 spelling ``numpy.core.*`` and the numpy 2 one ``numpy._core.*`` resolve without importing anything)."""
    probe = np.zeros(1, dtype=np.uint8)
    reconstruct = probe.__reduce__()[0]  # numpy's _reconstruct (protocols 0-4)
    frombuffer = probe.__reduce_ex__(5)[0]  # numpy's _frombuffer (protocol 5)
    allowed: dict[tuple[str, str], Callable[..., Any]] = {
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype, ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles a CIFAR-10 batch; any name beyond numpy's array reconstruction is refused (it could run code)."""

    _ALLOWED = _allowed_globals()

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise _NotABatch(f"{self.path} is not a plain CIFAR-10 batch: it asks to load {module}.{name}, which "
                             "could run code; re-extract the official cifar-10-python.tar.gz") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _NotABatch(f"{self.path} is not a plain CIFAR-10 batch: it refers to an external object; re-extract "
                         "the official cifar-10-python.tar.gz")


class _NotABatch(ValueError):
    """A batch file that asks for more than a plain CIFAR-10 batch needs."""


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [n, 3, 32, 32], labels int64 [n])`` of one batch file, read without running code."""
    fix = "re-extract the official cifar-10-python.tar.gz"
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, path).load()
    except _NotABatch:
        raise
    except OSError as exc:
        raise ValueError(f"cannot read CIFAR-10 batch {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # truncated or not a pickle at all
        why = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a readable CIFAR-10 batch ({why}); {fix}") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch (it holds a {type(entry).__name__}, not a dict); {fix}")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 batch (missing 'data' or 'labels'); {fix}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: expected 'data' to be a uint8 array [n, 3072], got {got}; {fix}")
    try:
        labels = np.asarray(labels) if len(labels) else np.zeros(0, dtype=np.int64)
    except Exception:  # ragged or not a sequence
        labels = np.asarray([None], dtype=object)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != data.shape[0]:
        raise ValueError(f"{path}: expected {data.shape[0]} integer labels, got {labels.dtype} {labels.shape}; {fix}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise ValueError(f"{path}: labels must lie in [0, 10), got [{labels.min()}, {labels.max()}]; {fix}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar10(root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the train (5 batches) or test split as uint8 images [N, 3, 32, 32] and int64 labels."""
    folder = Path(root) / _FOLDER
    parts = [_read_batch(folder / name) for name in (_TRAIN_FILES if train else _TEST_FILES)]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(images), torch.from_numpy(labels)


class CIFAR10DataModule(BaseDataModule):
    """CIFAR-10 with a seeded train / development (``val``) split; train augmentation = random crop (pad 4) + h-flip.
    A development image whose bytes equal a test image's is dropped from the development split (the test split
    stays unseen); the training split is CIFAR-10's own, untouched.

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
        self._checked = False
        if not self.download:
            self._check_files()

    def _check_files(self) -> None:
        """Every batch must exist and be a plain CIFAR-10 batch (read with the restricted unpickler)."""
        missing = _missing_files(self.root)
        if missing:
            raise FileNotFoundError(
                f"CIFAR-10 not found: looked for the python batches in '{self.root / _FOLDER}' "
                f"(missing: {', '.join(p.name for p in missing)}). Pass download=True when online, "
                f"or place the extracted 'cifar-10-python.tar.gz' under '{self.root}'."
            )
        if not self._checked:
            for name in _TRAIN_FILES + _TEST_FILES:
                _read_batch(self.root / _FOLDER / name)
            self._checked = True

    def prepare_data(self) -> None:
        """Download through torchvision if requested and the files are not there yet."""
        if self.download and _missing_files(self.root):
            from torchvision.datasets import CIFAR10

            self.root.mkdir(parents=True, exist_ok=True)
            CIFAR10(str(self.root), train=True, download=True)
            CIFAR10(str(self.root), train=False, download=True)
        self._check_files()

    def _train_transform(self) -> transforms.Compose | None:
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
        seen = set(image_digests(test_images))
        va = va[torch.tensor([d not in seen for d in image_digests(images[va])], dtype=torch.bool)]
        return (
            TensorImageDataset(images[tr], labels[tr], transform=self._train_transform()),
            TensorImageDataset(images[va], labels[va]),
            TensorImageDataset(test_images, test_labels),
        )
