"""Quantization points on functional ops (``x + y``, ``torch.cat``, ``F.silu``, ``x.mean()``) of the user's own
model, in eager mode, without editing its code.

An op is identified as in the model's graph (:mod:`quantrain.graph`): the module whose forward runs it (its
*scope*), the torch function (``add``, ``cat``, ``silu``) and its index among that scope's calls of that function in
one forward (ops on floats; those on indices and masks are numbered apart), so ``layer1.0.add:1`` is the second
``+`` of floats in ``layer1.0``'s forward. At run time:

* forward pre/post hooks on each scope module and on its direct children keep a stack of the modules whose forward
  is running, so an op is attributed to the scope only when the scope's own forward runs it (not a child's);
* while a scope's forward runs, a ``TorchFunctionMode`` sees every torch-level call exactly as ``torch.export``
  recorded it (one call per ``x + y`` or ``F.silu``, whatever ATen ops it runs), counts the calls of each function
  that has points in the scope, and passes the output of the k-th through that point's fake quantizer.

The points' quantizers live on their scope module (child ``op_quant``, a ``ModuleDict`` keyed ``"add:1"``), so their
state is in the model's state_dict and moves with it; each point exposes ``fake_quant`` like a quantized module.

Why not rewrite the forward from the exported graph (as PT2E does)? That gives a new ``GraphModule`` in place of the
user's model: different class, code and state_dict keys, no Python control flow, and ``self.training`` branches
frozen to the mode captured. Intercepting keeps the user's object, its Parameters, its forward and its checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from quantrain.fake_quantizer import FakeQuantizer
from quantrain.graph import is_capturing
from quantrain.graph.model_graph import op_type
from quantrain.wrapping.fusion import CLAMPS

__all__ = ["OP_CHILD", "OpPoint", "OpPointPlan", "OpPoints", "function_name"]

OP_CHILD = "op_quant"
"""The child of a scope module holding its op points."""


@dataclass(frozen=True)
class OpPointPlan:
    """Quantize the output of the ``index``-th call of ``op`` in the forward of ``scope`` (``''``: the model); ``op``
    without an in-place marker (``add`` counts ``+`` and ``+=`` alike, as the graph does)."""

    scope: str
    op: str
    index: int
    settings: Any  # TargetSettings
    activation: str | None = None
    """``'relu'``/``'relu6'``: applied before quantizing (the ReLU after the op then changes nothing)."""
    inner: tuple[str, ...] = ()
    """The op's parts quantized by their own quantizers (``quantrain.config.ops.INNER_TARGETS``): ``("_gate_0",)``
    computes ``silu`` as ``x * q(sigmoid(x))`` (``hardswish`` with its hardsigmoid); ``("_scores_0", "_probs_0")``
    computes attention with both products on quantized operands (:meth:`OpPoint.attention`); ``("_param_0",)``
    quantizes the parameter a ``mul`` reads (:meth:`OpPoint.mul`)."""

    @property
    def key(self) -> str:
        return f"{self.op}:{self.index}"

    @property
    def name(self) -> str:
        return f"{self.scope}.{self.key}" if self.scope else self.key


def function_name(func: Callable) -> str:
    """A torch function's name as the graph names ops: ``Tensor.add`` -> ``add``, ``Tensor.__getitem__`` ->
    ``getitem``."""
    name = getattr(func, "__name__", "")
    return name[2:-2] if name.startswith("__") and name.endswith("__") and len(name) > 4 else name


class OpPoint(nn.Module):
    """One op's quantizers, keyed by target (``_output_0``), as a quantized module keeps its own."""

    def __init__(self, fake_quant: nn.ModuleDict, name: str, activation: str | None = None, op: str = "") -> None:
        super().__init__()
        self.fake_quant = fake_quant
        self.point_name = name
        self.op_type = op
        self.activation = activation
        """``'relu'``/``'relu6'``: the activation applied before quantizing (see :class:`OpPointPlan`)."""
        self.clamp = None if activation is None else CLAMPS[activation]

    @property
    def composed(self) -> bool:
        """Whether the op is computed from its quantized parts (:meth:`silu`, :meth:`hardswish`, :meth:`mul`,
        :meth:`attention`)."""
        return len(self.fake_quant) > 1

    def quantize(self, output: Tensor) -> Tensor:
        """The op's output, through its fused activation (if any) and fake quantizer."""
        return self.fake_quant["_output_0"](output, self.clamp)

    def silu(self, x: Tensor, inplace: bool = False) -> Tensor:
        """``q_out(x * q_gate(sigmoid(x)))``: SiLU as an integer engine runs it, a quantized sigmoid times ``x``."""
        return self.quantize(x * self.fake_quant["_gate_0"](torch.sigmoid(x)))

    def hardswish(self, x: Tensor, inplace: bool = False) -> Tensor:
        """``q_out(x * q_gate(hardsigmoid(x)))``: Hardswish as ONNX Runtime runs it (HardSigmoid, then a product
        that a quantized gate lets run as QLinearMul)."""
        return self.quantize(x * self.fake_quant["_gate_0"](F.hardsigmoid(x)))

    def mul(self, input: Any, other: Any, **kwargs: Any) -> Tensor:
        """``q_out(x * q_param(p))``: a product with a parameter of the model (a layer scale), the parameter
        quantized per tensor as a weight is, so that an integer engine multiplies integers (QLinearMul)."""
        if isinstance(input, nn.Parameter):
            input = self.fake_quant["_param_0"](input)
        elif isinstance(other, nn.Parameter):
            other = self.fake_quant["_param_0"](other)
        return self.quantize(torch.mul(input, other, **kwargs))

    def attention(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attn_mask: Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> Tensor:
        """``q_out(q_probs(softmax(q_scores(query @ key^T) * scale + mask)) @ value)``: attention as an integer
        engine runs it (``F.scaled_dot_product_attention``'s arguments and meaning), so that both products read
        quantized operands; a row whose keys are all masked gets zeros, as PyTorch's own attention gives.
        Computed step by step, it takes the memory of the score matrix that PyTorch's fused kernels avoid."""
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeats = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
        scores = self.fake_quant["_scores_0"](query @ key.transpose(-2, -1))
        scores = scores * (query.shape[-1] ** -0.5 if scale is None else scale)
        keep = None
        if is_causal:
            keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            keep = attn_mask if keep is None else keep & attn_mask
        elif attn_mask is not None:
            scores = scores + attn_mask
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if attn_mask is not None:  # rows the mask empties (read from the mask: no head dim) get zeros, not NaN
            empty = ~keep.any(-1, keepdim=True) if keep is not None else (attn_mask == float("-inf")).all(-1, keepdim=True)
            probs = probs.masked_fill(empty, 0.0)
        probs = self.fake_quant["_probs_0"](probs)
        if dropout_p > 0.0:
            probs = torch.dropout(probs, dropout_p, train=True)
        return self.quantize(probs @ value)

    def extra_repr(self) -> str:
        return self.point_name


class _Interceptor(TorchFunctionMode):
    def __init__(self, points: OpPoints) -> None:
        super().__init__()
        self.points = points

    def __torch_function__(self, func, types, args=(), kwargs=None):
        frame = self.points.stack[-1]
        table = None if frame is None else self.points.table.get(frame)
        if table is None:
            return func(*args, **(kwargs or {}))
        op = op_type(function_name(func))  # `y += x` runs add_, counted with the adds as the graph counts it
        by_index = table.get(op)
        if by_index is None:
            return func(*args, **(kwargs or {}))
        composed = _COMPOSED.get(op)
        first = args[0] if args else (kwargs or {}).get("query" if op == "scaled_dot_product_attention" else "input")
        if composed is not None and isinstance(first, Tensor) and first.is_floating_point():
            index = self.points.counts.get((frame, op), 0)
            point = by_index.get(index)
            if point is not None and point.composed:
                self.points.counts[(frame, op)] = index + 1
                return composed(point, *args, **(kwargs or {}))
        output = func(*args, **(kwargs or {}))
        if isinstance(output, Tensor):
            first = output
        elif isinstance(output, (tuple, list)):
            first = next((o for o in output if isinstance(o, Tensor)), None)
        else:
            first = None
        if first is None or not first.is_floating_point():
            return output  # ops on indices and masks are not counted, as the graph numbers them apart
        counts = self.points.counts
        index = counts.get((frame, op), 0)
        counts[(frame, op)] = index + 1
        point = by_index.get(index)
        if point is not None and isinstance(output, Tensor):
            output = point.quantize(output)
        return output


_COMPOSED = {
    "silu": OpPoint.silu,
    "hardswish": OpPoint.hardswish,
    "scaled_dot_product_attention": OpPoint.attention,
    "mul": OpPoint.mul,
}
"""The ops an op point computes from quantized parts, when its plan names them (``OpPointPlan.inner``)."""


class OpPoints:
    """The op points of one model and the hooks that run them (see the module docstring)."""

    def __init__(self, model: nn.Module, points: dict[str, OpPoint], plans: tuple[OpPointPlan, ...]) -> None:
        self.table: dict[str, dict[str, dict[int, OpPoint]]] = {}
        for plan in plans:
            self.table.setdefault(plan.scope, {}).setdefault(plan.op, {})[plan.index] = points[plan.name]
        self.stack: list[str | None] = [None]
        self.counts: dict[tuple[str, str], int] = {}
        self._mode: _Interceptor | None = None
        self._depth = 0
        self._handles = []
        modules = dict(model.named_modules())
        framed: dict[int, str | None] = {}
        for scope in self.table:
            framed[id(modules[scope])] = scope
        for scope in self.table:
            for child in modules[scope].children():
                framed.setdefault(id(child), None)  # a child's own forward is not its parent's
        seen = set()
        for module in model.modules():
            if id(module) in framed and id(module) not in seen:
                seen.add(id(module))
                self._handles.append(module.register_forward_pre_hook(_Enter(self, framed[id(module)])))
                self._handles.append(module.register_forward_hook(_Leave(self), always_call=True))

    def enter(self, frame: str | None) -> None:
        if is_capturing():
            self.stack.append(None)
            return
        if frame is not None and self._depth == 0:  # the outermost scope call starts a forward
            self.counts.clear()
            self._mode = _Interceptor(self)
            self._mode.__enter__()
        if frame is not None or self._depth > 0:
            self._depth += 1
        self.stack.append(frame)

    def leave(self) -> None:
        frame = self.stack.pop()
        if is_capturing():
            return
        if frame is not None or self._depth > 0:
            self._depth -= 1
            if self._depth == 0 and self._mode is not None:
                mode, self._mode = self._mode, None
                mode.__exit__(None, None, None)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mode": None, "_depth": 0, "stack": [None], "_handles": []}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _Enter:
    """A forward pre-hook (an object, so that copies of the model get hooks on their own copy of the points)."""

    def __init__(self, points: OpPoints, frame: str | None) -> None:
        self.points, self.frame = points, frame

    def __call__(self, module: nn.Module, args: Any) -> None:
        self.points.enter(self.frame)


class _Leave:
    def __init__(self, points: OpPoints) -> None:
        self.points = points

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.points.leave()


def build_op_points(
    model: nn.Module, plans: tuple[OpPointPlan, ...], make: Callable[[OpPointPlan, str], FakeQuantizer]
) -> tuple[dict[str, OpPoint], OpPoints]:
    """Attach each plan's quantizer to its scope module (child ``op_quant``) and start intercepting."""
    modules = dict(model.named_modules())
    points: dict[str, OpPoint] = {}
    for plan in plans:
        scope = modules[plan.scope]
        if OP_CHILD not in scope._modules:
            scope.add_module(OP_CHILD, nn.ModuleDict())
        quantizers = {"_output_0": make(plan, "_output_0")}
        quantizers.update((target, make(plan, target)) for target in plan.inner)
        point = OpPoint(nn.ModuleDict(quantizers), plan.name, plan.activation, plan.op)
        scope._modules[OP_CHILD][plan.key] = point
        points[plan.name] = point
    return points, OpPoints(model, points, plans)


def remove_op_points(model: nn.Module, runtime: OpPoints | None) -> None:
    """Undo :func:`build_op_points`: hooks removed, every ``op_quant`` child deleted."""
    if runtime is not None:
        runtime.remove()
    for module in model.modules():
        module._modules.pop(OP_CHILD, None)
