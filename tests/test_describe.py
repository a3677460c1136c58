"""quantizer.describe(): each quantized target in forward order with its settings, fusion and scale, and the ops a
config could name, whose names a new config accepts."""

import copy
import json

import pytest
import torch
from torch import nn

from quantrain import QATQuantizer, deployable_config_list

UINT8 = {"quant_dtype": "uint8", "quant_scheme": "affine"}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)) + x)
        return torch.sigmoid(y) * y


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.fc = nn.Conv2d(3, 4, 1), Block(), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.block(self.stem(x)).mean([2, 3], keepdim=True), 1))


def _quantized():
    torch.manual_seed(0)
    model = Net()
    config = [*deployable_config_list(8, 8, input_module="stem"), {"op_types": ["add"], "target_names": ["_output_"], **UINT8}]
    return model, QATQuantizer(model, config, fuse="auto", example_inputs=torch.randn(1, 3, 6, 6))


def test_each_target_in_forward_order_with_its_settings_fusion_and_the_ops_left():
    _model, quantizer = _quantized()
    description = quantizer.describe()
    rows = [(r.name, r.kind, r.type, r.target, r.dtype, r.scheme, r.granularity, r.fused) for r in description.rows]
    assert rows == [
        ("stem", "module", "Conv2d", "_input_0", "uint8", "affine", "default", ""),
        ("stem", "module", "Conv2d", "weight", "int8", "symmetric", "out_channel", ""),
        ("stem", "module", "Conv2d", "_output_0", "uint8", "affine", "default", ""),
        ("block.conv", "module", "Conv2d", "weight", "int8", "symmetric", "out_channel", "block.bn folded"),
        ("block.conv", "module", "Conv2d", "_output_0", "uint8", "affine", "default", ""),
        ("block.add:0", "op", "add", "_output_0", "uint8", "affine", "default", "relu"),
        ("block.sigmoid:0", "op", "sigmoid", None, None, None, None, ""),
        ("block.mul:0", "op", "mul", None, None, None, None, ""),
        ("mean:0", "op", "mean", None, None, None, None, ""),
        ("fc", "module", "Linear", "weight", "int8", "symmetric", "out_channel", ""),
        ("fc", "module", "Linear", "_output_0", "uint8", "affine", "default", ""),
    ]
    assert description.unquantized_ops == ("block.sigmoid:0", "block.mul:0", "mean:0")
    assert description.data_movement_ops == 1  # torch.flatten
    assert len(description.points) == 8 and all(row.scale == "" for row in description.rows)  # nothing observed yet
    text = str(description)
    assert text.splitlines()[0] == "Net: 8 quantized targets"
    assert "3 op(s) not quantized (target '-'): name them in op_names to quantize them" in text
    assert "1 op(s) that only move values keep their input's quantization (not listed)" in text
    assert json.loads(json.dumps(description.to_dict()))["rows"][5]["name"] == "block.add:0"


def test_scales_appear_once_observed():
    model, quantizer = _quantized()
    model(torch.randn(8, 3, 6, 6))
    rows = {(row.name, row.target): row.scale for row in quantizer.describe().points}
    add = quantizer.op_points["block.add:0"].fake_quant["_output_0"]
    assert rows[("block.add:0", "_output_0")] == f"{add.scale.item():.4g}"
    weight = model.fc.fake_quant["weight"].scale.flatten()
    assert rows[("fc", "weight")] == f"2 in [{weight.min().item():.3g}, {weight.max().item():.3g}]"


def test_a_name_from_the_description_is_a_name_a_config_accepts():
    _model, quantizer = _quantized()
    fresh = Net()
    for name in quantizer.describe().unquantized_ops:
        other = QATQuantizer(
            copy.deepcopy(fresh),
            [{"op_names": [name], "target_names": ["_output_"], **UINT8}],
            example_inputs=torch.randn(1, 3, 6, 6),
        )
        assert list(other.op_points) == [name]


def test_without_the_graph_only_modules_are_listed_and_the_table_says_why():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    quantizer = QATQuantizer(model, deployable_config_list(8, 8))
    description = quantizer.describe()
    assert [(row.name, row.target) for row in description.rows] == [
        ("0", "_input_0"),
        ("0", "weight"),
        ("0", "_output_0"),
        ("2", "weight"),
        ("2", "_output_0"),
    ]
    assert not description.graph and description.unquantized_ops == ()
    assert str(description).endswith("the model's graph was not captured (pass example_inputs to see its ops)")


def test_an_unwrapped_model_has_nothing_to_describe():
    _model, quantizer = _quantized()
    quantizer.unwrap_model()
    with pytest.raises(RuntimeError, match="unwrapped"):
        quantizer.describe()
