"""Float forwards that take their parameters as arguments, one per module type.

A quantized module computes its float forward with fake-quantized parameters. For the types registered here that
is a direct call of the functional op (no attribute juggling); any other type falls back to running its own
``forward`` with the parameters substituted for the duration of the call (:func:`substituted_parameters`).

A registered function is called as ``fn(module, params, *args, **kwargs)``, where ``params`` maps every parameter
name of the module to the tensor to use, and the remaining arguments are those of the module's forward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FLOAT_FORWARDS", "register_float_forward", "substituted_parameters"]

FloatForward = Callable[..., object]
FLOAT_FORWARDS: dict[type[nn.Module], FloatForward] = {}


def register_float_forward(*module_types: type[nn.Module]) -> Callable[[FloatForward], FloatForward]:
    """Register ``fn(module, params, *args, **kwargs)`` as the parametrised forward of exactly these types."""

    def register(fn: FloatForward) -> FloatForward:
        for module_type in module_types:
            FLOAT_FORWARDS[module_type] = fn
        return fn

    return register


@register_float_forward(nn.Linear)
def _linear(module: nn.Linear, params: Mapping[str, Tensor], input: Tensor) -> Tensor:
    if input.dim() > 2 and _exporting():
        # a (batch, tokens, features) input as rows of one matrix: ONNX exports that as Gemm, which ONNX Runtime
        # fuses with its int32 bias and the output's quantization (QGemm), where MatMul + Add ran as
        # MatMulIntegerToFloat, a float Add and a QuantizeLinear; the same numbers
        # (only the batch dim is dynamic in an export: constant shapes, which ONNX Runtime moves quantization through)
        middle = [int(size) for size in input.shape[1:-1]]
        rows = F.linear(input.reshape(-1, module.in_features), params["weight"], params["bias"])
        return rows.reshape(-1, *middle, module.out_features)
    return F.linear(input, params["weight"], params["bias"])


def _exporting() -> bool:
    """Whether an ONNX export (either exporter) is tracing the forward; under torch.compile, a constant ``False``."""
    if torch.compiler.is_dynamo_compiling():
        return False
    return torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()


@register_float_forward(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(module: nn.Conv2d, params: Mapping[str, Tensor], input: Tensor) -> Tensor:
    return module._conv_forward(input, params["weight"], params["bias"])


@register_float_forward(nn.Embedding)
def _embedding(module: nn.Embedding, params: Mapping[str, Tensor], input: Tensor) -> Tensor:
    return F.embedding(
        input, params["weight"], module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse
    )


@register_float_forward(nn.LayerNorm)
def _layer_norm(module: nn.LayerNorm, params: Mapping[str, Tensor], input: Tensor) -> Tensor:
    return F.layer_norm(input, module.normalized_shape, params["weight"], params["bias"], module.eps)


@register_float_forward(nn.GroupNorm)
def _group_norm(module: nn.GroupNorm, params: Mapping[str, Tensor], input: Tensor) -> Tensor:
    return F.group_norm(input, module.num_groups, params["weight"], params["bias"], module.eps)


@contextmanager
def substituted_parameters(module: nn.Module, tensors: Mapping[str, Tensor]) -> Iterator[None]:
    """Make ``module.<name>`` return ``tensors[name]`` inside the block; the Parameters are restored after it."""
    saved = {name: module._parameters[name] for name in tensors}
    module._parameters.update(tensors)
    try:
        yield
    finally:
        module._parameters.update(saved)
