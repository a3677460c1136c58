"""``quantizer.describe()``: every quantization point of a quantized model, named as a config names it, and every op
of its forward that a config could name but none quantizes.

A row per quantized target, in the order the forward runs them: the point's name (a module, ``layer1.0.conv``, or an
op, ``layer1.0.add:0``: the first ``+`` in the forward of ``layer1.0``; see :mod:`quantrain.config.ops`), its type
(the module's class, or the op), the target (``_input_0``, ``weight``, ``_output_0``, ``_gate_0``), dtype, scheme,
granularity, what is fused into it (a folded BatchNorm, the ReLU its output is quantized after) and its scale once
observed. Then a row per op that computes floats and is not quantized (``-`` in the target column), so that its
name can be copied into an ``op_names`` entry; ops that only move values (views, reshapes, indexing) keep their
input's quantization (the ops integer bias passes through, ``quantrain.config.bias.GRID_OPS``) and are counted,
not listed.

>>> import torch
>>> from torch import nn
>>> from quantrain import QATQuantizer, deployable_config_list
>>> class Block(nn.Module):
...     def __init__(self):
...         super().__init__()
...         self.conv, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()
...     def forward(self, x):
...         return self.relu(self.conv(x) + x) * 0.5
>>> model = nn.Sequential(nn.Conv2d(3, 4, 1), Block())
>>> config = deployable_config_list(8, 8) + [{"op_types": ["add"], "target_names": ["_output_"],
...                                           "quant_dtype": "uint8", "quant_scheme": "affine"}]
>>> quantizer = QATQuantizer(model, config, fuse="auto", example_inputs=torch.randn(1, 3, 8, 8))
>>> description = quantizer.describe()
>>> [(row.name, row.target, row.fused) for row in description.rows]  # doctest: +NORMALIZE_WHITESPACE
[('0', '_input_0', ''), ('0', 'weight', ''), ('0', '_output_0', ''), ('1.conv', 'weight', ''),
 ('1.conv', '_output_0', ''), ('1.add:0', '_output_0', 'relu'), ('1.mul:0', None, '')]
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from quantrain.config.bias import GRID_OPS
from quantrain.config.resolve import float_type
from quantrain.fake_quantizer import FakeQuantizer
from quantrain.graph import CallKind, ModelGraph
from quantrain.wrapping.op_points import OpPoint

__all__ = ["Description", "PointRow", "describe"]


@dataclass(frozen=True)
class PointRow:
    """One quantized target, or (``target`` None) one op a config could quantize."""

    name: str
    """How a config names the point: the module's name, or the op's (``layer1.0.add:0``)."""
    kind: str
    """``'module'`` or ``'op'``."""
    type: str
    """The module's class (its float class for a quantized module) or the op."""
    target: str | None
    dtype: str | None = None
    scheme: str | None = None
    granularity: str | None = None
    fused: str = ""
    """What is fused into the point: on a weight, ``'1.bn folded'``; on an output, ``'relu'``/``'relu6'``, the
    activation applied before it is quantized (a layer's fused ReLU, or the ReLU that alone reads an op's output)."""
    scale: str = ""
    """The scale once observed: one number, or the count and range of per-channel scales; ``''`` before."""


@dataclass(frozen=True)
class Description:
    """What :func:`describe` found; ``str()`` gives the table."""

    model_type: str
    rows: tuple[PointRow, ...]
    data_movement_ops: int = 0
    """How many ops of the forward only move values (not listed)."""
    graph: bool = True
    """Whether the model's graph was available (without it, only the quantized modules are listed)."""

    @property
    def points(self) -> tuple[PointRow, ...]:
        """The quantized targets (rows with a target)."""
        return tuple(row for row in self.rows if row.target is not None)

    @property
    def unquantized_ops(self) -> tuple[str, ...]:
        """The names of the ops a config could quantize but none does."""
        return tuple(row.name for row in self.rows if row.target is None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_type": self.model_type,
            "rows": [asdict(row) for row in self.rows],
            "data_movement_ops": self.data_movement_ops,
            "graph": self.graph,
        }

    def __str__(self) -> str:
        from quantrain.summary import format_table

        header = ("point", "type", "target", "dtype", "scheme", "granularity", "fused", "scale")
        table = [header] + [
            (
                row.name,
                row.type,
                row.target or "-",
                row.dtype or "",
                row.scheme or "",
                row.granularity or "",
                row.fused,
                row.scale,
            )
            for row in self.rows
        ]
        points = len(self.points)
        lines = [f"{self.model_type}: {points} quantized target{'s' if points != 1 else ''}", format_table(table)]
        if self.unquantized_ops:
            lines.append(f"{len(self.unquantized_ops)} op(s) not quantized (target '-'): name them in op_names to quantize them")
        if self.data_movement_ops:
            lines.append(f"{self.data_movement_ops} op(s) that only move values keep their input's quantization (not listed)")
        if not self.graph:
            lines.append("the model's graph was not captured (pass example_inputs to see its ops)")
        return "\n".join(lines)


def describe(model: nn.Module, holders: dict[str, nn.Module], graph: ModelGraph | None) -> Description:
    """The description of ``model`` whose quantized modules and op points are ``holders`` (name -> the module that
    holds the quantizers in ``fake_quant``), in the order of ``graph`` where there is one."""
    rows: list[PointRow] = []
    listed: set[str] = set()
    moving = 0
    if graph is not None:
        for call in graph.calls:
            if call.kind is CallKind.MODULE and call.index == 0 and call.target in holders:
                rows.extend(_rows(call.target, "module", holders[call.target]))
                listed.add(call.target)
            elif call.kind is CallKind.OP and call.name in holders:
                rows.extend(_rows(call.name, "op", holders[call.name]))
                listed.add(call.name)
            elif call.kind is CallKind.OP and call.floating:
                if call.op_type in GRID_OPS:  # they keep their input's quantization
                    moving += 1
                else:
                    rows.append(PointRow(call.name, "op", call.op_type, None))
    for name, holder in holders.items():  # modules the forward did not call on the example (or no graph)
        if name not in listed:
            rows.extend(_rows(name, "op" if ":" in name else "module", holder))
    return Description(type(model).__name__, tuple(rows), moving, graph is not None)


def _rows(name: str, kind: str, holder: nn.Module) -> Iterator[PointRow]:
    type_name = holder.op_type if isinstance(holder, OpPoint) else float_type(holder).__name__
    folded, activation = _fused(holder)
    for target, fq in sorted(holder.fake_quant.items(), key=lambda item: _ORDER.get(item[0].rstrip("0123456789"), 1)):
        assert isinstance(fq, FakeQuantizer)
        settings = fq.settings
        yield PointRow(
            name,
            kind,
            type_name,
            target,
            settings.dtype.name,
            settings.scheme.value,
            str(settings.granularity.spec),
            {"weight": folded, "_output_0": activation}.get(target, ""),
            _scale(fq),
        )


_ORDER = {"_input_": 0, "_output_": 2, "_gate_": 3, "_scores_": 4, "_probs_": 5}  # parameters (1): input to output


def _fused(holder: nn.Module) -> tuple[str, str]:
    """What the weight row and the output row show: the folded BatchNorm, the activation before the output."""
    fusion = getattr(holder, "fusion", None)
    if fusion is None:
        return "", getattr(holder, "activation", None) or ""
    return (f"{fusion.group[1]} folded" if fusion.bn is not None else ""), fusion.activation or ""


def _scale(fq: FakeQuantizer) -> str:
    if not fq.is_calibrated:
        return ""
    scale = fq.scale.detach().float().flatten()
    if scale.numel() == 1:
        return f"{scale.item():.4g}"
    return f"{scale.numel()} in [{scale.min().item():.3g}, {scale.max().item():.3g}]"
