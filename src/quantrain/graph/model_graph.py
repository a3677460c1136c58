"""The graph view of a model: who computes what from whom, at the level quantization cares about.

A :class:`ModelGraph` is a list of :class:`Call` in execution order. A call is one of:

* an **input** of the forward (a tensor the caller passes in),
* a **module call**: one call of a module that quantization treats as a unit (a module to be quantized, one already
  quantized, or a module without children that holds parameters, such as ``BatchNorm2d``, or passes values on, such
  as ``ReLU`` or ``MaxPool2d``); a module called twice in a forward gives two calls, with ``index`` 0 and 1,
* an **op call**: one functional operation between those modules (``x + y``, ``torch.cat``, ``F.silu``, a view),
  as the forward calls it (one torch function call, whatever ATen ops it runs), named by the module whose forward
  runs it (``scope``), the op and its index among the same ops of that scope, so the second residual add of
  ``layer1.0`` is ``layer1.0.add:1``,
* the **output** of the forward.

Edges are data: ``call.inputs`` are the calls whose tensors it reads, in order, and ``call.users`` those that read
its tensors. Parameters, buffers and constants are not calls. :func:`quantrain.graph.capture` builds the view from
``torch.export``; fusion planning, integer-bias sources and export all read the same one.

>>> import torch
>>> from torch import nn
>>> from quantrain.graph import capture
>>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
>>> graph = capture(model, torch.randn(1, 1, 5, 5))
>>> [call.name for call in graph.calls]
['input_0', '0', '1', '2', 'output']
>>> [user.name for user in graph.module_calls("0")[0].users]
['1']
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Call", "CallKind", "ModelGraph", "op_type"]


def op_type(op: str) -> str:
    """An op without its in-place marker: ``add_`` -> ``add`` (``__and__`` stays)."""
    return op[:-1] if op.endswith("_") and not op.startswith("_") else op


class CallKind(enum.Enum):
    INPUT = "input"
    MODULE = "module"
    OP = "op"
    OUTPUT = "output"


@dataclass(eq=False)
class Call:
    """One node of the view (see the module docstring). Compared by identity."""

    kind: CallKind
    target: str
    """The module's name (module calls, as in ``named_modules()``), the op (op calls: the torch function's name,
    ``add``, ``cat``, ``silu``, ``getitem`` for indexing; in-place variants as ``add_``), or the input's name."""
    index: int = 0
    """Which call of that module (0: the first of the forward), or which of the scope's ops of that kind."""
    scope: str = ""
    """Op calls: the module whose forward runs the op (``''``: the model's own forward)."""
    module_type: type | None = None
    """Module calls: the module's class."""
    constants: tuple[Any, ...] = ()
    """Op calls: the first ATen op's arguments that are not tensors (e.g. ``(0.0, 6.0)`` for ``hardtanh``)."""
    aten: tuple[str, ...] = ()
    """The ATen ops the call ran, for messages and tests."""
    dtype: Any = None
    """The ``torch.dtype`` of the call's (first) tensor output, as captured."""
    parameters: tuple[str, ...] = ()
    """Op calls: the model's parameters the op reads directly (``x * self.layer_scale``), by name."""
    inputs: list[Call] = field(default_factory=list)
    users: list[Call] = field(default_factory=list)

    @property
    def name(self) -> str:
        """How the call is named in messages and configs: ``features.0`` (module), ``features.0@1`` (its second
        call), ``layer1.0.add:0`` (op), ``add:0`` (op of the model's own forward)."""
        if self.kind is CallKind.MODULE:
            return self.target if self.index == 0 else f"{self.target}@{self.index}"
        if self.kind is CallKind.OP:
            index = f"{self.index}" if self.floating else f"{self.index}({str(self.dtype).removeprefix('torch.')})"
            return f"{self.scope}.{self.op_type}:{index}" if self.scope else f"{self.op_type}:{index}"
        return self.target

    @property
    def floating(self) -> bool:
        """Whether the call computes floating-point values (ops on indices or masks are numbered apart, and named
        with their dtype: ``add:0(int64)``)."""
        return self.dtype is None or self.dtype.is_floating_point

    @property
    def op_type(self) -> str:
        """Op calls: the op without its in-place marker (``add_`` -> ``add``)."""
        return op_type(self.target) if self.kind is CallKind.OP else self.target

    @property
    def in_place(self) -> bool:
        return self.kind is CallKind.OP and self.target.endswith("_") and not self.target.startswith("_")

    def __repr__(self) -> str:
        return f"Call({self.kind.value} {self.name}, inputs={[c.name for c in self.inputs]})"


@dataclass
class ModelGraph:
    """The calls of one forward, in execution order (see the module docstring)."""

    calls: list[Call]
    model_type: str = ""

    def __post_init__(self) -> None:
        self._by_module: dict[str, list[Call]] = {}
        for call in self.calls:
            if call.kind is CallKind.MODULE:
                self._by_module.setdefault(call.target, []).append(call)

    def module_calls(self, name: str) -> list[Call]:
        """Every call of the module ``name`` (empty when the forward never calls it as a unit)."""
        return self._by_module.get(name, [])

    def call_counts(self) -> dict[str, int]:
        """How many times the forward calls each module unit."""
        return {name: len(calls) for name, calls in self._by_module.items()}

    def ops(self) -> Iterator[Call]:
        return (call for call in self.calls if call.kind is CallKind.OP)

    def find(self, name: str) -> Call | None:
        """The call named ``name`` (see :attr:`Call.name`), or ``None``."""
        return next((call for call in self.calls if call.name == name), None)

    def __len__(self) -> int:
        return len(self.calls)
