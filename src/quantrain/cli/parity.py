"""``quantrain parity MODEL.onnx``: rebuild the trained fake-quant model and compare it with ONNX Runtime, output by
output, batch by batch combined as if run at once."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from quantrain.cli.common import (
    CHECK_FAILED,
    OK,
    CliError,
    add_command,
    existing_file,
    fraction,
    info,
    non_negative,
    one_line,
    positive,
    progress_enabled,
    require,
)
from quantrain.cli.loading import check_onnx, load_checkpoint, load_inputs, quantized_model
from quantrain.spec import load_quantizer_spec

__all__ = ["add_parser", "run"]

PARITY_EPILOG = """\
Rebuilds the trained fake-quant model and compares it with the ONNX model in ONNX Runtime, output by output:
top-1 agreement (2-D outputs), the largest difference in units of the output's quantization step, and SQNR.

  --model MODULE:FACTORY   FACTORY() returns the float model; MODULE is an importable module (the current
                           folder is searched first) or a path to a .py file, e.g. models.py:build
  --config QUANT.json      the config_list and quantizer options (quantrain.save_quantizer_spec writes it):
                           {"config_list": [...], "quantizer": {"fuse": "auto", "integer_bias": true}}
  --checkpoint STATE.pt    model.state_dict() of the quantized model after QAT (torch.save); loaded weights-only
  --data DATA              inputs: a .pt file holding a tensor (or a dict with key "x" or "inputs"), a .npy
                           file, or a .npz file (key "x" or "inputs", or its only array)

examples:
  quantrain parity model_int8.onnx --model models.py:build --checkpoint qat.pt --config quant.json --data x.npy
  quantrain parity quantrain-demo/digits_int8.onnx --model quantrain.demo:build_digits_model \\
      --checkpoint quantrain-demo/checkpoint.pt --config quantrain-demo/quant.json --data quantrain-demo/test_inputs.npy
  quantrain parity model_int8.onnx ... --min-agreement 0.999 --max-diff-steps 1 --quiet || echo "mismatch"
"""


def add_parser(commands: Any) -> None:
    parity = add_command(
        commands,
        "parity",
        help="compare an ONNX export with the trained fake-quant PyTorch model on data",
        description="Check that the ONNX model computes what the trained fake-quant model computes.",
        epilog=PARITY_EPILOG,
    )
    parity.add_argument("onnx", metavar="MODEL.onnx", help="the exported ONNX model")
    parity.add_argument("--model", required=True, metavar="MODULE:FACTORY", help="builds the float model (see below)")
    parity.add_argument("--checkpoint", required=True, metavar="STATE.pt", help="state_dict of the quantized model")
    parity.add_argument("--config", required=True, metavar="QUANT.json", help="quantizer spec (see below)")
    parity.add_argument("--data", required=True, metavar="DATA", help="inputs: .pt, .npy or .npz (see below)")
    parity.add_argument("--batch-size", type=positive, default=256, help="inputs per ONNX Runtime call (default 256)")
    parity.add_argument("--min-agreement", type=fraction, metavar="FRACTION", help="exit 1 if top-1 agreement is lower")
    parity.add_argument(
        "--max-diff-steps", type=non_negative, metavar="STEPS", help="exit 1 if an output differs by more quantization steps"
    )
    parity.add_argument(
        "--float64",
        action="store_true",
        help="also run the model in float64 and compare PyTorch's float32 forward and ONNX Runtime with it "
        "(how far float32 rounding alone moves the outputs)",
    )
    parity.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    parity.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    require("onnx", "onnxruntime", command="parity")
    for flag, path in (("MODEL.onnx", args.onnx), ("--checkpoint", args.checkpoint), ("--config", args.config)):
        existing_file(path, flag)
    try:
        config_list, options = load_quantizer_spec(args.config)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    check_onnx(args.onnx)
    inputs = load_inputs(args.data)
    model = quantized_model(args.model, config_list, options, args.config, tuple(x[:1] for x in inputs))
    load_checkpoint(model, args.checkpoint)
    model.eval()
    count = len(inputs[0])
    batches = -(-count // args.batch_size)
    batches_text = f"{batches} batch{'es' if batches > 1 else ''}"
    info(args, f"comparing {args.onnx} with {args.model} + {args.checkpoint} on {count} inputs ({batches_text})")
    report = _batched_parity(model, args.onnx, inputs, args.batch_size, progress_enabled(args), args.float64)
    failures = _threshold_failures(report, args.min_agreement, args.max_diff_steps)
    if args.json:
        document = {"onnx": args.onnx, "inputs": count}
        for key in ("outputs", *(("pytorch_vs_float64", "onnx_vs_float64") if args.float64 else ())):
            document[key] = [_finite_dict(dataclasses.asdict(o)) for o in getattr(report, key)]
        print(json.dumps({**document, "notes": list(report.notes), "failures": failures}, indent=1))
    else:
        print(_format_parity(report, args.onnx, count))
    for failure in failures:
        print(f"quantrain: check failed: {failure}", file=sys.stderr)
    return CHECK_FAILED if failures else OK


def _batched_parity(
    model: Any, onnx_path: str, inputs: tuple[torch.Tensor, ...], batch_size: int, progress: bool, float64: bool = False
) -> Any:
    """:func:`quantrain.check_parity` batch by batch, combined as if run at once (see :func:`_combine`); with
    ``float64``, its comparisons with the model in float64 too."""
    from quantrain.deploy.parity import ParityReport, check_parity, parity_notes

    signals: list[float] = []  # the reference's signal power per output, from the forward check_parity runs

    def remember(module: Any, args: Any, output: Any) -> None:
        signals[:] = _powers(output)

    handle = model.register_forward_hook(remember)
    parts: list[tuple[int, Any, list[float]]] = []
    try:
        with _bar(len(inputs[0]), progress) as bar:
            for start in range(0, len(inputs[0]), batch_size):
                batch = tuple(t[start : start + batch_size] for t in inputs)
                signals.clear()
                try:
                    report = check_parity(model, onnx_path, batch if len(batch) > 1 else batch[0], float64=float64)
                except ValueError as exc:  # check_parity's own messages name the file and the mismatch
                    raise CliError(str(exc)) from None
                except Exception as exc:  # PyTorch or ONNX Runtime refusing these inputs (shape, dtype, rank)
                    raise CliError(
                        f"running the models on --data inputs {start}..{start + len(batch[0]) - 1} failed: {one_line(exc)}"
                    ) from None
                parts.append((len(batch[0]), report, list(signals)))
                bar.update(len(batch[0]))
    finally:
        handle.remove()
    outputs = _combine(parts)
    if not float64:
        return ParityReport(outputs, notes=parity_notes(onnx_path, outputs))
    pytorch, onnx_ = _combine(parts, "pytorch_vs_float64"), _combine(parts, "onnx_vs_float64")
    return ParityReport(
        outputs, notes=parity_notes(onnx_path, outputs, pytorch, onnx_), pytorch_vs_float64=pytorch, onnx_vs_float64=onnx_
    )


def _powers(output: Any) -> list[float]:
    """``sum(output^2)`` per output of the model (a tensor or a tuple/list of tensors), in float64."""
    outputs = output if isinstance(output, (tuple, list)) else (output,)
    return [float(o.detach().double().pow(2).sum()) for o in outputs]


def _combine(parts: Sequence[tuple[int, Any, list[float]]], comparison: str = "outputs") -> tuple[Any, ...]:
    """Per output, the batches' results of one comparison of the reports (``comparison``: ``"outputs"``,
    ``"pytorch_vs_float64"``, ``"onnx_vs_float64"``) as one: top-1 agreement weighted by batch size, the largest
    differences, and ``SQNR = 10 log10(sum signal / sum noise)``, each batch's noise recovered from its SQNR and
    signal power as ``signal * 10^(-SQNR / 10)`` (for an all-zero reference, whose SQNR says nothing,
    ``max |diff|^2``). The signal is the fake-quant model's float32 output; for the float64 comparisons it stands
    for the float64 output, from which it differs by float32 rounding."""
    from quantrain.deploy.parity import OutputParity

    total = sum(size for size, _, _ in parts)
    combined = []
    for index, first in enumerate(getattr(parts[0][1], comparison)):
        results = [
            (size, getattr(report, comparison)[index], signal[index] if index < len(signal) else 0.0)
            for size, report, signal in parts
        ]
        agreements = [r.top1_agreement for _, r, _ in results]
        steps = [r.max_diff_in_steps for _, r, _ in results]
        signal = sum(s for _, _, s in results)
        noise = sum(_noise(r, s) for _, r, s in results)
        combined.append(
            OutputParity(
                name=first.name,
                top1_agreement=None if None in agreements else sum(n * r.top1_agreement for n, r, _ in results) / total,
                max_abs_diff=max(r.max_abs_diff for _, r, _ in results),
                max_diff_in_steps=None if None in steps else max(steps),
                sqnr_db=math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf,
            )
        )
    return tuple(combined)


def _noise(result: Any, signal: float) -> float:
    if result.sqnr_db == math.inf:
        return 0.0
    if signal > 0 and math.isfinite(result.sqnr_db):
        return signal * 10 ** (-result.sqnr_db / 10)
    return result.max_abs_diff**2


@contextlib.contextmanager
def _bar(total: int, enabled: bool) -> Iterator[Any]:
    """A tqdm progress bar over ``total`` inputs on stderr; a silent stand-in when disabled or without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        yield _NoBar()
        return
    with tqdm(total=total, unit="input", desc="parity", leave=False, file=sys.stderr) as bar:
        yield bar


class _NoBar:
    def update(self, n: int) -> None:
        return None


def _threshold_failures(report: Any, min_agreement: float | None, max_diff_steps: float | None) -> list[str]:
    failures = []
    if min_agreement is not None:
        rated = [o for o in report.outputs if o.top1_agreement is not None]
        if not rated:
            failures.append("--min-agreement: no output is 2-D (batch, classes), so there is no top-1 agreement")
        failures += [
            f"{o.name}: top-1 agreement {100 * o.top1_agreement:.2f}% is below --min-agreement {100 * min_agreement:.2f}%"
            for o in rated
            if o.top1_agreement < min_agreement
        ]
    if max_diff_steps is not None:
        stepped = [o for o in report.outputs if o.max_diff_in_steps is not None]
        if not stepped:
            failures.append("--max-diff-steps: no output is quantized, so differences have no step")
        failures += [
            f"{o.name}: differs by {o.max_diff_in_steps:.2f} quantization steps, more than --max-diff-steps {max_diff_steps:g}"
            for o in stepped
            if o.max_diff_in_steps > max_diff_steps
        ]
    return failures


def _format_parity(report: Any, onnx_path: str, count: int) -> str:
    from quantrain.summary import format_table

    def table(comparisons: Any) -> str:
        rows = [("output", "top-1 agreement", "max |diff|", "max diff in steps", "SQNR dB")]
        for o in comparisons:
            rows.append(
                (
                    o.name,
                    "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.2f}%",
                    f"{o.max_abs_diff:.4g}",
                    "-" if o.max_diff_in_steps is None else f"{o.max_diff_in_steps:.2f}",
                    f"{o.sqnr_db:.1f}",
                )
            )
        return format_table(rows)

    text = f"{onnx_path} in ONNX Runtime vs the fake-quant model, {count} inputs\n" + table(report.outputs)
    if report.pytorch_vs_float64:
        text += "\n\nPyTorch's float32 forward vs the model in float64\n" + table(report.pytorch_vs_float64)
        text += "\n\nONNX Runtime vs the model in float64\n" + table(report.onnx_vs_float64)
    return text + "".join(f"\nnote: {note}" for note in report.notes)


def _finite_dict(data: dict[str, Any]) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, float) and not math.isfinite(value) else value for key, value in data.items()}
