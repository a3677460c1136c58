"""The report's PNG plots, drawn with matplotlib's object API (``Figure``, Agg): no pyplot, no global state.

Every plot over training uses one axis, optimizer steps, and can mark events on it (``{label: step}``, e.g. where
quantization starts and where BatchNorm is frozen) as labelled vertical lines. Each ``plot_*`` function saves its
PNG and returns :func:`describe` of what it drew (axis limits, lines and their styles, event lines), which
:func:`quantrain.report.write_report` keeps in ``report.json``.

matplotlib is imported only when a plot is drawn; without it, :func:`figure` raises ``ImportError`` with the
install hint (``pip install 'quantrain[report]'``).

>>> zoomed_limits([99.0, 99.4, 98.0], min_span=1.0)  # the data's range, 15% more at each end
(97.79, 99.61)
>>> zoomed_limits([97.0, 97.0], min_span=1.0)        # at least min_span wide, around the data
(96.35, 97.65)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from quantrain.report.recorder import RangeHistory

__all__ = ["describe", "figure", "plot_accuracy", "plot_ranges", "plot_sqnr", "require_matplotlib", "zoomed_limits"]

DPI = 100
RANGE_COLUMNS = 3
STEP_LABEL = "optimizer step"
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v")
EVENT_COLOR = "#444444"
EVENT_GID = "event:"  # the gid prefix of an event's vertical line (describe() finds them by it)
ZOOM_PAD = 0.15  # the zoomed axis extends this fraction of the data's span beyond it at each end


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


def zoomed_limits(values: Sequence[float], *, min_span: float) -> tuple[float, float]:
    """Axis limits around ``values``: their range, widened to at least ``min_span``, plus a margin at each end."""
    low, high = min(values), max(values)
    if high - low < min_span:
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    pad = ZOOM_PAD * (high - low)
    return round(low - pad, 10), round(high + pad, 10)


def plot_accuracy(
    metrics: Mapping[str, Sequence[tuple[int, float]]],
    path: str,
    *,
    ylabel: str = "test accuracy (%)",
    events: Mapping[str, int] | None = None,
    focus_from: int | None = None,
    min_span: float = 1.0,
) -> dict[str, Any]:
    """One line per metric series over optimizer steps, each with its own colour, line style and marker.

    ``events`` are marked on every panel. With ``focus_from`` a second panel shows the steps from there on, its
    y axis zoomed to the values there (spanning at least ``min_span``), so that curves close together (QAT and a
    float control near 99%) separate; the first panel shades that stretch.
    """
    series = {name: points for name, points in metrics.items() if points}
    last = max((step for points in series.values() for step, _ in points), default=0)
    focused = [value for points in series.values() for step, value in points if focus_from is not None and step >= focus_from]
    fig = figure(12 if focused else 8, 4.8)
    axes = list(fig.subplots(1, 2 if focused else 1, squeeze=False).flat)
    for ax in axes:
        for index, (name, points) in enumerate(series.items()):
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=name, **_series_style(index, len(series)))
        ax.set_xlabel(STEP_LABEL)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(ylabel)
    if focused:
        whole, zoom = axes
        whole.set_title("whole run", fontsize=10)
        whole.axvspan(focus_from, last, color="0.5", alpha=0.12, linewidth=0)
        zoom.set_title(f"from step {focus_from}, zoomed", fontsize=10)
        zoom.set_xlim(focus_from - 0.02 * max(1, last - focus_from), last + 0.02 * max(1, last - focus_from))
        zoom.set_ylim(*zoomed_limits(focused, min_span=min_span))
    curves = [tuple(zip(*points, strict=True)) for points in series.values()]
    for ax in axes:
        _mark_events(ax, events or {}, curves)
    if series:
        fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=min(4, len(series)))
    fig.savefig(path)
    return {"panels": [describe(ax) for ax in axes]}


def _series_style(index: int, count: int) -> dict[str, Any]:
    """Colour, line style and marker all differ between neighbours; earlier series are wider, with larger markers,
    and drawn below, so that two equal curves both show (a small marker inside a larger one, a narrow line on a
    wide one)."""
    rank = count - 1 - index  # 0 for the last series, drawn on top
    return {
        "color": COLORS[index % len(COLORS)],
        "linestyle": LINESTYLES[index % len(LINESTYLES)],
        "marker": MARKERS[index % len(MARKERS)],
        "markersize": 4.0 + 1.5 * min(rank, 2),
        "linewidth": 1.4 + 0.9 * min(rank, 2),
        "zorder": 2 + index,
    }


def _mark_events(ax: Any, events: Mapping[str, int], curves: Sequence[tuple[Sequence[float], Sequence[float]]]) -> None:
    """A dotted vertical line per event, labelled along it (rotated, just right of it) at the top of the panel, its
    bottom or its middle: wherever the ``curves`` (``(xs, ys)`` polylines, xs increasing) cross the label least."""
    (x_low, x_high), (y_low, y_high) = ax.get_xlim(), ax.get_ylim()
    for label, step in events.items():
        ax.axvline(step, color=EVENT_COLOR, linestyle=(0, (2, 2)), linewidth=1.1, zorder=1.5, gid=EVENT_GID + label)
        spans = _spans(curves, step, step + LABEL_WIDTH * (x_high - x_low))
        occupied = [((low - y_low) / (y_high - y_low or 1.0), (high - y_low) / (y_high - y_low or 1.0)) for low, high in spans]
        y, va, dy = min(_LABEL_PLACES, key=lambda place: _crossing(occupied, place[0]))[1]
        ax.annotate(
            f"{label} ({step})",
            xy=(step, y),
            xycoords=("data", "axes fraction"),
            xytext=(3, dy),
            textcoords="offset points",
            rotation=90,
            ha="left",
            va=va,
            fontsize=8,
            color=EVENT_COLOR,
            bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.75},
        )


LABEL_WIDTH = 0.035  # the x-range fraction an event's rotated label covers, right of its line
# (the label's extent in axes fraction, its anchor): top, bottom, middle, preferred in that order on a tie
_LABEL_PLACES = (((0.55, 1.0), (1, "top", -4)), ((0.0, 0.45), (0, "bottom", 4)), ((0.275, 0.725), (0.5, "center", 0)))


def _spans(curves: Sequence[tuple[Sequence[float], Sequence[float]]], x0: float, x1: float) -> list[tuple[float, float]]:
    """Per curve, the y-interval its polyline covers between ``x0`` and ``x1`` (curves outside it left out)."""
    import numpy as np

    spans = []
    for xs, ys in curves:
        xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if len(xs) == 0 or xs[-1] < x0 or xs[0] > x1:
            continue
        inside = ys[(xs >= x0) & (xs <= x1)]
        ends = np.interp([max(x0, xs[0]), min(x1, xs[-1])], xs, ys)
        values = np.concatenate([inside, ends])
        spans.append((float(values.min()), float(values.max())))
    return spans


def _crossing(occupied: Sequence[tuple[float, float]], extent: tuple[float, float]) -> float:
    """How much of ``extent`` the ``occupied`` intervals cover, plus a little for each that touches it."""
    low, high = extent
    return sum(max(0.0, min(b, high) - max(a, low)) + (0.01 if a <= high and b >= low else 0.0) for a, b in occupied)


def plot_ranges(ranges: Mapping[str, RangeHistory], path: str, *, events: Mapping[str, int] | None = None) -> dict[str, Any]:
    """One panel per activation target: its tracked ``[min, max]`` over optimizer steps (per-channel ranges: the
    envelope), with ``events`` marked."""
    labels = list(ranges)
    columns = min(RANGE_COLUMNS, max(1, len(labels)))
    rows = max(1, math.ceil(len(labels) / columns))
    fig = figure(4 * columns, 2.8 * rows)
    grid = fig.subplots(rows, columns, squeeze=False)
    drawn = []
    for index, ax in enumerate(grid.flat):
        if index >= len(labels):
            ax.set_visible(False)
            continue
        steps, lows, highs = (t.numpy() for t in ranges[labels[index]].envelope())
        ax.fill_between(steps, lows, highs, alpha=0.25, color="tab:blue", linewidth=0)
        ax.plot(steps, highs, color="tab:blue", linewidth=1.2, label="max")
        ax.plot(steps, lows, color="tab:orange", linewidth=1.2, label="min")
        ax.set_title(labels[index], fontsize=10)
        ax.grid(True, alpha=0.3)
        _mark_events(ax, events or {}, [(steps, lows), (steps, highs)])
        if index % columns == 0:
            ax.set_ylabel("tracked range")
        if index + columns >= len(labels):  # the lowest panel of its column
            ax.set_xlabel(STEP_LABEL)
        drawn.append(ax)
    if drawn:
        fig.legend(*drawn[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=9)
    fig.savefig(path)
    return {"panels": [describe(ax) for ax in drawn]}


def plot_sqnr(sqnr: Mapping[str, float], path: str) -> dict[str, Any]:
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
    return {"panels": [describe(ax)]}


def describe(ax: Any) -> dict[str, Any]:
    """What a drawn panel shows: title, axis labels and limits, its labelled lines with their styles, and its event
    lines with whether their label is written on the panel."""
    from matplotlib.colors import to_hex

    texts = {text.get_text() for text in ax.texts}
    lines, events = [], []
    for line in ax.get_lines():
        gid = line.get_gid() or ""
        if gid.startswith(EVENT_GID):
            label, step = gid[len(EVENT_GID) :], float(line.get_xdata()[0])
            events.append({"label": label, "step": step, "labelled": f"{label} ({step:g})" in texts})
        elif not line.get_label().startswith("_"):
            style = {"color": to_hex(line.get_color()), "linestyle": line.get_linestyle(), "marker": line.get_marker()}
            lines.append({"label": line.get_label(), **style})
    return {
        "title": ax.get_title(),
        "xlabel": ax.get_xlabel(),
        "ylabel": ax.get_ylabel(),
        "xlim": [float(v) for v in ax.get_xlim()],
        "ylim": [float(v) for v in ax.get_ylim()],
        "lines": lines,
        "events": events,
    }


def _db(value: float) -> str:
    return f"{value:.1f} dB" if math.isfinite(value) else ("inf" if value > 0 else "-inf")
