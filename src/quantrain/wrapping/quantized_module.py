"""Attach fake quantizers to a module in place, keeping its Parameter objects, state_dict keys and identity.

Attaching changes the module's class to a subclass of its own (``Linear`` -> ``QuantizedLinear``, so
``isinstance(m, nn.Linear)`` still holds, as with ``torch.nn.utils.parametrize``) and adds one child,
``fake_quant``: an ``nn.ModuleDict`` of :class:`~quantrain.fake_quantizer.FakeQuantizer` keyed by target name. The
forward reads like its formula::

    inputs  = fake_quant[_input_i](inputs)          for each quantized input
    params  = fake_quant[name](parameter)           for each quantized parameter
    outputs = float_forward(params, inputs)
    outputs = fake_quant[_output_j](outputs)        for each quantized output

Detaching restores the original class and removes the child: the module is exactly what it was.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from quantrain.config.resolve import ModulePlan, TargetKind, TargetPlan
from quantrain.fake_quantizer import FakeQuantizer
from quantrain.graph import is_capturing
from quantrain.observer import RangeTracking
from quantrain.ops.fake_quant import integer_bias
from quantrain.ops.ranges import block_layout
from quantrain.wrapping.derived import DerivedModule, derived_class, restore_class
from quantrain.wrapping.forwards import FLOAT_FORWARDS, register_float_forward, substituted_parameters
from quantrain.wrapping.fusion import CLAMPS
from quantrain.wrapping.meta import state_device

_SINGLE_OUTPUT = (("_output_0", 0),)

__all__ = ["CHILD_NAME", "QuantizedModule", "attach", "detach", "is_quantized", "link_integer_bias", "quantized_class"]

CHILD_NAME = "fake_quant"
FUSION_NAME = "fusion"


@register_float_forward(nn.Sequential)
def _sequential(module: nn.Sequential, params: Mapping[str, Tensor], input: Any) -> Any:
    """A quantized ``nn.Sequential`` runs its layers, not the children quantrain added to it."""
    for name, layer in module._modules.items():
        if name not in (CHILD_NAME, FUSION_NAME):
            input = layer(input)
    return input


class QuantizedModule(DerivedModule):
    """Mixin placed before the float class in a quantized module's MRO (see the module docstring)."""

    prefix = "Quantized"
    fake_quant: nn.ModuleDict
    _quant_params: tuple[str, ...]
    _quant_inputs: tuple[tuple[str, int | None, str | None], ...]
    _quant_outputs: tuple[tuple[str, int | str], ...]
    _bias_scales: tuple[FakeQuantizer, FakeQuantizer] | None = None  # (input, weight) quantizers: see integer_bias

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if is_capturing():  # the graph is the float model's (see quantrain.graph)
            return self.float_forward({}, *args, **kwargs)
        fake_quant = self.fake_quant
        if self._quant_inputs:
            args, kwargs = _quantize_inputs(fake_quant, self._quant_inputs, args, kwargs)
        fusion = self._modules.get(FUSION_NAME)
        if fusion is None:
            output = self.float_forward(self.quantized_parameters(), *args, **kwargs)
        elif (
            fusion.activation is not None
            and self._quant_outputs == _SINGLE_OUTPUT
            and (not torch.jit.is_tracing() or getattr(fake_quant["_output_0"], "clamps_when_tracing", False))
        ):
            # The fused activation is a clamp: the output quantizer applies it, keeping one mask for both. (Not while
            # torch.jit.trace records, where that path's ops depend on the grad mode, which its check run changes;
            # except for the ONNX export's quantizers, whose clamp is plain and can be left to the saturation.)
            pre_activation = fusion.linear_forward(self, *args, **kwargs)
            output = fake_quant["_output_0"](_tensor(fake_quant["_output_0"], pre_activation), CLAMPS[fusion.activation])
            fusion.record(output)
            return output
        else:
            output = fusion.fused_forward(self, *args, **kwargs)
        if self._quant_outputs:
            output = _quantize_outputs(fake_quant, self._quant_outputs, output)
        if fusion is not None:
            fusion.record(output)
        return output

    def quantize_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """``(args, kwargs)`` with every quantized input fake-quantized, as :meth:`forward` passes them on."""
        if not self._quant_inputs:
            return args, kwargs
        return _quantize_inputs(self.fake_quant, self._quant_inputs, args, kwargs)

    def quantized_parameters(self) -> dict[str, Tensor]:
        """Each quantized parameter fake-quantized, and the bias on the integer grid where that is enabled."""
        params = {name: self.fake_quant[name](self._parameters[name]) for name in self._quant_params}
        if self._bias_scales is not None and self._parameters.get("bias") is not None:
            params["bias"] = self.integer_bias(self._parameters["bias"])
        return params

    def integer_bias(self, bias: Tensor) -> Tensor:
        """``bias`` as the int32 bias of integer inference (scale ``S_in * S_w``), once both quantizers are live.

        Unchanged unless the quantizer was created with ``integer_bias=True`` and found this layer's input
        quantizer; call it after the weight has been fake-quantized in the same forward.
        """
        if self._bias_scales is None:
            return bias
        source, weight = self._bias_scales
        if not (_live(source) and _live(weight)):
            return bias
        if weight.scale.numel() not in (1, bias.numel()):
            raise ValueError(
                f"integer_bias: {weight.label} has {weight.scale.numel()} scales (shape {tuple(weight.scale.shape)}) but "
                f"the bias {bias.numel()} entries, so its scales are not one per output channel; if "
                f"{self._float_class.__name__} keeps its output channels on another dim of its weight, say so "
                "with quantrain.register_weight_axis"
            )
        return integer_bias(bias, source.scale, weight.scale)

    def float_forward(self, params: dict[str, Tensor], *args: Any, **kwargs: Any) -> Any:
        """The float class's forward, with ``params`` in place of the parameters of the same names."""
        form = FLOAT_FORWARDS.get(self._float_class)
        if not params and form is None:
            return self._float_class.forward(self, *args, **kwargs)
        if form is not None:
            return form(self, {**self._parameters, **params}, *args, **kwargs)
        with substituted_parameters(self, params):
            return self._float_class.forward(self, *args, **kwargs)


def quantized_class(float_class: type[nn.Module]) -> type[QuantizedModule]:
    """The quantized subclass of ``float_class`` (created once, then cached)."""
    return derived_class(QuantizedModule, float_class)


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, QuantizedModule)


def build_fake_quantizers(
    module_name: str,
    module: nn.Module,
    plan: ModulePlan,
    device: torch.device | None,
    tracking: Callable[[TargetKind], RangeTracking] | None = None,
) -> nn.ModuleDict:
    """One FakeQuantizer per target of ``plan``; reads ``module`` but does not change it.

    ``tracking(kind)`` says how each kind of target tracks its range (default: moving average).
    """
    tracking = tracking or (lambda kind: RangeTracking.MOVING_AVERAGE)
    fake_quant = nn.ModuleDict()

    for target in plan.targets:
        label = f"{module_name or type(module).__name__}.{target.name}"
        if target.kind is TargetKind.PARAMETER:
            param = module._parameters[target.name]
            shape = None if target.blocks is None else block_layout(param.shape, target.blocks)[1]
            fq = FakeQuantizer(
                target.settings,
                blocks=target.blocks,
                range_shape=shape,
                tracking=tracking(target.kind),
                label=label,
                device=state_device(param.device),
            )
        else:
            fq = FakeQuantizer(target.settings, activation=True, tracking=tracking(target.kind), label=label, device=device)
        fake_quant[target.name] = fq
    return fake_quant


def attach(module: nn.Module, plan: ModulePlan, fake_quant: nn.ModuleDict) -> None:
    """Turn ``module`` into its quantized subclass with ``fake_quant`` as its quantizers (in place)."""
    module.__class__ = quantized_class(type(module))
    module.add_module(CHILD_NAME, fake_quant)
    module._quant_params = _names(plan.targets, TargetKind.PARAMETER)
    module._quant_inputs = tuple((t.name, t.position, t.key) for t in plan.targets if t.kind is TargetKind.INPUT)
    module._quant_outputs = tuple((t.name, t.key) for t in plan.targets if t.kind is TargetKind.OUTPUT)


def detach(module: nn.Module) -> None:
    """Undo :func:`attach`: the module gets back its float class and loses its quantizers."""
    if not isinstance(module, QuantizedModule):
        return
    del module._modules[CHILD_NAME]
    module._modules.pop(FUSION_NAME, None)
    for attribute in ("_quant_params", "_quant_inputs", "_quant_outputs", "_bias_scales"):
        module.__dict__.pop(attribute, None)
    restore_class(module)


def link_integer_bias(module: QuantizedModule, source: FakeQuantizer) -> None:
    """Make ``module`` round its bias to ``source.scale * weight scale`` (see :meth:`QuantizedModule.integer_bias`)."""
    module.__dict__["_bias_scales"] = (source, module.fake_quant["weight"])


def _live(fq: FakeQuantizer) -> bool:
    return fq._fake_quant and fq.is_calibrated


def _names(targets: tuple[TargetPlan, ...], kind: TargetKind) -> tuple[str, ...]:

    return tuple(t.name for t in targets if t.kind is kind)


def _quantize_inputs(fake_quant: nn.ModuleDict, slots, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    args_list = list(args)
    kwargs = dict(kwargs)
    for target, position, keyword in slots:
        if position is not None and position < len(args_list):
            args_list[position] = fake_quant[target](_tensor(fake_quant[target], args_list[position]))
        elif keyword is not None and keyword in kwargs:
            kwargs[keyword] = fake_quant[target](_tensor(fake_quant[target], kwargs[keyword]))
    return tuple(args_list), kwargs


def _quantize_outputs(fake_quant: nn.ModuleDict, slots, output: Any) -> Any:
    for target, key in slots:
        fq = fake_quant[target]
        if isinstance(output, Tensor):
            if key != 0:
                raise ValueError(f"{fq.label}: the module returns a single tensor, so only '_output_' / '_output_0' exist")
            output = fq(output)
        elif isinstance(output, (tuple, list)) and isinstance(key, int):
            if key >= len(output):
                raise ValueError(f"{fq.label}: the module returns {len(output)} outputs, there is no index {key}")
            items = list(output)
            items[key] = fq(_tensor(fq, items[key]))
            output = output._make(items) if hasattr(output, "_make") else type(output)(items)
        elif isinstance(output, Mapping) and isinstance(key, str):
            if key not in output:
                raise ValueError(f"{fq.label}: the module's output has no key {key!r}; keys are {list(output)}")
            output = _replace_item(output, key, fq(_tensor(fq, output[key])))
        else:
            raise ValueError(f"{fq.label}: cannot select output {key!r} from a {type(output).__name__}")
    return output


def _replace_item(output: Mapping, key: str, value: Tensor) -> Mapping:
    copy = output.copy() if hasattr(output, "copy") else dict(output)
    copy[key] = value
    return copy


def _tensor(fq: FakeQuantizer, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{fq.label}: expected a tensor to quantize, got {type(value).__name__}")
    return value
