"""The report's PNG plots, drawn with matplotlib's object API (``Figure``, Agg): no pyplot, no global state.

matplotlib is imported only when a plot is drawn; without it, :func:`figure` raises ``ImportError`` with the
install hint (``pip install 'quantrain[report]'``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from quantrain.report.recorder import RangeHistory

__all__ = ["figure", "plot_accuracy", "plot_ranges", "plot_sqnr", "require_matplotlib"]

DPI = 100
RANGE_COLUMNS = 3
MARKERS = ("o", "s", "^", "D", "v")
LINESTYLES = ("-", "--", "-.", ":")


def require_matplotlib() -> Any:
    """The ``matplotlib.figure`` module, or ``ImportError`` with the install hint."""
    try:
        import matplotlib.figure
    except ImportError:
        raise ImportError("writing a report needs matplotlib: pip install 'quantrain[report]'") from None
    return matplotlib.figure


def figure(width: float, height: float) -> Any:
    """A new ``matplotlib.figure.Figure`` (inches) with constrained layout; ``savefig`` draws it with Agg."""
    return require_matplotlib().Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def plot_accuracy(metrics: Mapping[str, Sequence[tuple[int, float]]], path: str, *, ylabel: str = "test accuracy (%)") -> None:
    """One line per metric series over steps."""
    fig = figure(8, 4.5)
    ax = fig.add_subplot()
    for index, (name, points) in enumerate(metrics.items()):
        steps, values = zip(*points, strict=True) if points else ((), ())
        style = {"marker": MARKERS[index % len(MARKERS)], "linestyle": LINESTYLES[index % len(LINESTYLES)]}
        ax.plot(steps, values, markersize=3, linewidth=1.5, label=name, **style)  # styles differ: equal curves both show
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    fig.savefig(path)


def plot_ranges(ranges: Mapping[str, RangeHistory], path: str) -> None:
    """One panel per activation target: its tracked ``[min, max]`` over steps (per-channel ranges: the envelope)."""
    labels = list(ranges)
    columns = min(RANGE_COLUMNS, max(1, len(labels)))
    rows = max(1, math.ceil(len(labels) / columns))
    fig = figure(4 * columns, 2.6 * rows)
    axes = fig.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        if index >= len(labels):
            ax.set_visible(False)
            continue
        steps, lows, highs = (t.numpy() for t in ranges[labels[index]].envelope())
        ax.fill_between(steps, lows, highs, alpha=0.25, color="tab:blue", linewidth=0)
        ax.plot(steps, highs, color="tab:blue", linewidth=1.2, label="max")
        ax.plot(steps, lows, color="tab:orange", linewidth=1.2, label="min")
        ax.set_title(labels[index], fontsize=10)
        ax.grid(True, alpha=0.3)
        if index % columns == 0:
            ax.set_ylabel("tracked range")
        if index + columns >= len(labels):  # the lowest panel of its column
            ax.set_xlabel("quantizer step")
    axes.flat[0].legend(loc="best", fontsize=8)
    fig.savefig(path)


def plot_sqnr(sqnr: Mapping[str, float], path: str) -> None:
    """Horizontal bars, one per layer in model order, labelled with their dB (``inf``: drawn at the largest finite)."""
    names = list(sqnr)
    values = [sqnr[name] for name in names]
    finite = [v for v in values if math.isfinite(v)]
    cap = max(finite, default=1.0)
    shown = [v if math.isfinite(v) else (cap if v > 0 else 0.0) for v in values]
    fig = figure(8, 1.2 + 0.45 * len(names))
    ax = fig.add_subplot()
    positions = range(len(names))
    ax.barh(positions, shown, color="tab:green")
    ax.set_yticks(list(positions), names)
    ax.invert_yaxis()  # first layer on top
    for position, value, width in zip(positions, values, shown, strict=True):
        ax.annotate(_db(value), (width, position), xytext=(3, 0), textcoords="offset points", va="center", fontsize=9)
    ax.set_xlabel("SQNR (dB), float vs quantized activations")
    ax.set_xlim(0, max(shown, default=1.0) * 1.15 or 1.0)
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path)


def _db(value: float) -> str:
    return f"{value:.1f} dB" if math.isfinite(value) else ("inf" if value > 0 else "-inf")
