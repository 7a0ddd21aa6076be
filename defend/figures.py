"""Figures people read: map grids with labelled rows and a colour bar, line plots, ROC curves and bar charts
(matplotlib, Agg backend, written atomically through :func:`defend.io.atomic_path`)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402

from .io import atomic_path  # noqa: E402

__all__ = ["map_grid", "line_plot", "roc_plot", "bar_chart"]

_FONT = 9


def _cell(ax, t: Tensor, cmap: str):
    """One image ``[3, H, W]`` or map ``[1, H, W]`` (colour-mapped on [0, 1]) without ticks; returns the artist."""
    t = t.detach().float().cpu()
    ax.set_xticks([])
    ax.set_yticks([])
    if t.shape[0] == 1:
        return ax.imshow(t[0].numpy(), cmap=cmap, vmin=0, vmax=1)
    return ax.imshow(t.permute(1, 2, 0).clamp(0, 1).numpy())


def map_grid(path: str | Path, columns: Sequence[tuple[str, Tensor]], rows: int, row_labels: Sequence[str] | None = None,
             title: str | None = None, cmap: str = "jet", cbar_label: str = "attribution (normalised)") -> None:
    """One column per ``(title, batch)``, a batch being images ``[N, 3, H, W]`` or maps ``[N, 1, H, W]``; one row per
    example (``row_labels``: e.g. ``"3 (three) -> 8 (eight)"``), a colour bar for the maps, readable titles."""
    n = len(columns)
    fig, axes = plt.subplots(rows, n, figsize=(1.9 * n + 1.2, 1.9 * rows + (0.5 if title else 0.2)), squeeze=False)
    artist = None
    for j, (head, batch) in enumerate(columns):
        for i in range(rows):
            im = _cell(axes[i][j], batch[i], cmap)
            if batch.shape[1] == 1:
                artist = im
            if i == 0:
                axes[i][j].set_title(head, fontsize=_FONT)
            if j == 0 and row_labels is not None:
                axes[i][j].set_ylabel(row_labels[i], fontsize=_FONT)
    if title:
        fig.suptitle(title, fontsize=_FONT + 2)
    fig.tight_layout()
    if artist is not None:
        bar = fig.colorbar(artist, ax=axes.ravel().tolist(), fraction=0.02, pad=0.01)
        bar.set_label(cbar_label, fontsize=_FONT)
        bar.ax.tick_params(labelsize=_FONT - 1)
    _save(fig, path, Path(path).suffix.lstrip(".") or "png")


def line_plot(path: str | Path, x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str,
              title: str = "") -> None:
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=name)
    ax.set_xlabel(xlabel, fontsize=_FONT + 1)
    ax.set_ylabel(ylabel, fontsize=_FONT + 1)
    ax.set_title(title, fontsize=_FONT + 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=_FONT - 1)
    fig.tight_layout()
    _save(fig, path, "png")


def roc_plot(path: str | Path, curves: dict[str, tuple[Sequence[float], Sequence[float], float]], title: str = "") -> None:
    """ROC curves ``{label: (false-positive rates, true-positive rates, AUC)}`` with the 1 % and 5 % FPR marks."""
    fig, ax = plt.subplots(figsize=(5.0, 4.5))
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot(list(fpr), list(tpr), label=f"{label} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    for f in (0.01, 0.05):
        ax.axvline(f, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("false-positive rate (benign flagged)", fontsize=_FONT + 1)
    ax.set_ylabel("detection rate (adversarial flagged)", fontsize=_FONT + 1)
    ax.set_title(title, fontsize=_FONT + 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=_FONT - 1, loc="lower right")
    fig.tight_layout()
    _save(fig, path, "png")


def bar_chart(path: str | Path, groups: Sequence[str], series: dict[str, Sequence[float]], ylabel: str,
              title: str = "") -> None:
    """Grouped bars: one group per entry of ``groups`` (e.g. a defence), one bar per series (e.g. an attack)."""
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.2))
    for k, (name, vals) in enumerate(series.items()):
        ax.bar([g + k * width for g in range(len(groups))], [float("nan") if v is None else v for v in vals],
               width=width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=_FONT)
    ax.set_ylabel(ylabel, fontsize=_FONT + 1)
    ax.set_title(title, fontsize=_FONT + 1)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=_FONT - 1)
    fig.tight_layout()
    _save(fig, path, "png")


def _save(fig, path: str | Path, fmt: str) -> None:
    """Write ``fig`` atomically (mode ``0o666 & ~umask``; a full disk is a one-line ``cannot write <file>`` error
    with no partial file left) and close it whatever happens."""
    try:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, dpi=110, format=fmt)
    finally:
        plt.close(fig)
