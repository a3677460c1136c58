"""Capture a model's :class:`~quantrain.graph.ModelGraph` with ``torch.export`` (non-strict: the forward runs as
Python, on fake tensors, so shape checks, ``self.training`` branches and Hugging Face's output classes just work).

The export records ATen ops, each tagged with the stack of modules whose forward ran it (``nn_module_stack``, where
a second call of a module is marked ``@1``). Ops inside a *unit* module become one module call; the others are op
calls in the scope of the innermost module running them. Units are the modules named in ``units`` (those to be
quantized), modules quantrain already quantized, and modules without children that hold parameters or buffers or
only pass values on (see :func:`_leaf_unit`); never the model itself.

Capturing reads the model and never changes it: parameters and buffers are replaced by fake tensors for the export
(BatchNorm's running statistics do not move), and a module quantrain has quantized runs its float forward (see
:func:`is_capturing`), so no range is tracked and the graph is that of the float model. A forward that
``torch.export`` cannot follow raises :class:`CaptureError`, saying why and what to do.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from quantrain.graph.model_graph import Call, CallKind, ModelGraph, op_type

__all__ = ["CaptureError", "capture", "capturing", "example_arguments", "is_capturing", "output_tensors"]

_STATE = threading.local()
_ROOT = "model"  # the attribute under which the capture wrapper holds the model


class CaptureError(ValueError):
    """The model's graph could not be captured (the message says why and what to do)."""


def is_capturing() -> bool:
    """Whether a capture is running in this thread: quantized modules then compute their float forward."""
    return getattr(_STATE, "depth", 0) > 0


@contextlib.contextmanager
def capturing() -> Iterator[None]:
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def example_arguments(example_inputs: Any, *, what: str = "example_inputs") -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` for the forward from an example: a tensor (one positional input), a tuple or list of
    positional inputs, or a dict of keyword inputs (as ``model(**batch)`` takes a Hugging Face batch)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, Mapping):
        if not all(isinstance(key, str) for key in example_inputs):
            raise TypeError(f"{what}: a dict of keyword inputs needs string keys")
        return (), dict(example_inputs)
    raise TypeError(
        f"{what} must be a tensor, a tuple or list of the forward's positional inputs, or a dict of its keyword "
        f"inputs, got {type(example_inputs).__name__}"
    )


class _Root(nn.Module):
    """Holds the model for the export and returns the tensors of its output, whatever their container (so outputs
    such as Hugging Face's caches need no pytree registration)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(output_tensors(self.model(*args, **kwargs)))


def output_tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors of a forward's output, in order, whatever holds them: tuples, lists, dicts and dict-like outputs
    (Hugging Face's ``ModelOutput``); other objects are skipped."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 8 and isinstance(value, Mapping):
        for item in value.values():
            yield from output_tensors(item, depth + 1)
    elif depth < 8 and isinstance(value, (tuple, list)):
        for item in value:
            yield from output_tensors(item, depth + 1)


def capture(model: nn.Module, example_inputs: Any, *, units: frozenset[str] = frozenset()) -> ModelGraph:
    """The graph view of ``model``'s forward on ``example_inputs`` (see :func:`example_arguments`).

    ``units``: names of modules to keep as one call each (the modules to be quantized). Raises
    :class:`CaptureError` when ``torch.export`` cannot capture the forward, ``TypeError`` for a bad example.
    """
    args, kwargs = example_arguments(example_inputs)
    name = type(model).__name__
    try:
        with capturing(), _quiet():
            exported = torch.export.export(_Root(model), args, kwargs or None, strict=False)
    except Exception as exc:  # the forward is arbitrary user code: every failure is "cannot capture"
        raise CaptureError(
            f"could not capture the graph of {name} with torch.export ({_first_line(exc)}). quantrain reads the "
            "graph to find what to fold and which quantizer feeds each layer; check that the example inputs are "
            "what the forward takes (a tensor, a tuple of positional inputs or a dict of keyword inputs, on the "
            "model's device), or make the forward exportable (see torch.export's documentation on data-dependent "
            "control flow), or quantize without the options that need the graph (fuse='auto', integer_bias)"
        ) from exc
    return _view(model, exported, units)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("torch._export", "torch.export", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _view(model: nn.Module, exported: torch.export.ExportedProgram, units: frozenset[str]) -> ModelGraph:
    canonical = {}  # id(module) -> its name in named_modules() (a module registered twice keeps its first name)
    for module_name, module in model.named_modules():
        canonical.setdefault(id(module), module_name)
    modules = {id(m): m for m in model.modules()}
    user_inputs = set(exported.graph_signature.user_inputs)
    parameters = {placeholder: _relative(name) for placeholder, name in exported.graph_signature.inputs_to_parameters.items()}

    def unit_of(path: str) -> str | None:
        """The canonical name of the module at ``path`` if it is a unit, else ``None``."""
        try:
            module = model.get_submodule(path)
        except AttributeError:
            return None
        module_name = canonical.get(id(module), path)
        if not path:  # the model itself is never a unit: its graph is what the view shows
            return None
        is_unit = module_name in units or hasattr(type(module), "_float_class") or _leaf_unit(module)
        return module_name if is_unit else None

    calls: list[Call] = []
    owner: dict[str, Call] = {}  # fx node name -> the call computing it
    module_call: dict[str, Call] = {}  # nn_module_stack key of a unit call -> that call
    op_counts: dict[tuple[str, str, bool], int] = {}
    op_call: dict[tuple[str, Any], Call] = {}  # (scope, torch-level function call) -> its op call
    graph_inputs = 0
    for node in exported.graph.nodes:
        if node.op == "placeholder":
            if node.name in user_inputs:
                call = Call(CallKind.INPUT, f"input_{graph_inputs}")
                graph_inputs += 1
                calls.append(call)
                owner[node.name] = call
            continue
        if node.op == "output":
            call = Call(CallKind.OUTPUT, "output")
            _connect(call, node, owner, dedupe=False)
            calls.append(call)
            continue
        if node.op != "call_function" or not _is_data(node):
            continue
        stack = [(key, path) for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items()]
        stack = [(key, _relative(path)) for key, path in stack if path == _ROOT or path.startswith(f"{_ROOT}.")]
        unit = next(((key, name) for key, path in stack if (name := unit_of(path)) is not None), None)
        if node.target is operator.getitem and _source(node) in owner and unit is None:
            owner[node.name] = owner[_source(node)]  # a part of a tuple result belongs to the op that made it
            continue
        if unit is not None:
            key, module_name = unit
            call = module_call.get(key)
            if call is None:
                module = model.get_submodule(module_name)
                call = Call(CallKind.MODULE, module_name, index=_call_index(key), module_type=type(modules[id(module)]))
                module_call[key] = call
                calls.append(call)
            call.aten = (*call.aten, _op_name(node))
            _connect(call, node, owner, dedupe=True)
        else:
            scope = stack[-1][1] if stack else ""
            function = node.meta.get("torch_fn")
            call = op_call.get((scope, function)) if function is not None else None
            if call is None:  # the first ATen op of a torch-level call (x + y, F.silu, torch.cat, x[:, :2], ...)
                op = _function_name(function) if function is not None else _op_name(node)
                dtype = _dtype(node)
                # ops on floats are counted apart from those on integers (indices, masks, positions), which the export
                # may have computed away as constants, so that the k-th float add here is the k-th the forward runs
                counter = (scope, op_type(op), dtype is None or dtype.is_floating_point)
                index = op_counts.get(counter, 0)
                op_counts[counter] = index + 1
                read = tuple(parameters[a.name] for a in node.args if isinstance(a, torch.fx.Node) and a.name in parameters)
                call = Call(CallKind.OP, op, index=index, scope=scope, constants=_constants(node), dtype=dtype, parameters=read)
                calls.append(call)
                if function is not None:
                    op_call[(scope, function)] = call
            call.aten = (*call.aten, _op_name(node))
            _connect(call, node, owner, dedupe=bool(call.aten[:-1]))
        owner[node.name] = call
    return ModelGraph(calls, type(model).__name__)


LEAF_UNITS = (
    nn.ReLU,
    nn.ReLU6,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.Flatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
"""Modules without parameters that stay one call: fusion folds the ReLUs, the others pass values on unchanged."""


def _leaf_unit(module: nn.Module) -> bool:
    """A module without children is a unit when it has parameters or buffers of its own (a BatchNorm, a LayerNorm,
    Hugging Face's Conv1D) or is one of :data:`LEAF_UNITS`; another one (``nn.SiLU``, ``nn.GELU``, a model's own
    activation class, ``nn.AdaptiveAvgPool2d``) shows its ops, in its own scope, so that configs can select them."""
    if any(True for _ in module.children()):
        return False
    own = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
    return own or isinstance(module, LEAF_UNITS)


def _relative(path: str) -> str:
    return "" if path == _ROOT else path[len(_ROOT) + 1 :]


def _call_index(key: str) -> int:
    _, at, index = key.rpartition("@")
    return int(index) if at and index.isdigit() else 0


def _op_name(node: torch.fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", None) or getattr(target, "__name__", str(target))


def _function_name(function: tuple[str, str]) -> str:
    """The op of a torch-level call as ``torch.export`` records it (``('add_1', 'method_descriptor.add')``): ``add``;
    a dunder method such as ``__getitem__`` (``x[:, :2]``) gives ``getitem``."""
    name = str(function[1]).rpartition(".")[2]
    return name[2:-2] if name.startswith("__") and name.endswith("__") and len(name) > 4 else name


def _is_data(node: torch.fx.Node) -> bool:
    """Whether the node computes tensors (not shapes, assertions or other bookkeeping)."""
    value = node.meta.get("val")
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)


def _dtype(node: torch.fx.Node) -> torch.dtype | None:
    value = node.meta.get("val")
    value = next((v for v in value if isinstance(v, torch.Tensor)), None) if isinstance(value, (tuple, list)) else value
    return value.dtype if isinstance(value, torch.Tensor) else None


def _source(node: torch.fx.Node) -> str | None:
    first = node.args[0] if node.args else None
    return first.name if isinstance(first, torch.fx.Node) else None


def _flat_nodes(value: Any) -> Iterator[torch.fx.Node]:
    if isinstance(value, torch.fx.Node):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _flat_nodes(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _flat_nodes(item)


def _constants(node: torch.fx.Node) -> tuple[Any, ...]:
    return tuple(arg for arg in node.args if not any(True for _ in _flat_nodes(arg)))


def _connect(call: Call, node: torch.fx.Node, owner: dict[str, Call], *, dedupe: bool) -> None:
    """Record the calls ``node`` reads from as inputs of ``call`` (and ``call`` as their user)."""
    for arg in (*_flat_nodes(node.args), *_flat_nodes(node.kwargs)):
        producer = owner.get(arg.name)
        if producer is None or producer is call or (dedupe and producer in call.inputs):
            continue
        call.inputs.append(producer)
        if call not in producer.users:
            producer.users.append(call)
