"""The demo's results table (printed, and in the report), its notes, and the list of files and commands it prints."""

from __future__ import annotations

import os
import shlex
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quantrain.demo.artifacts import Artifacts
    from quantrain.demo.run import DemoResult

__all__ = ["format_files", "format_table", "table_rows", "timing_note"]

LATENCY_BATCH = 512  # ONNX Runtime latency: the median time for one batch of (at most) this many test images


def format_table(result: DemoResult) -> str:
    """The table, then what its columns mean (dataset, what is timed, how latency is measured)."""
    rows = table_rows(result)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join([*lines, *(f"  {note}" for note in table_notes(result))])


def table_rows(result: DemoResult) -> list[tuple[str, ...]]:
    """The header and the rows of the final table (the printed table and the report's)."""
    base, more = str(result.epochs), f"{result.epochs} + {result.qat_epochs}"
    rows = [
        ("model", "epochs", "test accuracy", "train time", "ORT latency", "size"),
        ("float32", base, f"{result.float_accuracy:.2f}%", f"{result.float_seconds:.1f} s", "", ""),
        (
            f"float32 + {result.qat_epochs} epochs (control)",
            more,
            f"{result.control_accuracy:.2f}%",
            f"{result.control_seconds:.1f} s",
            *_deployed(result, "float"),
        ),
        (
            f"int{result.bits} QAT (fake-quant)",
            f"{more} QAT",
            f"{result.qat_accuracy:.2f}%",
            f"{result.qat_seconds:.1f} s",
            "",
            "",
        ),
    ]
    if result.deployment is not None:
        accuracy = f"{result.deployment.int8_accuracy:.2f}%"
        rows.append((f"int{result.bits} in ONNX Runtime", f"{more} QAT", accuracy, "", *_deployed(result, "int8")))
    return rows


def table_notes(result: DemoResult) -> list[str]:
    """What the table's numbers are, one sentence each."""
    data = f"{result.dataset}: tested on {result.test_size} images, trained on {result.train_size}"
    if result.dataset == "fashion-mnist":
        data += " of the 60000 training images"
    return [data + ".", timing_note(result), deployment_note(result) + "."]


def timing_note(result: DemoResult) -> str:
    return (
        f"train time: wall time of the epochs a row adds ({result.epochs} float; {result.qat_epochs} more for the control "
        f"and for QAT, each from the float32 model), measured after an untimed {result.warmup_seconds:.1f} s warm-up "
        "(first steps, native kernel build) and without the report's evaluations."
    )


def deployment_note(result: DemoResult) -> str:
    if result.deployment is None:
        return "install onnx and onnxruntime (pip install 'quantrain[demo]') for the ONNX Runtime rows"
    batch = "the whole test set" if result.test_size <= LATENCY_BATCH else f"{LATENCY_BATCH} test images"
    return (
        f"ORT latency: median time for {batch} in one batch; the int{result.bits} model in ONNX Runtime agrees with "
        f"its fake-quant twin on {result.deployment.top1_agreement:.2f}% of images"
    )


def _deployed(result: DemoResult, which: str) -> tuple[str, str]:
    deployment = result.deployment
    if deployment is None:
        return "", ""
    latency, size = (
        (deployment.int8_latency_ms, deployment.int8_bytes)
        if which == "int8"
        else (deployment.float_latency_ms, deployment.float_bytes)
    )
    return f"{latency:.2f} ms", f"{size / 1024:.1f} KiB"


def format_files(artifacts: Artifacts, results_json: str | None = None, report_note: str | None = None) -> str:
    """Where each file went, and the ``quantrain`` commands that work on them (shell-quoted)."""
    rows = artifacts.listing(results_json)
    width = max(len(what) for what, _ in rows)
    folder = artifacts.folder
    lines = [f"files in {folder}{'' if folder.endswith(os.sep) else os.sep} ({os.path.abspath(folder)}):"]
    lines += [f"  {what.ljust(width)}  {path}" for what, path in rows]
    if report_note:
        lines.append(f"  {report_note}")
    lines.append("try:")
    lines += [f"  {shlex.join(command)}" for command in artifacts.commands()]
    return "\n".join(lines)
