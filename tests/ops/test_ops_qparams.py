"""calculate_qparams: NNI's scale / zero-point formula (widen to 0, symmetric or affine, eps floor, clamp)."""

from __future__ import annotations

import pytest
import torch

from quantrain.config import QuantDtype
from quantrain.ops import calculate_qparams

F32_EPS = torch.finfo(torch.float32).eps
DTYPES = [f"{prefix}int{bits}" for prefix in ("", "u") for bits in range(2, 9)]


def _qparams(lo: float, hi: float, dtype: str, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q = QuantDtype.parse(dtype)
    return calculate_qparams(torch.tensor(lo), torch.tensor(hi), q.qmin, q.qmax, symmetric=symmetric)


def _reference(lo: float, hi: float, qmin: int, qmax: int, symmetric: bool) -> tuple[torch.Tensor, float]:
    """Scalar reference, one float32 op at a time in the docstring's order; the zero point as a Python number."""
    lo_t = torch.tensor(lo, dtype=torch.float32)
    hi_t = torch.tensor(hi, dtype=torch.float32)
    lo_t = lo_t if lo_t.item() < 0.0 else torch.tensor(0.0)
    hi_t = hi_t if hi_t.item() > 0.0 else torch.tensor(0.0)
    if symmetric:
        half_levels = torch.tensor(qmax - qmin, dtype=torch.float32) / 2
        scale = (lo_t.abs() if abs(lo_t.item()) > abs(hi_t.item()) else hi_t.abs()) / half_levels
        if scale.item() < F32_EPS:
            scale = torch.tensor(F32_EPS, dtype=torch.float32)
        zero_point = (qmax + qmin + 1) // 2
    else:
        scale = (hi_t - lo_t) / torch.tensor(qmax - qmin, dtype=torch.float32)
        if scale.item() < F32_EPS:
            scale = torch.tensor(F32_EPS, dtype=torch.float32)
        zero_point = qmin - round((lo_t / scale).item())  # Python's round is half-to-even too
    return scale, float(min(max(zero_point, qmin), qmax))


# --- golden values from the reference, range (-1, 3) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "symmetric", "numerator", "denominator", "zero_point"),
    [
        ("int8", True, 3.0, 127, 0.0),
        ("int8", False, 4.0, 254, -63.0),
        ("uint8", True, 3.0, 127.5, 128.0),
        ("uint8", False, 4.0, 255, 64.0),
    ],
)
def test_golden_values_for_range_minus1_3(dtype, symmetric, numerator, denominator, zero_point):
    scale, zp = _qparams(-1.0, 3.0, dtype, symmetric)
    expected_scale = torch.tensor(numerator) / denominator  # float32 arithmetic
    assert scale.dtype == torch.float32
    assert scale.shape == ()
    assert torch.equal(scale, expected_scale)
    assert zp.is_floating_point()
    assert zp.item() == zero_point


def test_int8_affine_zero_point_is_a_half_to_even_tie():
    # -1 / (4/254) is exactly -63.5 in float32; half-to-even gives -64, so zp = -127 + 64 = -63 (not -64).
    scale, zp = _qparams(-1.0, 3.0, "int8", False)
    assert (torch.tensor(-1.0) / scale).item() == -63.5
    assert zp.item() == -63.0


# --- widening to contain zero ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int4"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("given", "widened"), [((0.5, 2.0), (0.0, 2.0)), ((-3.0, -1.0), (-3.0, 0.0))])
def test_range_is_widened_to_contain_zero(dtype, symmetric, given, widened):
    scale, zp = _qparams(*given, dtype, symmetric)
    expected_scale, expected_zp = _qparams(*widened, dtype, symmetric)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(zp, expected_zp)


def test_widened_positive_range_hand_values():
    # (0.5, 2) -> (0, 2): int8 affine scale 2/254, zp = -127 - round(0) = -127; uint8 affine zp 0.
    scale, zp = _qparams(0.5, 2.0, "int8", False)
    assert torch.equal(scale, torch.tensor(2.0) / 254)
    assert zp.item() == -127.0
    scale, zp = _qparams(0.5, 2.0, "uint8", False)
    assert torch.equal(scale, torch.tensor(2.0) / 255)
    assert zp.item() == 0.0


def test_widened_negative_range_hand_values():
    # (-3, -1) -> (-3, 0): int8 symmetric 3/127 zp 0; uint8 affine 3/255, zp = 0 - round(-255) = 255.
    scale, zp = _qparams(-3.0, -1.0, "int8", True)
    assert torch.equal(scale, torch.tensor(3.0) / 127)
    assert zp.item() == 0.0
    scale, zp = _qparams(-3.0, -1.0, "uint8", False)
    assert torch.equal(scale, torch.tensor(3.0) / 255)
    assert zp.item() == 255.0


# --- eps floor and zero-point clamp ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int8", "uint8", "int2", "uint4"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_range_floors_scale_at_float32_eps(dtype, symmetric):
    q = QuantDtype.parse(dtype)
    scale, zp = _qparams(0.0, 0.0, dtype, symmetric)
    assert scale.item() == F32_EPS
    assert torch.isfinite(scale).item()
    # symmetric: the middle of the range; affine: qmin - round(0 / eps) = qmin
    assert zp.item() == ((q.qmax + q.qmin + 1) // 2 if symmetric else q.qmin)


def test_eps_floor_is_applied_before_the_zero_point():
    # (-1e-5, 0) int8 affine: raw scale 1e-5/254 ~ 3.9e-8 < eps, so scale = eps; 1e-5 / eps = 83.89 -> 84;
    # zp = -127 + 84 = -43.  Computing zp from the unfloored scale would give -127 + 254 = 127.
    scale, zp = _qparams(-1e-5, 0.0, "int8", False)
    assert scale.item() == F32_EPS
    assert zp.item() == -43.0


def test_tiny_symmetric_range_is_floored():
    scale, zp = _qparams(-1e-9, 1e-9, "int8", True)
    assert scale.item() == F32_EPS
    assert zp.item() == 0.0


def test_zero_point_is_clamped_to_qmax():
    # In bfloat16, scale = bf16(2.9375 / 254) = 0.01153564453125 and bf16(-2.9375 / scale) = -255,
    # so the unclamped zero point would be -127 + 255 = 128 > qmax.
    lo = torch.tensor(-2.9375, dtype=torch.bfloat16)
    hi = torch.tensor(0.0, dtype=torch.bfloat16)
    scale, zp = calculate_qparams(lo, hi, -127, 127, symmetric=False)
    assert scale.item() == 0.01153564453125
    assert (lo / scale).item() == -255.0
    assert zp.item() == 127.0


def test_zero_point_stays_within_range_for_many_ranges():
    gen = torch.Generator().manual_seed(1)
    lo = -torch.rand(4096, generator=gen) * 10.0 ** torch.randint(-8, 4, (4096,), generator=gen).float()
    hi = torch.rand(4096, generator=gen) * 10.0 ** torch.randint(-8, 4, (4096,), generator=gen).float()
    for dtype in ("int8", "uint8", "int2", "uint3"):
        q = QuantDtype.parse(dtype)
        for symmetric in (True, False):
            _, zp = calculate_qparams(lo, hi, q.qmin, q.qmax, symmetric=symmetric)
            assert zp.min().item() >= q.qmin
            assert zp.max().item() <= q.qmax
            assert torch.equal(zp, zp.round())


# --- per-channel (vector) inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_vector_inputs_give_elementwise_results(symmetric):
    lo = torch.tensor([-1.0, 0.5, -3.0, 0.0, -0.25])
    hi = torch.tensor([3.0, 2.0, -1.0, 0.0, 4.0])
    scale, zp = calculate_qparams(lo, hi, 0, 255, symmetric=symmetric)
    assert scale.shape == lo.shape
    assert zp.shape == lo.shape
    for i in range(lo.numel()):
        s, z = calculate_qparams(lo[i], hi[i], 0, 255, symmetric=symmetric)
        assert torch.equal(scale[i], s)
        assert torch.equal(zp[i], z)


def test_vector_hand_values_uint8_affine():
    lo = torch.tensor([[-1.0], [0.5], [-3.0]])
    hi = torch.tensor([[3.0], [2.0], [-1.0]])
    scale, zp = calculate_qparams(lo, hi, 0, 255, symmetric=False)
    assert scale.shape == (3, 1)
    assert torch.equal(scale, torch.tensor([[4.0], [2.0], [3.0]]) / 255)
    assert zp.flatten().tolist() == [64.0, 0.0, 255.0]


# --- every dtype and scheme against an independent reference ----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_reference_for_all_dtypes(dtype, symmetric):
    q = QuantDtype.parse(dtype)
    gen = torch.Generator().manual_seed(q.bits * 2 + int(symmetric) + (0 if q.signed else 100))
    lo = [*(torch.rand(48, generator=gen) * 6 - 5).tolist(), -1.0, 0.5, -3.0, 0.0, -1e-9, -7.25]
    hi = [*(torch.rand(48, generator=gen) * 6 - 1).tolist(), 3.0, 2.0, -1.0, 0.0, 0.0, 0.125]
    scale, zp = calculate_qparams(torch.tensor(lo), torch.tensor(hi), q.qmin, q.qmax, symmetric=symmetric)
    for i, (a, b) in enumerate(zip(lo, hi, strict=True)):
        ref_scale, ref_zp = _reference(a, b, q.qmin, q.qmax, symmetric)
        assert torch.equal(scale[i], ref_scale), (i, a, b)
        assert zp[i].item() == ref_zp, (i, a, b)


@pytest.mark.parametrize(
    ("dtype", "qmin", "qmax", "sym_zp"),
    [
        ("int2", -1, 1, 0),
        ("int4", -7, 7, 0),
        ("int8", -127, 127, 0),
        ("uint2", 0, 3, 2),
        ("uint4", 0, 15, 8),
        ("uint8", 0, 255, 128),
    ],
)
def test_symmetric_zero_point_is_middle_of_range(dtype, qmin, qmax, sym_zp):
    q = QuantDtype.parse(dtype)
    assert (q.qmin, q.qmax) == (qmin, qmax)
    scale, zp = _qparams(-1.0, 3.0, dtype, True)
    assert zp.item() == sym_zp
    assert torch.equal(scale, torch.tensor(3.0) / ((qmax - qmin) / 2))
