"""Derived classes: a module becomes an instance of a subclass of its own class, in place.

``derived_class(Mixin, nn.Linear)`` is ``class <Mixin.prefix>Linear(Mixin, nn.Linear)``, created once and cached,
so ``isinstance(m, nn.Linear)`` keeps holding (as with ``torch.nn.utils.parametrize``). Instances pickle and
deep-copy: they reduce to the mixin and the float class, and the class is rebuilt on load.
"""

from __future__ import annotations

from torch import nn

__all__ = ["DerivedModule", "derived_class", "restore_class"]


class DerivedModule(nn.Module):
    """Base of the mixins; ``_float_class`` is the class the module had before."""

    prefix = "Derived"
    _float_class: type[nn.Module]
    _mixin: type[DerivedModule]

    def __reduce_ex__(self, protocol):
        return _new_derived, (self._mixin, self._float_class), self.__getstate__()


_CLASSES: dict[tuple[type, type], type] = {}


def derived_class(mixin: type[DerivedModule], float_class: type[nn.Module]) -> type:
    """``class <prefix><Name>(mixin, float_class)``, created once per pair."""
    key = (mixin, float_class)
    cls = _CLASSES.get(key)
    if cls is None:
        name = f"{mixin.prefix}{float_class.__name__}"
        namespace = {"_float_class": float_class, "_mixin": mixin, "__module__": mixin.__module__, "__qualname__": name}
        cls = _CLASSES[key] = type(name, (mixin, float_class), namespace)
    return cls


def restore_class(module: nn.Module) -> None:
    """Give ``module`` back the class it had before it was derived."""
    if isinstance(module, DerivedModule):
        module.__class__ = module._float_class


def _new_derived(mixin: type[DerivedModule], float_class: type[nn.Module]) -> nn.Module:
    cls = derived_class(mixin, float_class)
    return cls.__new__(cls)
