"""Small models and an independent reference of the reference's QAT math, shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

EPS = torch.finfo(torch.float32).eps
QMIN, QMAX = -127, 127
IN_W_OUT = [
    {"op_types": ["Linear"], "target_names": ["_input_", "weight", "_output_"], "quant_dtype": "int8", "quant_scheme": "affine"}
]
"""int8 affine input, weight and output of every Linear."""


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def reference_qparams(lo, hi, qmin, qmax, symmetric):
    """The reference's scale/zero-point formula, written out independently."""
    lo = torch.min(lo, torch.zeros_like(lo))
    hi = torch.max(hi, torch.zeros_like(hi))
    if symmetric:
        scale = torch.max(lo.abs(), hi.abs()) / (float(qmax - qmin) / 2)
        scale = torch.max(scale, torch.full_like(scale, EPS))
        zp = torch.full_like(scale, (qmax + qmin + 1) // 2)
    else:
        scale = (hi - lo) / float(qmax - qmin)
        scale = torch.max(scale, torch.full_like(scale, EPS))
        zp = qmin - torch.round(lo / scale)
    return scale, torch.clamp(zp, qmin, qmax)


def reference_fake_quant(x, scale, zp, qmin, qmax):
    return (torch.round(torch.clamp(x / scale + zp, qmin, qmax)) - zp) * scale


class ReferenceTarget:
    """Per-tensor EMA tracking + fake quant, as the reference does it for one target."""

    def __init__(self, qmin: int, qmax: int, symmetric: bool) -> None:
        self.qmin, self.qmax, self.symmetric = qmin, qmax, symmetric
        self.lo = self.hi = None

    def __call__(self, x: torch.Tensor, training: bool = True) -> torch.Tensor:
        if training:
            lo, hi = x.detach().reshape(-1).amin(-1), x.detach().reshape(-1).amax(-1)
            self.lo = lo if self.lo is None else self.lo * 0.99 + (1 - 0.99) * lo
            self.hi = hi if self.hi is None else self.hi * 0.99 + (1 - 0.99) * hi
        scale, zp = reference_qparams(self.lo, self.hi, self.qmin, self.qmax, self.symmetric)
        return reference_fake_quant(x, scale, zp, self.qmin, self.qmax)


def optimized_op_types(path, folder, level: str = "extended") -> list[str]:
    """The op types of the graph ONNX Runtime runs for the model at ``path`` once it has optimized it (``level``:
    ``"extended"`` or ``"all"``), in graph order; the optimized model is written into ``folder``."""
    return [node.op_type for node in _optimized_nodes(path, folder, level)]


def optimized_node_names(path, folder, level: str = "extended") -> list[str]:
    """The node names of that graph (see :func:`optimized_op_types`)."""
    return [node.name for node in _optimized_nodes(path, folder, level)]


def _optimized_nodes(path, folder, level):
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    levels = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    options.graph_optimization_level = levels[level]
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return list(onnx.load(options.optimized_model_filepath).graph.node)
