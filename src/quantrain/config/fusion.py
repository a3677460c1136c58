"""Which modules are fused: the explicit ``fuse_names`` of each entry, and (``fuse='auto'``) the patterns found by
tracing the model with ``torch.fx``.

Patterns: Conv1d/2d/3d or Linear -> BatchNorm (-> ReLU/ReLU6), and (``auto`` only) any quantized module whose output
feeds only a ReLU/ReLU6, e.g. a residual ``quantrain.Add``; where each module's output feeds only the next one.
Explicit ``fuse_names`` accept NNI's patterns. Reads the model, never changes it.

"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from quantrain.config.parse import ConfigEntry
from quantrain.config.resolve import FusionPlan, ModulePlan, float_type

__all__ = ["plan_fusions", "trace"]

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping as leaves the modules to be quantized and those already quantized in place (each is
    one unit for quantization, whatever it does inside)."""

    def __init__(self, leaves: frozenset[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (
            qualified_name in self.leaves
            or hasattr(type(module), "_float_class")
            or super().is_leaf_module(module, qualified_name)
        )


def trace(model: nn.Module, leaves: frozenset[str] = frozenset()) -> tuple[fx.Graph | None, str]:
    """The model's fx graph (with ``leaves`` not traced into), or ``None`` and the reason it could not be traced.

    The model is left as it was: torch.fx stores each tensor constant of the forward on the root module
    (``_tensor_constant0``, ...), and those attributes are removed again (the graph is only read, never run)."""
    before = {name: set(names) for name, names in _attribute_names(model).items()}
    try:
        return _Tracer(leaves).trace(model), ""

    except Exception as exc:  # tracing runs arbitrary user code: any failure means "not traceable"
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        for name, names in _attribute_names(model).items():
            for added in set(names) - before[name]:
                del names[added]


def _attribute_names(model: nn.Module) -> dict[str, dict]:
    """Where an attribute set on a module lands: its ``__dict__`` and its parameter, buffer and submodule dicts."""
    return {"__dict__": vars(model), "_parameters": model._parameters, "_buffers": model._buffers, "_modules": model._modules}


def plan_fusions(
    model: nn.Module, entries: tuple[ConfigEntry, ...], plans: tuple[ModulePlan, ...], *, auto: bool
) -> tuple[ModulePlan, ...]:
    """Attach a :class:`FusionPlan` to each module plan that starts a fused chain."""
    explicit = [(entry, group) for entry in entries for group in entry.fuse_names]
    if not explicit and not auto:
        return plans
    modules = dict(model.named_modules())
    planned = {plan.name: plan for plan in plans}
    graph, reason = trace(model, frozenset(planned))

    fusions: dict[str, FusionPlan] = {}
    used: set[str] = set()
    for entry, group in explicit:
        fusion = _explicit_fusion(entry, group, modules, planned, graph)
        if used & set(group):
            raise entry.error(
                ValueError,
                "fuse_names",
                f"{group}: a module can be fused only once, but {sorted(used & set(group))} is already in another group",
            )
        used |= set(group)
        fusions[group[0]] = fusion
    if auto:
        if graph is None:
            warnings.warn(
                f"fuse='auto': could not trace {type(model).__name__} with torch.fx ({reason}); "
                "folding only the modules named in fuse_names",
                stacklevel=3,
            )
        else:
            found = [fusion for fusion in _auto_fusions(graph, modules, planned) if not used & set(fusion.group)]
            for fusion in _called_once(found, graph):
                used |= set(fusion.group)
                fusions[fusion.group[0]] = fusion
    return tuple(replace(plan, fusion=fusions.get(plan.name)) for plan in plans)


def _called_once(found: list[FusionPlan], graph: fx.Graph) -> list[FusionPlan]:
    """The fusions whose layer and BatchNorm the forward calls once; the others are dropped with a warning (a fused
    layer computes the whole chain on every call, so a call not followed by the BatchNorm would get it anyway)."""
    calls = {name: len(nodes) for name, nodes in _nodes_by_module(graph).items()}
    kept, dropped = [], []
    for fusion in found:
        shared = [name for name in (fusion.group[0], fusion.bn) if name is not None and calls.get(name, 0) > 1]
        if shared:
            dropped.append(f"{fusion.group} ({shared[0]!r} is called {calls[shared[0]]} times)")
        else:
            kept.append(fusion)
    if dropped:
        warnings.warn(
            f"fuse='auto': not fusing {', '.join(dropped)}: a fused module computes the whole chain on every call, "
            "so only a module called once per forward is fused",
            stacklevel=6,  # the caller of QATQuantizer(...)
        )
    return kept


def _explicit_fusion(
    entry: ConfigEntry,
    group: tuple[str, ...],
    modules: dict[str, nn.Module],
    planned: dict[str, ModulePlan],
    graph: fx.Graph | None,
) -> FusionPlan:
    first, *rest = (modules[name] for name in group)
    bn = group[1] if len(group) > 1 and isinstance(rest[0], NORMS) and isinstance(first, FOLDABLE) else None
    activation = ACTIVATION_MODULES.get(float_type(modules[group[-1]]))
    if bn is not None:
        _check_foldable(entry, group, modules[bn], planned)
    if graph is not None:
        _check_consecutive(entry, group, graph)
    return FusionPlan(group, bn, activation)


def _check_foldable(entry: ConfigEntry, group: tuple[str, ...], bn: _BatchNorm, planned: dict[str, ModulePlan]) -> None:
    if bn.running_var is None or bn.running_mean is None:
        raise entry.error(
            ValueError,
            "fuse_names",
            f"{group}: {group[1]!r} keeps no running statistics (track_running_stats=False), so it cannot be folded",
        )
    if group[1] in planned:
        raise entry.error(
            ValueError,
            "fuse_names",
            f"{group}: {group[1]!r} is folded into {group[0]!r} and cannot also "
            "be quantized on its own; exclude it from the other config entries",
        )


def _nodes_by_module(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    nodes: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            nodes.setdefault(str(node.target), []).append(node)
    return nodes


def _check_consecutive(entry: ConfigEntry, group: tuple[str, ...], graph: fx.Graph) -> None:
    nodes = _nodes_by_module(graph)
    for name in group:
        if len(nodes.get(name, ())) != 1:
            count = len(nodes.get(name, ()))
            raise entry.error(
                ValueError,
                "fuse_names",
                f"{group}: {name!r} is called {count} times in the forward; only a module called exactly once can be fused",
            )
    for producer, consumer in itertools.pairwise(group):
        users = list(nodes[producer][0].users)
        if users != nodes[consumer]:
            found = ", ".join(str(user.target) for user in users) or "nothing"
            raise entry.error(
                ValueError,
                "fuse_names",
                f"{group} is not a chain: the output of {producer!r} goes to {found}, not only to {consumer!r}",
            )


def _auto_fusions(graph: fx.Graph, modules: dict[str, nn.Module], planned: dict[str, ModulePlan]) -> list[FusionPlan]:
    """Chains that start at a planned module and pass their output on only: Conv/Linear -> BN (-> activation), or any
    module whose quantized output feeds only a ReLU/ReLU6 (the output is then quantized after the activation)."""
    found = []
    for node in graph.nodes:
        if node.op != "call_module" or str(node.target) not in planned:
            continue
        name, module = str(node.target), modules[str(node.target)]
        chain, bn, tail = [name], None, node
        if isinstance(module, FOLDABLE) and _only_user(tail, NORMS, modules):
            tail = next(iter(tail.users))
            if str(tail.target) in planned or modules[str(tail.target)].running_var is None:
                continue  # quantized on its own, or nothing to fold with
            bn = str(tail.target)
            chain.append(bn)

        activation = _activation_of(tail, modules)
        wants_output = any(t.name == "_output_0" for t in planned[name].targets)
        if activation is not None and wants_output:
            user = next(iter(tail.users))
            if user.op == "call_module":
                chain.append(str(user.target))
        else:
            activation = None
        if bn is not None or activation is not None:
            found.append(FusionPlan(tuple(chain), bn, activation))
    return found


def _only_user(node: fx.Node, kinds: tuple[type, ...], modules: dict[str, nn.Module]) -> bool:
    users = list(node.users)
    return len(users) == 1 and users[0].op == "call_module" and isinstance(modules.get(str(users[0].target)), kinds)


def _activation_of(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    users = list(node.users)
    if len(users) != 1:
        return None
    user = users[0]
    if user.op == "call_module":
        return ACTIVATION_MODULES.get(type(modules.get(str(user.target))))
    if user.op == "call_function" and len(user.args) == 1 and not user.kwargs.get("inplace"):
        return ACTIVATION_FUNCTIONS.get(user.target)
    return None
