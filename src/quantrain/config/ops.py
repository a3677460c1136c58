"""Config entries that select functional ops (``x + y``, ``torch.cat``, ``F.silu``) rather than modules.

An entry names ops the way the model's graph does (:mod:`quantrain.graph`):

* ``op_names`` with an op's full name, ``"<scope>.<op>:<index>"`` (``"layer1.0.add:1"``: the second ``+`` in the
  forward of module ``layer1.0``; ``"cat:0"``: the first ``torch.cat`` of the model's own forward);
* ``op_types`` with an op's lower-case name (``"add"``, ``"cat"``, ``"silu"``, ``"mean"``): every call of it, in
  every module's forward;
* ``op_names_re`` patterns match op names too, in an entry whose ``op_types`` name ops (``{"op_types": ["add"],
  "op_names_re": ["layer1\\..*"]}``: every ``+`` under ``layer1``); ``exclude_op_names``/``exclude_op_types``
  exclude ops as they exclude modules.

Module class names start with an upper-case letter (``Conv2d``, ``GELUActivation``), so a lower-case ``op_types``
name that is no module type of the model is an op, and a name with ``:`` is an op name. An op's target is its
output, ``_output_`` (``_output_0``); an entry selecting ops quantizes each selected op's output with its settings.
``silu`` has a second target, ``_gate_`` (``_gate_0``): the sigmoid inside ``x * sigmoid(x)``, quantized before the
product, as ONNX Runtime runs SiLU (QLinearSigmoid, then QLinearMul), ``hardswish`` the same with its hardsigmoid;
``scaled_dot_product_attention`` has
``_scores_`` (``q @ k^T``) and ``_probs_`` (the softmax), so that both of its products run as QLinearMatMul
(:data:`INNER_TARGETS`); an entry naming them selects only ops that have them.
Reads the graph, never the model.

>>> from quantrain.config import parse_config_list
>>> is_op_type("add", set()), is_op_type("Conv2d", set()), is_op_name("layer1.0.add:1")
(True, False, True)
"""

from __future__ import annotations

import re
import warnings

from quantrain.config.fusion import activation_of
from quantrain.config.parse import ConfigEntry
from quantrain.graph import Call, ModelGraph

__all__ = ["KNOWN_OPS", "OP_TARGETS", "OpTargetPlan", "entry_selects_ops", "is_op_name", "is_op_type", "plan_op_targets"]

OP_TARGETS = ("_output_", "_output_0")
INNER_TARGETS = {
    "silu": ("_gate_",),
    "hardswish": ("_gate_",),
    "scaled_dot_product_attention": ("_scores_", "_probs_"),
    "mul": ("_param_",),
}
"""Ops an integer engine runs as several, and the targets that quantize their parts: ``silu`` as
``x * sigmoid(x)`` (``_gate_``: the sigmoid, for QLinearSigmoid then QLinearMul), ``hardswish`` as
``x * hardsigmoid(x)`` (``_gate_``: the hardsigmoid, so the product runs as QLinearMul), attention as
``softmax(q @ k^T * scale + mask) @ v`` (``_scores_``: ``q @ k^T``, ``_probs_``: the softmax, so both products run as
QLinearMatMul), and a product with a parameter of the model (``_param_``: the parameter, quantized per tensor as a
weight is, so that ``x * self.layer_scale`` runs as QLinearMul; a product of two activations has no such target)."""
INNER_MEANINGS = {
    "_gate_": "the gate inside silu or hardswish (its sigmoid or hardsigmoid)",
    "_scores_": "q @ k^T inside scaled_dot_product_attention",
    "_probs_": "the softmax inside scaled_dot_product_attention",
    "_param_": "the parameter a mul multiplies by",
}

KNOWN_OPS = frozenset(
    {
        "add",
        "sub",
        "mul",
        "div",
        "matmul",
        "bmm",
        "cat",
        "stack",
        "relu",
        "relu6",
        "hardtanh",
        "sigmoid",
        "hardsigmoid",
        "silu",
        "hardswish",
        "gelu",
        "tanh",
        "softmax",
        "log_softmax",
        "layer_norm",
        "group_norm",
        "mean",
        "sum",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "avg_pool1d",
        "avg_pool2d",
        "max_pool1d",
        "max_pool2d",
        "interpolate",
        "pad",
        "flatten",
        "reshape",
        "view",
        "permute",
        "transpose",
        "getitem",
        "scaled_dot_product_attention",
    }
)
"""Ops a config may name although the model at hand does not run them (so one config_list serves many models)."""

_OP_NAME = re.compile(r"^(?:(?P<scope>.+)\.)?(?P<op>[A-Za-z_]\w*):(?P<index>\d+)$")


def is_op_name(name: str) -> bool:
    """Whether an ``op_names`` entry names an op (``scope.op:index``) rather than a module."""
    return ":" in name


def is_op_type(name: str, module_types: set[str]) -> bool:
    """Whether an ``op_types`` entry names an op (a lower-case identifier no module type of the model is called)."""
    return name.isidentifier() and name[0].islower() and name not in module_types


def entry_selects_ops(entry: ConfigEntry, module_types: set[str]) -> bool:
    return any(is_op_name(name) for name in entry.op_names) or any(is_op_type(name, module_types) for name in entry.op_types)


class OpTargetPlan:
    """The output of op call ``call`` quantized with ``settings`` (from entry ``entry_index``); with ``activation``
    (``'relu'``/``'relu6'``, found by ``fuse='auto'``) the ReLU that alone reads it is applied first, so the output
    is quantized after it, as an integer engine runs the op with its activation."""

    __slots__ = ("activation", "call", "entry_index", "inner", "settings")

    def __init__(
        self, call: Call, settings, entry_index: int, activation: str | None = None, inner: tuple[str, ...] = ()
    ) -> None:
        self.call, self.settings, self.entry_index, self.activation = call, settings, entry_index, activation
        self.inner = inner
        """The op's parts quantized too (:data:`INNER_TARGETS`, numbered: ``("_gate_0",)``)."""

    @property
    def name(self) -> str:
        return self.call.name

    def __repr__(self) -> str:
        return f"OpTargetPlan({self.name}, config_list[{self.entry_index}])"


def plan_op_targets(
    entries: tuple[ConfigEntry, ...],
    graph: ModelGraph | None,
    module_types: set[str],
    selected_modules: dict[int, int],
    *,
    auto: bool = False,
) -> tuple[OpTargetPlan, ...]:
    """The op outputs the entries quantize, in graph order; the first entry that selects an op wins. With ``auto``
    (``fuse='auto'``), an op whose output only a ReLU/ReLU6 reads is quantized after that activation.

    ``selected_modules``: how many modules each entry (by index) selected, for the "selects nothing" warning.
    Raises ``ValueError`` naming the entry and key for an op name the graph does not have, an op type neither in
    the graph nor in :data:`KNOWN_OPS`, and a target an op does not have.
    """
    wanted = [entry for entry in entries if entry_selects_ops(entry, module_types)]
    if not wanted:
        return ()
    if graph is None:
        raise ValueError("op targets need the model's graph")
    ops = list(graph.ops())
    names = {call.name for call in ops}
    types = {call.op_type for call in ops}
    claimed: dict[str, OpTargetPlan] = {}
    for entry in wanted:
        _check(entry, names, types, module_types)
        # an op computing integers or booleans (an index, a mask) has nothing to quantize
        selected = [call for call in ops if _selects(entry, call, module_types) and _floating(call)]
        if not selected and not selected_modules.get(entry.index):
            warnings.warn(f"config_list[{entry.index}] selects no module or op of {graph.model_type}", stacklevel=4)
        for call in selected:
            earlier = claimed.get(call.name)
            if earlier is not None:
                warnings.warn(
                    f"config_list[{entry.index}]: op {call.name!r} is already configured by "
                    f"config_list[{earlier.entry_index}]; the first entry wins",
                    stacklevel=4,
                )
                continue
            activation = activation_of(call) if auto else None
            inner = tuple(t for t in _inner(entry) if t != "_param_0" or call.parameters)  # only where there is one
            claimed[call.name] = OpTargetPlan(call, entry.settings_for(_target(entry)), entry.index, activation, inner)
    order = {id(call): position for position, call in enumerate(graph.calls)}
    return tuple(sorted(claimed.values(), key=lambda plan: order[id(plan.call)]))


def _floating(call: Call) -> bool:
    return call.floating


def _inner_name(name: str) -> str | None:
    """``'_gate_'``/``'_gate_0'`` -> ``'_gate_'``: the part of an op a target name quantizes (``None``: no part)."""
    base = name[:-1] if name.endswith("_0") else name
    return base if base in INNER_MEANINGS else None


def _inner(entry: ConfigEntry) -> tuple[str, ...]:
    names = [_inner_name(name) for name in entry.target_names or ()]
    return tuple(dict.fromkeys(f"{name}0" for name in names if name))


def _target(entry: ConfigEntry) -> str:
    return "_output_0" if entry.target_names is None or "_output_0" in entry.target_names else "_output_"


def _check(entry: ConfigEntry, names: set[str], types: set[str], module_types: set[str]) -> None:
    from quantrain.config.resolve import _suggest

    for key in ("op_names", "exclude_op_names"):
        for name in getattr(entry, key):
            if is_op_name(name) and name not in names:
                shape = "" if _OP_NAME.match(name) else "; an op is named '<module>.<op>:<index>', e.g. 'layer1.0.add:0'"
                raise entry.error(ValueError, key, f"no op named {name!r} in the model's graph{_suggest(name, names)}{shape}")
    for key in ("op_types", "exclude_op_types"):
        for name in getattr(entry, key):
            if is_op_type(name, module_types) and name not in types and name not in KNOWN_OPS:
                raise entry.error(
                    ValueError,
                    key,
                    f"{name!r} is neither a module type nor an op of the model's forward"
                    f"{_suggest(name, types) or _suggest(name, KNOWN_OPS)} (its ops: {', '.join(sorted(types)) or 'none'})",
                )
    targets = entry.target_names
    if targets is not None:
        other = [name for name in targets if name not in OP_TARGETS and _inner_name(name) is None]
        if other or not targets:
            raise entry.error(
                ValueError,
                "target_names",
                f"{other or list(targets)}: an op's target is its output ('_output_'; silu and hardswish also have '_gate_', "
                "scaled_dot_product_attention '_scores_' and '_probs_', mul '_param_'); list ops in an entry of their own",
            )
        inner = [name for name in targets if _inner_name(name)]
        if inner and not any(name in OP_TARGETS for name in targets):
            raise entry.error(
                ValueError,
                "target_names",
                f"{inner}: {_quoted(inner)} {'comes' if len(inner) == 1 else 'come'} with the op's '_output_'",
            )
        named_types = {m.group("op") for name in entry.op_names if (m := _OP_NAME.match(name))}
        selected_types = {name for name in entry.op_types if is_op_type(name, module_types)} | named_types
        for name in inner:
            part = _inner_name(name)
            owners = {op for op, parts in INNER_TARGETS.items() if part in parts}
            if not selected_types or not selected_types <= owners:
                raise entry.error(
                    ValueError,
                    "target_names",
                    f"'{part}' is {INNER_MEANINGS[part]}; the entry also selects {sorted(selected_types - owners) or 'no op'}",
                )


def _quoted(names: list[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _selects(entry: ConfigEntry, call: Call, module_types: set[str]) -> bool:
    """Whether ``entry`` selects op ``call``: its name and type conditions both hold, and no exclusion does."""
    op_names = [name for name in entry.op_names if is_op_name(name)]
    op_types = [name for name in entry.op_types if is_op_type(name, module_types)]
    if not op_names and not op_types:
        return False
    if entry.op_names or entry.op_names_re:
        named = call.name in op_names or (op_types and any(p.match(call.name) for p in entry.op_names_re))
        if not named:
            return False
    if entry.op_types and call.op_type not in op_types:
        return False
    if call.name in entry.exclude_op_names or call.op_type in entry.exclude_op_types:
        return False
    return not any(p.match(call.name) for p in entry.exclude_op_names_re)
