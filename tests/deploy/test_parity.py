"""check_parity's reference side: which outputs count as quantized, and with which step."""

import torch
from torch import nn

from quantrain import QATQuantizer
from quantrain.deploy.parity import _reference


class FreesItsQuantizedTensor(nn.Module):
    """The quantized output of ``fc`` is freed before the model's output is made, so the output's Python object
    may take the freed one's place (and its id)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        total = y.sum(dim=1, keepdim=True)
        del y
        return total * 0.5


def test_an_output_no_quantizer_made_has_no_step_even_where_a_freed_tensor_had_its_id():
    model = FreesItsQuantizedTensor()
    QATQuantizer(model, [{"op_names": ["fc"], "target_names": ["_output_"]}])
    model(torch.randn(8, 4))
    # By id alone, a few percent of these calls would take fc's step for the output's (seen in GPT-2's pooled logits).
    steps = [_reference(model, lambda m: m(torch.randn(8, 4)))[1][0] for _ in range(300)]
    assert steps == [None] * 300


def test_an_output_a_quantizer_made_has_its_step():
    model = nn.Sequential(nn.Linear(4, 3))
    QATQuantizer(model, [{"op_names": ["0"], "target_names": ["_output_"]}])
    model(torch.randn(8, 4))
    (step,) = _reference(model, lambda m: m(torch.randn(8, 4)))[1]
    assert step == model[0].fake_quant["_output_0"].scale.item()


class AddsInPlace(nn.Module):
    """As torchvision's BasicBlock does ``out += identity``: the quantized output of ``fc`` changes after its
    quantizer produced it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        y += x
        return y


def _exported(model, tmp_path, example):
    from quantrain import export_onnx

    model(example)
    path = tmp_path / "model.onnx"
    export_onnx(model.eval(), example, path)
    return path


def test_per_layer_parity_compares_what_a_quantizer_produced_though_the_forward_then_changes_it_in_place(tmp_path):
    from quantrain import check_parity

    torch.manual_seed(0)
    model = AddsInPlace()
    QATQuantizer(model, [{"op_names": ["fc"], "target_names": ["_output_"]}])
    example = torch.randn(32, 4)
    path = _exported(model, tmp_path, example)
    (layer,) = check_parity(model, path, example, per_layer=True).layers
    # the tensor after `y += x` differs from the quantizer's output by |x|, about a hundred steps of fc's grid
    assert layer.label == "fc._output_0" and layer.max_diff_in_steps <= 1 + 1e-4


def test_the_float64_reference_compares_both_runtimes_with_the_model_in_float64_and_leaves_the_model_as_it_was(tmp_path):
    from quantrain import check_parity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    QATQuantizer(model, [{"op_types": ["Linear"], "target_names": ["_input_", "weight", "_output_"]}])
    example = torch.randn(64, 8)
    path = _exported(model, tmp_path, example)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = check_parity(model, path, example, float64=True)
    (own,), (onnx_,) = report.pytorch_vs_float64, report.onnx_vs_float64
    step = model[2].fake_quant["_output_0"].scale.item()
    # two layers: PyTorch's float32 rounding moves no value across a boundary of the output's grid here, ONNX
    # Runtime's integer requantization at most one value by one step
    assert own.max_abs_diff < step / 100 and onnx_.max_diff_in_steps <= 1 + 1e-4
    assert own.top1_agreement == onnx_.top1_agreement == 1.0
    assert "against the model in float64" in str(report)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_rounding_notes_say_whether_float32_rounding_explains_a_difference_of_several_steps():
    from quantrain.deploy.parity import OutputParity, _rounding_notes

    def parity(steps):
        return OutputParity("logits", 1.0, steps * 0.01, steps, 30.0)

    assert _rounding_notes((parity(1.0),)) == ()
    (hint,) = _rounding_notes((parity(3.0),))
    assert "float64=True" in hint
    (explained,) = _rounding_notes((parity(3.0),), (parity(3.0),), (parity(4.0),))
    assert "amplifies float32 rounding" in explained and "3.0 steps" in explained
    (unexplained,) = _rounding_notes((parity(3.0),), (parity(0.0),), (parity(3.0),))
    assert "more than rounding explains" in unexplained and "per_layer=True" in unexplained
