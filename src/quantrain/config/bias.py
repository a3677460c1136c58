"""Where each layer's input scale comes from, for the integer bias of integer-only inference.

An integer engine (the paper, section 2.4; ONNX Runtime's QLinearConv and QGemm) stores a layer's bias as int32 with
scale ``S_in * S_w`` and zero point 0. To train and evaluate exactly what it will run, the layer must know ``S_in``:
the scale of the activation quantizer whose output it consumes. That is its own ``_input_`` quantizer, or else the
``_output_`` quantizer of the module upstream, found by tracing the model with ``torch.fx`` and walking back through
operations that keep values on the same grid (max pooling, ReLU, reshapes, dropout, and the BatchNorm/activation a
fusion folds away). Reads the model, never changes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from quantrain.config.fusion import trace
from quantrain.config.resolve import ModulePlan, TargetKind
from quantrain.config.settings import GranularityKind

__all__ = ["BiasSource", "plan_bias_sources"]

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
GRID_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.relu,
    torch.squeeze,
    torch.unsqueeze,
    F.relu,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.dropout,
}
GRID_METHODS = {"view", "reshape", "flatten", "contiguous", "relu", "squeeze", "unsqueeze"}


@dataclass(frozen=True)
class BiasSource:
    """The layer ``module`` reads its input from the quantizer ``target`` of module ``source``."""

    module: str
    source: str
    target: str


def plan_bias_sources(model: nn.Module, plans: tuple[ModulePlan, ...]) -> tuple[tuple[BiasSource, ...], tuple[str, ...]]:
    """For every planned layer with a quantized weight and a float bias: where its input scale comes from.

    Returns the sources found and the names of the layers whose input is not known to be quantized per tensor (they
    keep a float bias).
    """
    planned = {plan.name: plan for plan in plans}
    modules = dict(model.named_modules())
    layers = [plan for plan in plans if _has_float_bias(plan, modules[plan.name])]
    if not layers:
        return (), ()
    graph = None
    if any(_target(plan, INPUT) is None for plan in layers):
        graph, _ = trace(model, frozenset(planned))
    calls = _calls(graph) if graph is not None else {}
    passes = _fused_away(plans)
    sources, missing = [], []
    for plan in layers:
        source = _source(plan, calls, planned, modules, passes)
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


def _calls(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def _source(
    plan: ModulePlan,
    calls: dict[str, list[fx.Node]],
    planned: dict[str, ModulePlan],
    modules: dict[str, nn.Module],
    passes: frozenset[str],
) -> BiasSource | None:
    if _target(plan, INPUT) is not None:
        return BiasSource(plan.name, plan.name, INPUT) if _per_tensor_activation(plan, INPUT) else None
    nodes = calls.get(plan.name, [])
    if len(nodes) != 1 or not nodes[0].args or not isinstance(nodes[0].args[0], fx.Node):
        return None
    node = nodes[0].args[0]
    while True:
        if node.op == "call_module" and node.target in planned and _target(planned[node.target], OUTPUT) is not None:
            target_plan = planned[node.target]
            return BiasSource(plan.name, node.target, OUTPUT) if _per_tensor_activation(target_plan, OUTPUT) else None
        upstream = _grid_preserving_input(node, modules, passes)
        if upstream is None:
            return None
        node = upstream


def _grid_preserving_input(node: fx.Node, modules: dict[str, nn.Module], passes: frozenset[str]) -> fx.Node | None:
    """The node whose values ``node`` passes on unchanged in grid (same scale), or ``None``."""
    if node.op == "call_module":
        if node.target in passes or isinstance(modules.get(node.target), GRID_MODULES):
            return _first_node(node)
    elif (node.op == "call_function" and node.target in GRID_FUNCTIONS) or (
        node.op == "call_method" and node.target in GRID_METHODS
    ):
        return _first_node(node)
    return None


def _first_node(node: fx.Node) -> fx.Node | None:
    first = node.args[0] if node.args else None
    return first if isinstance(first, fx.Node) else None
