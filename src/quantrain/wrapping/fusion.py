"""Fusion: Conv/Linear + BatchNorm (+ ReLU/ReLU6) folded during QAT, and activation fusion.

A fused layer keeps every module where it is. The conv (or linear) gets a ``fusion`` child and computes the whole
chain; the BatchNorm becomes a pass-through (its class derived as ``Folded<Name>``) that checks it receives the
conv's output; a ReLU or ReLU6 module becomes a pass-through for the fused output (``Fused<Name>``; any other input
it still clamps), as in torch.ao, where the fused module's output goes straight to its output quantizer, which
applies the activation's clamp (see ``CLAMPS``) and then quantizes. For ReLU6 that keeps the top of the range where
rounding puts it: ``round(6 / s) * s``, up to half a step above 6, as the integer kernel of the export computes it
(the export then has no float Clip after the layer).

With ``s = gamma / sqrt(running_var + eps)`` (per output channel), the layer computes, while BN is live
(training mode and not frozen), the paper's folding with the batch-statistics correction::

    y = conv(x, fq(w * s)) / s + b            # weights quantized folded with the running statistics
    y = batch_norm(y)                          # batch statistics; running statistics keep updating

which equals ``batch_norm(conv(x, w) + b)`` up to weight quantization, and sends gradients to w, gamma and beta
whether or not the conv has a bias. Once BN is frozen (or in eval mode) it computes what an integer engine runs::

    y = conv(x, fq(w * s), fq(beta + (b - running_mean) * s))

Channels with gamma = 0 use s = 1 in the live formula (the BN output is beta there anyway, and gamma still gets
its gradient); the standard deviation is floored at 1e-12, so tiny variances stay finite.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from quantrain.distributed import synced_batch_norm, world_size
from quantrain.graph import is_capturing
from quantrain.ops import native
from quantrain.ops.fake_quant import clamp_with_mask
from quantrain.wrapping.derived import DerivedModule, derived_class, restore_class

__all__ = [
    "ACTIVATIONS",
    "CLAMPS",
    "FUSED_MODULES",
    "FoldedBatchNorm",
    "FusedReLU",
    "Fusion",
    "fold_parameters",
    "fold_factor",
    "link_folded_bn",
    "link_fused_relu",
    "unlink_folded_bn",
    "unlink_fused_relu",
]


CLAMPS: dict[str, tuple[float, float | None]] = {"relu": (0.0, None), "relu6": (0.0, 6.0)}
"""Each fusable activation as the clamp it is."""
FUSED_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6}
"""The module type of each fusable activation that :func:`link_fused_relu` makes a pass-through."""


def _keeps_mask(x: Tensor) -> bool:
    """Whether the clamp keeps a mask for backward: when a gradient is needed, and not while ``torch.jit.trace``
    records (its graph must not depend on the grad mode, which its check run changes)."""
    return x.requires_grad and torch.is_grad_enabled() and not torch.jit.is_tracing()


def _relu(x: Tensor) -> Tensor:
    return clamp_with_mask(x, 0.0) if _keeps_mask(x) else F.relu(x)


def _relu6(x: Tensor) -> Tensor:
    return clamp_with_mask(x, 0.0, 6.0) if _keeps_mask(x) else F.relu6(x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": _relu, "relu6": _relu6}

MIN_STD = 1e-12


def fold_factor(bn: _BatchNorm) -> Tensor:
    """``gamma / sqrt(running_var + eps)`` per channel (gamma = 1 without affine parameters)."""
    std = torch.sqrt(bn.running_var + bn.eps).clamp_min(MIN_STD)
    return std.reciprocal() if bn.weight is None else bn.weight / std


def fold_parameters(weight: Tensor, bias: Tensor | None, bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """Weight and bias of the single conv/linear equal to ``bn(conv(x))`` with BN's running statistics.

    ``w' = w * s``, ``b' = beta + (b - mean) * s`` with ``s = gamma / sqrt(var + eps)``.
    """
    factor = fold_factor(bn)
    conv_bias = torch.zeros_like(factor) if bias is None else bias
    beta = torch.zeros_like(factor) if bn.bias is None else bn.bias
    return weight * factor.reshape(_channel_shape(weight.dim(), 0)), beta + (conv_bias - bn.running_mean) * factor


def _channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(-1 if dim == axis else 1 for dim in range(ndim))


class Fusion(nn.Module):
    """What a fused layer adds to its first module: the folded BN (if any), the activation, the BN freeze flag.

    The BN is referenced, not owned: it stays in the model where it was (and in the state_dict under its name).
    """

    def __init__(self, group: tuple[str, ...], bn: _BatchNorm | None, activation: str | None) -> None:
        super().__init__()
        self.group = group
        self.activation = activation
        self.__dict__["bn"] = bn
        self.__dict__["relu"] = None  # the ReLU module made a pass-through for this layer's output, if any
        self.register_buffer("bn_frozen", torch.zeros((), dtype=torch.uint8))
        self._bn_frozen = False
        self._last_output: weakref.ref | None = None

    bn: _BatchNorm | None
    relu: nn.Module | None

    def fused_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = self.linear_forward(module, *args, **kwargs)
        return output if self.activation is None else ACTIVATIONS[self.activation](output)

    def linear_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """The fused chain before its activation (the output quantizer can apply that, see ``CLAMPS``)."""
        if self.bn is None:
            return module.float_forward(module.quantized_parameters(), *args, **kwargs)
        return self._folded_forward(module, *args, **kwargs)

    def _folded_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        bn = self.bn
        if not (bn.training and not self._bn_frozen):
            quantize_weight, quantize_bias = _parameter_quantizers(module)
            weight, bias = fold_parameters(module.weight, module.bias, bn)
            return module.float_forward({"weight": quantize_weight(weight), "bias": quantize_bias(bias)}, *args, **kwargs)
        if torch.compiler.is_compiling():
            # Under torch.compile this runs eagerly (a graph break): AOT autograd would recompute the fold factor in
            # the backward from running_var after batch_norm updated it in place, and get the gradients wrong.
            return _live_folded_eagerly(self, module, args, kwargs)
        return self._live_folded_forward(module, *args, **kwargs)

    def _live_folded_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        bn = self.bn
        quantize_weight, quantize_bias = _parameter_quantizers(module)
        factor = fold_factor(bn)
        safe = torch.where(factor == 0, 1.0, factor)
        weight = quantize_weight(module.weight * safe.reshape(_channel_shape(module.weight.dim(), 0)))
        y = module.float_forward({"weight": weight, "bias": None}, *args, **kwargs)
        shape = _channel_shape(y.dim(), 1)
        y = _ChannelDivide.apply(y, safe.reshape(shape))
        if module.bias is not None:
            y = y + module.bias.reshape(shape)
        if "bias" in module.fake_quant:  # track the deployable bias's range while BN is live
            with torch.no_grad():
                quantize_bias(fold_parameters(module.weight, module.bias, bn)[1])
        if isinstance(bn, nn.SyncBatchNorm) and world_size(bn.process_group) > 1:
            return synced_batch_norm(bn, y)  # SyncBatchNorm's own forward runs on GPUs only
        return bn._float_class.forward(bn, y)

    def freeze_bn(self, frozen: bool = True) -> None:
        """Use running statistics from now on (and stop updating them)."""
        self.bn_frozen.fill_(int(frozen))
        self._bn_frozen = bool(frozen)

    @property
    def is_bn_frozen(self) -> bool:
        return self._bn_frozen

    def record(self, output: Any) -> None:
        self._last_output = weakref.ref(output) if isinstance(output, Tensor) else None

    def produced(self, tensor: Tensor) -> bool:
        return self._last_output is not None and self._last_output() is tensor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._bn_frozen = bool(self.bn_frozen.item())

    def __getstate__(self):
        state = super().__getstate__()
        return {**state, "_last_output": None}

    def extra_repr(self) -> str:
        return f"group={self.group}, activation={self.activation}"


class FoldedBatchNorm(DerivedModule):
    """A BatchNorm folded into the layer before it: passes its input through (the layer already applied it)."""

    prefix = "Folded"

    def forward(self, input: Tensor) -> Tensor:
        if is_capturing():  # the graph is the float model's (see quantrain.graph)
            return self._float_class.forward(self, input)
        fusion: Fusion = self.__dict__["_fused_into"]
        if not fusion.produced(input):
            raise ValueError(
                f"fuse_names {fusion.group}: {fusion.group[1]!r} must receive the output of {fusion.group[0]!r} "
                "directly, but got another tensor; fuse only consecutive modules"
            )
        return input


class FusedReLU(DerivedModule):
    """A ReLU or ReLU6 fused into the layer before it: passes that layer's output through (already clamped, to
    ``[0, inf)`` or ``[0, 6]``, then quantized: for ReLU6 the top level ``round(6 / s) * s`` may lie under half a
    step above 6, and stays there, as in the integer kernel), and clamps any other input, so a module reused
    elsewhere in the forward still works. Skipping it keeps one activation-sized tensor fewer for backward, and
    leaves no float Relu/Clip after the layer in the ONNX export."""

    prefix = "Fused"

    def forward(self, input: Tensor) -> Tensor:
        if self.__dict__["_fused_into"].produced(input):
            return input
        return self._float_class.forward(self, input)


def link_fused_relu(relu: nn.Module, fusion: Fusion) -> None:
    relu.__class__ = derived_class(FusedReLU, type(relu))
    relu.__dict__["_fused_into"] = fusion
    fusion.__dict__["relu"] = relu


def unlink_fused_relu(relu: nn.Module) -> None:
    if isinstance(relu, FusedReLU):
        relu.__dict__.pop("_fused_into").__dict__["relu"] = None
        restore_class(relu)


def link_folded_bn(bn: _BatchNorm, fusion: Fusion) -> None:

    bn.__class__ = derived_class(FoldedBatchNorm, type(bn))
    bn.__dict__["_fused_into"] = fusion


def unlink_folded_bn(bn: nn.Module) -> None:
    if isinstance(bn, FoldedBatchNorm):
        bn.__dict__.pop("_fused_into", None)
        restore_class(bn)


class _ChannelDivide(torch.autograd.Function):
    """``y / s`` for a per-channel ``s``, keeping only the quotient for backward (batch norm keeps it too).

    ``d(y/s)/dy = 1/s`` and ``d(y/s)/ds = -(y/s)/s``, so the gradient of ``s`` is ``-sum(g * out) / s``: one
    product and a reduction, where autograd's division would also keep ``y`` and form ``-g * y / s^2``. On plain
    float32 CPU tensors both gradients come from one native pass (:func:`quantrain.ops.native.channel_divide_backward`).
    """

    @staticmethod
    def forward(ctx, y: Tensor, s: Tensor) -> Tensor:
        out = torch.div(y, s)
        ctx.save_for_backward(out, s)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        out, s = ctx.saved_tensors
        fused = native.channel_divide_backward(grad, out, s, *ctx.needs_input_grad[:2])
        if fused is not None:  # one pass (the sum in double precision, see there)
            return fused
        grad_y = grad / s if ctx.needs_input_grad[0] else None
        grad_s = -(grad * out).sum_to_size(s.shape) / s if ctx.needs_input_grad[1] else None
        return grad_y, grad_s


@torch.compiler.disable
def _live_folded_eagerly(fusion: Fusion, module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    return fusion._live_folded_forward(module, *args, **kwargs)


def _parameter_quantizers(module: nn.Module) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """What the folded weight and bias go through: their fake quantizers, or none / the integer-bias rounding."""
    fake_quant = module.fake_quant
    quantize_weight = fake_quant["weight"] if "weight" in fake_quant else _identity  # noqa: SIM401 (ModuleDict)
    quantize_bias = fake_quant["bias"] if "bias" in fake_quant else module.integer_bias  # noqa: SIM401
    return quantize_weight, quantize_bias


def _identity(x: Tensor) -> Tensor:

    return x
