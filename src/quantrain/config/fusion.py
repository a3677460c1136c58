"""Which modules are fused: the explicit ``fuse_names`` of each entry, and (``fuse='auto'``) the patterns found in the
model's graph (:mod:`quantrain.graph`, captured with ``torch.export``).

Patterns: Conv1d/2d/3d or Linear -> BatchNorm (-> ReLU/ReLU6), and (``auto`` only) any quantized module whose output
feeds only a ReLU/ReLU6, e.g. a residual ``quantrain.Add``; where each module's output feeds only the next one.
Explicit ``fuse_names`` accept NNI's patterns, and are checked against the graph when there is one. Reads the model,
never changes it.

"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import replace

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from quantrain.config.parse import ConfigEntry
from quantrain.config.resolve import FusionPlan, ModulePlan, float_type
from quantrain.graph import Call, CallKind, ModelGraph

__all__ = ["activation_of", "plan_fusions"]

FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
ACTIVATION_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
ACTIVATION_OPS = {"relu": "relu", "relu6": "relu6"}
"""Functional activations by their ATen op (``F.relu6`` is ``relu6``; ``nn.ReLU6`` runs ``hardtanh(x, 0, 6)``)."""


def plan_fusions(
    model: nn.Module,
    entries: tuple[ConfigEntry, ...],
    plans: tuple[ModulePlan, ...],
    *,
    auto: bool,
    graph: ModelGraph | None = None,
) -> tuple[ModulePlan, ...]:
    """Attach a :class:`FusionPlan` to each module plan that starts a fused chain.

    ``graph``: the model's graph, with the planned modules as units; needed for ``auto``, and used to check
    explicit ``fuse_names`` where given."""
    explicit = [(entry, group) for entry in entries for group in entry.fuse_names]
    if not explicit and not auto:
        return plans
    if auto and graph is None:
        raise ValueError("fuse='auto' needs the model's graph")
    modules = dict(model.named_modules())
    planned = {plan.name: plan for plan in plans}

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
        found = [fusion for fusion in _auto_fusions(graph, modules, planned) if not used & set(fusion.group)]
        for fusion in _called_once(found, graph):
            used |= set(fusion.group)
            fusions[fusion.group[0]] = fusion
    return tuple(replace(plan, fusion=fusions.get(plan.name)) for plan in plans)


def _called_once(found: list[FusionPlan], graph: ModelGraph) -> list[FusionPlan]:
    """The fusions whose layer and BatchNorm the forward calls once; the others are dropped with a warning (a fused
    layer computes the whole chain on every call, so a call not followed by the BatchNorm would get it anyway)."""
    calls = graph.call_counts()
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
    graph: ModelGraph | None,
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


def _check_consecutive(entry: ConfigEntry, group: tuple[str, ...], graph: ModelGraph) -> None:
    for name in group:
        count = len(graph.module_calls(name))
        if count != 1:
            raise entry.error(
                ValueError,
                "fuse_names",
                f"{group}: {name!r} is called {count} times in the forward; only a module called exactly once can be fused",
            )
    for producer, consumer in itertools.pairwise(group):
        users = graph.module_calls(producer)[0].users
        if users != graph.module_calls(consumer):
            found = ", ".join(user.name for user in users) or "nothing"
            raise entry.error(
                ValueError,
                "fuse_names",
                f"{group} is not a chain: the output of {producer!r} goes to {found}, not only to {consumer!r}",
            )


def _auto_fusions(graph: ModelGraph, modules: dict[str, nn.Module], planned: dict[str, ModulePlan]) -> list[FusionPlan]:
    """Chains that start at a planned module and pass their output on only: Conv/Linear -> BN (-> activation), or any
    module whose quantized output feeds only a ReLU/ReLU6 (the output is then quantized after the activation)."""
    found = []
    for call in graph.calls:
        if call.kind is not CallKind.MODULE or call.target not in planned:
            continue
        name, module = call.target, modules[call.target]
        chain, bn, tail = [name], None, call
        if isinstance(module, FOLDABLE) and _only_user(tail, NORMS):
            tail = tail.users[0]
            if tail.target in planned or modules[tail.target].running_var is None:
                continue  # quantized on its own, or nothing to fold with
            bn = tail.target
            chain.append(bn)

        activation = activation_of(tail)
        wants_output = any(t.name == "_output_0" for t in planned[name].targets)
        if activation is not None and wants_output:
            user = tail.users[0]
            if user.kind is CallKind.MODULE:
                chain.append(user.target)
        else:
            activation = None
        if bn is not None or activation is not None:
            found.append(FusionPlan(tuple(chain), bn, activation))
    return found


def _only_user(call: Call, kinds: tuple[type, ...]) -> bool:
    users = call.users
    return (
        len(users) == 1
        and users[0].kind is CallKind.MODULE
        and users[0].module_type is not None
        and issubclass(float_type_of(users[0].module_type), kinds)
    )


def activation_of(call: Call) -> str | None:
    """The ReLU/ReLU6 that alone reads ``call``'s output (a module, or a functional op not in place)."""
    if len(call.users) != 1:
        return None
    user = call.users[0]
    if user.kind is CallKind.MODULE and user.module_type is not None:
        return ACTIVATION_MODULES.get(float_type_of(user.module_type))
    if user.kind is CallKind.OP and not user.in_place and len(user.inputs) == 1:
        if user.target == "hardtanh" and tuple(float(c) for c in user.constants) == (0.0, 6.0):
            return "relu6"
        return ACTIVATION_OPS.get(user.target)
    return None


def float_type_of(module_type: type) -> type:
    """The float class of a (possibly quantrain-derived) module class."""
    return getattr(module_type, "_float_class", module_type)
