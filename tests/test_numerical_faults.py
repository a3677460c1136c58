"""NaN and infinity never reach a tracked range; degenerate and extreme tensors give finite scales and outputs."""

import warnings

import pytest
import torch
from torch import nn

from quantrain import PtqQuantizer, QATQuantizer
from quantrain.config import Granularity, QuantDtype, QuantScheme, TargetSettings
from quantrain.fake_quantizer import FakeQuantizer
from quantrain.observer import RangeObserver, RangeTracking

OUTPUT = [{"op_names": ["0"], "target_names": ["_output_"], "quant_dtype": "uint8", "quant_scheme": "affine"}]


def _fq(granularity="default", dtype="uint8", scheme="affine"):
    settings = TargetSettings(QuantDtype.parse(dtype), QuantScheme.parse(scheme), Granularity.parse(granularity))
    fq = FakeQuantizer(settings, activation=True, label="m._output_0")
    fq.enable_fake_quant(True)
    return fq


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("tracking", list(RangeTracking))
def test_a_batch_with_nan_or_infinity_leaves_the_range_as_it_was(bad, tracking):
    obs = RangeObserver(tracking=tracking)
    obs(torch.tensor([-1.0, 2.0]))
    obs(torch.tensor([-0.5, 3.0]))
    before = obs.tracked_min.clone(), obs.tracked_max.clone()
    obs(torch.tensor([-0.7, bad, 1.0]))
    torch.testing.assert_close((obs.tracked_min, obs.tracked_max), before, rtol=2e-7, atol=0)  # EMA of a value with itself
    assert int(obs.nonfinite_batches) == 1
    obs(torch.tensor([-4.0, 5.0]))  # and tracking goes on
    assert torch.isfinite(obs.tracked_min) and obs.tracked_max > before[1]


def test_only_the_blocks_with_nan_are_left_out():
    obs = RangeObserver(shape=None)
    obs(torch.tensor([[1.0, -1.0], [2.0, -2.0]]), (1, -1))  # one range per row
    obs(torch.tensor([[3.0, float("nan")], [4.0, -4.0]]), (1, -1))
    assert obs.tracked_max[0].item() == pytest.approx(1.0) and obs.tracked_min[0].item() == pytest.approx(-1.0)  # kept
    assert obs.tracked_max[1].item() == pytest.approx(0.99 * 2.0 + 0.01 * 4.0)
    assert int(obs.nonfinite_batches) == 1


def test_a_first_batch_without_a_finite_value_seeds_nothing_and_is_not_quantized():
    fq = _fq()
    x = torch.tensor([float("nan"), 1.0])
    out = fq(x)
    assert not fq.observer.is_seeded and not fq.is_calibrated
    assert torch.equal(out[1:], x[1:])  # passed through: there is no scale yet
    fq(torch.tensor([0.0, 2.55]))
    assert fq.is_calibrated and fq.scale.item() == pytest.approx(0.01)


def test_a_first_batch_with_one_bad_channel_starts_that_channel_at_zero():
    obs = RangeObserver(shape=None)
    obs(torch.tensor([[float("inf"), 1.0], [2.0, -3.0]]), (1, -1))
    assert obs.is_seeded
    assert obs.tracked_min.flatten().tolist() == [0.0, -3.0] and obs.tracked_max.flatten().tolist() == [0.0, 2.0]


def test_with_a_reducer_a_left_out_block_takes_the_other_processes_range():
    other = (torch.tensor(-2.0), torch.tensor(6.0))  # another rank's finite batch range

    def reduce(lo, hi):
        return torch.minimum(lo, other[0]), torch.maximum(hi, other[1])

    obs = RangeObserver(tracking=RangeTracking.CURRENT)
    obs.reducer = reduce
    obs(torch.tensor([1.0, float("nan")]))
    assert (obs.tracked_min.item(), obs.tracked_max.item()) == (-2.0, 6.0)  # not NaN: this rank's batch is left out


def test_training_warns_naming_the_module_and_keeps_scales_finite():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    quantizer = QATQuantizer(model, OUTPUT)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(4):
        x = torch.randn(8, 4)
        if step == 2:
            x[3, 1] = float("nan")
        optimizer.zero_grad()
        model(x).sum().backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            optimizer.zero_grad() if step == 2 else None  # the NaN gradient is not applied
            optimizer.step()
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        if step == 2:
            assert len(messages) == 1 and "0._output_0 (1)" in messages[0]
        else:
            assert messages == []
    entry = quantizer.get_calibration_config()["0"]["_output_0"]
    assert all(torch.isfinite(entry[key]).all() for key in ("scale", "zero_point", "tracked_min", "tracked_max"))
    assert quantizer.check_nonfinite() == {}  # reported once


def test_ptq_calibration_leaves_out_batches_with_infinity():
    model = nn.Sequential(nn.Linear(4, 4))
    ptq = PtqQuantizer(model, OUTPUT)
    ptq.track_forward(torch.ones(2, 4))
    high = ptq.quantized_modules["0"].fake_quant["_output_0"].observer.tracked_max.clone()
    with pytest.warns(RuntimeWarning, match=r"0\._output_0 \(1\)"):
        ptq.track_forward(torch.full((2, 4), float("inf")))
    assert torch.equal(ptq.quantized_modules["0"].fake_quant["_output_0"].observer.tracked_max, high)


@pytest.mark.parametrize("scheme, dtype", [("affine", "uint8"), ("affine", "int8"), ("symmetric", "int8")])
@pytest.mark.parametrize("value", [0.0, 3.0, -3.0])
def test_all_zero_and_constant_tensors_give_finite_scales(scheme, dtype, value):
    fq = _fq(dtype=dtype, scheme=scheme)
    x = torch.full((16,), value)
    out = fq(x)
    assert torch.isfinite(fq.scale).all() and fq.scale.item() > 0
    assert torch.allclose(out, x, atol=fq.scale.item())  # the constant is representable to within a step


@pytest.mark.parametrize("magnitude", [1e30, 1e-30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("granularity", ["default", "per_channel"])
def test_extreme_magnitudes_give_finite_results(magnitude, dtype, granularity):
    if dtype is torch.float16 and magnitude > 65504:
        magnitude = 6e4  # float16's largest values (1e30 is infinite there)
    fq = _fq(granularity=granularity, dtype="int8")
    x = (torch.linspace(-1, 1, 12).reshape(3, 4) * magnitude).to(dtype).requires_grad_()
    out = fq(x)
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(fq.scale).all()
    if magnitude >= 1:  # large values keep their size to within a step; tiny ones fall below eps and round to 0
        # within half a step, plus the output's own rounding to a half-precision dtype
        tolerance = fq.scale.max() * 0.51 + x.detach().float().abs() * torch.finfo(dtype).eps
        assert ((out.float() - x.detach().float()).abs() <= tolerance).all()
    else:
        assert (out == 0).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_the_compiled_observer_leaves_nan_batches_out_too():
    obs = RangeObserver()
    observe = torch.compile(obs, backend="eager")  # the compiled branch, traced by dynamo
    observe(torch.tensor([-1.0, 2.0]))
    observe(torch.tensor([-0.5, 3.0]))
    before = obs.tracked_min.clone(), obs.tracked_max.clone()
    observe(torch.tensor([-0.7, float("nan"), 1.0]))
    torch.testing.assert_close((obs.tracked_min, obs.tracked_max), before, rtol=2e-7, atol=0)
    assert int(obs.nonfinite_batches) == 1
