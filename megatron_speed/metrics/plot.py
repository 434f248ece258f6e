"""PNG plots of held-out accuracy against wall-clock time, the figure the project is judged by.

Uses matplotlib's object API with the Agg canvas directly, so plotting never touches pyplot's
global state or needs a display. matplotlib is imported only when a plot is drawn: the trainer, the
tools and the GPU tests import this package on hosts whose image has no matplotlib (tools/gpu_check.sh).
Points are `(wall_seconds, accuracy)`; they are plotted in the order given (callers log them in time
order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def _new_axes(title: str) -> tuple[Figure, Axes]:
    """A figure with one labelled axes on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel("wall-clock seconds")
    ax.set_ylabel("held-out accuracy")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Figure, ax: Axes, path: Path) -> Path:
    """Add a legend when something is labelled, write the PNG (creating folders) and return its path."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _hline(ax: Axes, y: float | None, label: str, color: str) -> None:
    if y is not None:
        ax.axhline(y, linestyle="--", color=color, linewidth=1.2, label=label)


def plot_accuracy_vs_time(points: Sequence[tuple[float, float]], path: Path, *, title: str,
                          baseline: float | None,
                          sets: Mapping[str, Sequence[tuple[float, float]]] | None = None) -> Path:
    """One run's held-out accuracy over wall-clock seconds: the pooled curve `points` and, when there
    are several held-out sets, one curve per set (`sets`: label -> points, e.g. "aime24 (avg@16)");
    `baseline` (the warm-start accuracy) is drawn as a dashed horizontal line when given."""
    fig, ax = _new_axes(title)
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", markersize=3, label="held-out accuracy (pooled)" if sets else "held-out accuracy")
    for label, set_points in (sets or {}).items():
        if set_points:
            xs, ys = zip(*set_points, strict=True)
            ax.plot(xs, ys, marker=".", markersize=3, linewidth=1.0, label=label)
    _hline(ax, baseline, f"warm start ({baseline:.3f})" if baseline is not None else "", "gray")
    return _save(fig, ax, path)


def plot_runs(runs: Mapping[str, Sequence[tuple[float, float]]], path: Path, *, title: str,
              target: float | None) -> Path:
    """Several runs' accuracy-vs-time curves on one axes (e.g. RLOO vs SPEED-RLOO); `target` is a
    dashed horizontal line, e.g. the accuracy whose time-to-reach is being compared."""
    fig, ax = _new_axes(title)
    for name, points in runs.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    _hline(ax, target, f"target ({target:.3f})" if target is not None else "", "black")
    return _save(fig, ax, path)


__all__ = ["plot_accuracy_vs_time", "plot_runs"]
