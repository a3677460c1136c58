"""fake_quantize / quantize_dequantize: values, rounding, saturation, straight-through gradient, dtypes, blocks."""

from __future__ import annotations

import pytest
import torch

from quantrain.config import QuantDtype
from quantrain.ops import calculate_qparams, fake_quantize, min_max, quantize_dequantize

INT8 = (-127, 127)
UINT8 = (0, 255)


def _reference(x, scale, zero_point, qmin, qmax):
    """The documented formula, written out independently (scale and zp already broadcast to x)."""
    t = x / scale + zero_point
    q = torch.round(torch.clamp(t, min=qmin, max=qmax))
    return ((q - zero_point) * scale).to(x.dtype)


def _fq(values, scale, zero_point, qmin, qmax):
    x = torch.tensor(values, dtype=torch.float32)
    return fake_quantize(x, torch.tensor(scale), torch.tensor(zero_point), qmin, qmax)


# --- forward values -----------------------------------------------------------------------------------------------


def test_round_half_to_even():
    # scale 0.5, zp 0: t = 0.5 -> 0, 1.5 -> 2, -2.5 -> -2, 2.5 -> 2, -0.5 -> 0, 3.5 -> 4
    y = _fq([0.25, 0.75, -1.25, 1.25, -0.25, 1.75], 0.5, 0.0, *INT8)
    assert y.tolist() == [0.0, 1.0, -1.0, 1.0, 0.0, 2.0]


def test_rounds_to_nearest_step():
    # scale 0.1: 0.26 -> t 2.6 -> 3 -> 0.3; -0.34 -> -3.4 -> -3 -> -0.3
    y = _fq([0.26, -0.34], 0.1, 0.0, *INT8)
    assert y.tolist() == [(torch.tensor(3.0) * torch.tensor(0.1)).item(), (torch.tensor(-3.0) * torch.tensor(0.1)).item()]


def test_saturates_at_both_ends():
    # int4 [-7, 7], scale 0.5: representable [-3.5, 3.5]
    y = _fq([10.0, -10.0, 3.5, -3.5, 3.6, -3.9], 0.5, 0.0, -7, 7)
    assert y.tolist() == [3.5, -3.5, 3.5, -3.5, 3.5, -3.5]


def test_saturates_with_nonzero_zero_point():
    # uint8, scale 0.5, zp 10: representable [(0 - 10) * 0.5, (255 - 10) * 0.5] = [-5, 122.5]
    y = _fq([-5.0, -6.0, -100.0, 100.0, 200.0, 0.3, 0.0], 0.5, 10.0, *UINT8)
    # 0.3 -> t 10.6 -> 11 -> 0.5; 100 -> t 210 -> 100
    assert y.tolist() == [-5.0, -5.0, -5.0, 100.0, 122.5, 0.5, 0.0]


def test_negative_zero_point():
    # int8, scale 0.25, zp -63: representable [(-127 + 63) * .25, (127 + 63) * .25] = [-16, 47.5]
    y = _fq([-20.0, -16.0, 0.0, 1.1, 47.5, 50.0], 0.25, -63.0, *INT8)
    # 1.1 -> t 4.4 - 63 = -58.6 -> -59 -> (-59 + 63) * .25 = 1.0
    assert y.tolist() == [-16.0, -16.0, 0.0, 1.0, 47.5, 47.5]


def test_per_channel_scale_broadcasts_over_rows():
    x = torch.tensor([[0.3, -1.1, 100.0], [0.3, -1.1, 100.0]])
    scale = torch.tensor([[0.5], [0.25]])
    zp = torch.tensor([[0.0], [1.0]])
    y = fake_quantize(x, scale, zp, *INT8)
    # row 0: t = [0.6, -2.2, 200] -> [1, -2, 127] -> [0.5, -1.0, 63.5]
    # row 1: t = [2.2, -3.4, 401] -> [2, -3, 127] -> [0.25, -1.0, 31.5]
    assert y.shape == (2, 3)
    assert y.tolist() == [[0.5, -1.0, 63.5], [0.25, -1.0, 31.5]]


def test_per_channel_scale_broadcasts_over_columns():
    x = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    y = fake_quantize(x, torch.tensor([[0.3, 2.0]]), torch.tensor([[0.0, 0.0]]), *INT8)
    # col 0: 1 / .3 = 3.33 -> 3 -> 0.9 ; col 1: 0.5 -> 0 -> 0
    nine_tenths = (torch.tensor(3.0) * torch.tensor(0.3)).item()
    assert y.tolist() == [[nine_tenths, 0.0], [-nine_tenths, 0.0]]


def test_docstring_example():
    x = torch.tensor([-1.0, 0.26, 0.3, 5.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0.0), -10, 10)
    assert [round(v, 4) for v in y.tolist()] == [-1.0, 0.3, 0.3, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0]


# --- gradient -----------------------------------------------------------------------------------------------------


def test_gradient_is_one_inside_inclusive_and_zero_outside():
    # int8, scale 0.5, zp 0: t = x / 0.5
    x = torch.tensor([63.5, -63.5, 63.65, -63.65, 0.0, 10.2, 100.0, -100.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.5), torch.tensor(0.0), *INT8)
    # 63.65 -> t = 127.3: within half a step of qmax, rounds to qmax if unclamped, but is outside -> gradient 0
    assert y.tolist()[:4] == [63.5, -63.5, 63.5, -63.5]
    y.backward(torch.arange(1.0, 9.0))
    assert x.grad.tolist() == [1.0, 2.0, 0.0, 0.0, 5.0, 6.0, 0.0, 0.0]


def test_gradient_boundaries_with_zero_point():
    # uint8, scale 0.5, zp 10: t = x / 0.5 + 10; t = 0 at x = -5, t = 255 at x = 122.5
    x = torch.tensor([-5.0, -5.15, 122.5, 122.65, 0.0], requires_grad=True)
    y = fake_quantize(x, torch.tensor(0.5), torch.tensor(10.0), *UINT8)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_gradient_mask_per_channel():
    x = torch.tensor([[1.0, 2.0], [1.0, 2.0]], requires_grad=True)
    # row 0: scale 0.01 -> t = 100, 200 ; row 1: scale 0.015625 -> t = 64, 128 (int8 qmax 127)
    y = fake_quantize(x, torch.tensor([[0.01], [0.015625]]), torch.zeros(2, 1), *INT8)
    y.sum().backward()
    assert x.grad.tolist() == [[1.0, 0.0], [1.0, 0.0]]


def test_no_gradient_to_scale_or_zero_point():
    x = torch.tensor([0.3, -2.0, 50.0], requires_grad=True)
    scale = torch.tensor(0.25, requires_grad=True)
    zp = torch.tensor(3.0, requires_grad=True)
    y = fake_quantize(x, scale, zp, *UINT8)
    y.sum().backward()
    assert scale.grad is None
    assert zp.grad is None
    # t = [4.2, -5, 203]: -2.0 lies below qmin 0
    assert x.grad.tolist() == [1.0, 0.0, 1.0]


# --- dtypes -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_output_dtype_equals_input_dtype(dtype, per_channel):
    x = torch.tensor([[0.26, -1.0, 7.0], [0.5, 0.0, -7.0]], dtype=dtype, requires_grad=True)
    scale = torch.tensor([[0.5], [0.25]]) if per_channel else torch.tensor(0.5)
    zp = torch.zeros_like(scale)
    y = fake_quantize(x, scale, zp, -7, 7)
    assert y.dtype == dtype
    y.sum().backward()
    assert x.grad.dtype == dtype
    if per_channel:
        # row 0 (0.5): 0.26 -> 0.5 ; -1 -> -1 ; 7 -> 3.5 (sat, grad 0) ; row 1 (0.25): 0.5, 0, -7 -> -1.75 (sat)
        assert y.float().tolist() == [[0.5, -1.0, 3.5], [0.5, 0.0, -1.75]]
        assert x.grad.float().tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]
    else:
        assert y.float().tolist() == [[0.5, -1.0, 3.5], [0.5, 0.0, -3.5]]
        assert x.grad.float().tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_with_per_channel_scale_quantizes_on_the_float32_grid(dtype):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 256, generator=gen) * 2).to(dtype)
    scale = torch.full((4, 1), 3.0) / 127
    zp = torch.zeros(4, 1)
    expected = _reference(x.float(), scale, zp, *INT8).to(dtype)
    assert torch.equal(fake_quantize(x, scale, zp, *INT8), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_with_per_tensor_scale_quantizes_on_the_float32_grid(dtype):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 256, generator=gen) * 2).to(dtype)
    scale = torch.tensor(3.0) / 127
    zp = torch.tensor(0.0)
    expected = _reference(x.float(), scale, zp, *INT8).to(dtype)
    assert torch.equal(fake_quantize(x, scale.reshape(1), zp.reshape(1), *INT8), expected)  # per-channel form
    assert torch.equal(fake_quantize(x, scale, zp, *INT8), expected)


# --- against an independent reference on random inputs ------------------------------------------------------------


@pytest.mark.parametrize("qdtype", ["int4", "int8", "uint8"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_reference_on_random_inputs(qdtype, symmetric):
    q = QuantDtype.parse(qdtype)
    gen = torch.Generator().manual_seed(q.bits + 10 * int(symmetric) + 100 * int(q.signed))
    x = (torch.randn(8, 33, generator=gen) * 3 + 0.5).requires_grad_()
    lo, hi = x.detach().amin() * 0.8, x.detach().amax() * 0.8  # a range a bit narrower, so that some values saturate
    scale, zp = calculate_qparams(lo, hi, q.qmin, q.qmax, symmetric=symmetric)
    y = fake_quantize(x, scale, zp, q.qmin, q.qmax)
    assert torch.equal(y, _reference(x.detach(), scale, zp, q.qmin, q.qmax))
    y.sum().backward()
    t = x.detach() / scale + zp
    inside = (t >= q.qmin) & (t <= q.qmax)
    assert 0 < int(inside.sum()) < x.numel()
    assert torch.equal(x.grad, inside.float())


# --- quantize_dequantize with block layouts ----------------------------------------------------------------------


@pytest.mark.parametrize("qdtype", ["int4", "int8", "uint8"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("blocks", [(1, -1), (-1, 1), (1, 1)])
def test_per_axis_blocks_equal_fake_quantize_with_broadcast_scale(qdtype, symmetric, blocks):
    q = QuantDtype.parse(qdtype)
    gen = torch.Generator().manual_seed(3 + q.bits)
    x = torch.randn(4, 6, generator=gen) * torch.arange(1.0, 7.0)
    lo, hi = min_max(x * 0.9, blocks)
    scale, zp = calculate_qparams(lo, hi, q.qmin, q.qmax, symmetric=symmetric)
    expected_shape = {(1, -1): (4, 1), (-1, 1): (1, 6), (1, 1): (4, 6)}[blocks]
    assert scale.shape == expected_shape
    out = quantize_dequantize(x, scale, zp, q.qmin, q.qmax, blocks)
    assert torch.equal(out, fake_quantize(x, scale, zp, q.qmin, q.qmax))
    assert torch.equal(out, _reference(x, scale, zp, q.qmin, q.qmax))


@pytest.mark.parametrize("qdtype", ["int4", "int8", "uint8"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_none_blocks_is_per_tensor(qdtype, symmetric):
    q = QuantDtype.parse(qdtype)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(4, 6, generator=gen)
    scale, zp = calculate_qparams(*min_max(x * 0.9, None), q.qmin, q.qmax, symmetric=symmetric)
    assert scale.shape == ()
    assert torch.equal(quantize_dequantize(x, scale, zp, q.qmin, q.qmax, None), _reference(x, scale, zp, q.qmin, q.qmax))


def test_block_layout_hand_values():
    # (2, 4) tensor, blocks (1, 2): scales [[1, 0.5], [0.25, 2]] (int8, zp 0)
    x = torch.tensor([[1.4, 2.6, 1.4, 2.6], [1.4, 2.6, 1.4, 2.6]])
    scale = torch.tensor([[1.0, 0.5], [0.25, 2.0]])
    out = quantize_dequantize(x, scale, torch.zeros(2, 2), *INT8, (1, 2))
    # 1.4/1=1.4->1, 2.6->3 | 1.4/.5=2.8->3 ->1.5, 2.6/.5=5.2->5->2.5 | 1.4/.25=5.6->6->1.5, 2.6/.25=10.4->10->2.5
    # | 1.4/2=.7->1->2, 2.6/2=1.3->1->2
    assert out.tolist() == [[1.0, 3.0, 1.5, 2.5], [1.5, 2.5, 2.0, 2.0]]


def _expand(scale: torch.Tensor, blocks: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    for dim, size in enumerate(blocks):
        scale = scale.repeat_interleave(shape[dim] if size == -1 else size, dim=dim)
    return scale


@pytest.mark.parametrize("qdtype", ["int4", "int8", "uint8"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("shape", "blocks"),
    [((4, 6), (2, 3)), ((4, 6), (-1, 2)), ((4, 6), (2, -1)), ((4, 6), (4, 3)), ((2, 4, 6), (-1, 2, 3)), ((3, 4, 6), (1, 2, -1))],
)
def test_true_block_layout_equals_repeat_interleave_reference(qdtype, symmetric, shape, blocks):
    q = QuantDtype.parse(qdtype)
    gen = torch.Generator().manual_seed(q.bits * 7 + int(symmetric) + len(shape))
    x = (torch.randn(shape, generator=gen) * 2).requires_grad_()
    lo, hi = min_max(x * 0.85, blocks)
    scale, zp = calculate_qparams(lo, hi, q.qmin, q.qmax, symmetric=symmetric)
    full_scale, full_zp = _expand(scale, blocks, shape), _expand(zp, blocks, shape)
    assert full_scale.shape == shape
    out = quantize_dequantize(x, scale, zp, q.qmin, q.qmax, blocks)
    assert out.shape == shape
    assert torch.equal(out, _reference(x.detach(), full_scale, full_zp, q.qmin, q.qmax))
    out.sum().backward()
    t = x.detach() / full_scale + full_zp
    assert torch.equal(x.grad, ((t >= q.qmin) & (t <= q.qmax)).float())
    assert not torch.equal(x.grad, torch.ones(shape))  # 0.85 * range: some values saturate


def test_block_scales_are_not_interchangeable():
    # A wrong layout (e.g. scales applied per row instead of per 2x3 block) changes the result.
    x = torch.tensor([[1.0] * 6] * 4)
    scale = torch.tensor([[1.0, 0.5], [0.25, 0.0625]])
    out = quantize_dequantize(x, scale, torch.zeros(2, 2), *INT8, (2, 3))
    assert torch.equal(out, torch.ones(4, 6))  # every scale divides 1 exactly
    out = quantize_dequantize(x * 0.3, scale, torch.zeros(2, 2), *INT8, (2, 3))
    # 0.3/1 -> 0 ; 0.3/.5=.6 -> 1 -> .5 ; 0.3/.25=1.2 -> 1 -> .25 ; 0.3/.0625=4.8 -> 5 -> .3125
    expected = torch.tensor([[0.0] * 3 + [0.5] * 3] * 2 + [[0.25] * 3 + [0.3125] * 3] * 2)
    assert torch.equal(out, expected)


def test_integer_bias_rounds_to_the_input_times_weight_scale_grid():
    """Steps 0.5 * [0.5, 0.25] = [0.25, 0.125]: 0.3 -> 1 step = 0.25; -0.7 -> -5.6 -> -6 steps = -0.75."""
    from quantrain.ops.fake_quant import integer_bias

    bias = torch.tensor([0.3, -0.7], requires_grad=True)
    out = integer_bias(bias, torch.tensor(0.5), torch.tensor([[0.5], [0.25]]))
    assert out.tolist() == [0.25, -0.75]
    (out * torch.tensor([2.0, 3.0])).sum().backward()
    assert bias.grad.tolist() == [2.0, 3.0]  # straight through


def test_integer_bias_saturates_at_the_int32_range():
    from quantrain.ops.fake_quant import INT32_MAX, INT32_MIN, integer_bias

    out = integer_bias(torch.tensor([1e12, -1e12, 3.0]), torch.tensor(1.0), torch.tensor(1.0))
    assert out.tolist() == [float(INT32_MAX + 1), float(INT32_MIN), 3.0]  # 2^31 - 1 is 2^31 in float32
