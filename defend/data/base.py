"""Shared pieces of the data modules: an in-memory dataset and a small base class."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..distributed import rank_world
from .batch import IMAGE, INDEX, LABEL, MASK

__all__ = ["TensorImageDataset", "BaseDataModule", "EpochShuffleSampler"]


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
        }
