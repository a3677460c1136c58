"""The native CPU kernels: the same bits as the PyTorch operations they replace, where they apply, and a fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from quantrain import QATQuantizer
from quantrain.ops import native
from quantrain.ops.fake_quant import fake_quantize, fake_quantize_clamped, torch_quantize_dequantize_with_mask
from quantrain.ops.ranges import min_max

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture
def kernels():
    if native._library() is None:
        pytest.skip(f"native kernels not built here: {native.status()}")
    return native


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _awkward(shape, scale=1.0) -> torch.Tensor:
    """Random values plus the cases rounding and clamping get wrong: ties, zeros of both signs, NaN, infinities."""
    x = torch.randn(shape) * scale
    flat = x.view(-1)
    special = torch.tensor([0.5, 1.5, -2.5, 0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e30, -1e-30])
    flat[: min(len(special), flat.numel())] = special[: flat.numel()]
    return x


RANGES = [(-127, 127), (-128, 127), (0, 255), (-8, 7), (0, 15)]


@pytest.mark.parametrize(("qmin", "qmax"), RANGES)
@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize(
    ("shape", "qshape"),
    [((300,), ()), ((64, 33), (64, 1)), ((8, 6, 5, 5), (8, 1, 1, 1)), ((4, 6, 3, 7), (1, 6, 1, 1)), ((5, 7, 9), (9,))],
)
def test_fake_quant_matches_pytorch_bit_for_bit(kernels, qmin, qmax, affine, shape, qshape):
    x = _awkward(shape, scale=3.0)
    scale = torch.rand(qshape) * 0.05 + 0.01
    zero_point = torch.randint(qmin, qmax + 1, qshape).float() if affine else None
    got = kernels.fake_quantize_with_mask(x, scale, zero_point, qmin, qmax)
    want = torch_quantize_dequantize_with_mask(x, scale, zero_point, qmin, qmax)
    assert got is not None
    assert torch.equal(_bits(got[0]), _bits(want[0]))
    mask = kernels.unpack_mask(got[1], x.shape)
    assert got[1].dtype == torch.uint8 and got[1].numel() == (x.numel() + 7) // 8  # one bit per element
    assert torch.equal(mask, want[1])
    assert not mask.all() and mask.any()  # both sides of the clamp were exercised


@pytest.mark.parametrize("clamp", [(0.0, None), (0.0, 6.0), (-1.0, 1.0)])
@pytest.mark.parametrize("affine", [False, True])
def test_fused_clamp_matches_pytorch(kernels, clamp, affine):
    x = _awkward((32, 50), scale=4.0)
    scale, zero_point = torch.tensor(0.03), (torch.tensor(7.0) if affine else None)
    got = kernels.fake_quantize_with_mask(x, scale, zero_point, 0, 255, clamp)
    want = torch_quantize_dequantize_with_mask(x, scale, zero_point, 0, 255, clamp)
    mask = kernels.unpack_mask(got[1], x.shape)
    assert torch.equal(_bits(got[0]), _bits(want[0])) and torch.equal(mask, want[1])
    # the gate: gradient only strictly inside the clamp (and inside the quantization range)
    inside = (x > clamp[0]) & (x < (clamp[1] if clamp[1] is not None else float("inf")))
    assert not (mask & ~inside).any()


def test_hand_computed_values(kernels):
    out, mask = kernels.fake_quantize_with_mask(
        torch.tensor([[0.26, -0.34, 9.0], [0.25, 0.75, -1.25]]), torch.tensor([[0.1], [0.5]]), None, -10, 10
    )
    assert out.flatten().tolist() == pytest.approx([0.3, -0.3, 1.0, 0.0, 1.0, -1.0], abs=1e-7)
    assert mask.tolist() == [0b111011]  # bit i for element i, row after row


@pytest.mark.parametrize(("shape", "axis"), [((64, 100), 0), ((7, 3, 5), 1), ((3, 100, 33), 2), ((5, 16, 2, 2), 1)])
def test_channel_min_max_matches_amin_amax(kernels, shape, axis):
    x = torch.randn(shape)
    mins, maxs = kernels.channel_min_max(x, axis)
    dims = [d for d in range(len(shape)) if d != axis]
    assert torch.equal(mins, x.amin(dims)) and torch.equal(maxs, x.amax(dims))


def test_channel_min_max_lets_nan_win(kernels):
    x = torch.randn(6, 40)
    x[1, 39] = float("nan")  # in the tail after the vectorized part
    x[4, 3] = float("nan")
    x[2, 5] = float("inf")
    mins, maxs = kernels.channel_min_max(x, 0)
    assert torch.equal(mins.isnan(), torch.tensor([False, True, False, False, True, False]))
    assert maxs[2] == float("inf") and torch.equal(maxs.isnan(), mins.isnan())
    assert torch.equal(mins[~mins.isnan()], x.amin(1)[~mins.isnan()])


def test_per_channel_ranges_use_one_pass(kernels, monkeypatch):
    calls = []
    monkeypatch.setattr(native, "channel_min_max", lambda x, axis: calls.append(axis))  # None: falls back
    x = torch.randn(4, 8)
    lo, hi = min_max(x, (1, -1))
    assert calls == [0] and torch.equal(lo, x.amin(1, keepdim=True)) and torch.equal(hi, x.amax(1, keepdim=True))


@pytest.mark.parametrize("n", [5, 8, 21, 70000])
def test_masked_gradient(kernels, n):
    grad = torch.randn(n)
    grad[:5] = torch.tensor([1.5, -2.0, float("nan"), float("inf"), -3.0])
    mask = torch.rand(n) > 0.3
    mask[:5] = torch.tensor([True, False, False, False, True])
    bits = kernels.fake_quantize_with_mask(torch.where(mask, 0.0, 1e9), torch.tensor(1.0), None, -127, 127)[1]
    assert torch.equal(kernels.unpack_mask(bits, (n,)), mask)
    got = kernels.masked_grad(grad, bits)
    assert torch.equal(_bits(got), _bits(grad * mask.float()))  # -2 * 0 = -0.0; NaN and inf * 0 = NaN
    unpacked = kernels.masked_grad(grad.double(), bits)  # unpacked with PyTorch operations
    assert torch.equal(unpacked.view(torch.int64), (grad.double() * mask.double()).view(torch.int64))
    x = torch.tensor([0.26, 9.0, -0.34], requires_grad=True)
    fake_quantize(x, torch.tensor(0.1), None, -10, 10).backward(torch.tensor([2.0, 3.0, 4.0]))
    assert x.grad.tolist() == [2.0, 0.0, 4.0]


def test_other_tensors_take_the_pytorch_path(kernels):
    scale = torch.tensor(0.1)
    for x in (torch.randn(8, dtype=torch.float64), torch.randn(8, 4).t(), torch.randn(8, dtype=torch.bfloat16)):
        assert kernels.fake_quantize_with_mask(x, scale, None, -127, 127) is None
    assert kernels.fake_quantize_with_mask(torch.randn(4, 6), torch.rand(4, 6), None, -127, 127) is None  # two axes
    assert kernels.fake_quantize_with_mask(torch.randn(4, 6), scale.double(), None, -127, 127) is None
    assert kernels.channel_min_max(torch.randn(8, 4).t(), 0) is None


def test_fused_clamp_gradient_through_autograd(kernels):
    x = torch.tensor([-1.0, 0.26, 5.9, 9.0], requires_grad=True)
    y = fake_quantize_clamped(x, 0.0, 6.0, torch.tensor(0.1), None, 0, 255)
    y.sum().backward()
    assert y.tolist() == pytest.approx([0.0, 0.3, 5.9, 6.0], abs=1e-6) and x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def _train(fuse, steps: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    config = [
        {"op_types": ["Conv2d"], "target_names": ["_input_", "weight", "_output_"], "quant_dtype": "int8",
         "granularity": "per_channel"},
        {"op_types": ["Linear"], "target_names": ["_input_", "weight", "_output_"], "quant_dtype": "uint8",
         "quant_scheme": "affine"},
    ]  # fmt: skip
    QATQuantizer(model, config, fuse=fuse, example_inputs=torch.zeros(1, 1, 8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_identical_with_and_without_kernels(kernels, monkeypatch):
    with_kernels = _train(fuse=None)
    monkeypatch.setattr(native, "_library", lambda: None)
    without = _train(fuse=None)
    assert with_kernels.keys() == without.keys()
    for name, value in with_kernels.items():
        assert torch.equal(value, without[name]), name


def test_folded_batch_norm_training_agrees_with_the_pytorch_path(kernels, monkeypatch):
    with_kernels = _train(fuse="auto")
    assert "0.fusion.bn_frozen" in with_kernels  # the BatchNorm was folded
    monkeypatch.setattr(native, "_library", lambda: None)
    without = _train(fuse="auto")
    for name, value in with_kernels.items():  # the fold's per-channel sum is rounded differently (see the kernel)
        torch.testing.assert_close(value, without[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("shape", [(64, 32, 8, 8), (5, 7, 3), (4, 6)])
def test_channel_divide_backward(kernels, shape):
    grad, out = torch.randn(shape), torch.randn(shape)
    s = torch.rand((1, shape[1]) + (1,) * (len(shape) - 2)) + 0.5
    grad_y, grad_s = kernels.channel_divide_backward(grad, out, s, True, True)
    assert torch.equal(_bits(grad_y), _bits(grad / s))
    torch.testing.assert_close(grad_s, -(grad * out).sum_to_size(s.shape) / s, rtol=1e-5, atol=1e-5)
    exact = -(grad.double() * out.double()).sum_to_size(s.shape) / s.double()
    assert (grad_s.double() - exact).abs().max() <= (exact.abs() * 2**-23).max()  # within one rounding
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(_bits(kernels.channel_divide_backward(grad, out, s, False, True)[1]), _bits(grad_s))
    finally:
        torch.set_num_threads(threads)
    assert kernels.channel_divide_backward(grad, out, s, True, False)[1] is None
    assert kernels.channel_divide_backward(grad.t() if grad.dim() == 2 else grad.transpose(0, 1), out, s, True, True) is None


def _status_in_subprocess(tmp_path, **env) -> str:
    environment = {**os.environ, "PYTHONPATH": SRC, "QUANTRAIN_CACHE_DIR": str(tmp_path / "cache"), **env}
    code = "from quantrain.ops import native; import torch; print(native.status()); "
    code += "print(native.fake_quantize_with_mask(torch.ones(3), torch.tensor(0.5), None, -127, 127) is None)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_disabled_by_environment(tmp_path):
    out = _status_in_subprocess(tmp_path, QUANTRAIN_NATIVE="0")
    assert out.splitlines() == ["disabled by QUANTRAIN_NATIVE", "True"]


@pytest.mark.slow
def test_a_failing_compiler_falls_back_with_its_reason(tmp_path):
    out = _status_in_subprocess(tmp_path, CC="false").splitlines()
    assert out[0].startswith("unavailable (false failed") and out[0].endswith("using PyTorch operations")
    assert out[1] == "True"


@pytest.mark.slow
def test_builds_into_the_cache_directory_once(tmp_path, kernels):
    first = _status_in_subprocess(tmp_path).splitlines()
    assert first[0].startswith(f"loaded: {tmp_path / 'cache'}") and first[1] == "False"
    built = list((tmp_path / "cache").glob("*.so"))
    assert len(built) == 1 and not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # no scratch left
    stamp = built[0].stat().st_mtime_ns
    assert _status_in_subprocess(tmp_path).splitlines() == first
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
