"""BatchNorm re-estimation: recompute every BatchNorm's running statistics under the quantized model.

After QAT the running statistics still average batches seen over training, under weights that kept changing and,
early on, without quantization; the model deployed normalizes with them. Re-estimating them on a few batches of
data with the model as it will run (quantized weights and activations, ranges frozen) is AIMET's recommended step
for low bit widths and depthwise layers. Each BatchNorm's statistics are reset and become the plain average over
the batches run (``momentum=None``): for batch ``t`` with per-channel mean ``m_t`` and unbiased variance ``v_t`` of
its input,

    running_mean = (m_1 + ... + m_T) / T,    running_var = (v_1 + ... + v_T) / T

A BatchNorm folded into its conv (``fuse``) is re-estimated through the fold's live formula, so its statistics are
those of the conv output computed with quantized weights; a frozen fold is live for the duration. Nothing else
changes: every module's training mode, each BatchNorm's momentum and each fold's frozen state are restored, no
quantizer tracks ranges, no parameter gets a gradient; if the data yields no batch or a forward raises, the
statistics are put back as they were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["reestimate_batchnorm", "run_batch"]


def run_batch(model: nn.Module, batch: Any) -> Any:
    """The default way to feed one batch: a dict as keyword inputs, a tuple or list as ``(inputs, *targets)`` (what
    a ``DataLoader`` of pairs yields: its first element is the input), anything else as the one positional input."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def reestimate_batchnorm(
    model: nn.Module,
    data: Iterable[Any],
    batches: int | None,
    fusions: Iterable[Any],
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> int:
    """Re-estimate the running statistics of every BatchNorm of ``model`` on ``data`` (at most ``batches`` batches;
    ``None``: all), see the module docstring; returns how many batches ran. ``fusions``: the quantizer's folds."""
    if batches is not None and (not isinstance(batches, int) or isinstance(batches, bool) or batches < 1):
        raise ValueError(f"batches must be a positive int or None, got {batches!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be a callable forward(model, batch), got {type(forward).__name__}")
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        raise ValueError(f"{type(model).__name__} has no BatchNorm that tracks running statistics to re-estimate")
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(f"data must be an iterable of batches (a DataLoader, a list), got {type(data).__name__}") from None
    saved_stats = [{k: getattr(bn, k).clone() for k in ("running_mean", "running_var", "num_batches_tracked")} for bn in norms]
    modes = {module: module.training for module in model.modules()}
    momenta = [bn.momentum for bn in norms]
    frozen = [(fusion, fusion.is_bn_frozen) for fusion in fusions if fusion.bn is not None]
    count = 0
    try:
        model.eval()  # quantizers keep their ranges, dropout is off
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # a cumulative average: each batch counts the same
            bn.train()
        for fusion, _ in frozen:
            fusion.freeze_bn(False)
        with torch.no_grad():
            for batch in iterator:
                (forward or run_batch)(model, batch)
                count += 1
                if batches is not None and count >= batches:
                    break
        if count == 0:
            raise ValueError("data yielded no batch; the BatchNorm statistics are unchanged")
    except BaseException:
        for bn, stats in zip(norms, saved_stats, strict=True):
            for key, value in stats.items():
                getattr(bn, key).copy_(value)
        raise
    finally:
        for bn, momentum in zip(norms, momenta, strict=True):
            bn.momentum = momentum
        for module, training in modes.items():
            module.training = training
        for fusion, was_frozen in frozen:
            fusion.freeze_bn(was_frozen)
    return count
