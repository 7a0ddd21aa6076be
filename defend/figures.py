"""Figures people read: map grids with labelled rows and a colour bar, line plots, ROC curves and bar charts
(matplotlib, Agg backend, constrained layout, written atomically through :func:`defend.io.atomic_path`).

Each file is written in the format its name's suffix asks for (``.png``, ``.pdf``, ``.svg``, ...; an unknown suffix is
refused before anything is plotted); maps use a perceptual colour map (viridis), ROC curves a log-scale FPR axis (the
low-FPR region is where a detector is used), and every bar axis holds one measure (so one direction). Each writer returns its (closed) Figure."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from .io import atomic_path  # noqa: E402

__all__ = ["map_grid", "line_plot", "certified_plot", "roc_plot", "bar_chart", "bar_panels", "pareto_plot", "scatter_ci_plot",
           "figure_format"]

_FONT = 9
#: the colour map of attribution maps: perceptually uniform, readable in grey scale and by colour-blind readers
MAP_CMAP = "viridis"


def figure_format(path: str | Path) -> str:
    """The matplotlib format of ``path``'s suffix (``maps.pdf`` -> ``pdf``); a one-line error for a suffix
    matplotlib cannot write (checked before plotting)."""
    suffix = Path(path).suffix.lower().lstrip(".")
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix not in formats:
        raise ValueError(f"cannot write figure {str(path)!r}: unsupported file suffix {Path(path).suffix or '(none)'!r}; "
                         f"use one of {', '.join('.' + f for f in sorted(formats))} (e.g. .png, .pdf or .svg)")
    return suffix


def _cell(ax, t: Tensor, cmap: str):
    """One image ``[3, H, W]`` or map ``[1, H, W]`` (colour-mapped on [0, 1]) without ticks; returns the artist."""
    t = t.detach().float().cpu()
    ax.set_xticks([])
    ax.set_yticks([])
    if t.shape[0] == 1:
        return ax.imshow(t[0].numpy(), cmap=cmap, vmin=0, vmax=1)
    return ax.imshow(t.permute(1, 2, 0).clamp(0, 1).numpy())


def map_grid(path: str | Path, columns: Sequence[tuple[str, Tensor]], rows: int, row_labels: Sequence[str] | None = None,
             title: str | None = None, cmap: str = MAP_CMAP, cbar_label: str = "attribution (normalised)") -> Figure:
    """One column per ``(title, batch)``, a batch being images ``[N, 3, H, W]`` or maps ``[N, 1, H, W]``; one row per
    example (``row_labels``: e.g. ``"3 (three) -> 8 (eight)"``), a colour bar for the maps, readable titles."""
    fmt = figure_format(path)
    n = len(columns)
    fig, axes = plt.subplots(rows, n, figsize=(1.9 * n + 1.2, 1.9 * rows + (0.5 if title else 0.2)), squeeze=False,
                             layout="constrained")
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
    if artist is not None:
        bar = fig.colorbar(artist, ax=axes, fraction=0.05, pad=0.02)  # constrained layout keeps it on the page
        bar.set_label(cbar_label, fontsize=_FONT)
        bar.ax.tick_params(labelsize=_FONT - 1)
    return _save(fig, path, fmt)


def line_plot(path: str | Path, x: Sequence[float], series: dict[str, Sequence[float]], xlabel: str, ylabel: str,
              title: str = "") -> Figure:
    """One line (with markers) per series over ``x``."""
    fmt = figure_format(path)
    fig, ax = plt.subplots(figsize=(6.0, 4.0), layout="constrained")
    for name, ys in series.items():
        ax.plot(list(x), list(ys), marker="o", label=name)
    _label_axes(ax, xlabel, ylabel, title)
    return _save(fig, path, fmt)


def certified_plot(path: str | Path, radii: Sequence[float], series: dict[str, Sequence[float | None]],
                   title: str = "") -> Figure:
    """Certified accuracy against the L2 radius (Cohen et al.'s Figure 1): one step line per series, markers at the
    measured radii, the share at a radius drawn back to the previous one (the share cannot grow with r: between two
    measured radii the true curve lies at or above the step, so the figure never overstates a certificate), each
    series in its own dash pattern so that equal curves stay visible, the share axis on [0, 1]."""
    fmt = figure_format(path)
    fig, ax = plt.subplots(figsize=(6.0, 4.0), layout="constrained")
    styles = ["-", "--", ":", "-."]
    for i, (name, ys) in enumerate(series.items()):
        ax.plot(list(radii), [float("nan") if v is None else v for v in ys], drawstyle="steps-pre", marker="os^v"[i % 4],
                ls=styles[i % len(styles)], lw=2.2 if i == 0 else 1.4, label=name)
    ax.set_ylim(-0.02, 1.02)
    _label_axes(ax, "L2 radius r (image units)", "share of inputs certified at r", title)
    return _save(fig, path, fmt)


def _label_axes(ax: Axes, xlabel: str, ylabel: str, title: str) -> None:
    """Axis labels, title, a light grid and the legend of a line or point plot."""
    ax.set_xlabel(xlabel, fontsize=_FONT + 1)
    ax.set_ylabel(ylabel, fontsize=_FONT + 1)
    ax.set_title(title, fontsize=_FONT + 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=_FONT - 1)


def pareto_plot(path: str | Path, series: dict[str, Sequence[tuple[float, float, str, bool]]], xlabel: str,
                ylabel: str, title: str = "") -> Figure:
    """Labelled points ``(x, y, label, on_front)`` per series; the points on the Pareto front are joined (in ``x``
    order) and drawn filled, the others hollow."""
    fmt = figure_format(path)
    fig, ax = plt.subplots(figsize=(6.0, 4.0), layout="constrained")
    for name, pts in series.items():
        front = sorted((p for p in pts if p[3]), key=lambda p: p[0])
        line = ax.plot([p[0] for p in front], [p[1] for p in front], marker="o", label=f"{name}: Pareto front")[0]
        rest = [p for p in pts if not p[3]]
        ax.scatter([p[0] for p in rest], [p[1] for p in rest], facecolors="none", edgecolors=line.get_color())
        for x, y, label, _ in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=_FONT - 2)
    _label_axes(ax, xlabel, ylabel, title)
    return _save(fig, path, fmt)


def scatter_ci_plot(path: str | Path, points: Sequence[tuple[float, float | None, float | None, float, float | None,
                                                            float | None, str]], front: Sequence[int], xlabel: str,
                    ylabel: str, title: str = "") -> Figure:
    """Labelled points ``(x, x_low, x_high, y, y_low, y_high, label)`` with their interval bars in both directions
    (a bound of None: no bar on that side), and the Pareto front (``front``: indices of the points on it,
    maximising both) drawn as a step line."""
    fmt = figure_format(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")

    def err(v: float, lo: float | None, hi: float | None) -> list[float]:
        return [max(v - lo, 0.0) if lo is not None else 0.0, max(hi - v, 0.0) if hi is not None else 0.0]

    for x, xlo, xhi, y, ylo, yhi, label in points:
        xe, ye = err(x, xlo, xhi), err(y, ylo, yhi)
        ax.errorbar([x], [y], xerr=[[xe[0]], [xe[1]]], yerr=[[ye[0]], [ye[1]]], fmt="o", ms=4, color="tab:blue",
                    ecolor="tab:gray", elinewidth=0.8, capsize=2)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=_FONT - 2,
                    parse_math=False)  # a label is a card's text: "$" is not mathtext
    steps = sorted((points[i][0], points[i][3]) for i in front)
    ax.plot([p[0] for p in steps], [p[1] for p in steps], drawstyle="steps-pre", color="tab:red", lw=1.2,
            label="Pareto front (higher is better on both)")
    _label_axes(ax, xlabel, ylabel, title)
    return _save(fig, path, fmt)


def roc_plot(path: str | Path, curves: dict[str, tuple[Sequence[float], Sequence[float], float]], title: str = "") -> Figure:
    """ROC curves ``{label: (false-positive rates, true-positive rates, AUC)}`` on a log-scale FPR axis (from the
    smallest non-zero FPR measured; an FPR of 0 is drawn there), with the 1 % and 5 % FPR marks."""
    fmt = figure_format(path)
    positive = [float(f) for fpr, _, _ in curves.values() for f in fpr if f > 0]
    floor = min(positive + [1e-2]) / 2
    fig, ax = plt.subplots(figsize=(5.0, 4.5), layout="constrained")
    for label, (fpr, tpr, auc) in curves.items():
        ax.plot([max(float(f), floor) for f in fpr], list(tpr), label=f"{label} (AUC {auc:.3f})", drawstyle="steps-post")
    chance = [floor * (1 / floor) ** (i / 50) for i in range(51)]
    ax.plot(chance, chance, color="grey", lw=0.8, ls=":", label="chance")
    for f in (0.01, 0.05):
        if f > floor:
            ax.axvline(f, color="grey", lw=0.6, ls="--")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.02)
    ax.set_xlabel("false-positive rate (benign flagged, log scale)", fontsize=_FONT + 1)
    ax.set_ylabel("detection rate (adversarial flagged)", fontsize=_FONT + 1)
    ax.set_title(title, fontsize=_FONT + 1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=_FONT - 1, loc="lower right")
    return _save(fig, path, fmt)


def bar_chart(path: str | Path, groups: Sequence[str], series: dict[str, Sequence[float | None]], ylabel: str,
              title: str = "") -> Figure:
    """Grouped bars on one axis: one group per entry of ``groups`` (e.g. a defence), one bar per series (e.g. an
    attack). Every series must be the same measure (one direction); use :func:`bar_panels` for several measures."""
    return bar_panels(path, groups, {ylabel: series}, title)


def bar_panels(path: str | Path, groups: Sequence[str], panels: dict[str, dict[str, Sequence[float | None]]],
               title: str = "") -> Figure:
    """One bar panel per measure ``{axis label: {series: values per group}}``, stacked with a shared x axis, so that
    a higher-is-better and a lower-is-better measure never share an axis (say the direction in the axis label)."""
    fmt = figure_format(path)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 1.1 * len(groups) + 2), 1.0 + 2.6 * len(panels)),
                             sharex=True, squeeze=False, layout="constrained")
    for ax, (ylabel, series) in zip(axes[:, 0], panels.items()):
        width = 0.8 / max(len(series), 1)
        for k, (name, vals) in enumerate(series.items()):
            ax.bar([g + k * width for g in range(len(groups))], [float("nan") if v is None else v for v in vals],
                   width=width, label=name)
        ax.set_ylabel(ylabel, fontsize=_FONT + 1)
        ax.grid(alpha=0.3, axis="y")
        if len(series) > 1:
            ax.legend(fontsize=_FONT - 1)
    width = 0.8 / max(max((len(s) for s in panels.values()), default=1), 1)
    axes[-1, 0].set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    axes[-1, 0].set_xticklabels(groups, rotation=20, ha="right", fontsize=_FONT)
    fig.suptitle(title, fontsize=_FONT + 1)
    return _save(fig, path, fmt)


def _save(fig: Figure, path: str | Path, fmt: str) -> Figure:
    """Write ``fig`` atomically in format ``fmt`` (mode ``0o666 & ~umask``; a full disk is a one-line ``cannot write
    <file>`` error with no partial file left) and close it whatever happens; returns it (closed, for inspection)."""
    try:
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, dpi=110, format=fmt)
    finally:
        plt.close(fig)
    return fig
