"""Figures: grids of images and attribution maps (matplotlib, Agg backend, written atomically through
:func:`defend.io.atomic_path`)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from ..io import atomic_path  # noqa: E402

__all__ = ["map_grid", "line_plot"]


def map_grid(path: Path, columns: Sequence[tuple[str, Tensor]], rows: int, row_labels: Sequence[str] | None = None) -> None:
    """One column per (title, batch) where a batch is images ``[N,3,H,W]`` or maps ``[N,1,H,W]``."""
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.6 * len(columns), 1.6 * rows), squeeze=False)
    for j, (title, batch) in enumerate(columns):
        for i in range(rows):
            ax = axes[i][j]
            t = batch[i].detach().float().cpu()
            if t.shape[0] == 1:
                ax.imshow(t[0].numpy(), cmap="jet", vmin=0, vmax=1)
            else:
                ax.imshow(t.permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([]); ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=7)
            if j == 0 and row_labels is not None:
                ax.set_ylabel(row_labels[i], fontsize=7)
    fig.tight_layout()
    _save(fig, path, path.suffix.lstrip(".") or "png")


def line_plot(path: Path, x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str, title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=name)
    ax.set_xlabel(xlabel); ax.set_ylabel(ylabel); ax.set_title(title, fontsize=9); ax.grid(alpha=0.3); ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, "png")


def _save(fig, path: Path, fmt: str) -> None:
    """Write ``fig`` atomically (mode ``0o666 & ~umask``; a full disk is a one-line ``cannot write <file>`` error
    with no partial file left) and close it whatever happens."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=fmt)
    finally:
        plt.close(fig)
