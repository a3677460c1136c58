"""QAT under torch.autocast (CPU bfloat16): ranges and scales in float32, the rounding too (ops.fake_quant computes
half-precision inputs in the scale's dtype), no dtype errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantrain import QATQuantizer
from quantrain.config import Granularity, QuantDtype, QuantScheme, TargetSettings
from quantrain.fake_quantizer import FakeQuantizer

CONFIG = [
    {
        "op_types": ["Conv2d", "Linear"],
        "target_names": ["_input_", "weight", "_output_"],
        "quant_dtype": "uint8",
        "quant_scheme": "affine",
        "fuse_names": [("0", "1", "2")],
        "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric", "granularity": "out_channel"}},
    }
]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def train(model, autocast: bool, steps: int = 8) -> list[float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step % 2)
        x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
            loss = F.cross_entropy(out, y)
        if autocast:
            assert out.dtype == torch.bfloat16
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("integer_bias", [False, True])
def test_bf16_autocast_trains_with_float32_ranges(integer_bias):
    model = make_model()
    quantizer = QATQuantizer(model, CONFIG, integer_bias=integer_bias)
    losses = train(model, autocast=True)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the same two batches, seen repeatedly: the loss falls
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point():
            assert buffer.dtype == torch.float32, name
    for module in quantizer.quantized_modules.values():
        for fq in module.fake_quant.values():
            assert fq.is_calibrated and fq.scale.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters())

    reference = make_model()
    reference_quantizer = QATQuantizer(reference, CONFIG, integer_bias=integer_bias)
    train(reference, autocast=False)
    for module, targets in reference_quantizer.get_calibration_config().items():
        for target, entry in targets.items():  # bf16 activations: the same ranges to about 2^-8
            actual = quantizer.get_calibration_config()[module][target]
            torch.testing.assert_close(actual["tracked_max"], entry["tracked_max"], rtol=0.03, atol=0.03)
            torch.testing.assert_close(actual["tracked_min"], entry["tracked_min"], rtol=0.03, atol=0.03)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["default", "per_channel"])
def test_half_precision_input_is_quantized_in_float32(dtype, granularity):
    settings = TargetSettings(QuantDtype.parse("uint8"), QuantScheme.parse("affine"), Granularity.parse(granularity))
    fq = FakeQuantizer(settings, activation=True)
    fq.enable_fake_quant(True)
    x = (torch.randn(4, 3) * 3).to(dtype).requires_grad_()
    out = fq(x)
    assert out.dtype == dtype
    expected = ((torch.round(x.detach().float() / fq.scale + fq.zero_point).clamp(0, 255) - fq.zero_point) * fq.scale).to(dtype)
    assert torch.equal(out.detach(), expected)
    out.sum().backward()
    x32 = x.detach().float().requires_grad_()
    fq(x32).sum().backward()  # the float32 path: the same straight-through mask
    assert x.grad.dtype == dtype and torch.equal(x.grad, x32.grad.to(dtype))
