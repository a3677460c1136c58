"""export_onnx(exporter='torch.export'): the torch.export-based ONNX exporter writes the model that the
TorchScript-based one writes (same operators, node names and quantization points; ONNX Runtime computes the same
numbers), and refuses what it cannot do before any work."""

import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from quantrain import QATQuantizer, export_onnx

CONFIG = [
    {
        "op_types": ["Conv2d", "Linear"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "uint8",
        "quant_scheme": "affine",
        "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric", "granularity": "out_channel"}},
    }
]


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    QATQuantizer(model, CONFIG)
    for step in range(3):
        model(torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(step)))
    return model.eval()


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_0": x.numpy()})[0]


def test_both_exporters_write_the_same_nodes_and_onnx_runtime_computes_the_same_numbers(tmp_path):
    model = _model()
    x = torch.randn(2, 1, 8, 8)
    graphs = {}
    for exporter in ("torchscript", "torch.export"):
        export_onnx(model, x, tmp_path / f"{exporter}.onnx", exporter=exporter, opset=18, weight_dtype="uint8")
        graph = onnx.load(str(tmp_path / f"{exporter}.onnx")).graph
        graphs[exporter] = [(n.op_type, n.name) for n in graph.node if n.op_type != "Constant"]
    flatten = ("Flatten", "/3/Flatten")  # torch.export writes the flatten as a Reshape
    assert graphs["torch.export"] == [("Reshape", "/3/Reshape") if node == flatten else node for node in graphs["torchscript"]]
    assert ("GlobalAveragePool", "/2/GlobalAveragePool") in graphs["torch.export"]
    assert ("DequantizeLinear", "/0/weight/DequantizeLinear") in graphs["torch.export"]
    quantize = [name for op, name in graphs["torch.export"] if op == "QuantizeLinear"]
    assert quantize[:2] == ["0._input_0/quantize", "0._output_0/quantize"]
    batch = torch.randn(16, 1, 8, 8)  # another batch size: the batch dimension is dynamic in both
    assert np.array_equal(_run(tmp_path / "torch.export.onnx", batch), _run(tmp_path / "torchscript.onnx", batch))


def test_per_tensor_points_carry_no_axis_and_per_channel_weights_keep_theirs(tmp_path):
    export_onnx(_model(), torch.randn(2, 1, 8, 8), tmp_path / "m.onnx", exporter="torch.export", opset=18)
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    axes = {n.name: [a.i for a in n.attribute if a.name == "axis"] for n in qdq}
    assert axes["/0/weight/DequantizeLinear"] == [0] and axes["/4/weight/DequantizeLinear"] == [0]
    assert axes["0._input_0/quantize"] == [] and axes["4._output_0/dequantize"] == []


def test_an_unknown_exporter_is_a_value_error_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"exporter must be one of \['torch.export', 'torchscript'\], got 'dynamo'"):
        export_onnx(_model(), torch.randn(2, 1, 8, 8), tmp_path / "m.onnx", exporter="dynamo")
    assert not (tmp_path / "m.onnx").exists()


def test_torch_export_below_opset_18_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"opset: the torch\.export-based exporter writes opset 18 or later, got 17"):
        export_onnx(_model(), torch.randn(2, 1, 8, 8), tmp_path / "m.onnx", exporter="torch.export", opset=17)
    assert not (tmp_path / "m.onnx").exists()


def test_without_onnxscript_torch_export_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"exporter='torch\.export' needs onnxscript: pip install onnxscript"):
        export_onnx(_model(), torch.randn(2, 1, 8, 8), tmp_path / "m.onnx", exporter="torch.export", opset=18)
