"""Shared pieces of the data modules: an in-memory dataset, a small base class and the three splits.

Every data module has three disjoint splits: ``train``, the **development** split ``val`` (Lightning's name; ``dev``
is accepted everywhere a split is named) and ``test``. Everything that tunes or selects (early stopping, epoch
selection, recipe and hyper-parameter sweeps, the detector's choice of interpreters, FPR thresholds) reads the
development split; the test split is for final figures only (:func:`require_development` refuses it), and no image
lies on both sides (:meth:`BaseDataModule.check_disjoint`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..distributed import rank_world
from .batch import IMAGE, INDEX, LABEL, MASK

__all__ = ["TensorImageDataset", "BaseDataModule", "EpochShuffleSampler", "SPLITS", "DEV", "split_name",
           "require_development", "SealedSplitError", "image_digests"]

#: the splits of every data module, in order: training, development (Lightning's ``val``), test
SPLITS = ("train", "val", "test")
#: the development split: what tuning and selection read
DEV = "val"
_ALIASES = {"dev": DEV, "development": DEV, "validation": DEV}


class SealedSplitError(ValueError):
    """Tuning or selection was asked to read the test split."""


def split_name(split: str) -> str:
    """The canonical name of ``split`` (``dev`` / ``development`` / ``validation`` -> ``val``); one-line error for an
    unknown one."""
    name = _ALIASES.get(str(split), str(split))
    if name not in SPLITS:
        raise ValueError(f"unknown data split {split!r}; choose train, dev (= val) or test")
    return name


def require_development(split: str, what: str) -> str:
    """The canonical development split for ``what`` (something that tunes or selects); the test split is refused:
    it is sealed for final figures. The training split is refused too (selection on training data selects the fit)."""
    name = split_name(split)
    if name != DEV:
        why = "the test split is sealed for final figures" if name == "test" else "it is the training split"
        raise SealedSplitError(f"{what} tunes or selects, so it reads the development split (dev), not {split!r}: "
                               f"{why}; pass split: dev")
    return name


def image_digests(images: torch.Tensor) -> list[str]:
    """SHA-256 of every image's bytes (uint8 ``[N, C, H, W]`` or floats on the uint8 grid): equal images, equal digest."""
    if images.dtype != torch.uint8:
        images = torch.round(images.clamp(0, 1) * 255).to(torch.uint8)
    flat = images.reshape(images.shape[0], -1).contiguous().numpy()
    return [hashlib.sha256(row.tobytes()).hexdigest() for row in flat]


class EpochShuffleSampler(DistributedSampler):
    """A random order that depends only on ``(seed, epoch)``, sharded the same way on any number of processes.

    Lightning calls :meth:`set_epoch` at the start of every training epoch, so a run resumed from a checkpoint
    sees exactly the batches an uninterrupted run would have seen (a generator carried across epochs would restart
    from its seed instead). Under DDP with ``W`` processes the epoch's permutation is padded to a multiple of ``W``
    (repeating its first indices, as ``DistributedSampler`` does) and rank ``r`` takes positions ``r::W``: with a
    per-process batch of ``B / W`` the ``k``-th batches of all ranks together are exactly the ``k``-th batch of
    size ``B`` of one process, so DDP training follows the one-process run (see ``tests/test_ddp_parity.py``).
    It subclasses ``DistributedSampler`` only so that Lightning keeps it instead of substituting its own; the
    rank and world size are read when iterating (the process group may not exist when the loader is built).
    """

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:  # no super().__init__: see above
        self.dataset = self.data_source = data_source
        self.seed = int(seed)
        self.epoch = 0
        self.shuffle, self.drop_last = True, False

    @property
    def num_replicas(self) -> int:
        return rank_world()[1]

    @property
    def rank(self) -> int:
        return rank_world()[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.data_source), generator=g).tolist()
        rank, world = rank_world()
        if world > 1:
            order = (order + order[:(-len(order)) % world])[rank::world]
        return iter(order)

    def __len__(self) -> int:
        return -(-len(self.data_source) // rank_world()[1])


class TensorImageDataset(Dataset):
    """Dataset over precomputed uint8 images ``[N, 3, H, W]`` (and optional uint8 masks ``[N, 1, H, W]``)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor | None = None,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        if masks is not None and masks.shape != (images.shape[0], 1, *images.shape[2:]):
            raise ValueError(f"masks must have shape [N, 1, H, W], got {tuple(masks.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.masks = masks
        self.transform = transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        image = self.images[idx].float() / 255.0
        if self.transform is not None:
            image = self.transform(image)
        item = {
            IMAGE: image,
            LABEL: self.labels[idx].clone(),
            INDEX: torch.tensor(idx, dtype=torch.int64),
        }
        if self.masks is not None:
            item[MASK] = self.masks[idx].float()
        return item


class BaseDataModule(pl.LightningDataModule):
    """Common properties, lazy setup and dataloader construction.

    Subclasses set ``name``, ``num_classes``, ``image_shape``, ``class_names``, ``has_mask``
    and implement :meth:`_build` returning ``(train, val, test)`` datasets.
    """

    name: str = "base"
    has_mask: bool = False

    def __init__(self, batch_size: int, num_workers: int, seed: int) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.num_classes: int = 0
        self.image_shape: tuple[int, int, int] = (3, 0, 0)
        self.class_names: list[str] = []
        self._datasets: tuple[Dataset, Dataset, Dataset] | None = None

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets once (idempotent)."""
        if self._datasets is None:
            self._datasets = self._build()

    @property
    def train_dataset(self) -> Dataset:
        self.setup()
        return self._datasets[0]

    @property
    def val_dataset(self) -> Dataset:
        self.setup()
        return self._datasets[1]

    @property
    def test_dataset(self) -> Dataset:
        self.setup()
        return self._datasets[2]

    @property
    def dev_dataset(self) -> Dataset:
        """The development split (``val``): everything that tunes or selects reads it."""
        return self.val_dataset

    def split_dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` (``train``, ``dev`` / ``val`` or ``test``)."""
        return {"train": self.train_dataset, "val": self.val_dataset, "test": self.test_dataset}[split_name(split)]

    def split_keys(self, split: str) -> list[str]:
        """What identifies each item of ``split`` for the disjointness check: the digest of its image bytes
        (subclasses add their own identities, e.g. the source digit or the file's content)."""
        ds = self.split_dataset(split)
        images = getattr(ds, "images", None)
        if isinstance(images, torch.Tensor):
            return image_digests(images)
        return [image_digests(ds[i][IMAGE].unsqueeze(0))[0] for i in range(len(ds))]

    def check_disjoint(self, a: str = DEV, b: str = "test") -> None:
        """Raise ``ValueError`` when an item of split ``a`` is also in split ``b`` (same image, or same source)."""
        shared = set(self.split_keys(a)) & set(self.split_keys(b))
        if shared:
            raise ValueError(f"{self.name}: {len(shared)} item(s) of the {a} split are also in the {b} split (e.g. "
                             f"{sorted(shared)[0][:16]}); remove the duplicates so that {b} stays unseen")

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        """Shuffled loaders draw their order from :class:`EpochShuffleSampler` (seeded per epoch); the loader's own
        generator (worker seeds) keeps iterator creation from consuming the global RNG."""
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(dataset, self.seed) if shuffle else None,
            num_workers=self.num_workers,
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def describe(self) -> dict[str, Any]:
        """Summary of the data module (builds the datasets if needed)."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "image_shape": tuple(self.image_shape),
            "class_names": list(self.class_names),
            "has_mask": self.has_mask,
            "sizes": {
                "train": len(self.train_dataset),
                "val": len(self.val_dataset),
                "test": len(self.test_dataset),
            },
            "development_split": DEV,
        }
