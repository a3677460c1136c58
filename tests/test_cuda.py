"""The fake-quant path on CUDA gives the CPU's numbers (runs only where a GPU is present)."""

import copy

import pytest
import torch
from torch import nn

from quantrain import QATQuantizer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_cuda_training_matches_cpu():
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    gpu = copy.deepcopy(cpu).cuda()
    config = [
        {
            "op_types": ["Conv2d", "Linear"],
            "quant_dtype": "uint8",
            "quant_scheme": "affine",
            "target_settings": {"weight": {"quant_dtype": "int8", "granularity": "out_channel"}},
        }
    ]
    quantizers = [QATQuantizer(cpu, config), QATQuantizer(gpu, config)]
    for _ in range(3):
        x = torch.randn(4, 3, 8, 8)
        out_cpu, out_gpu = cpu(x), gpu(x.cuda())
        out_gpu.sum().backward()
        out_cpu.sum().backward()
        assert torch.allclose(out_gpu.cpu(), out_cpu, atol=1e-4)
    assert gpu[0].fake_quant["weight"].scale.is_cuda
    config_cpu, config_gpu = (q.get_calibration_config() for q in quantizers)
    assert torch.allclose(config_gpu["0"]["weight"]["scale"], config_cpu["0"]["weight"]["scale"])
    assert config_gpu["0"]["weight"]["scale"].device.type == "cpu"
