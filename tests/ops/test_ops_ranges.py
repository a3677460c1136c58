"""min_max, block_layout and ema_update: the range-tracking math."""

from __future__ import annotations

import pytest
import torch

from quantrain.ops import block_layout, ema_update, min_max
from quantrain.ops.ranges import WHOLE

MATRIX = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])

# 4 x 6, values chosen so that each 2 x 3 block has a distinct min and max
BLOCKY = torch.tensor(
    [
        [0.5, -1.0, 2.0, 7.0, 8.0, 9.0],
        [1.5, 3.0, 0.0, -4.0, 6.5, 1.0],
        [-9.0, -8.0, -7.5, 0.25, 0.75, 0.5],
        [-6.0, -5.0, -8.5, 0.125, 0.625, 0.375],
    ]
)


def test_min_max_per_tensor():
    lo, hi = min_max(MATRIX, None)
    assert lo.shape == () and hi.shape == ()
    assert (lo.item(), hi.item()) == (-6.0, 5.0)


def test_min_max_whole_layout_keeps_dims():
    lo, hi = min_max(MATRIX, (WHOLE, WHOLE))
    assert lo.shape == (1, 1)
    assert (lo.tolist(), hi.tolist()) == ([[-6.0]], [[5.0]])


def test_min_max_per_row():
    lo, hi = min_max(MATRIX, (1, WHOLE))
    assert lo.tolist() == [[-2.0], [-6.0]]
    assert hi.tolist() == [[3.0], [5.0]]


def test_min_max_per_column():
    lo, hi = min_max(MATRIX, (WHOLE, 1))
    assert lo.tolist() == [[1.0, -2.0, -6.0]]
    assert hi.tolist() == [[4.0, 5.0, 3.0]]


def test_min_max_per_block():
    lo, hi = min_max(BLOCKY, (2, 3))
    assert lo.tolist() == [[-1.0, -4.0], [-9.0, 0.125]]
    assert hi.tolist() == [[3.0, 9.0], [-5.0, 0.75]]


def test_min_max_blocks_along_columns_only():
    lo, hi = min_max(BLOCKY, (WHOLE, 2))
    assert lo.tolist() == [[-9.0, -8.5, 0.375]]
    assert hi.tolist() == [[3.0, 7.0, 9.0]]


def test_min_max_per_channel_of_nchw():
    x = torch.zeros(2, 3, 2, 2)
    x[0, 0, 0, 0], x[1, 0, 1, 1] = -1.0, 2.0
    x[1, 1, 0, 1], x[0, 1, 1, 0] = -3.0, 0.5
    x[:, 2] = 4.0
    lo, hi = min_max(x, (WHOLE, 1, WHOLE, WHOLE))
    assert lo.shape == (1, 3, 1, 1)
    assert lo.flatten().tolist() == [-1.0, -3.0, 4.0]
    assert hi.flatten().tolist() == [2.0, 0.5, 4.0]


def test_min_max_is_detached():
    x = MATRIX.clone().requires_grad_()
    lo, hi = min_max(x, (1, WHOLE))
    assert not lo.requires_grad and not hi.requires_grad


def test_min_max_keeps_input_dtype():
    lo, hi = min_max(MATRIX.to(torch.bfloat16), (1, WHOLE))
    assert lo.dtype == hi.dtype == torch.bfloat16
    assert lo.float().tolist() == [[-2.0], [-6.0]]
    assert hi.float().tolist() == [[3.0], [5.0]]


def test_block_layout_shapes():
    assert block_layout((4, 6), (2, 3)) == ((2, 2, 2, 3), (2, 2))
    assert block_layout((4, 6), (WHOLE, 2)) == ((1, 4, 3, 2), (1, 3))
    assert block_layout(torch.Size([4, 6]), (1, WHOLE)) == ((4, 1, 1, 6), (4, 1))
    assert block_layout((5, 3, 2, 2), (WHOLE, 1, WHOLE, WHOLE)) == ((1, 5, 3, 1, 1, 2, 1, 2), (1, 3, 1, 1))


@pytest.mark.parametrize(("shape", "blocks"), [((4, 6), (3, WHOLE)), ((4, 6), (2, 4)), ((4, 6), (WHOLE, 5)), ((7,), (2,))])
def test_block_layout_rejects_blocks_that_do_not_divide(shape, blocks):
    with pytest.raises(ValueError, match="does not divide"):
        block_layout(shape, blocks)
    with pytest.raises(ValueError, match="does not divide"):
        min_max(torch.zeros(shape), blocks)


def test_block_layout_rejects_wrong_rank():
    with pytest.raises(ValueError, match="needs a tensor with 2 dims"):
        block_layout((4, 6, 2), (2, 3))
    with pytest.raises(ValueError, match="needs a tensor with 2 dims"):
        min_max(torch.zeros(4), (1, WHOLE))


def test_ema_update_hand_value():
    # 1 * 0.99 + 0.01 * 2 = 1.01
    assert ema_update(torch.tensor(1.0), torch.tensor(2.0), 0.99).item() == pytest.approx(1.01, abs=1e-6)
    assert ema_update(torch.tensor([-1.0]), torch.tensor([0.0]), 0.99).item() == pytest.approx(-0.99, abs=1e-6)


@pytest.mark.parametrize("shape", [(), (5,), (1, 3, 1, 1), (2, 2)])
def test_ema_update_is_bit_exact_with_the_formula(shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    avg = torch.randn(shape, generator=gen) * 5
    cur = torch.randn(shape, generator=gen) * 5
    for _ in range(20):
        new = ema_update(avg, cur, 0.99)
        expected = avg * 0.99 + (1 - 0.99) * cur
        assert new.dtype == torch.float32
        assert torch.equal(new, expected)
        avg, cur = new, cur * -1.1


def test_ema_update_uses_the_decay_argument():
    avg, cur = torch.tensor([4.0, -2.0]), torch.tensor([0.0, 2.0])
    assert ema_update(avg, cur, 0.5).tolist() == [2.0, 0.0]
    assert ema_update(avg, cur, 0.0).tolist() == [0.0, 2.0]
    assert torch.equal(ema_update(avg, cur, 0.9), avg * 0.9 + (1 - 0.9) * cur)
