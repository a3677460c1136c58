"""Multi-process training: tracked ranges combined across the ranks of a process group.

Under data parallelism (``torch.nn.parallel.DistributedDataParallel``) each rank sees a slice of the global batch.
For every activation target, each training forward reduces the slice's range across ranks before the moving average::

    batch_min = min over ranks of min(x_rank)        batch_max = max over ranks of max(x_rank)
    tracked   = decay * tracked + (1 - decay) * batch_range

so every rank holds the same tracked range, scale and zero point, equal to a single process seeing the whole
batch. One ``all_reduce`` (MAX of ``(-min, max)``) per activation target and forward; weights need none, since DDP
keeps them identical on every rank.

The first synchronized forward also checks that every rank quantized the model the same way (a fingerprint of the
layout, then a readable difference when they disagree: a ``ValueError`` on every rank rather than a hang) and
copies rank 0's quantization state to the others (as DDP does for the model's own state when it wraps it).

>>> sync = RangeSync()
>>> sync.active()   # no process group: ranges stay local
False
"""

from __future__ import annotations

import collections
import hashlib
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "RangeSync",
    "all_reduce_range",
    "all_reduce_sum",
    "broadcast_state",
    "check_same_layout",
    "synced_batch_norm",
    "world_size",
]


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Processes in ``group`` (the default group when ``None``); 1 without an initialized process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class RangeSync:
    """What an activation's range observer calls to combine a batch's range across ranks.

    Args:
        on_first_sync: called once, before the first reduction (the quantizer's layout check and state copy).
        group: the process group (``None``: the default one).
        enabled: ``False`` keeps every rank's ranges to itself.

    Copies and pickles of a model get an inert ``RangeSync``: they have no quantizer of their own.
    """

    def __init__(
        self, on_first_sync: Callable[[], None] | None = None, group: dist.ProcessGroup | None = None, enabled: bool = True
    ) -> None:
        self._on_first_sync = weakref.WeakMethod(on_first_sync) if hasattr(on_first_sync, "__self__") else None
        self.group = group
        self.enabled = enabled and self._on_first_sync is not None
        self.ready = False

    def active(self) -> bool:
        """Whether ranges are reduced now: enabled, and a process group of more than one rank exists."""
        return self.enabled and world_size(self.group) > 1

    def first_sync(self) -> None:
        """Run the one-time check and state copy if it has not run (every rank must call this together)."""
        if self.ready:
            return
        callback = self._on_first_sync() if self._on_first_sync is not None else None
        if callback is not None:
            callback()
        self.ready = True

    def __call__(self, current_min: Tensor, current_max: Tensor) -> tuple[Tensor, Tensor]:
        if not self.active():
            return current_min, current_max
        self.first_sync()
        return all_reduce_range(current_min, current_max, self.group)

    def __reduce__(self):
        return RangeSync, ()


def all_reduce_range(current_min: Tensor, current_max: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """The elementwise minimum of ``current_min`` and maximum of ``current_max`` over all ranks, in one collective
    (``max(-min)`` is ``-min(min)`` exactly)."""
    n = current_min.numel()
    packed = torch.cat([current_min.reshape(-1).neg(), current_max.reshape(-1)])
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    _SENT.append(packed)
    return packed[:n].neg().reshape(current_min.shape), packed[n:].reshape(current_max.shape)


_SENT: collections.deque[Tensor] = collections.deque(maxlen=8)
"""The last tensors quantrain passed to a collective, kept referenced from Python: gloo's worker thread may release
its own reference after the call returned, and if that were the last one it would need the GIL to free the Python
object, which deadlocks a process whose main thread is joining that thread at exit (PyTorch's ProcessGroupGloo
destructor holds the GIL)."""


def check_same_layout(lines: Sequence[str], group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> None:
    """Raise ``ValueError`` on every rank unless all ranks pass the same ``lines`` (a description of how the model
    is quantized). One small collective when they agree; on disagreement the lines are gathered to say where."""
    digest = hashlib.sha256("\n".join(lines).encode()).digest()
    fingerprint = int.from_bytes(digest[:7], "little")  # 56 bits: exact in int64, and so is its negation
    packed = torch.tensor([fingerprint, -fingerprint], dtype=torch.int64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    if packed[0].item() == -packed[1].item():
        return
    gathered: list = [None] * world_size(group)
    dist.all_gather_object(gathered, list(lines), group=group)
    raise ValueError(_layout_difference(gathered))


def _layout_difference(per_rank: list[list[str]]) -> str:
    first = per_rank[0]
    for rank, lines in enumerate(per_rank[1:], start=1):
        if lines != first:
            only_first = [line for line in first if line not in lines][:3]
            only_here = [line for line in lines if line not in first][:3]
            return (
                f"quantrain: ranks quantized the model differently: rank 0 has {only_first or 'nothing more'}, "
                f"rank {rank} has {only_here or 'nothing more'}. Create every rank's quantizer from the same model, "
                "config_list and options"
            )
    return "quantrain: ranks quantized the model differently"


def broadcast_state(state: dict[str, Tensor], group: dist.ProcessGroup | None = None) -> dict[str, Tensor]:
    """Rank 0's tensors, by name, on every rank (the names must agree; shapes may differ, as with ranges not yet
    sized). Three collectives: the shapes' length, the shapes, then one flat tensor per dtype."""
    source = dist.get_global_rank(group, 0) if group is not None else 0
    names = sorted(state)
    device = next(iter(state.values())).device if state else None
    dims = [d for name in names for d in (state[name].dim(), *state[name].shape)]
    length = torch.tensor([len(dims)], dtype=torch.int64, device=device)
    dist.broadcast(length, source, group=group)
    shapes = torch.tensor(dims, dtype=torch.int64, device=device) if dist.get_rank() == source else None
    if shapes is None:
        shapes = torch.empty(int(length.item()), dtype=torch.int64, device=device)
    dist.broadcast(shapes, source, group=group)
    received = _allocate(names, state, shapes.tolist())
    for dtype in sorted({t.dtype for t in received.values()}, key=str):
        members = [name for name in names if received[name].dtype == dtype]
        flat = torch.cat([state[name].reshape(-1) for name in members]) if dist.get_rank() == source else None
        if flat is None:
            flat = torch.empty(sum(received[name].numel() for name in members), dtype=dtype, device=device)
        dist.broadcast(flat, source, group=group)
        for name, piece in zip(members, flat.split([received[name].numel() for name in members]), strict=True):
            received[name] = piece.reshape(received[name].shape).clone()
    return received


def _allocate(names: list[str], state: dict[str, Tensor], dims: list[int]) -> dict[str, Tensor]:
    shapes, at = {}, 0
    for name in names:
        ndim = dims[at]
        shapes[name] = tuple(dims[at + 1 : at + 1 + ndim])
        at += 1 + ndim
    return {name: state[name].new_empty(shapes[name]) for name in names}


def synced_batch_norm(bn: _BatchNorm, y: Tensor) -> Tensor:
    """Training-mode ``bn(y)`` with statistics of the batch on every rank of ``bn.process_group`` (a
    ``SyncBatchNorm`` folded into the layer before it), on any device, CPU included.

    Two differentiable all-reduces (the sum, then the sum of squared deviations, per channel) give the global mean
    and biased variance; the gradient flows back through them to every rank, as with ``SyncBatchNorm``. The running
    statistics are updated as BatchNorm does, with the unbiased global variance.
    """
    group = bn.process_group or dist.group.WORLD
    dims = [0, *range(2, y.dim())]
    shape = [1, -1] + [1] * (y.dim() - 2)
    local = torch.cat([y.sum(dims), y.new_full((1,), y.numel() // y.shape[1])])  # ranks' batches may differ in size
    total = all_reduce_sum(local, group)
    count = total[-1].detach()
    mean = total[:-1] / count
    centered = y - mean.reshape(shape)
    var = all_reduce_sum(centered.square().sum(dims), group) / count
    _update_running_stats(bn, mean.detach(), var.detach() * (count / (count - 1).clamp_min(1)))
    out = centered * torch.rsqrt(var + bn.eps).reshape(shape)
    if bn.weight is not None:
        out = out * bn.weight.reshape(shape) + bn.bias.reshape(shape)
    return out


def all_reduce_sum(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum over ranks, with the gradient summed over ranks too (``torch.distributed.nn``)."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


@torch.no_grad()
def _update_running_stats(bn: _BatchNorm, mean: Tensor, unbiased_var: Tensor) -> None:
    if not bn.track_running_stats or bn.running_mean is None:
        return
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
    bn.running_var.mul_(1 - momentum).add_(unbiased_var, alpha=momentum)
