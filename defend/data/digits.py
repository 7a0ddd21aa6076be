"""Embedded-digits data: scikit-learn's 8x8 digits rendered into cluttered colour scenes.

Everything is generated at run time (no download), deterministically from a seed.  Each image
holds one small digit at a random scale/position/colour on a smooth colour background with
distractor strokes, rectangles and blobs; the ground-truth mask is the digit's support.
Splits are made by *source* digit, so no source digit appears in two splits (the development split is ``val``).

The test split is a *draw*: ``test_draw`` picks the random stream its scenes are rendered with. Draw 0 is the test
split every figure before 2026-12-06 was measured on, and the project's own development read it (recipes and
hyper-parameters were chosen on it); draw 1, the default, renders the same test source digits into scenes that no
tuning has ever seen (the sealed test split). Train and development splits do not depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from .base import BaseDataModule, TensorImageDataset

__all__ = ["EmbeddedDigits", "DigitsDataModule", "SPLITS"]

SPLITS = ("train", "val", "test")
_CHUNK = 1024  # images rendered per vectorised chunk


def _load_source_digits() -> tuple[torch.Tensor, np.ndarray]:
    """Return the 1797 sklearn digits as float alpha maps [N, 1, 8, 8] in [0, 1] and labels."""
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    return images, digits.target.astype(np.int64)


class EmbeddedDigits:
    """Renders source digits into cluttered ``3 x image_size x image_size`` scenes.

    ``render(sources, rng)`` returns uint8 images ``[N, 3, S, S]`` and uint8 masks ``[N, 1, S, S]``.
    Digit scale is drawn from ``scale_range`` (fractions of ``image_size``; default 10-18 px at 32 px).
    """

    def __init__(
        self,
        image_size: int = 32,
        scale_range: tuple[float, float] = (10 / 32, 18 / 32),
        mask_threshold: float = 0.3,
    ) -> None:
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.image_size = int(image_size)
        self.scale_range = scale_range
        self.mask_threshold = mask_threshold
        self.digits, self.labels = _load_source_digits()
        ys, xs = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")
        self._xs = xs.float() + 0.5  # pixel centres
        self._ys = ys.float() + 0.5

    @property
    def num_sources(self) -> int:
        return int(self.digits.shape[0])

    def render(self, sources: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Render ``sources`` (indices into the source digits) with randomness from ``rng``."""
        images, masks = [], []
        for start in range(0, len(sources), _CHUNK):
            img, mask = self._render_chunk(np.asarray(sources[start : start + _CHUNK]), rng)
            images.append(img)
            masks.append(mask)
        if not images:
            s = self.image_size
            return torch.zeros(0, 3, s, s, dtype=torch.uint8), torch.zeros(0, 1, s, s, dtype=torch.uint8)
        return torch.cat(images), torch.cat(masks)

    # -- pieces -------------------------------------------------------------------------------
    def _background(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        """Smooth colour gradient plus low-frequency colour noise, [n, 3, S, S]."""
        s = self.image_size
        c0 = torch.from_numpy(rng.uniform(0.15, 0.85, (n, 3, 1, 1)).astype(np.float32))
        c1 = torch.from_numpy(rng.uniform(0.15, 0.85, (n, 3, 1, 1)).astype(np.float32))
        theta = torch.from_numpy(rng.uniform(0, 2 * math.pi, (n, 1, 1, 1)).astype(np.float32))
        u = (self._xs / s - 0.5) * torch.cos(theta) + (self._ys / s - 0.5) * torch.sin(theta)
        t = (u / math.sqrt(0.5) + 1.0) / 2.0  # in [0, 1]
        grid = torch.from_numpy(rng.normal(0.0, 0.08, (n, 3, 4, 4)).astype(np.float32))
        noise = F.interpolate(grid, size=(s, s), mode="bicubic", align_corners=False)
        return (c0 + (c1 - c0) * t + noise).clamp(0.0, 1.0)

    def _distractors(self, bg: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Composite thin line strokes, small rectangles and soft blobs over ``bg``."""
        n, s = bg.shape[0], self.image_size
        px = s / 32.0
        x, y = self._xs, self._ys

        def colour() -> torch.Tensor:
            return torch.from_numpy(rng.uniform(0, 1, (n, 3, 1, 1)).astype(np.float32))

        def uni(lo: float, hi: float) -> torch.Tensor:
            return torch.from_numpy(rng.uniform(lo, hi, (n, 1, 1, 1)).astype(np.float32))

        def active(k: int, counts: np.ndarray) -> torch.Tensor:
            return torch.from_numpy((counts > k).astype(np.float32)).view(n, 1, 1, 1)

        layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        n_lines = rng.integers(2, 5, n)
        for k in range(4):  # thin straight strokes (~1 px wide), anti-aliased
            x0, y0 = uni(0, s), uni(0, s)
            ang, length = uni(0, 2 * math.pi), uni(6 * px, 20 * px)
            dx, dy = torch.cos(ang) * length, torch.sin(ang) * length
            tt = (((x - x0) * dx + (y - y0) * dy) / (length**2)).clamp(0, 1)
            dist = torch.sqrt((x - x0 - tt * dx) ** 2 + (y - y0 - tt * dy) ** 2)
            alpha = (0.5 * px + 0.5 - dist).clamp(0, 1) * active(k, n_lines)
            layers.append((alpha, colour()))
        n_rects = rng.integers(1, 4, n)
        for k in range(3):  # small filled rectangles
            w, h = uni(2 * px, 6 * px), uni(2 * px, 6 * px)
            x0, y0 = uni(0, s) - w / 2, uni(0, s) - h / 2
            inside = (x >= x0) & (x < x0 + w) & (y >= y0) & (y < y0 + h)
            layers.append((inside.float() * active(k, n_rects), colour()))
        n_blobs = rng.integers(1, 3, n)
        for k in range(2):  # soft elliptical blobs
            cx, cy = uni(0, s), uni(0, s)
            sx, sy = uni(1.2 * px, 3.0 * px), uni(1.2 * px, 3.0 * px)
            g = torch.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))
            layers.append((g * uni(0.5, 0.9) * active(k, n_blobs), colour()))
        order = rng.permutation(len(layers))
        out = bg
        for i in order:
            alpha, col = layers[i]
            out = out * (1 - alpha) + col * alpha
        return out

    def _digit_alpha(self, sources: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Bilinearly upscale each source digit to a random scale at a random position: [n, 1, S, S]."""
        n, s = len(sources), float(self.image_size)
        size = rng.uniform(self.scale_range[0] * s, self.scale_range[1] * s, n)
        cx = rng.uniform(size / 2, s - size / 2)
        cy = rng.uniform(size / 2, s - size / 2)
        theta = np.zeros((n, 2, 3), dtype=np.float32)
        theta[:, 0, 0] = s / size
        theta[:, 1, 1] = s / size
        theta[:, 0, 2] = (s / 2 - cx) * 2 / size
        theta[:, 1, 2] = (s / 2 - cy) * 2 / size
        grid = F.affine_grid(torch.from_numpy(theta), [n, 1, self.image_size, self.image_size], align_corners=False)
        src = self.digits[torch.from_numpy(sources)]
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False).clamp(0, 1)

    def _render_chunk(self, sources: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(sources)
        scene = self._distractors(self._background(n, rng), rng)
        alpha = self._digit_alpha(sources, rng)
        # digit colour contrasts with the local background luminance (alpha-weighted mean under the digit)
        lum = (0.299 * scene[:, 0] + 0.587 * scene[:, 1] + 0.114 * scene[:, 2]).unsqueeze(1)
        local = ((lum * alpha).sum((1, 2, 3)) / alpha.sum((1, 2, 3)).clamp_min(1e-6)).numpy()
        u = rng.uniform(0, 1, (n, 3))
        lo = np.where(local[:, None] >= 0.5, 0.0, np.minimum(local[:, None] + 0.4, 0.9))
        hi = np.where(local[:, None] >= 0.5, np.maximum(local[:, None] - 0.4, 0.1), 1.0)
        col = torch.from_numpy((lo + u * (hi - lo)).astype(np.float32)).view(n, 3, 1, 1)
        image = scene * (1 - alpha) + col * alpha
        image_u8 = torch.round(image.clamp(0, 1) * 255).to(torch.uint8)
        mask_u8 = (alpha > self.mask_threshold).to(torch.uint8)
        return image_u8, mask_u8


class DigitsDataModule(BaseDataModule):
    """Lightning data module over :class:`EmbeddedDigits` with source-disjoint splits.

    Items follow the batch contract in :mod:`defend.data.batch` and include a ``"mask"``.
    Each split dataset also carries ``.sources`` (source-digit index of every item).

    Args:
        seed: seeds the source split, the rendering and the per-epoch shuffle.
        image_size: side of the rendered scenes (>= 16 px).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        renders_per_digit: renders of every source digit in the train, val and test splits.
        split_fractions: shares of the 1797 source digits in the train, val and test splits (sum 1).
        limit_test: keep only the first ``limit_test`` test images (None: all).
        test_draw: the rendering of the test split (0: the one read by development before 2026-12-06; 1: the sealed
            draw no tuning has seen; see the module docstring).
    """

    name = "digits"
    has_mask = True

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 32,
        batch_size: int = 128,
        num_workers: int = 0,
        renders_per_digit: Sequence[int] = (4, 2, 2),
        split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
        limit_test: int | None = None,
        test_draw: int = 1,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if len(renders_per_digit) != 3 or min(renders_per_digit) < 1:
            raise ValueError(f"renders_per_digit must be 3 positive ints (train, val, test), got {renders_per_digit}")
        if len(split_fractions) != 3 or min(split_fractions) <= 0 or abs(sum(split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be 3 positive floats summing to 1, got {split_fractions}")
        if limit_test is not None and limit_test < 1:
            raise ValueError(f"limit_test must be a positive int or None, got {limit_test}")
        if isinstance(test_draw, bool) or not isinstance(test_draw, int) or test_draw < 0:
            raise ValueError(f"test_draw must be a whole number >= 0 (1: the sealed test split), got {test_draw!r}")
        self.save_hyperparameters()
        self.image_size = int(image_size)
        self.renders_per_digit = tuple(int(r) for r in renders_per_digit)
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.limit_test = limit_test
        self.test_draw = int(test_draw)
        self.num_classes = 10
        self.image_shape = (3, self.image_size, self.image_size)
        self.class_names = [str(i) for i in range(10)]
        self._renderer: EmbeddedDigits | None = None
        self._sources: dict[str, np.ndarray] | None = None

    def _split_sources(self, num_sources: int) -> dict[str, np.ndarray]:
        perm = np.random.default_rng([self.seed, 0]).permutation(num_sources)
        n_train = int(round(self.split_fractions[0] * num_sources))
        n_val = int(round(self.split_fractions[1] * num_sources))
        return {"train": perm[:n_train], "val": perm[n_train : n_train + n_val], "test": perm[n_train + n_val :]}

    def source_indices(self, split: str) -> np.ndarray:
        """Indices (into ``sklearn.datasets.load_digits()``) of the source digits of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
        self.setup()
        return self._sources[split].copy()

    def _stream(self, split: str, k: int) -> list[int]:
        """The seed sequence a split is rendered with (the test split's draw 0 is the stream used until 2026-12-06)."""
        if split == "test" and self.test_draw > 0:
            return [self.seed, k + 1, self.test_draw]
        return [self.seed, k + 1]

    def split_keys(self, split: str) -> list[str]:
        """Every item's source digit and image digest: no source digit and no image may be on two sides."""
        ds = self.split_dataset(split)
        return [f"source {int(i)}" for i in ds.sources] + super().split_keys(split)

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        self._renderer = EmbeddedDigits(image_size=self.image_size)
        self._sources = self._split_sources(self._renderer.num_sources)
        datasets = []
        for k, split in enumerate(SPLITS):
            sources = np.repeat(self._sources[split], self.renders_per_digit[k])
            rng = np.random.default_rng(self._stream(split, k))
            sources = sources[rng.permutation(len(sources))]
            images, masks = self._renderer.render(sources, rng)
            if split == "test" and self.limit_test is not None:
                sources, images, masks = sources[: self.limit_test], images[: self.limit_test], masks[: self.limit_test]
            labels = torch.from_numpy(self._renderer.labels[sources])
            dataset = TensorImageDataset(images, labels, masks)
            dataset.sources = torch.from_numpy(sources)  # source-digit index of every item
            datasets.append(dataset)
        return datasets[0], datasets[1], datasets[2]
