"""Quantized functional ops in the ONNX export: a residual add runs as ONNX Runtime's QLinearAdd, its ReLU folded."""

import collections

import torch
import torch.nn.functional as F
from torch import nn

from helpers import optimized_op_types
from quantrain import QATQuantizer, check_parity, deployable_config_list, export_onnx

UINT8 = {"quant_dtype": "uint8", "quant_scheme": "affine"}


class Residual(nn.Module):
    """torchvision's BasicBlock, shortened: conv-BN-ReLU, conv-BN, + input, ReLU (the same module twice)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn, self.relu = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.block1, self.block2 = Residual(), Residual()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        x = self.block2(self.block1(self.relu(self.bn(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_a_quantized_residual_add_runs_as_qlinearadd_with_its_relu_folded(tmp_path):
    torch.manual_seed(0)
    model = Net()
    example = torch.randn(2, 3, 8, 8)
    config = deployable_config_list(8, 8, input_module="stem", output_op_types=("AdaptiveAvgPool2d",))
    config.append({"op_types": ["add"], "target_names": ["_output_"], **UINT8})
    quantizer = QATQuantizer(model, config, fuse="auto", integer_bias=True, example_inputs=example)
    assert list(quantizer.op_points) == ["block1.add:0", "block2.add:0"]
    assert [p.clamp for p in quantizer.op_points.values()] == [(0.0, None), (0.0, None)]  # the ReLU after each add
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(4):
        x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        F.cross_entropy(model(x), torch.randint(0, 10, (16,))).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    path = tmp_path / "net.onnx"
    export_onnx(model, example, path)
    ops = collections.Counter(optimized_op_types(path, tmp_path))
    assert ops["QLinearAdd"] == 2 and ops["QLinearConv"] == 5 and ops["QGemm"] == 1
    assert "Relu" not in ops and "Add" not in ops and "Conv" not in ops  # nothing left in float between them
    report = check_parity(model, path, torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(9)))
    (output,) = report.outputs
    assert output.top1_agreement == 1.0 and output.max_diff_in_steps <= 1.0 + 1e-4
