"""RangeObserver (EMA of min/max) and FakeQuantizer (observer + qparams + fake quantization, with state)."""

from __future__ import annotations

import pytest
import torch

from quantrain.config import Granularity, GranularityKind, QuantDtype, QuantScheme, TargetSettings
from quantrain.fake_quantizer import FakeQuantizer
from quantrain.observer import RangeObserver
from quantrain.ops import calculate_qparams, fake_quantize
from quantrain.ops.ranges import WHOLE

DECAY = 0.99


def _ema(avg: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
    return avg * DECAY + (1 - DECAY) * cur


def _settings(dtype: str = "int8", scheme: str = "symmetric", granularity: object = None) -> TargetSettings:
    return TargetSettings(QuantDtype.parse(dtype), QuantScheme.parse(scheme), Granularity.parse(granularity))


def _expected_output(x, lo, hi, settings: TargetSettings):
    symmetric = settings.scheme is QuantScheme.SYMMETRIC
    scale, zp = calculate_qparams(lo, hi, settings.qmin, settings.qmax, symmetric=symmetric)
    return fake_quantize(x, scale, zp, settings.qmin, settings.qmax), scale, zp


# --- RangeObserver ------------------------------------------------------------------------------------------------


def test_observer_first_batch_seeds_the_range():
    obs = RangeObserver()
    assert not obs.is_seeded
    assert obs.seeded.item() == 0
    obs(torch.tensor([-1.0, 2.0, 0.5]))
    assert obs.is_seeded
    assert obs.seeded.item() == 1
    assert obs.tracked_min.shape == ()
    assert (obs.tracked_min.item(), obs.tracked_max.item()) == (-1.0, 2.0)


def test_observer_ema_is_bit_exact_step_by_step():
    gen = torch.Generator().manual_seed(5)
    obs = RangeObserver()
    batches = [torch.randn(17, generator=gen) * (i + 1) for i in range(12)]
    obs(batches[0])
    exp_min, exp_max = batches[0].min(), batches[0].max()
    assert torch.equal(obs.tracked_min, exp_min)
    for batch in batches[1:]:
        obs(batch)
        exp_min, exp_max = _ema(exp_min, batch.min()), _ema(exp_max, batch.max())
        assert torch.equal(obs.tracked_min, exp_min)
        assert torch.equal(obs.tracked_max, exp_max)


def test_observer_docstring_values():
    obs = RangeObserver()
    obs(torch.tensor([-1.0, 2.0]))
    obs(torch.tensor([0.0, 4.0]))
    # min: -1 * .99 + .01 * 0 = -0.99 ; max: 2 * .99 + .01 * 4 = 2.02
    assert obs.tracked_min.item() == pytest.approx(-0.99, abs=1e-6)
    assert obs.tracked_max.item() == pytest.approx(2.02, abs=1e-6)


def test_observer_per_channel_ranges_via_blocks():
    obs = RangeObserver(None)
    x1 = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, 6.0], [-7.0, 0.0, -1.0]])
    obs(x1, (1, WHOLE))
    assert obs.tracked_min.shape == (3, 1)
    assert obs.tracked_min.flatten().tolist() == [-2.0, 4.0, -7.0]
    assert obs.tracked_max.flatten().tolist() == [3.0, 6.0, 0.0]
    x2 = torch.tensor([[0.0, 0.0, 0.0], [10.0, 10.0, 10.0], [-1.0, 1.0, 2.0]])
    obs(x2, (1, WHOLE))
    assert torch.equal(obs.tracked_min, _ema(torch.tensor([[-2.0], [4.0], [-7.0]]), torch.tensor([[0.0], [10.0], [-1.0]])))
    assert torch.equal(obs.tracked_max, _ema(torch.tensor([[3.0], [6.0], [0.0]]), torch.tensor([[0.0], [10.0], [2.0]])))


def test_observer_with_known_shape():
    obs = RangeObserver((1, 2))
    obs(torch.tensor([[1.0, -3.0], [-2.0, 4.0]]), (WHOLE, 1))
    assert obs.tracked_min.tolist() == [[-2.0, -3.0]]
    assert obs.tracked_max.tolist() == [[1.0, 4.0]]


def test_observer_tracks_half_precision_input_in_float32():
    obs = RangeObserver()
    obs(torch.tensor([-1.5, 2.25], dtype=torch.bfloat16))
    assert obs.tracked_min.dtype == torch.float32
    assert (obs.tracked_min.item(), obs.tracked_max.item()) == (-1.5, 2.25)


def test_observer_shape_change_raises():
    obs = RangeObserver(None)
    obs(torch.zeros(3, 4), (1, WHOLE))
    with pytest.raises(ValueError, match="range shape changed"):
        obs(torch.zeros(4, 4), (1, WHOLE))
    # the failed batch did not touch the range
    assert obs.tracked_min.shape == (3, 1)
    obs(torch.ones(3, 4), (1, WHOLE))
    assert torch.equal(obs.tracked_max, _ema(torch.zeros(3, 1), torch.ones(3, 1)))


def test_observer_rejects_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        RangeObserver(decay=1.0)
    with pytest.raises(ValueError, match="decay"):
        RangeObserver(decay=-0.1)


def test_observer_state_dict_round_trip():
    obs = RangeObserver()
    obs(torch.tensor([-1.0, 2.0]))
    obs(torch.tensor([-3.0, 1.0]))
    fresh = RangeObserver()
    fresh.load_state_dict(obs.state_dict())
    assert fresh.is_seeded
    assert torch.equal(fresh.tracked_min, obs.tracked_min)
    assert torch.equal(fresh.tracked_max, obs.tracked_max)
    # the next batch continues the average rather than re-seeding it
    batch = torch.tensor([5.0, 6.0])
    obs(batch)
    fresh(batch)
    assert torch.equal(fresh.tracked_min, obs.tracked_min)
    assert fresh.tracked_min.item() != 5.0


def test_observer_state_dict_into_lazily_shaped_observer():
    obs = RangeObserver(None)
    obs(torch.tensor([-1.0, 2.0, 0.5]), (1,))
    obs(torch.tensor([0.0, -4.0, 8.0]), (1,))
    assert obs.tracked_min.shape == (3,)
    fresh = RangeObserver(None)
    assert not fresh.is_seeded
    fresh.load_state_dict(obs.state_dict())
    assert fresh.is_seeded
    assert fresh.tracked_min.shape == (3,)
    assert torch.equal(fresh.tracked_min, obs.tracked_min)
    assert torch.equal(fresh.tracked_max, obs.tracked_max)
    batch = torch.tensor([1.0, 1.0, 1.0])
    obs(batch, (1,))
    fresh(batch, (1,))
    assert torch.equal(fresh.tracked_min, obs.tracked_min)
    assert torch.equal(fresh.tracked_max, obs.tracked_max)
    with pytest.raises(ValueError, match="range shape changed"):
        fresh(torch.zeros(4), (1,))


def test_observer_loading_an_unseeded_state_clears_is_seeded():
    obs = RangeObserver()
    obs(torch.tensor([-1.0, 2.0]))
    obs.load_state_dict(RangeObserver().state_dict())
    assert not obs.is_seeded
    obs(torch.tensor([5.0, 6.0]))  # seeds again
    assert (obs.tracked_min.item(), obs.tracked_max.item()) == (5.0, 6.0)


# --- FakeQuantizer --------------------------------------------------------------------------------------------------


def test_fake_quantizer_is_identity_before_enabling_but_tracks():
    fq = FakeQuantizer(_settings())
    x = torch.tensor([-1.0, 0.3, 3.0])
    assert torch.equal(fq(x), x)
    assert (fq.observer.tracked_min.item(), fq.observer.tracked_max.item()) == (-1.0, 3.0)
    assert not fq.is_calibrated
    assert fq.scale.item() == 1.0
    x2 = torch.tensor([-2.0, 5.0])
    assert torch.equal(fq(x2), x2)
    assert torch.equal(fq.observer.tracked_max, _ema(torch.tensor(3.0), torch.tensor(5.0)))


def test_fake_quantizer_training_forward_uses_range_including_current_batch():
    settings = _settings()
    fq = FakeQuantizer(settings)
    fq(torch.tensor([-1.0, 3.0]))  # seeds (-1, 3) while disabled
    fq.enable_fake_quant(True)
    assert fq.fake_quant_enabled.item() == 1
    x = torch.tensor([-2.0, 0.3, 5.0])
    y = fq(x)
    lo, hi = _ema(torch.tensor(-1.0), torch.tensor(-2.0)), _ema(torch.tensor(3.0), torch.tensor(5.0))
    expected, scale, zp = _expected_output(x, lo, hi, settings)
    assert fq.is_calibrated
    assert torch.equal(fq.scale, scale)
    assert torch.equal(fq.zero_point, zp)
    assert torch.equal(y, expected)
    # hand check: range (-1.01, 3.02), scale 3.02 / 127; 5.0 saturates at 127 * scale ~ 3.02 (not 3.0 nor 5.0)
    assert fq.scale.item() == pytest.approx(3.02 / 127, rel=1e-6)
    assert y[2].item() == pytest.approx(3.02, rel=1e-6)
    assert y[1].item() == pytest.approx(round(0.3 / (3.02 / 127)) * 3.02 / 127, rel=1e-6)


def test_fake_quantizer_affine_first_batch_after_enabling():
    settings = _settings("uint8", "affine")
    fq = FakeQuantizer(settings)
    fq.enable_fake_quant()
    x = torch.tensor([-1.0, 0.01, 3.0])
    y = fq(x)
    # range (-1, 3): scale 4/255, zp 64
    assert torch.equal(fq.scale, torch.tensor(4.0) / 255)
    assert fq.zero_point.item() == 64.0
    assert torch.equal(y, fake_quantize(x, torch.tensor(4.0) / 255, torch.tensor(64.0), 0, 255))
    assert y[1].item() == pytest.approx(4.0 / 255, rel=1e-6)  # 0.01 / (4/255) = 0.64 -> 1 step


def test_fake_quantizer_eval_keeps_range_and_scale_but_quantizes():
    settings = _settings()
    fq = FakeQuantizer(settings)
    fq.enable_fake_quant()
    fq(torch.tensor([-1.0, 3.0]))
    fq(torch.tensor([-2.0, 2.0]))
    tracked = (fq.observer.tracked_min.clone(), fq.observer.tracked_max.clone())
    scale, zp = fq.scale.clone(), fq.zero_point.clone()
    fq.eval()
    x = torch.tensor([-10.0, 0.3, 10.0])
    y = fq(x)
    assert torch.equal(fq.observer.tracked_min, tracked[0])
    assert torch.equal(fq.observer.tracked_max, tracked[1])
    assert torch.equal(fq.scale, scale)
    assert torch.equal(fq.zero_point, zp)
    assert torch.equal(y, fake_quantize(x, scale, zp, -127, 127))
    assert y[2].item() == pytest.approx(127 * scale.item(), rel=1e-6)
    assert not torch.equal(y, x)


def test_fake_quantizer_enabled_but_uncalibrated_in_eval_is_identity():
    fq = FakeQuantizer(_settings())
    fq.enable_fake_quant()
    fq.eval()
    x = torch.tensor([-1.0, 0.3, 3.0])
    assert torch.equal(fq(x), x)
    assert not fq.is_calibrated
    assert not fq.observer.is_seeded


def test_fake_quantizer_disabled_observer_freezes_ranges():
    fq = FakeQuantizer(_settings())
    fq.enable_fake_quant()
    fq(torch.tensor([-1.0, 3.0]))
    fq.enable_observer(False)
    assert fq.observer_enabled.item() == 0
    tracked_max, scale = fq.observer.tracked_max.clone(), fq.scale.clone()
    x = torch.tensor([-50.0, 0.3, 50.0])
    y = fq(x)  # training mode
    assert torch.equal(fq.observer.tracked_max, tracked_max)
    assert torch.equal(fq.scale, scale)
    assert torch.equal(y, fake_quantize(x, scale, fq.zero_point, -127, 127))
    assert y[2].item() == pytest.approx(3.0, rel=1e-6)
    fq.enable_observer(True)
    fq(x)
    assert torch.equal(fq.observer.tracked_max, _ema(torch.tensor(3.0), torch.tensor(50.0)))
    assert not torch.equal(fq.scale, scale)


def test_fake_quantizer_rejects_non_float_input_with_label():
    fq = FakeQuantizer(_settings(), label="fc1.weight")
    with pytest.raises(TypeError, match=r"fc1\.weight"):
        fq(torch.tensor([1, 2, 3]))
    assert not fq.observer.is_seeded


def test_fake_quantizer_per_channel_activation():
    settings = _settings("int8", "symmetric", "per_channel")
    assert settings.granularity.kind is GranularityKind.PER_CHANNEL
    fq = FakeQuantizer(settings, activation=True, label="conv.input")
    fq.enable_fake_quant()
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 4, 4, generator=gen) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1)
    y = fq(x)
    lo, hi = x.amin(dim=(0, 2, 3), keepdim=True), x.amax(dim=(0, 2, 3), keepdim=True)
    expected, scale, zp = _expected_output(x, lo, hi, settings)
    assert fq.scale.shape == (1, 3, 1, 1)
    assert torch.equal(fq.scale, scale)
    assert torch.equal(fq.zero_point, zp)
    assert torch.equal(y, expected)
    # per channel, not per tensor: the scales differ by channel
    assert fq.scale[0, 2].item() < fq.scale[0, 0].item() < fq.scale[0, 1].item()

    x2 = torch.randn(5, 3, 4, 4, generator=gen)
    y2 = fq(x2)
    lo2 = _ema(lo, x2.amin(dim=(0, 2, 3), keepdim=True))
    hi2 = _ema(hi, x2.amax(dim=(0, 2, 3), keepdim=True))
    expected2, scale2, _ = _expected_output(x2, lo2, hi2, settings)
    assert fq.scale.shape == (1, 3, 1, 1)
    assert torch.equal(fq.scale, scale2)
    assert torch.equal(y2, expected2)
    assert y2.shape == (5, 3, 4, 4)


def test_fake_quantizer_per_row_weight_with_known_shape():
    settings = _settings("int8", "symmetric", "out_channel")
    fq = FakeQuantizer(settings, blocks=(1, WHOLE), range_shape=(2, 1), label="fc.weight")
    fq.enable_fake_quant()
    w = torch.tensor([[1.27, -0.5, 0.013], [-12.7, 3.0, 0.06]])
    y = fq(w)
    # row 0: scale 1.27/127 = 0.01; row 1: 12.7/127 = 0.1
    assert fq.scale.flatten().tolist() == pytest.approx([0.01, 0.1], rel=1e-6)
    assert torch.equal(y, fake_quantize(w, fq.scale, fq.zero_point, -127, 127))
    assert y.flatten().tolist() == pytest.approx([1.27, -0.5, 0.01, -12.7, 3.0, 0.1], rel=1e-5)


@pytest.mark.parametrize("granularity", [None, "per_channel"])
def test_fake_quantizer_state_dict_round_trip_lazily_shaped(granularity):
    settings = _settings("uint8", "affine", granularity)
    fq = FakeQuantizer(settings, activation=True, label="act")
    gen = torch.Generator().manual_seed(21)
    fq(torch.randn(4, 3, 2, 2, generator=gen))
    fq.enable_fake_quant()
    fq(torch.randn(4, 3, 2, 2, generator=gen) + 0.5)
    fq.enable_observer(False)
    state = fq.state_dict()

    fresh = FakeQuantizer(settings, activation=True, label="act")
    assert not fresh.is_calibrated
    fresh.load_state_dict(state)
    assert fresh.is_calibrated
    assert fresh.fake_quant_enabled.item() == 1
    assert fresh.observer_enabled.item() == 0
    assert fresh.observer.is_seeded
    assert fresh.scale.shape == fq.scale.shape == ((1, 3, 1, 1) if granularity else ())
    for name, value in fq.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name

    x = torch.randn(6, 3, 2, 2, generator=gen) * 3
    assert torch.equal(fresh(x), fq(x))  # training mode, observer frozen: quantizes, range unchanged
    assert not torch.equal(fresh(x), x)
    fresh.eval()
    fq.eval()
    assert torch.equal(fresh(x), fq(x))
    # the restored flags drive training forwards too
    fresh.train()
    fq.train()
    fresh.enable_observer(True)
    fq.enable_observer(True)
    assert torch.equal(fresh(x), fq(x))
    assert torch.equal(fresh.scale, fq.scale)
    assert torch.equal(fresh.observer.tracked_min, fq.observer.tracked_min)


def test_fake_quantizer_state_dict_round_trip_disabled_fake_quant():
    fq = FakeQuantizer(_settings(), activation=True)
    fq(torch.tensor([[-1.0, 3.0]]))
    fresh = FakeQuantizer(_settings(), activation=True)
    fresh.enable_fake_quant()
    fresh.load_state_dict(fq.state_dict())
    assert fresh.fake_quant_enabled.item() == 0
    assert not fresh.is_calibrated
    x = torch.tensor([[0.3, -7.0]])
    assert torch.equal(fresh(x), x)  # the loaded "disabled" flag wins over the fresh module's own
