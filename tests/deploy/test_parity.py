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
