"""Matplotlib figures written to PNG files (headless: the Agg backend). Shared by the evaluation
commands."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def line_plot(path: str | Path, series: dict[str, Sequence[tuple[float, float]]], *,
              title: str, xlabel: str, ylabel: str, log2_x: bool = False,
              ylim: tuple[float, float] | None = None) -> Path:
    """One line (with markers) per series of (x, y) points, sorted by x."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for label, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    if log2_x:
        ax.set_xscale("log", base=2)
        xs = sorted({p[0] for pts in series.values() for p in pts})
        ax.set_xticks(xs, [f"{int(x) // 1024}K" if x >= 1024 else str(int(x)) for x in xs])
    _finish(ax, title, xlabel, ylabel, ylim, legend=bool(series))
    return _save(fig, path)


def small_multiples(path: str | Path,
                    panels: dict[str, dict[str, Sequence[tuple[float, float]]]], *,
                    title: str, xlabel: str, ylabel: str, log2_x: bool = False,
                    ylim: tuple[float, float] | None = None, columns: int = 4) -> Path:
    """One small line plot per panel (same series in each), sharing axes and one legend."""
    rows = max(1, -(-len(panels) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), dpi=110,
                             sharex=True, sharey=True, squeeze=False)
    handles: dict[str, object] = {}
    for ax, (panel, series) in zip(axes.flat, panels.items(), strict=False):
        for label, points in series.items():
            points = sorted(points)
            (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                              markersize=3, label=label)
            handles.setdefault(label, line)
        ax.set_title(panel, fontsize=9)
        ax.grid(True, alpha=0.3)
        if log2_x:
            ax.set_xscale("log", base=2)
        if ylim:
            ax.set_ylim(*ylim)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    xs = sorted({p[0] for series in panels.values() for pts in series.values() for p in pts})
    for ax in list(axes.flat)[:len(panels)]:
        ax.tick_params(labelbottom=True, labelleft=True, labelsize=7)
        if log2_x:
            ax.set_xticks(xs, [f"{int(x) // 1024}K" if x >= 1024 else str(int(x)) for x in xs])
    fig.supxlabel(xlabel)
    fig.supylabel(ylabel)
    fig.suptitle(title)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    return _save(fig, path, tight=False)


def scatter_plot(path: str | Path, points: dict[str, Sequence[tuple[float, float]]], *,
                 title: str, xlabel: str, ylabel: str,
                 ylim: tuple[float, float] | None = None) -> Path:
    """One marker group per label; each point annotated with nothing, labels in the legend."""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for label, pts in points.items():
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=label, s=36)
    _finish(ax, title, xlabel, ylabel, ylim, legend=bool(points))
    return _save(fig, path)


def grouped_bars(path: str | Path, categories: Sequence[str],
                 panels: dict[str, dict[str, Sequence[float | None]]], *, title: str,
                 xlabel: str, ylabel: str, reference: float | None = None,
                 ylim: tuple[float, float] | None = None) -> Path:
    """Side-by-side panels of grouped bars: in each panel, one group per category (x axis) and
    one bar per series (value i of a series belongs to category i; None leaves a gap).
    `reference` draws a dashed horizontal line (e.g. 1.0 for a speedup)."""
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.5),
                             dpi=120, squeeze=False)
    for ax, (panel, series) in zip(axes.flat, panels.items(), strict=False):
        width = 0.8 / max(1, len(series))
        for k, (label, values) in enumerate(series.items()):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(categories))]
            kept = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
            ax.bar([x for x, _ in kept], [v for _, v in kept], width=width, label=label)
        if reference is not None:
            ax.axhline(reference, color="black", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(categories)), list(categories))
        _finish(ax, panel, xlabel, ylabel, ylim, legend=bool(series))
    fig.suptitle(title)
    return _save(fig, path)


def heatmap(path: str | Path, matrix: Sequence[Sequence[float]], *, title: str, xlabel: str,
            ylabel: str, colorbar_label: str) -> Path:
    """A matrix as an image, row 0 at the top, with a colour bar."""
    rows, cols = len(matrix), len(matrix[0]) if matrix else 0
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * cols + 2), max(3.0, 0.3 * rows + 1.5)),
                           dpi=120)
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label=colorbar_label)
    if cols <= 48:
        ax.set_xticks(range(cols))
    if rows <= 48:
        ax.set_yticks(range(rows))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(fig, path)


def _finish(ax, title, xlabel, ylabel, ylim, legend: bool) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=8, loc="best")


def _save(fig, path: str | Path, tight: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
