"""A tiny digits classifier shared by test modules (trained in seconds on CPU, deterministic)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from defend.data import DigitsDataModule
from defend.inputs import take_split
from defend.models.small import small_cnn

__all__ = ["train_tiny_classifier"]


def train_tiny_classifier(steps: int = 120, width: int = 8, n_test: int = 64):
    """``(model, test split, train split)``: a width-``width`` small CNN after ``steps`` Adam steps on the embedded
    digits (one render per digit)."""
    torch.manual_seed(0)
    dm = DigitsDataModule(seed=0, renders_per_digit=(1, 1, 1), batch_size=64)
    dm.setup("fit")
    train, test = take_split(dm, "train"), take_split(dm, "test", n_test)
    model = small_cnn(num_classes=10, width=width)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, train["image"].shape[0], (64,), generator=gen)
        loss = F.cross_entropy(model(train["image"][idx]), train["label"][idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), test, train
