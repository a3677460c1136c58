"""Training reports: accuracy curves, tracked activation ranges and per-layer SQNR, as PNG plots in one HTML page.

Three pieces, usable with any quantizer and any training loop:

* :class:`TrainingRecorder` records metrics you give it (``record_metric``) and, at each counted optimizer step,
  every activation target's tracked range;
* :func:`activation_sqnr` measures, per quantized module, ``10 * log10(sum(f**2) / sum((f - q)**2))`` between the
  float and the quantized model's outputs on the same inputs;
* :func:`write_report` writes ``report.html`` with ``accuracy.png``, ``ranges.png``, ``sqnr.png`` and a final table,
  and ``report.json`` with the data behind the plots and what each drew (axis limits, lines, marked events).

Plots need matplotlib (``pip install 'quantrain[report]'``), imported only by :func:`write_report`; recording and
SQNR need nothing beyond torch.

>>> import torch
>>> from quantrain import QATQuantizer
>>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
>>> quantizer = QATQuantizer(model, [{"op_types": ["Linear"], "target_names": ["weight", "_output_"]}])
>>> optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
>>> recorder = TrainingRecorder(quantizer)
>>> for step in range(4):
...     model(torch.randn(16, 8)).square().mean().backward()
...     optimizer.step()
...     recorder.record_metric("accuracy", quantizer.current_step, 50.0 + step)
>>> recorder.close()
>>> list(recorder.ranges), len(recorder.ranges["2._output_0"].steps)
(['0._output_0', '2._output_0'], 4)
>>> sorted(activation_sqnr(None, quantizer, torch.randn(32, 8)))
['0', '2']

``write_report(out_dir, recorder=recorder, sqnr=sqnr, table=[{"model": "int8", "accuracy %": 97.5}])`` then writes
the page and returns its path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from quantrain.report.page import image_html, render_page, table_html
from quantrain.report.plots import STEP_LABEL, plot_accuracy, plot_ranges, plot_sqnr
from quantrain.report.recorder import RangeHistory, TrainingRecorder
from quantrain.report.sqnr import activation_sqnr, float_reference, sqnr_db

__all__ = [
    "RangeHistory",
    "TrainingRecorder",
    "activation_sqnr",
    "float_reference",
    "sqnr_db",
    "write_report",
]

REPORT_FILE, REPORT_DATA = "report.html", "report.json"
ACCURACY_PNG, RANGES_PNG, SQNR_PNG = "accuracy.png", "ranges.png", "sqnr.png"


def write_report(
    out_dir: str | os.PathLike,
    *,
    recorder: TrainingRecorder | None = None,
    sqnr: Mapping[str, float] | None = None,
    table: Sequence[Mapping[str, object]] | None = None,
    title: str = "quantrain report",
    notes: Sequence[str] = (),
    events: Mapping[str, int] | None = None,
    focus_from: int | None = None,
) -> Path:
    """Write ``report.html``, its PNGs and (with any plot) ``report.json`` into ``out_dir`` (created if needed); return
    the page's path.

    Args:
        recorder: its metrics give ``accuracy.png`` (values in %), its ranges ``ranges.png`` (each only if any),
            both over optimizer steps (see ``TrainingRecorder(step_offset=...)`` to put them on one axis).
        sqnr: ``{layer: dB}`` (as :func:`activation_sqnr` returns) gives ``sqnr.png`` and a table of the values.
        table: the final results, one mapping per row (e.g. model, accuracy, latency, size); floats shown to two
            decimals, anything else as ``str``.
        title: the page's title; ``notes``: paragraphs under it.
        events: ``{label: optimizer step}`` marked on the accuracy and range plots as labelled vertical lines,
            e.g. ``{"quantization starts": 230, "BatchNorm frozen": 286}``.
        focus_from: the accuracy plot gets a second panel from this step on, its y axis zoomed to the values there
            (e.g. where QAT and a float control continue from the same float model).

    ``report.json`` holds the data behind the plots (metrics, range envelopes, SQNR, events) and what each plot
    drew (:func:`quantrain.report.plots.describe`: axis limits, lines, event lines). The page links its images by
    relative path, so the folder can be moved or served as it is.
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    events = dict(events or {})
    sections: list[tuple[str, str]] = []
    drawn: dict[str, object] = {}
    if table:
        sections.append(("Results", table_html(table)))
    if recorder is not None and recorder.metrics:
        drawn[ACCURACY_PNG] = plot_accuracy(recorder.metrics, str(folder / ACCURACY_PNG), events=events, focus_from=focus_from)
        caption = "Test accuracy over optimizer steps, one line per recorded series." + _zoom_text(drawn[ACCURACY_PNG])
        sections.append(
            ("Accuracy over training", image_html(ACCURACY_PNG, "accuracy over steps", caption + _events_text(events)))
        )
    if recorder is not None and recorder.ranges:
        drawn[RANGES_PNG] = plot_ranges(recorder.ranges, str(folder / RANGES_PNG), events=events)
        caption = (
            "Tracked range [min, max] of each quantized activation (the moving average its scale and zero point "
            "come from) at each optimizer step of QAT, on the accuracy plot's step axis; per-channel ranges are shown "
            "as their envelope."
        )
        sections.append(
            ("Tracked activation ranges", image_html(RANGES_PNG, "tracked ranges over steps", caption + _events_text(events)))
        )
    if sqnr:
        drawn[SQNR_PNG] = plot_sqnr(sqnr, str(folder / SQNR_PNG))
        caption = (
            "Per quantized layer, SQNR = 10 log10(sum f\u00b2 / sum (f \u2212 q)\u00b2) between the float (f) and the "
            "quantized (q) layer outputs on the same inputs; about 6 dB per bit, noise accumulating with depth."
        )
        rows = [{"layer": name, "SQNR (dB)": value} for name, value in sqnr.items()]
        sections.append(("Activation SQNR per layer", image_html(SQNR_PNG, "SQNR per layer", caption) + table_html(rows)))
    if drawn:
        data = _report_data(recorder, sqnr, events, focus_from, drawn)
        (folder / REPORT_DATA).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    path = folder / REPORT_FILE
    path.write_text(render_page(title, notes, sections), encoding="utf-8")
    return path


def _zoom_text(drawn: object) -> str:
    panels = drawn["panels"] if isinstance(drawn, dict) else []
    if len(panels) < 2:
        return ""
    low, high = panels[1]["ylim"]
    return f" Left: the whole run; right: the stretch shaded on the left, its y axis zoomed to {low:.2f}-{high:.2f}."


def _events_text(events: Mapping[str, int]) -> str:
    if not events:
        return ""
    listed = "; ".join(f"{label} at step {step}" for label, step in events.items())
    return f" Dotted vertical lines: {listed}."


def _report_data(
    recorder: TrainingRecorder | None,
    sqnr: Mapping[str, float] | None,
    events: Mapping[str, int],
    focus_from: int | None,
    drawn: Mapping[str, object],
) -> dict[str, object]:
    """The JSON behind the page: non-finite numbers as strings ("inf"), so that any JSON reader accepts it."""
    ranges = {}
    for label, history in (recorder.ranges if recorder is not None else {}).items():
        steps, lows, highs = history.envelope()
        ranges[label] = {"steps": steps.tolist(), "min": lows.tolist(), "max": highs.tolist()}
    metrics = {name: [list(point) for point in points] for name, points in (recorder.metrics if recorder else {}).items()}
    data = {
        "step_axis": STEP_LABEL,
        "events": dict(events),
        "focus_from": focus_from,
        "metrics": metrics,
        "ranges": ranges,
        "sqnr": dict(sqnr or {}),
        "plots": dict(drawn),
    }
    return _finite(data)


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
