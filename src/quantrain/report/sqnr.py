"""Per-layer signal-to-quantization-noise ratio between a float model and its quantized twin.

For each quantized module, with ``f`` the float model's output and ``q`` the quantized model's output of the same
module on the same inputs (every element of every call, summed in float64)::

    SQNR_dB = 10 * log10( sum(f ** 2) / sum((f - q) ** 2) )

so 6.02 dB is one bit: a uniform b-bit quantizer that spans the signal gives about ``6.02 * b`` dB, less for
signals with outliers. ``inf`` means no error at all. Errors accumulate through the network: a layer's SQNR
includes the noise of every quantized layer before it, which is what the deployed model sees.

Modules are matched by name. A quantized module with a folded BatchNorm (and activation) outputs the whole fused
chain, so it is compared with the float output of the chain's last module (the ``group`` of its fusion).

The float model can be a copy taken before quantizing (its difference then includes what training changed since),
or, the default, :func:`float_reference`: a copy of the quantized model with fake quantization off, the same
weights unquantized, so the SQNR is quantization noise only.

>>> import torch
>>> from quantrain import PtqQuantizer
>>> model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
>>> with torch.no_grad():
...     _ = model[0].weight.copy_(torch.eye(2))
>>> config_list = [{"op_types": ["Linear"], "target_names": ["_output_"], "quant_dtype": "int8", "quant_scheme": "symmetric"}]
>>> ptq = PtqQuantizer(model.eval(), config_list)
>>> x = torch.tensor([[1.27, 0.013], [-0.5, 0.004]])   # int8 symmetric: scale 1.27 / 127 = 0.01
>>> ptq.track_forward(x)
>>> _ = ptq.compress()
>>> sqnr = activation_sqnr(None, ptq, x)                 # errors 0.003 and 0.004: noise 2.5e-5
>>> round(sqnr["0"], 2), round(10 * math.log10((1.27**2 + 0.013**2 + 0.5**2 + 0.004**2) / 2.5e-5), 2)
(48.72, 48.72)
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from quantrain.base import LINK_ATTRIBUTE, Quantizer
from quantrain.fake_quantizer import FakeQuantizer

__all__ = ["activation_sqnr", "float_reference", "sqnr_db"]


def sqnr_db(signal: float, noise: float) -> float:
    """``10 * log10(signal / noise)`` for sums of squares: ``inf`` without noise, ``-inf`` for noise without signal.

    >>> sqnr_db(100.0, 1.0), sqnr_db(1.0, 0.0), sqnr_db(0.0, 1.0)
    (20.0, inf, -inf)
    """
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def float_reference(quantized: Quantizer | nn.Module) -> nn.Module:
    """A deep copy of the quantized model with every fake quantizer off: the same (folded) weights, unquantized.

    The copy has no quantizer (it counts no steps); the model itself is not changed.
    """
    model = _quantizer_of(quantized).bound_model
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if isinstance(module, FakeQuantizer):
            module.enable_fake_quant(False)
    return reference


@torch.no_grad()
def activation_sqnr(
    float_model: nn.Module | None, quantized: Quantizer | nn.Module, inputs: Tensor | Sequence[Any]
) -> dict[str, float]:
    """SQNR in dB of each quantized module's output (see the module docstring), both models in eval mode.

    Args:
        float_model: the float model with the same module names, or ``None`` for :func:`float_reference`.
        quantized: the quantizer, or the model it quantized.
        inputs: one batch: a tensor, or a tuple/list of the forward's positional arguments.

    Returns:
        ``{module name: SQNR in dB}`` in the quantizer's order, for the modules that ran.
    """
    quantizer = _quantizer_of(quantized)
    model = quantizer.bound_model
    float_model = float_reference(quantizer) if float_model is None else _unwrap(float_model)
    if float_model is model:
        raise ValueError("float_model is the quantized model itself; pass a copy taken before quantizing, or None")
    pairs = _reference_names(quantizer)
    float_modules = dict(float_model.named_modules())
    missing = sorted({ref for ref in pairs.values() if ref not in float_modules})
    if missing:
        raise ValueError(f"float_model has no module named {', '.join(map(repr, missing))}: it must be a copy of the same model")
    args = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)

    reference: dict[str, list[list[Tensor]]] = {name: [] for name in pairs}
    capture = {name: _Capture(reference[name]) for name in pairs}
    with _eval_mode(float_model), _hooks(float_modules[ref].register_forward_hook(capture[q]) for q, ref in pairs.items()):
        float_model(*args)

    quantized_modules = quantizer.quantized_modules
    compare = {name: _Compare(name, reference[name]) for name in pairs}
    with _eval_mode(model), _hooks(quantized_modules[name].register_forward_hook(compare[name]) for name in pairs):
        model(*args)
    return {name: c.result() for name, c in compare.items() if c.calls}


def _quantizer_of(quantized: Quantizer | nn.Module) -> Quantizer:
    if isinstance(quantized, Quantizer):
        return quantized
    if isinstance(quantized, nn.Module):
        link = _unwrap(quantized).__dict__.get(LINK_ATTRIBUTE)
        if link is not None and link.quantizer is not None:
            return link.quantizer
        raise ValueError(f"{type(quantized).__name__} is not quantized by a live quantrain quantizer")
    raise TypeError(f"expected a quantrain Quantizer or the model it quantized, got {type(quantized).__name__}")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _reference_names(quantizer: Quantizer) -> dict[str, str]:
    """``{quantized module: float module to compare with}``: a fused chain's last module for folded layers."""
    ends = {fusion.group[0]: fusion.group[-1] for fusion in quantizer.fusions()}
    return {name: ends.get(name, name) for name in quantizer.quantized_modules}


def _float_tensors(output: Any) -> list[Tensor]:
    """The floating-point tensors of a module's output (tensors, or nested tuples, lists and dicts of them)."""
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _float_tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _float_tensors(item)]
    return []


class _Capture:
    """Forward hook on the float model: keeps a copy of each call's outputs (a later in-place op may change them)."""

    def __init__(self, calls: list[list[Tensor]]) -> None:
        self.calls = calls

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.calls.append([t.detach().clone() for t in _float_tensors(output)])


class _Compare:
    """Forward hook on the quantized model: sums of ``f**2`` and ``(f - q)**2`` against the float model's calls."""

    def __init__(self, name: str, reference: list[list[Tensor]]) -> None:
        self.name = name
        self.reference = reference
        self.calls = 0
        self.signal: Tensor | float = 0.0
        self.noise: Tensor | float = 0.0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.calls >= len(self.reference):
            raise ValueError(f"module {self.name!r} ran more often in the quantized model than in the float model")
        expected, actual = self.reference[self.calls], _float_tensors(output)
        self.calls += 1
        if len(expected) != len(actual) or any(f.shape != q.shape for f, q in zip(expected, actual, strict=False)):
            raise ValueError(f"module {self.name!r}: the float and quantized models' outputs differ in structure or shape")
        for f, q in zip(expected, actual, strict=True):
            f, q = f.double(), q.detach().double()
            self.signal = self.signal + f.square().sum()
            self.noise = self.noise + (f - q).square().sum()

    def result(self) -> float:
        return sqnr_db(float(self.signal), float(self.noise))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block (ranges frozen, BatchNorm on running statistics); each module's mode restored."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _hooks(handles: Any) -> Iterator[None]:
    registered = list(handles)
    try:
        yield
    finally:
        for handle in registered:
            handle.remove()
