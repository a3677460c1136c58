"""FakeQuantizer's one-call training forward (native observe + qparams + fake quantize) against its PyTorch path."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from quantrain.config import Granularity, GranularityKind, QuantDtype, QuantScheme, TargetSettings
from quantrain.fake_quantizer import FakeQuantizer
from quantrain.observer import RangeTracking
from quantrain.ops import native


@pytest.fixture
def kernels():
    if native._library() is None:
        pytest.skip(f"native kernels not built here: {native.status()}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32) if t.dtype == torch.float32 else t


def _batches(shape, count=6):
    """Batches with changing ranges, one holding a NaN and one an infinity (left out of the range)."""
    out = []
    for i in range(count):
        x = torch.randn(shape) * (1 + i) + 0.3 * i
        if i == 3:
            x.view(-1)[5] = float("nan")
        if i == 4:
            x.view(-1)[-1] = float("inf")
        out.append(x)
    return out


def _pair(settings, activation, tracking, blocks=None, range_shape=None):
    made = FakeQuantizer(settings, activation=activation, tracking=tracking, blocks=blocks, range_shape=range_shape)
    made.enable_fake_quant(True)
    return made, copy.deepcopy(made)


def _run(fq, batches, clamp, use_native, monkeypatch):
    with monkeypatch.context() as patch:
        if not use_native:
            patch.setattr(native, "observe_layout", lambda *args: None)
        calls = []
        original = fq._observe_and_quantize
        patch.setattr(fq, "_observe_and_quantize", lambda *a: calls.append(1) or original(*a))
        outputs, grads = [], []
        for x in batches:
            x = x.clone().requires_grad_(True)
            y = fq(x, clamp)
            weights = torch.linspace(-1, 2, y.numel()).reshape(y.shape)
            (y.nan_to_num(0.0, 0.0, 0.0) * weights).sum().backward()
            outputs.append(y.detach())
            grads.append(x.grad)
    return outputs, grads, len(calls)


def _assert_same(a: FakeQuantizer, b: FakeQuantizer, run_a, run_b):
    for ya, yb in zip(run_a[0], run_b[0], strict=True):
        assert torch.equal(_bits(ya), _bits(yb))
    for ga, gb in zip(run_a[1], run_b[1], strict=True):
        assert torch.equal(_bits(ga), _bits(gb))
    state_a, state_b = a.state_dict(), b.state_dict()
    for name, value in state_a.items():
        assert torch.equal(_bits(value), _bits(state_b[name])), name


SETTINGS = {
    "uint8-affine": TargetSettings(QuantDtype(8, False), QuantScheme.AFFINE),
    "int8-symmetric": TargetSettings(QuantDtype(8, True), QuantScheme.SYMMETRIC),
    "uint8-symmetric": TargetSettings(QuantDtype(8, False), QuantScheme.SYMMETRIC),  # zero point 128, constant
    "int4-affine": TargetSettings(QuantDtype(4, True), QuantScheme.AFFINE),
}


@pytest.mark.parametrize("tracking", list(RangeTracking))
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("clamp", [None, (0.0, None), (0.0, 6.0)])
def test_activation_steps_match_the_pytorch_path(kernels, monkeypatch, tracking, name, clamp):
    fast, slow = _pair(SETTINGS[name], activation=True, tracking=tracking)
    batches = _batches((16, 3, 5, 5))
    run_fast = _run(fast, batches, clamp, True, monkeypatch)
    run_slow = _run(slow, batches, clamp, False, monkeypatch)
    assert run_fast[2] == run_slow[2] == len(batches) - 1  # the first batch seeds the range the usual way
    _assert_same(fast, slow, run_fast, run_slow)
    assert int(fast.observer.nonfinite_batches) == (1 if clamp == (0.0, 6.0) else 2)  # ReLU6 clamps away the inf


@pytest.mark.parametrize("tracking", [RangeTracking.CURRENT, RangeTracking.MOVING_AVERAGE])
@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("shape", [(32, 20), (6, 4, 3, 3), (5, 40)])
def test_per_channel_weights_match_the_pytorch_path(kernels, monkeypatch, tracking, name, shape):
    settings = TargetSettings(SETTINGS[name].dtype, SETTINGS[name].scheme, Granularity(GranularityKind.OUT_CHANNEL))
    blocks = settings.granularity.block_shape(shape, activation=False)
    range_shape = (shape[0],) + (1,) * (len(shape) - 1)
    fast, slow = _pair(settings, activation=False, tracking=tracking, blocks=blocks, range_shape=range_shape)
    batches = [torch.randn(shape) * (i + 1) for i in range(4)]
    _assert_same(fast, slow, _run(fast, batches, None, True, monkeypatch), _run(slow, batches, None, False, monkeypatch))


def test_per_channel_activations_match_the_pytorch_path(kernels, monkeypatch):
    settings = TargetSettings(QuantDtype(8, False), QuantScheme.AFFINE, Granularity(GranularityKind.PER_CHANNEL))
    fast, slow = _pair(settings, activation=True, tracking=RangeTracking.MOVING_AVERAGE)
    batches = _batches((8, 6, 4, 4))
    run_fast, run_slow = _run(fast, batches, None, True, monkeypatch), _run(slow, batches, None, False, monkeypatch)
    _assert_same(fast, slow, run_fast, run_slow)
    assert fast.scale.shape == (1, 6, 1, 1) and int(fast.observer.nonfinite_batches) == 2


def test_hand_computed_step(kernels):
    fq = FakeQuantizer(SETTINGS["uint8-affine"], activation=True)
    fq.enable_fake_quant(True)
    fq(torch.tensor([-1.0, 3.0]))  # seeds the range [-1, 3]
    y = fq(torch.tensor([0.0, 5.0, 1.0]))  # range 0.99 * [-1, 3] + 0.01 * [0, 5] = [-0.99, 3.02]
    assert fq.observer.tracked_min.item() == pytest.approx(-0.99) and fq.observer.tracked_max.item() == pytest.approx(3.02)
    scale = (3.02 + 0.99) / 255
    assert fq.scale.item() == pytest.approx(scale, rel=1e-6)
    zero_point = round(0.99 / scale)
    assert fq.zero_point.item() == zero_point == 63
    assert y.tolist() == pytest.approx([0.0, (255 - zero_point) * scale, round(1 / scale) * scale], rel=1e-5)


def test_other_cases_keep_the_pytorch_path(kernels, monkeypatch):
    used = []

    def fake(x, *args):
        used.append(x)
        return torch.zeros_like(x), torch.ones(x.shape, dtype=torch.bool)

    monkeypatch.setattr(native, "observe_fake_quantize", fake)
    fq = FakeQuantizer(SETTINGS["uint8-affine"], activation=True)
    fq.enable_fake_quant(True)
    for x in (torch.randn(4, 5), torch.randn(4, 5, dtype=torch.float64), torch.randn(5, 4).t()):
        fq(x)  # the first seeds; then float64 and a transposed view are not for the kernel
    fq.observer.register_forward_hook(lambda *a: None)
    fq(torch.randn(4, 5))  # a hook on the observer must see its call
    assert used == []
    fq.observer._forward_hooks.clear()
    fq.train()
    fq(torch.randn(4, 5))
    assert len(used) == 1


def test_copies_and_pickles_rebuild_the_kernel_settings(kernels):
    fq = FakeQuantizer(SETTINGS["uint8-affine"], activation=True)
    fq.enable_fake_quant(True)
    for x in _batches((4, 5), count=3):
        fq(x)
    assert len(fq._native_plans) == 1
    copies = (copy.deepcopy(fq), pickle.loads(pickle.dumps(fq)))
    x = torch.randn(4, 5)
    want = fq(x)
    for other in copies:
        assert other._native_plans == {}
        assert torch.equal(other(x), want) and len(other._native_plans) == 1
