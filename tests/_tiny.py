"""A tiny digits classifier shared by test modules (trained in seconds on CPU, deterministic)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from defend.data import DigitsDataModule
from defend.inputs import take_split
from defend.models.small import small_cnn

__all__ = ["train_tiny_classifier", "shape_folder", "fit_small_cnn", "card_maps"]


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


def shape_folder(root: Path, names: Sequence[str] = ("disc", "square"), per_class: int = 12, size: int = 32) -> Path:
    """An image folder ``root/<name>/NN.png`` of one drawn shape per class (disc, square, triangle, repeating) on a
    random dark background; class names may carry non-UTF-8 bytes (surrogate-escaped)."""
    rng = np.random.default_rng(0)
    for k, c in enumerate(names):
        d = Path(os.fsdecode(os.fsencode(root) + b"/" + os.fsencode(c)))
        d.mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 100, 3)))
            r, (cx, cy) = 8, (int(v) for v in rng.integers(9, size - 9, 2))
            draw, fill = ImageDraw.Draw(img), tuple(int(v) for v in rng.integers(150, 256, 3))
            if k % 3 == 2:
                draw.polygon([(cx - r, cy + r), (cx + r, cy + r), (cx, cy - r)], fill=fill)
            else:
                (draw.ellipse if k % 3 == 0 else draw.rectangle)([cx - r, cy - r, cx + r, cy + r], fill=fill)
            img.save(d / f"{i:02d}.png")
    return root


def fit_small_cnn(train: dict, num_classes: int, steps: int, width: int = 4) -> torch.nn.Module:
    """A width-``width`` small CNN after ``steps`` full-batch Adam steps on ``train`` (seeded), in eval mode."""
    torch.manual_seed(0)
    model = small_cnn(num_classes=num_classes, width=width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(model(train["image"]), train["label"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def card_maps(model: torch.nn.Module, saved: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """GRAD + CAM maps of a saved adversarial set's clean inputs (for their labels) and adversarial inputs (for
    their predictions), and their labels (0 benign, 1 adversarial): a detector's training set."""
    from attacks import get_interpreter

    def maps(x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        return torch.cat([get_interpreter(n)(model, x, cls) for n in ("grad", "cam")], 1)

    with torch.no_grad():
        pred = model(saved["x_adv"]).argmax(1)
    data = torch.cat([maps(saved["x"], saved["label"]), maps(saved["x_adv"], pred)])
    return data, torch.cat([torch.zeros(len(pred)), torch.ones(len(pred))]).long()
