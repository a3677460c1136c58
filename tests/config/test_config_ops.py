"""Config entries that select functional ops: names, types, errors, and the quantizer around them."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantrain import PtqQuantizer, QATQuantizer

UINT8 = {"quant_dtype": "uint8", "quant_scheme": "affine"}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv1(x)) + x  # block.add:0
        return torch.cat([self.conv2(y) + y, y], dim=1)  # block.add:1, block.cat:0


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.head = Block(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.block(x).mean(dim=(2, 3)))  # mean:0


EXAMPLE = torch.randn(2, 4, 5, 5)


def _quantize(config, cls=QATQuantizer, **options):
    torch.manual_seed(0)
    model = Net()
    return model, cls(model, config, example_inputs=EXAMPLE, **options)


def test_op_types_select_every_call_of_an_op_and_op_names_one_call():
    _, quantizer = _quantize([{"op_types": ["add", "mean"], **UINT8}])
    assert list(quantizer.op_points) == ["block.add:0", "block.add:1", "mean:0"]
    _, quantizer = _quantize([{"op_names": ["block.add:1", "block.cat:0"], **UINT8}])
    assert list(quantizer.op_points) == ["block.add:1", "block.cat:0"]
    mixed = [
        {"op_types": ["add"], "exclude_op_names": ["block.add:0"], **UINT8},
        {"op_types": ["Conv2d"], "target_names": ["weight"]},
    ]
    _, quantizer = _quantize(mixed)
    assert list(quantizer.op_points) == ["block.add:1"] and list(quantizer.quantized_modules) == ["block.conv1", "block.conv2"]


def test_an_op_point_quantizes_that_op_output_on_its_grid_and_reports_it():
    model, quantizer = _quantize([{"op_names": ["block.add:1"], **UINT8}])
    x = torch.randn(8, 4, 5, 5)
    with torch.no_grad():
        y = F.relu(model.block.conv1(x)) + x
        expected = model.block.conv2(y) + y
    model(x)
    entry = quantizer.get_calibration_config()["block.add:1"]["_output_0"]
    assert entry["tracked_min"].item() == pytest.approx(expected.min().item(), rel=1e-5)
    assert entry["tracked_max"].item() == pytest.approx(expected.max().item(), rel=1e-5)
    captured = []
    model.block.register_forward_hook(lambda module, args, output: captured.append(output))
    model(x)
    added = captured[0][:, :4]  # the quantized sum is the first half of the concatenation
    q = added / entry["scale"] + entry["zero_point"]
    assert torch.allclose(q, q.round(), atol=1e-3) and not torch.allclose(added, expected, atol=1e-6)


def test_state_dict_round_trip_and_unwrap():
    model, quantizer = _quantize([{"op_types": ["add"], **UINT8}])
    model(torch.randn(4, 4, 5, 5))
    state = model.state_dict()
    assert "block.op_quant.add:0.fake_quant._output_0.scale" in state
    fresh, again = _quantize([{"op_types": ["add"], **UINT8}])
    fresh.load_state_dict(state)
    left, right = quantizer.get_calibration_config(), again.get_calibration_config()
    assert left.keys() == right.keys() and all(
        torch.equal(left[k]["_output_0"]["scale"], right[k]["_output_0"]["scale"]) for k in left
    )
    quantizer.unwrap_model()
    assert not any("op_quant" in key for key in model.state_dict()) and not model.block._forward_pre_hooks
    with torch.no_grad():  # the float model again: no quantization anywhere
        x = torch.randn(2, 4, 5, 5)
        y = F.relu(model.block.conv1(x)) + x
        assert torch.equal(model.block(x), torch.cat([model.block.conv2(y) + y, y], dim=1))


def test_from_compressor_keeps_op_targets_the_new_config_leaves_out():
    _, ptq = _quantize([{"op_types": ["add"], **UINT8}], cls=PtqQuantizer)
    ptq.track_forward(torch.randn(4, 4, 5, 5))
    ptq.compress()
    scale = ptq.get_calibration_config()["block.add:0"]["_output_0"]["scale"]
    qat = QATQuantizer.from_compressor(ptq, [{"op_types": ["Linear"], "target_names": ["weight"]}])
    assert list(qat.op_points) == ["block.add:0", "block.add:1"]
    assert torch.equal(qat.get_calibration_config()["block.add:0"]["_output_0"]["scale"], scale)


@pytest.mark.parametrize(
    "config, match",
    [
        (
            [{"op_names": ["block.add:7"]}],
            r"^config_list\[0\]: key 'op_names': no op named 'block.add:7' in the model's graph \(did you mean",
        ),
        ([{"op_names": ["block:add"]}], r"an op is named '<module>.<op>:<index>'"),
        (
            [{"op_types": ["ad"]}],
            r"^config_list\[0\]: key 'op_types': 'ad' is neither a module type nor an op .*did you mean 'add'",
        ),
        ([{"op_types": ["linear"]}], r"^config_list\[0\]: key 'op_types': 'linear' is neither .*did you mean 'Linear'"),
        (
            [{"op_types": ["add"], "target_names": ["weight"]}],
            r"^config_list\[0\]: key 'target_names': \['weight'\]: an op's target is its output "
            r"\('_output_'; silu and hardswish also",
        ),
        (
            [{"op_types": ["add", "cat"], "target_names": ["_output_", "_gate_"]}],
            r"^config_list\[0\]: key 'target_names': '_gate_' is the gate inside silu or hardswish "
            r"\(its sigmoid or hardsigmoid\); the entry also selects \['add', 'cat",
        ),
        (
            [{"op_types": ["silu"], "target_names": ["_gate_"]}],
            r"^config_list\[0\]: key 'target_names': \['_gate_'\]: '_gate_' comes with the op's '_output_'",
        ),
    ],
)
def test_bad_op_selectors_name_the_entry_and_key_and_leave_the_model_untouched(config, match):
    model = Net()
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=match):
        QATQuantizer(model, config, example_inputs=EXAMPLE)
    assert list(model.state_dict()) == keys and not hasattr(model, "quantrain_step") and not model.block._forward_pre_hooks


def test_ops_without_an_example_input_are_refused_and_known_ops_absent_from_the_model_are_fine():
    with pytest.raises(
        ValueError, match=r"^config_list\[0\] select functional ops, which are found in the model's graph.*example_inputs="
    ):
        QATQuantizer(Net(), [{"op_types": ["add"]}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, quantizer = _quantize([{"op_types": ["add", "silu", "layer_norm"], **UINT8}])  # silu, layer_norm: not here
    assert len(quantizer.op_points) == 2
    with pytest.warns(UserWarning, match=r"config_list\[0\] selects no module or op of Net"):
        _quantize([{"op_types": ["silu"]}])
    with pytest.warns(UserWarning, match=r"config_list\[1\]: op 'block.add:0' is already configured by config_list\[0\]"):
        _quantize([{"op_types": ["add"], **UINT8}, {"op_names": ["block.add:0"]}])
