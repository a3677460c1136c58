"""Models quantized on the ``meta`` device: quantrain's state waits there until the model is materialized.

A model built under ``torch.device("meta")`` has shapes but no data. Quantizing it builds quantrain's buffers with
their initial values on the CPU, keeps those values aside, and puts meta copies in the model, so it stays entirely on
``meta``. When the model gets real tensors, the quantizer writes the kept values into every quantrain buffer that the
materialization did not fill itself:

* ``model.load_state_dict(state_dict, assign=True)``: buffers in ``state_dict`` (a quantized checkpoint) are taken
  from it; the others (a float checkpoint has none) get their initial values, on the loaded tensors' device, before
  the load reads them;
* ``model.to_empty(device=...)`` leaves every buffer uninitialized: the next ``load_state_dict`` (before it loads),
  forward or quantizer call fills those it does not load.

Loading a state_dict into a model still on ``meta`` without ``assign=True`` copies nothing (PyTorch's rule) and is
refused with a ``ValueError`` saying what to do.

>>> import torch
>>> from torch import nn
>>> from quantrain import QATQuantizer
>>> with torch.device("meta"):
...     model = nn.Sequential(nn.Linear(4, 2))
>>> quantizer = QATQuantizer(model, [{"op_types": ["Linear"]}])
>>> model[0].fake_quant["weight"].scale.is_meta
True
>>> _ = model.load_state_dict(nn.Sequential(nn.Linear(4, 2)).state_dict(), assign=True)  # a float checkpoint
>>> model[0].fake_quant["weight"].scale.device.type, int(model[0].fake_quant["weight"].observer_enabled)
('cpu', 1)
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["PendingState", "is_meta", "state_device"]


def is_meta(device: torch.device | None) -> bool:
    return device is not None and device.type == "meta"


def state_device(device: torch.device | None) -> torch.device | None:
    """Where quantrain builds state for tensors on ``device``: the CPU stands in for ``meta`` (see the module)."""
    return torch.device("cpu") if is_meta(device) else device


class PendingState:
    """The initial values of quantrain's buffers ``names`` of a model on ``meta``, until the model is materialized.

    Creating it replaces those buffers by meta tensors of the same shapes and dtypes.
    """

    def __init__(self, model: nn.Module, names: Iterable[str]) -> None:
        self.initial: dict[str, Tensor] = {}
        for name in names:
            buffer = model.get_buffer(name)
            self.initial[name] = buffer.detach().to("cpu", copy=True)
            _set_buffer(model, name, torch.empty_like(buffer, device="meta"))

    @property
    def pending(self) -> bool:
        """Whether some buffers still wait for their initial values."""
        return bool(self.initial)

    def blocks_load(self, model: nn.Module, assign: bool) -> bool:
        """Whether loading a state_dict now would copy into meta buffers (a no-op) instead of assigning them."""
        return not assign and any(model.get_buffer(name).is_meta for name in self.initial)

    def materialize(self, model: nn.Module, loaded: Iterable[str] = (), device: torch.device | None = None) -> list[str] | None:
        """Write the initial value of every pending buffer not in ``loaded`` and return their names; ``None`` while
        there is no device to put them on (nothing changes then).

        A buffer the model already materialized (``to_empty``) stays on its device; one still on meta goes to
        ``device``, by default that of the model's first real tensor."""
        device = device or _real_device(model)
        if device is None:
            return None
        loaded = set(loaded)
        filled = [name for name in self.initial if name not in loaded]
        for name in filled:
            current = model.get_buffer(name)
            _set_buffer(model, name, self.initial[name].to(device if current.is_meta else current.device, copy=True))
        self.initial.clear()
        return filled


def _real_device(model: nn.Module) -> torch.device | None:
    for tensor in (*model.parameters(), *model.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return None


def _set_buffer(model: nn.Module, name: str, value: Tensor) -> None:
    owner, _, attribute = name.rpartition(".")
    model.get_submodule(owner)._buffers[attribute] = value
