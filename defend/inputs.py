"""Which inputs a measurement reads: the first items of a split (:func:`take_split`) or the first ones a classifier
gets right (:func:`select_correct`), each noted for ``provenance.json``. Shared by ``defend experiment`` and
``defend evaluate``."""
from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor

from .data.base import split_name
from .models import GapClassifier
from .provenance import note_data

__all__ = ["take_split", "select_correct"]


def take_split(dm: pl.LightningDataModule, split: str = "test", n: int | None = None) -> dict[str, Tensor]:
    """The first ``n`` items of a split (``train``, ``dev`` / ``val``, ``test``) as one batch dict (images, labels,
    masks if any); the split and the inputs' digest are noted for ``provenance.json``."""
    name = split_name(split)
    ds = {"train": dm.train_dataset, "val": dm.val_dataset, "test": dm.test_dataset}[name]
    n = len(ds) if n is None else min(n, len(ds))
    items = [ds[i] for i in range(n)]
    out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    note_data(out["image"], out["label"], split=name)
    return out


def select_correct(model: GapClassifier, dm: pl.LightningDataModule, n: int,
                   split: str | Sequence[str] = "test") -> dict[str, Tensor]:
    """The first ``n`` inputs of a split (or of several, concatenated in order: ``["test", "val"]``) that the
    classifier gets right (attacks start from correct inputs)."""
    splits = [split] if isinstance(split, str) else list(split)
    if not splits:
        raise ValueError("no data split named; choose from train, dev (= val), test")
    splits = [split_name(s) for s in splits]
    parts = [take_split(dm, s) for s in splits]
    data = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    with torch.no_grad():
        ok = torch.cat([model(data["image"][i:i + 512]).argmax(1) == data["label"][i:i + 512]
                        for i in range(0, data["image"].shape[0], 512)])
    idx = ok.nonzero().flatten()[:n]
    out = {k: v[idx] for k, v in data.items()}
    note_data(out["image"], out["label"], split="+".join(splits))
    return out
