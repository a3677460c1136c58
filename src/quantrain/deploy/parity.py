"""Parity: does the ONNX Runtime model compute what the trained fake-quant model computes?

For each output: top-1 agreement (for 2-D outputs, e.g. logits), the largest absolute difference, also in units of
that output's quantization step where the output is quantized, and the SQNR
``10 * log10(sum(reference^2) / sum((reference - onnx)^2))`` in dB (infinite when they are equal).

Two float32 programs that compute the same formula in different orders round differently, and a deep quantized
model can turn a value that rounds to the other side of a quantization boundary into several output steps further
on. ``float64=True`` measures how much of a difference that explains: it runs a copy of the model in float64 (the
same quantization grids, nearly exact arithmetic) and compares both PyTorch's float32 forward and ONNX Runtime
against it. Where ONNX Runtime is as close to the float64 forward as PyTorch's own float32 forward is, a difference
of a few steps between the two is the model's sensitivity to rounding, not an export error.
"""

from __future__ import annotations

import copy
import math
import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from quantrain.fake_quantizer import FakeQuantizer
from quantrain.graph import example_arguments, output_tensors

__all__ = ["LayerParity", "OutputParity", "ParityReport", "check_parity"]


@dataclass(frozen=True)
class OutputParity:
    name: str
    top1_agreement: float | None
    max_abs_diff: float
    max_diff_in_steps: float | None
    sqnr_db: float


@dataclass(frozen=True)
class LayerParity:
    """One quantization point inside the model (``module.target``), compared after dequantization."""

    label: str
    max_diff_in_steps: float
    sqnr_db: float


@dataclass(frozen=True)
class ParityReport:
    outputs: tuple[OutputParity, ...]
    layers: tuple[LayerParity, ...] = ()
    notes: tuple[str, ...] = ()
    """What may explain a difference: e.g. this CPU's ONNX Runtime saturating int8-weight products."""
    pytorch_vs_float64: tuple[OutputParity, ...] = ()
    """With ``float64=True``: the model's float32 forward against the same model in float64, per output (how far
    float32 rounding alone moves it)."""
    onnx_vs_float64: tuple[OutputParity, ...] = ()
    """With ``float64=True``: ONNX Runtime's outputs against the model in float64."""

    def __str__(self) -> str:
        lines = ["output | top-1 agreement | max |diff| | in quantization steps | SQNR dB"]
        lines += [_row(o) for o in self.outputs]
        if self.layers:
            lines += ["", "layer | max |diff| in quantization steps | SQNR dB"]
            lines += [f"{layer.label} | {layer.max_diff_in_steps:.2f} | {layer.sqnr_db:.1f}" for layer in self.layers]
        if self.pytorch_vs_float64:
            lines += ["", "against the model in float64 | top-1 agreement | max |diff| | in quantization steps | SQNR dB"]
            for who, rows in (("PyTorch float32", self.pytorch_vs_float64), ("ONNX Runtime", self.onnx_vs_float64)):
                lines += [f"{who}: {_row(o)}" for o in rows]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


def _row(o: OutputParity) -> str:
    top1 = "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.2f}%"
    steps = "-" if o.max_diff_in_steps is None else f"{o.max_diff_in_steps:.2f}"
    return f"{o.name} | {top1} | {o.max_abs_diff:.3g} | {steps} | {o.sqnr_db:.1f}"


def check_parity(
    model: nn.Module, onnx_path: str | os.PathLike, inputs: Any, *, per_layer: bool = False, float64: bool = False
) -> ParityReport:
    """Run ``model`` (in eval mode) and the ONNX model at ``onnx_path`` in ONNX Runtime on ``inputs``; compare.

    ``inputs``: a tensor, a tuple of the forward's positional inputs, or a dict of its keyword inputs (in the order
    the export was given them). ``per_layer=True`` also compares every quantization point that the export named
    after its target. ``float64=True`` also runs a copy of the model in float64 and compares both the float32
    model and ONNX Runtime with it (see the module's docstring); the model itself is left as it was.
    """
    session = _session(onnx_path)
    args, kwargs = example_arguments(inputs if not isinstance(inputs, list) else tuple(inputs), what="inputs")
    given = (*args, *kwargs.values())
    feeds = {arg.name: x.detach().cpu().numpy() for arg, x in zip(session.get_inputs(), given, strict=False)}
    if len(feeds) != len(given) or len(given) != len(session.get_inputs()):
        raise ValueError(f"{onnx_path}: the model takes {len(session.get_inputs())} inputs, {len(given)} were given")
    inputs = _Call(args, kwargs)
    reference, steps = _reference(model, inputs)
    produced = session.run(None, feeds)
    if len(produced) != len(reference):
        raise ValueError(f"{onnx_path}: the ONNX model has {len(produced)} outputs, the PyTorch model {len(reference)}")
    outputs = tuple(
        _compare(arg.name, ref, out, step)
        for arg, ref, out, step in zip(session.get_outputs(), reference, produced, steps, strict=True)
    )
    layers = _layers(model, onnx_path, inputs, feeds) if per_layer else ()
    if not float64:
        return ParityReport(outputs, layers, parity_notes(onnx_path, outputs))
    exact = _float64_outputs(model, inputs)
    names = [arg.name for arg in session.get_outputs()]
    pytorch = tuple(_compare(n, e, r, s) for n, e, r, s in zip(names, exact, reference, steps, strict=True))
    onnx_ = tuple(_compare(n, e, p, s) for n, e, p, s in zip(names, exact, produced, steps, strict=True))
    return ParityReport(outputs, layers, parity_notes(onnx_path, outputs, pytorch, onnx_), pytorch, onnx_)


def parity_notes(
    onnx_path: str | os.PathLike,
    outputs: tuple[OutputParity, ...],
    pytorch: tuple[OutputParity, ...] = (),
    onnx_: tuple[OutputParity, ...] = (),
) -> tuple[str, ...]:
    """The notes of a :class:`ParityReport` on these comparisons: what may explain a difference over one step
    (this CPU's int8 kernels, float32 rounding as the float64 comparisons ``pytorch``/``onnx_`` measure it)."""
    return _notes(onnx_path) + _rounding_notes(outputs, pytorch, onnx_)


def _float64_outputs(model: nn.Module, inputs: _Call) -> list[np.ndarray]:
    """The outputs of a float64 copy of ``model`` (eval mode) on ``inputs`` (their float tensors in float64)."""

    def widened(value: Any) -> Any:
        return value.double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value

    twin = copy.deepcopy(model).double().eval()
    call = _Call(tuple(widened(a) for a in inputs.args), {k: widened(v) for k, v in inputs.kwargs.items()})
    with torch.no_grad():
        outputs = list(output_tensors(call(twin)))
    return [o.detach().cpu().numpy() for o in outputs]


def _rounding_notes(
    outputs: tuple[OutputParity, ...], pytorch: tuple[OutputParity, ...] = (), onnx_: tuple[OutputParity, ...] = ()
) -> tuple[str, ...]:
    """For each output more than one step apart: what the float64 comparison says about it (or how to run it)."""
    notes = []
    for i, output in enumerate(outputs):
        if output.max_diff_in_steps is None or output.max_diff_in_steps <= 1 + 1e-4:
            continue
        if not pytorch:
            notes.append(
                f"{output.name}: {output.max_diff_in_steps:.1f} quantization steps apart; check_parity(..., "
                "float64=True) measures how much of that float32 rounding alone explains"
            )
            continue
        own, theirs = pytorch[i].max_diff_in_steps, onnx_[i].max_diff_in_steps
        if theirs <= max(own, 1.0) + 1 + 1e-4:
            notes.append(
                f"{output.name}: PyTorch's own float32 forward is {own:.1f} steps from the float64 forward and ONNX "
                f"Runtime {theirs:.1f}: this model amplifies float32 rounding (a value on the other side of a "
                "quantization boundary grows over the layers after it), so a difference of this size between two "
                "float32 runtimes is expected and not an export error"
            )
        else:
            notes.append(
                f"{output.name}: ONNX Runtime is {theirs:.1f} steps from the model in float64, PyTorch's own float32 "
                f"forward {own:.1f}: more than rounding explains; compare layer by layer with per_layer=True"
            )
    return tuple(notes)


def _notes(onnx_path: str | os.PathLike) -> tuple[str, ...]:
    """Why ONNX Runtime on this machine may differ from the trained model, for the model at ``onnx_path``."""
    import onnx

    from quantrain.deploy.export import wide_int8_weights
    from quantrain.deploy.runtime import u8s8_saturates

    wide = wide_int8_weights(onnx.load(str(onnx_path)).graph)
    if not wide or not u8s8_saturates():
        return ()
    listed = ", ".join(wide[:4]) + (f" and {len(wide) - 4} more" if len(wide) > 4 else "")
    return (
        "ONNX Runtime on this CPU (x86 without VNNI) adds pairs of uint8 x int8 products in 16 bits with "
        f"saturation, so layers whose int8 weights use more than 7 bits ({listed}) can differ from exact integer "
        "arithmetic; export with weight_dtype='uint8' (exact here, somewhat slower) or train 7-bit weights. CPUs "
        "with VNNI compute these weights exactly.",
    )


class _Call:
    """The model's inputs, positional and keyword, applied to a model."""

    def __init__(self, args: tuple, kwargs: dict[str, Any]) -> None:
        self.args, self.kwargs = args, kwargs

    def __call__(self, model: nn.Module) -> Any:
        return model(*self.args, **self.kwargs)


def _layers(model: nn.Module, onnx_path: str | os.PathLike, inputs: _Call, feeds: dict) -> tuple[LayerParity, ...]:
    """Compare each named quantization point of the ONNX model with the fake quantizer of the same label."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph_model = onnx.load(str(onnx_path))
    points = {n.name[: -len("/dequantize")]: n.output[0] for n in graph_model.graph.node if n.name.endswith("/dequantize")}
    graph_model.graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in points.values())
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    produced = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
    captured: dict[str, tuple[np.ndarray, float]] = {}

    def capture(fq: FakeQuantizer, args: tuple, output: torch.Tensor) -> None:
        if fq.label not in captured and fq.scale.numel() == 1:
            # a copy: the forward may change the tensor in place afterwards (torchvision's ResNet: out += identity)
            captured[fq.label] = (output.detach().cpu().numpy().copy(), float(fq.scale))

    handles = [m.register_forward_hook(capture) for m in model.modules() if isinstance(m, FakeQuantizer) and m.activation]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            inputs(model)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    layers = []
    for label, name in points.items():
        if label in captured and produced[name].shape == captured[label][0].shape:
            reference, step = captured[label]
            result = _compare(label, reference, produced[name], step)
            layers.append(LayerParity(label, result.max_diff_in_steps or 0.0, result.sqnr_db))
    return tuple(layers)


def _session(onnx_path: str | os.PathLike):
    import onnx
    import onnxruntime as ort

    if not os.path.isfile(onnx_path):
        raise ValueError(f"{onnx_path}: no such file")
    try:
        onnx.checker.check_model(onnx.load(str(onnx_path)))
        return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # a damaged file surfaces as many exception types from onnx and onnxruntime
        raise ValueError(f"{onnx_path}: not a valid ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def _reference(model: nn.Module, inputs: _Call) -> tuple[list[np.ndarray], list[float | None]]:
    """The model's outputs and, for each, the quantization step of the fake quantizer that produced it (if any)."""
    produced: dict[int, tuple[weakref.ref, float]] = {}

    def remember(fq: FakeQuantizer, args: tuple, output: torch.Tensor) -> None:
        if fq.is_calibrated and fq.scale.numel() == 1:  # by id, checked by a weak reference: ids of freed tensors recur
            produced[id(output)] = (weakref.ref(output), float(fq.scale))

    def step_of(output: torch.Tensor) -> float | None:
        ref, scale = produced.get(id(output), (None, None))
        return scale if ref is not None and ref() is output else None

    handles = [m.register_forward_hook(remember) for m in model.modules() if isinstance(m, FakeQuantizer)]
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            outputs = inputs(model)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    outputs = list(output_tensors(outputs))  # tuples, dicts, Hugging Face outputs: their tensors, in order
    return [o.detach().cpu().numpy() for o in outputs], [step_of(o) for o in outputs]


def _compare(name: str, reference: np.ndarray, produced: np.ndarray, step: float | None) -> OutputParity:
    if reference.shape != produced.shape:
        raise ValueError(f"output {name}: shape {produced.shape} from ONNX Runtime, {reference.shape} from PyTorch")
    diff = np.abs(reference.astype(np.float64) - produced.astype(np.float64))
    noise = float(np.sum(diff**2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
    top1 = None
    if reference.ndim == 2 and reference.shape[1] > 1:
        top1 = float(np.mean(reference.argmax(axis=1) == produced.argmax(axis=1)))
    max_diff = float(diff.max()) if diff.size else 0.0
    return OutputParity(name, top1, max_diff, None if step is None else max_diff / step, sqnr)
