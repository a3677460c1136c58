"""The demo's report page: its accuracy curves and tracked ranges on one step axis, per-layer SQNR, and the table."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantrain.demo.model import build_model
from quantrain.demo.table import deployment_note, table_rows, timing_note
from quantrain.demo.training import CURVE_TEST_SIZE
from quantrain.qat import QATQuantizer

if TYPE_CHECKING:
    from quantrain.demo.run import DemoResult
    from quantrain.report import TrainingRecorder

__all__ = ["qat_events", "write_demo_report"]

SQNR_IMAGES = 1000  # test images the per-layer SQNR is measured on


def qat_events(quantizer: QATQuantizer, offset: int) -> dict[str, int]:
    """The optimizer steps (counted from the start of float training) where the QAT schedule changes what runs."""
    schedule = quantizer.schedule
    events = {"quantization starts": offset + schedule.quant_start_step}
    if schedule.activation_start != schedule.quant_start_step:
        events["activations quantized"] = offset + schedule.activation_start
    if schedule.freeze_bn_step is not None:
        events["BatchNorm frozen"] = offset + schedule.freeze_bn_step
    if schedule.freeze_range_step is not None:
        events["ranges frozen"] = offset + schedule.freeze_range_step
    return events


def write_demo_report(
    folder: str,
    result: DemoResult,
    recorder: TrainingRecorder,
    quantizer: QATQuantizer,
    x_test: torch.Tensor,
    qat_start: int,
) -> str:
    """The report: accuracy curves, ranges over QAT, SQNR of each layer against its own weights unquantized, the table."""
    from quantrain.report import activation_sqnr, write_report

    sqnr = _labelled(activation_sqnr(None, quantizer, x_test[:SQNR_IMAGES]), quantizer, result.dataset)
    header, *rows = table_rows(result)
    notes = [
        f"{result.dataset}: trained on {result.train_size} images, tested on {result.test_size}; int{result.bits} weights "
        f"(symmetric, per channel) and activations (affine, per tensor), BatchNorm folded; {result.epochs} float epochs, "
        f"then {result.qat_epochs} epochs of QAT, and {result.qat_epochs} of the float control from the same model.",
        _curves_note(result.test_size)
        + " SQNR compares each layer of the QAT model with the same model, same weights, with fake quantization off, "
        f"on {min(SQNR_IMAGES, result.test_size)} test images.",
        timing_note(result)[0].upper() + timing_note(result)[1:],
        deployment_note(result) + ".",
    ]
    table = [dict(zip(header, row, strict=True)) for row in rows]
    path = write_report(
        folder,
        recorder=recorder,
        sqnr=sqnr,
        table=table,
        title=f"quantrain demo: {result.dataset}",
        notes=notes,
        events=qat_events(quantizer, qat_start),
        focus_from=qat_start,
    )
    return str(path)


def _curves_note(test_size: int) -> str:
    if test_size <= CURVE_TEST_SIZE:
        return f"Accuracy curves and the table use all {test_size} test images."
    return f"Accuracy curves use the first {CURVE_TEST_SIZE} test images; the table uses all {test_size}."


def _labelled(sqnr: dict[str, float], quantizer: QATQuantizer, dataset: str) -> dict[str, float]:
    """Each layer named with the float modules it computes: ``0 Conv2d+BatchNorm2d+ReLU`` for a folded chain."""
    kinds = {name: type(module).__name__ for name, module in build_model(dataset).named_modules()}
    groups = {fusion.group[0]: fusion.group for fusion in quantizer.fusions()}
    return {f"{name} {'+'.join(kinds[n] for n in groups.get(name, (name,)))}": value for name, value in sqnr.items()}
