"""Where each layer's input scale comes from, for the integer bias of integer-only inference.

An integer engine (the paper, section 2.4; ONNX Runtime's QLinearConv and QGemm) stores a layer's bias as int32 with
scale ``S_in * S_w`` and zero point 0. To train and evaluate exactly what it will run, the layer must know ``S_in``:
the scale of the activation quantizer whose output it consumes. That is its own ``_input_`` quantizer, or else the
``_output_`` quantizer of the module upstream, found in the model's graph (:mod:`quantrain.graph`) by walking back
through operations that keep values on the same grid (max pooling, ReLU, reshapes, dropout, and the
BatchNorm/activation a fusion folds away). Reads the model, never changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantrain.config.resolve import ModulePlan, TargetKind
from quantrain.config.settings import GranularityKind
from quantrain.graph import Call, CallKind, ModelGraph

__all__ = ["BiasSource", "needs_graph", "plan_bias_sources"]

INPUT, OUTPUT = "_input_0", "_output_0"
GRID_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.ReLU,
    nn.Flatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Identity,
)
GRID_OPS = frozenset(
    {
        "view",
        "_unsafe_view",
        "reshape",
        "flatten",
        "squeeze",
        "unsqueeze",
        "permute",
        "transpose",
        "t",
        "contiguous",
        "clone",
        "alias",
        "relu",
        "relu_",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "max_pool2d_with_indices",
        "dropout",
        "getitem",
        "chunk",
        "split",
    }
)
"""Ops whose output values are input values (or zero), so they stay on a per-tensor quantization grid."""


@dataclass(frozen=True)
class BiasSource:
    """The layer ``module`` reads its input from the quantizer ``target`` of module ``source``."""

    module: str
    source: str
    target: str


def needs_graph(model: nn.Module, plans: tuple[ModulePlan, ...]) -> list[str]:
    """The layers whose integer bias needs the graph: a quantized weight, a float bias and no ``_input_`` target."""
    modules = dict(model.named_modules())
    return [plan.name for plan in plans if _has_float_bias(plan, modules[plan.name]) and _target(plan, INPUT) is None]


def plan_bias_sources(
    model: nn.Module, plans: tuple[ModulePlan, ...], graph: ModelGraph | None = None, op_points: frozenset[str] = frozenset()
) -> tuple[tuple[BiasSource, ...], tuple[str, ...]]:
    """For every planned layer with a quantized weight and a float bias: where its input scale comes from.

    ``graph`` (the model's, with the planned modules as units) is needed for the layers :func:`needs_graph` lists;
    ``op_points`` names the quantized ops whose output quantizer is per tensor (a source too).
    Returns the sources found and the names of the layers whose input is not known to be quantized per tensor (they
    keep a float bias).
    """
    planned = {plan.name: plan for plan in plans}
    modules = dict(model.named_modules())
    layers = [plan for plan in plans if _has_float_bias(plan, modules[plan.name])]
    if not layers:
        return (), ()
    passes = _fused_away(plans)
    sources, missing = [], []
    for plan in layers:
        source = _source(plan, graph, planned, passes, op_points)
        if source is None:
            missing.append(plan.name)
        else:
            sources.append(source)
    return tuple(sources), tuple(missing)


def _has_float_bias(plan: ModulePlan, module: nn.Module) -> bool:
    weight = _target(plan, "weight")
    if weight is None or _target(plan, "bias") is not None:
        return False
    has_bias = getattr(module, "bias", None) is not None or (plan.fusion is not None and plan.fusion.bn is not None)
    return has_bias and weight.settings.granularity.kind in (GranularityKind.PER_TENSOR, GranularityKind.OUT_CHANNEL)


def _target(plan: ModulePlan, name: str):
    return next((t for t in plan.targets if t.name == name), None)


def _per_tensor_activation(plan: ModulePlan, name: str) -> bool:
    target = _target(plan, name)
    return (
        target is not None
        and target.kind in (TargetKind.INPUT, TargetKind.OUTPUT)
        and target.settings.granularity.kind is GranularityKind.PER_TENSOR
    )


def _fused_away(plans: tuple[ModulePlan, ...]) -> frozenset[str]:
    """Modules that a fusion turns into pass-throughs (the folded BatchNorm, the re-applied ReLU)."""
    return frozenset(name for plan in plans if plan.fusion is not None for name in plan.fusion.group[1:])


def _source(
    plan: ModulePlan, graph: ModelGraph | None, planned: dict[str, ModulePlan], passes: frozenset[str], op_points: frozenset[str]
) -> BiasSource | None:
    if _target(plan, INPUT) is not None:
        return BiasSource(plan.name, plan.name, INPUT) if _per_tensor_activation(plan, INPUT) else None
    calls = graph.module_calls(plan.name) if graph is not None else []
    if len(calls) != 1 or not calls[0].inputs:
        return None
    call = calls[0].inputs[0]
    while True:
        if call.kind is CallKind.MODULE and call.target in planned and _target(planned[call.target], OUTPUT) is not None:
            target_plan = planned[call.target]
            return BiasSource(plan.name, call.target, OUTPUT) if _per_tensor_activation(target_plan, OUTPUT) else None
        if call.kind is CallKind.OP and call.name in op_points:
            return BiasSource(plan.name, call.name, OUTPUT)
        upstream = _grid_preserving_input(call, passes)
        if upstream is None:
            return None
        call = upstream


def _grid_preserving_input(call: Call, passes: frozenset[str]) -> Call | None:
    """The call whose values ``call`` passes on unchanged in grid (same scale), or ``None``."""
    if call.kind is CallKind.MODULE:
        kind = getattr(call.module_type, "_float_class", call.module_type)
        grid = call.target in passes or (kind is not None and issubclass(kind, GRID_MODULES))
    else:
        grid = call.kind is CallKind.OP and (call.target in GRID_OPS or _zero_padding(call))
    return call.inputs[0] if grid and call.inputs else None


def _zero_padding(call: Call) -> bool:
    """``F.pad(x, pads)`` with zeros (real zero is on every grid quantrain makes)."""
    if call.target == "constant_pad_nd":
        return len(call.constants) < 2 or not call.constants[1]
    if call.target == "pad":
        mode = call.constants[1] if len(call.constants) > 1 else "constant"
        value = call.constants[2] if len(call.constants) > 2 else None
        return mode == "constant" and not value
    return False
