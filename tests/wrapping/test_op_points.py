"""Quantization points on functional ops: attributed to the right scope and call, state in the model, removable."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantrain.config.settings import QuantDtype, QuantScheme, TargetSettings
from quantrain.fake_quantizer import FakeQuantizer
from quantrain.graph import capture
from quantrain.wrapping.op_points import OpPointPlan, build_op_points, function_name, remove_op_points

UINT8 = TargetSettings(QuantDtype(8, False), QuantScheme.AFFINE)


def _make(plan, target):
    fq = FakeQuantizer(plan.settings, activation=True, label=f"{plan.name}.{target}")
    fq.enable_fake_quant(True)
    return fq


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.inner = nn.Linear(4, 4), Inner()

    def forward(self, x):
        y = self.fc(x) + x  # block.add:0
        y = self.inner(y)  # its own add is the child's, not the block's
        return y + 1.0  # block.add:1


class Inner(nn.Module):
    def forward(self, x):
        return x + 2.0


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()

    def forward(self, x):
        return torch.cat([self.block(x), self.block(x * 0.5)], dim=1)  # block called twice: add:0..3


def _points(model, *plans):
    return build_op_points(model, tuple(OpPointPlan(scope, op, index, UINT8) for scope, op, index in plans), _make)


def _range(points, name):
    observer = points[name].fake_quant["_output_0"].observer
    return observer.tracked_min.item(), observer.tracked_max.item()


def test_each_point_quantizes_the_call_the_graph_names():
    torch.manual_seed(0)
    model = Model()
    names = [call.name for call in capture(model, torch.randn(2, 4)).ops()]
    assert names == [
        "block.add:0",
        "block.inner.add:0",  # the child's own add is in its own scope
        "block.add:1",
        "mul:0",
        "block.add:2",
        "block.inner.add:1",
        "block.add:3",
        "cat:0",
    ]
    points, _ = _points(model, ("block", "add", 1), ("block", "add", 2), ("", "cat", 0))
    x = torch.randn(5, 4)
    with torch.no_grad():
        first = model.block.inner(model.block.fc(x) + x) + 1.0
        second_input = x * 0.5
        second_add = model.block.fc(second_input) + second_input
    out = model(x)
    assert _range(points, "block.add:1") == pytest.approx((first.min().item(), first.max().item()))
    assert _range(points, "block.add:2") == pytest.approx((second_add.min().item(), second_add.max().item()))
    fq = points["cat:0"].fake_quant["_output_0"]
    q = out / fq.scale + fq.zero_point  # on the point's grid
    assert torch.allclose(q, q.round(), atol=1e-3)


def test_points_live_in_the_state_dict_follow_copies_and_go_away_cleanly():
    model = Model()
    float_keys = set(model.state_dict())
    points, runtime = _points(model, ("block", "add", 0))
    model(torch.randn(3, 4))
    keys = set(model.state_dict()) - float_keys
    assert "block.op_quant.add:0.fake_quant._output_0.scale" in keys
    before = _range(points, "block.add:0")
    clone = copy.deepcopy(model)
    clone(torch.randn(3, 4) * 100)  # the copy's hooks quantize through the copy's own point
    assert _range(points, "block.add:0") == before
    assert clone.block.op_quant["add:0"].fake_quant["_output_0"].observer.tracked_max.item() > before[1] + 0.5
    remove_op_points(model, runtime)
    assert set(model.state_dict()) == float_keys
    assert not model.block._forward_hooks and not model.block._forward_pre_hooks


class Failing(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        y = self.fc(x) + 1.0
        if y.shape[0] == 3:
            raise RuntimeError("bad batch")
        return y


def test_an_exception_in_the_forward_leaves_nothing_intercepting():
    model = Failing()
    points, runtime = _points(model, ("", "add", 0))
    with pytest.raises(RuntimeError, match="bad batch"):
        model(torch.randn(3, 2))
    assert runtime.stack == [None] and runtime._mode is None
    assert torch.equal(torch.ones(2) + 1.0, torch.full((2,), 2.0))  # no mode left on the stack
    model(torch.randn(4, 2))
    assert points["add:0"].fake_quant["_output_0"].is_calibrated


def test_function_names_match_the_graph():
    assert function_name(torch.Tensor.add) == "add" and function_name(torch.Tensor.__getitem__) == "getitem"
    assert function_name(F.silu) == "silu" and function_name(torch.cat) == "cat"
