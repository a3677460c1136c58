"""Typed, frozen quantization settings: what a target is quantized to.

These are built once from a ``config_list`` (see :mod:`quantrain.config.parse`) and never re-parsed.
Strings appear only at the edge (``from_string``/``name``); inside the package the enumerations are used.

>>> QuantDtype.parse("int8").qmin, QuantDtype.parse("int8").qmax
(-127, 127)
>>> QuantDtype.parse("uint4").qmax
15
"""

from __future__ import annotations

import enum
import re
import reprlib
from dataclasses import dataclass

__all__ = [
    "Granularity",
    "GranularityKind",
    "QuantDtype",
    "QuantScheme",
    "TargetSettings",
]

_DTYPE_RE = re.compile(r"(u?)int([0-9]+)")
MIN_BITS = 2
MAX_BITS = 8
MAX_BLOCK_BITS = 63
"""Block sizes are at most ``2**63 - 1`` (a tensor dimension is an int64)."""


class _ShortRepr(reprlib.Repr):
    """``repr`` for values whose own ``repr`` fails: deep nesting cut, huge ints summarized."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel = 6
        self.maxtuple = self.maxlist = self.maxarray = self.maxdict = self.maxset = self.maxfrozenset = self.maxdeque = 16
        self.maxstring = self.maxother = 200
        self.maxlong = 60

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:  # str() of a very large int raises ValueError (Python's int_max_str_digits)
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)


_SHORT_REPR = _ShortRepr()


def shown(value: object) -> str:
    """``repr(value)`` for an error message, and never raising: a value whose ``repr`` fails (a huge int, deep
    nesting, a broken ``__repr__``) is shown shortened instead."""
    try:
        return repr(value)
    except Exception:  # ValueError (int_max_str_digits), RecursionError, or anything a __repr__ raises
        pass
    try:
        return _SHORT_REPR.repr(value)
    except Exception:
        return f"<{type(value).__name__} object>"


@dataclass(frozen=True)
class QuantDtype:
    """An integer type of ``bits`` bits.

    Signed types use the narrow range ``[-(2^(b-1)) + 1, 2^(b-1) - 1]`` (int8 is ``[-127, 127]``);
    unsigned types use the full range ``[0, 2^b - 1]``.
    """

    bits: int
    signed: bool

    @classmethod
    def parse(cls, value: str | None) -> QuantDtype:
        """``'int<N>'`` or ``'uint<N>'`` with 2 <= N <= 8; ``None`` means int8."""
        if value is None:
            return cls(8, True)
        if not isinstance(value, str):
            raise TypeError(f"expected a string such as 'int8' or 'uint8', got {type(value).__name__}")
        match = _DTYPE_RE.fullmatch(value)
        if match is None or len(match.group(2)) > 3 or not MIN_BITS <= int(match.group(2)) <= MAX_BITS:
            raise ValueError(f"unknown quant_dtype {value!r}; use 'int2'..'int8' or 'uint2'..'uint8'")
        return cls(int(match.group(2)), match.group(1) != "u")

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) + 1 if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1


class QuantScheme(enum.Enum):
    """``symmetric``: zero point fixed at the middle of the range; ``affine``: zero point fitted to the range."""

    SYMMETRIC = "symmetric"
    AFFINE = "affine"

    @classmethod
    def parse(cls, value: str | None) -> QuantScheme:
        if value is None:
            return cls.SYMMETRIC
        if not isinstance(value, str):
            raise TypeError(f"expected 'symmetric' or 'affine', got {type(value).__name__}")
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown quant_scheme {value!r}; use 'symmetric' or 'affine'") from None


class GranularityKind(enum.Enum):
    """How many scales a tensor gets."""

    PER_TENSOR = "default"
    OUT_CHANNEL = "out_channel"
    IN_CHANNEL = "in_channel"
    PER_CHANNEL = "per_channel"
    BLOCK = "block"


WHOLE = -1
"""Block size meaning "the whole dimension"."""


@dataclass(frozen=True)
class Granularity:
    """Which elements share one scale and zero point.

    * ``default``: one for the whole tensor.
    * ``out_channel``: one per output channel of a parameter: per index of its module type's output-channel axis
      (dim 0 of Linear, Conv and Embedding weights and of every 1-D parameter, dim 1 of ConvTranspose and Hugging Face
      ``Conv1D`` weights; see :func:`quantrain.register_weight_axis`). Parameters only: dim 0 of an activation is the
      batch.
    * ``in_channel`` / ``per_channel``: one per index of dim 1.
    * a list of block sizes, one per dim; ``-1`` means the whole dim (so ``[1, -1]`` on a matrix is one
      scale per row and ``[-1, 32]`` one scale per 32 consecutive columns).
    """

    kind: GranularityKind
    block_sizes: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: object) -> Granularity:
        if value is None:
            return cls(GranularityKind.PER_TENSOR)
        if isinstance(value, str):
            try:
                kind = GranularityKind(value)
            except ValueError:
                kind = None
            if kind is None or kind is GranularityKind.BLOCK:
                raise ValueError(
                    f"unknown granularity {value!r}; use 'default', 'out_channel', 'in_channel', "
                    "'per_channel' or a list of block sizes such as [1, -1]"
                )
            return cls(kind)
        if isinstance(value, (list, tuple)):
            if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise TypeError(f"a block granularity is a non-empty list of ints, got {shown(value)}")
            if any(v == 0 or v < WHOLE for v in value):
                raise ValueError(f"block sizes must be positive or -1 (whole dim), got {shown(list(value))}")
            if any(v.bit_length() > MAX_BLOCK_BITS for v in value):
                raise ValueError(f"block sizes must be below 2**{MAX_BLOCK_BITS}, got {shown(list(value))}")
            return cls(GranularityKind.BLOCK, tuple(value))
        raise TypeError(f"granularity must be a string or a list of ints, got {type(value).__name__}")

    @property
    def spec(self) -> str | list[int]:
        """The config_list spelling of this granularity."""
        return list(self.block_sizes) if self.kind is GranularityKind.BLOCK else self.kind.value

    def check_activation(self) -> None:
        """Raise ``ValueError`` when this granularity cannot apply to an activation (dim 0 is the batch)."""
        if self.kind is GranularityKind.OUT_CHANNEL:
            raise ValueError("granularity 'out_channel' splits dim 0, which is the batch of an activation; use 'per_channel'")
        if self.kind is GranularityKind.BLOCK and self.block_sizes[0] != WHOLE:
            raise ValueError(
                f"block granularity {list(self.block_sizes)} must start with -1 for an activation (dim 0 is the batch)"
            )

    def block_shape(self, shape: tuple[int, ...], *, activation: bool, out_axis: int = 0) -> tuple[int, ...] | None:
        """Block sizes resolved for a tensor of ``shape``; ``None`` means per tensor.

        ``out_axis`` is the parameter's output-channel axis, which ``out_channel`` splits (``(-1, 1)`` for a
        ``(in_features, out_features)`` weight with ``out_axis=1``). Whole dims keep the marker :data:`WHOLE`, so an
        activation whose batch size (or any other whole dim) varies keeps the same scale shape. Raises ``ValueError``
        when the granularity does not fit the shape.

        >>> Granularity.parse("out_channel").block_shape((4, 6), activation=False, out_axis=1)
        (-1, 1)
        """
        kind = self.kind
        if kind is GranularityKind.PER_TENSOR:
            return None
        if activation:
            self.check_activation()
        if kind is GranularityKind.OUT_CHANNEL:
            return _axis_blocks(shape, out_axis)
        if kind in (GranularityKind.IN_CHANNEL, GranularityKind.PER_CHANNEL):
            return _axis_blocks(shape, 1)
        sizes = self.block_sizes
        if len(sizes) != len(shape):
            raise ValueError(f"block granularity {list(sizes)} has {len(sizes)} entries but the tensor has shape {tuple(shape)}")
        for dim, (size, length) in enumerate(zip(sizes, shape, strict=True)):
            if size != WHOLE and length % size:
                raise ValueError(f"block size {size} does not divide dim {dim} of length {length} (shape {tuple(shape)})")
        return sizes


def _axis_blocks(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    if len(shape) <= axis:
        raise ValueError(
            f"needs a tensor with at least {axis + 1} dims for one scale per index of dim {axis}, got shape {tuple(shape)}"
        )
    return tuple(1 if dim == axis else WHOLE for dim in range(len(shape)))


APPLY_METHODS = ("bypass", "clamp_round", "qat_clamp_round")


@dataclass(frozen=True)
class TargetSettings:
    """Everything that says how one target (a parameter, input or output) is quantized."""

    dtype: QuantDtype = QuantDtype(8, True)
    scheme: QuantScheme = QuantScheme.SYMMETRIC
    granularity: Granularity = Granularity(GranularityKind.PER_TENSOR)
    apply_method: str | None = None

    @property
    def qmin(self) -> int:
        return self.dtype.qmin

    @property
    def qmax(self) -> int:
        return self.dtype.qmax
