"""Native CPU kernels for the QAT hot path, with the same numbers as the PyTorch operations they replace.

PyTorch has no CPU kernel that computes quantrain's fake quantization in one pass (its own fused kernels multiply by
``1 / scale`` and test the rounded value for the mask, so they give other numbers), and the operation-by-operation
path reads and writes each tensor about seven times. ``csrc/fake_quant.c`` does, with the same float32 operations in
the same order, so both paths give identical bits (tested):

* :func:`observe_fake_quantize`: a whole quantizer step (range, NaN screening, moving average, scale and zero point
  written into the quantizer's buffers, fake quantization with its mask) in one call;
* :func:`fake_quantize_with_mask`: the fake quantization alone (optionally after a fused ReLU/ReLU6 clamp);
* :func:`masked_grad`: the straight-through backward; masks are packed one bit per element (:func:`unpack_mask`);
* :func:`channel_min_max`: per-channel ranges in one pass;
* :func:`channel_divide_backward`: the backward of a folded BatchNorm's division (its per-channel sum in double
  precision: the one result that is close to, not identical with, PyTorch's float32 reduction).

The C source is compiled on first use with the system's C compiler, as ``torch.compile`` compiles its CPU kernels,
into a cache directory (``$QUANTRAIN_CACHE_DIR``, else ``$XDG_CACHE_HOME/quantrain``, else ``~/.cache/quantrain``),
keyed by the source, the flags, the compiler and the CPU, and loaded with :mod:`ctypes`; later processes load it from
there in milliseconds. Where there is no compiler, the build fails, or ``QUANTRAIN_NATIVE=0`` is set, every caller
uses the PyTorch operations instead (same numbers, slower); :func:`status` says which and why.

Only plain contiguous float32 CPU tensors take this path, outside ``torch.compile`` and tracing (which must see
PyTorch operations): everything else goes the PyTorch way.

>>> import torch
>>> result = fake_quantize_with_mask(torch.tensor([0.26, 9.0]), torch.tensor(0.1), None, -127, 127)
>>> result is None or [round(v, 4) for v in result[0].tolist()] == [0.3, 9.0]
True
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "Plan",
    "channel_divide_backward",
    "channel_min_max",
    "fake_quantize_with_mask",
    "masked_grad",
    "unpack_mask",
    "observe_fake_quantize",
    "observe_layout",
    "observe_plan",
    "status",
]

_log = logging.getLogger("quantrain")
_SOURCE = Path(__file__).with_name("csrc") / "fake_quant.c"
_EXACT = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-Wall"]
# Tried in turn: tuned to this CPU with OpenMP threads, then without each (compilers lacking one of them).
_FLAG_SETS = (["-march=native", "-fopenmp"], ["-fopenmp"], ["-march=native"], [])
_reason = "not loaded yet"

_PLAIN = (Tensor, torch.nn.Parameter)  # not subclasses: fake, functional or traced tensors have no real data
_F32P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


def status() -> str:
    """``"loaded: <path>"``, or why the PyTorch operations are used instead."""
    _library()
    return _reason


def fake_quantize_with_mask(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    clamp: tuple[float, float | None] | None = None,
) -> tuple[Tensor, Tensor] | None:
    """``(x_hat, bits)`` of :func:`quantrain.ops.fake_quant.fake_quantize` in one pass, with ``clamp=(lo, hi)``
    applied to ``x`` first (a fused ReLU/ReLU6; the mask then also requires ``lo < x < hi``); ``None`` where this
    path does not apply (then use the PyTorch operations).

    ``scale`` (and ``zero_point``) hold one value, or one per index of a single dim of ``x`` (broadcastable to it).
    ``bits`` is the gradient mask packed one bit per element (see :func:`unpack_mask`).
    """
    if not _plain_f32(x) or scale.dtype != torch.float32 or scale.device.type != "cpu" or x.numel() == 0:
        return None
    layout = _channel_layout(x.shape, scale.shape)
    if layout is None or (zero_point is not None and zero_point.shape != scale.shape):
        return None
    lib = _library()
    if lib is None:
        return None
    scale = scale.detach().contiguous()
    if zero_point is not None:
        zero_point = zero_point.detach().to(torch.float32).contiguous()
    out, bits = torch.empty_like(x, memory_format=torch.contiguous_format), _mask_bits(x.numel())
    lib.quantrain_fake_quant(
        x.data_ptr(),
        out.data_ptr(),
        bits.data_ptr(),
        scale.data_ptr(),
        None if zero_point is None else zero_point.data_ptr(),
        *layout,
        ctypes.byref(_quantize_plan(qmin, qmax, clamp)),
        torch.get_num_threads(),
    )
    return out, bits


def masked_grad(grad: Tensor, bits: Tensor) -> Tensor:
    """``grad * mask`` for a mask packed by this module's kernels (one pass; a zero keeps the gradient's sign)."""
    grad = grad.contiguous()
    lib = _library()
    if not (type(grad) in _PLAIN and grad.dtype is torch.float32 and grad.is_cpu) or lib is None:
        return grad * unpack_mask(bits, grad.shape).to(grad.dtype)  # e.g. a float64 gradient
    out = torch.empty_like(grad)
    lib.quantrain_masked_grad(grad.data_ptr(), bits.data_ptr(), out.data_ptr(), grad.numel(), torch.get_num_threads())
    return out


def unpack_mask(bits: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The bool mask of ``shape`` packed in ``bits`` (element ``i`` is bit ``i % 8`` of byte ``i // 8``).

    >>> unpack_mask(torch.tensor([0b101], dtype=torch.uint8), (3,)).tolist()
    [True, False, True]
    """
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=bits.device)
    flat = bits.reshape(-1, 1).bitwise_and(weights).ne(0).reshape(-1)
    return flat[: torch.Size(shape).numel()].reshape(shape)


def _mask_bits(numel: int) -> Tensor:
    return torch.empty((numel + 7) // 8, dtype=torch.uint8)


class Plan(ctypes.Structure):
    """A quantizer's constant settings for the kernels (``quantrain_plan`` in the C source)."""

    _fields_ = [
        ("tracking", ctypes.c_int32),
        ("symmetric", ctypes.c_int32),
        ("skip_nonfinite", ctypes.c_int32),
        ("has_gate", ctypes.c_int32),
        ("has_hi", ctypes.c_int32),
        ("decay", ctypes.c_float),
        ("keep", ctypes.c_float),
        ("qmin", ctypes.c_float),
        ("qmax", ctypes.c_float),
        ("levels", ctypes.c_float),
        ("lo", ctypes.c_float),
        ("hi", ctypes.c_float),
    ]


@functools.lru_cache(maxsize=256)
def _quantize_plan(qmin: int, qmax: int, clamp: tuple[float, float | None] | None) -> Plan:
    """The plan of a fake quantization alone (the observer's fields unused)."""
    return observe_plan("minmax", 0.0, False, False, qmin, qmax, clamp)


TRACKING_CODES = {"ema": 0, "minmax": 1, "extremes": 2}


def observe_plan(
    tracking: str,
    decay: float,
    symmetric: bool,
    skip_nonfinite: bool,
    qmin: int,
    qmax: int,
    clamp: tuple[float, float | None] | None = None,
) -> Plan:
    """The plan of a quantizer with these settings (``tracking``: a ``RangeTracking`` value)."""
    lo, hi = (0.0, None) if clamp is None else clamp
    return Plan(
        tracking=TRACKING_CODES[tracking],
        symmetric=symmetric,
        skip_nonfinite=skip_nonfinite,
        has_gate=clamp is not None,
        has_hi=hi is not None,
        decay=decay,
        keep=1 - decay,  # the moving average's two factors, each rounded to float32 as PyTorch rounds a scalar
        qmin=qmin,
        qmax=qmax,
        levels=(qmax - qmin) / 2 if symmetric else qmax - qmin,
        lo=lo,
        hi=0.0 if hi is None else hi,
    )


def observe_layout(x: Tensor, blocks: tuple[int, ...] | None, state: tuple[Tensor, ...]) -> tuple[int, int, int] | None:
    """``(outer, channels, inner)`` when :func:`observe_fake_quantize` applies to ``x`` with one range per
    ``blocks`` (``None``: one for the tensor) and the quantizer's ``state`` tensors, else ``None``.

    ``state``: float32 tensors of one value per range (tracked minimum and maximum, scale, zero point) and
    optionally an int64 counter last, all plain contiguous CPU tensors."""
    if not _plain_f32(x) or x.numel() == 0 or _library() is None:
        return None
    if blocks is None:
        layout = (1, 1, x.numel())
    else:
        if len(blocks) != x.dim():
            return None
        # ranges per index of a dim (block 1), one over a whole dim, or (0) several blocks along a dim: not here
        counts = [n if size == 1 else (1 if size in (-1, n) else 0) for n, size in zip(x.shape, blocks, strict=True)]
        axes = [d for d, n in enumerate(counts) if n != 1]
        if 0 in counts or len(axes) > 1:
            return None
        layout = (1, 1, x.numel()) if not axes else _channel_layout(x.shape, torch.Size(counts))
    channels = layout[1]
    for tensor in state[:4]:
        if not (type(tensor) is Tensor and tensor.dtype is torch.float32 and tensor.is_cpu and tensor.is_contiguous()):
            return None
        if tensor.numel() != channels:
            return None
    if len(state) > 4 and not (type(state[4]) is Tensor and state[4].dtype is torch.int64 and state[4].is_cpu):
        return None
    return layout


def observe_fake_quantize(
    x: Tensor,
    layout: tuple[int, int, int],
    plan: Plan,
    tracked_min: Tensor,
    tracked_max: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_zero_point: bool,
    nonfinite: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One quantizer step in one native call: track ``x``'s range (``plan.tracking``, leaving out a channel whose
    range is not finite with ``plan.skip_nonfinite``, counted in ``nonfinite``), write ``scale`` (and, affine,
    ``zero_point``) from it, and return ``(x_hat, mask)`` as :func:`fake_quantize_with_mask` with them.
    ``quant_zero_point``: whether the fake quantization adds the zero point (not for symmetric signed types).
    Only after :func:`observe_layout` said it applies; the numbers are those of the PyTorch path, bit for bit."""
    out, bits = torch.empty_like(x), _mask_bits(x.numel())
    scratch = torch.empty(2 * layout[1])
    _library().quantrain_observe_fake_quant(
        x.data_ptr(),
        out.data_ptr(),
        bits.data_ptr(),
        *layout,
        ctypes.byref(plan),
        tracked_min.data_ptr(),
        tracked_max.data_ptr(),
        scale.data_ptr(),
        None if plan.symmetric else zero_point.data_ptr(),
        zero_point.data_ptr() if quant_zero_point else None,
        None if nonfinite is None else nonfinite.data_ptr(),
        scratch.data_ptr(),
        torch.get_num_threads(),
    )
    return out, bits


def channel_divide_backward(
    grad: Tensor, out: Tensor, s: Tensor, need_y: bool, need_s: bool
) -> tuple[Tensor | None, Tensor | None] | None:
    """The gradients of ``out = y / s`` (``s``: one value per index of dim 1 of ``y``, shaped to broadcast) from the
    quotient ``out``, in one pass: ``grad / s`` (as PyTorch divides) and ``-sum(grad * out) / s`` per channel (summed
    in double precision, in a fixed order: a few units in the last place from PyTorch's float32 reduction, and the
    same for any number of threads); ``None`` where this path does not apply."""
    if not (_plain_f32(grad) and _plain_f32(out) and _plain_f32(s)) or grad.shape != out.shape or grad.dim() < 2:
        return None
    channels = grad.shape[1]
    if s.numel() != channels or s.shape != (1, channels) + (1,) * (grad.dim() - 2) or grad.numel() == 0:
        return None
    lib = _library()
    if lib is None:
        return None
    grad_y = torch.empty_like(grad) if need_y else None
    grad_s = torch.empty_like(s) if need_s else None
    lib.quantrain_channel_divide_backward(
        grad.data_ptr(),
        out.data_ptr(),
        s.data_ptr(),
        None if grad_y is None else grad_y.data_ptr(),
        None if grad_s is None else grad_s.data_ptr(),
        grad.shape[0],
        channels,
        grad.numel() // (grad.shape[0] * channels),
        torch.get_num_threads(),
    )
    return grad_y, grad_s


def channel_min_max(x: Tensor, axis: int) -> tuple[Tensor, Tensor] | None:
    """Minimum and maximum of ``x`` over every dim but ``axis`` (one pass; a NaN wins, as in ``amin``/``amax``),
    each of ``x.shape[axis]`` values; ``None`` where this path does not apply."""
    if not _plain_f32(x) or x.numel() == 0:
        return None
    lib = _library()
    if lib is None:
        return None
    channels = x.shape[axis]
    outer = x.shape[:axis].numel()
    mins, maxs = torch.empty(channels), torch.empty(channels)
    lib.quantrain_channel_min_max(
        x.data_ptr(), mins.data_ptr(), maxs.data_ptr(), outer, channels, x.numel() // (outer * channels), torch.get_num_threads()
    )
    return mins, maxs


def _plain_f32(x: Tensor) -> bool:
    """A real (not fake, traced or subclassed) contiguous float32 CPU tensor, outside compilation and tracing."""
    return (
        type(x) in _PLAIN
        and x.dtype is torch.float32
        and x.is_cpu
        and x.is_contiguous()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
    )


def _channel_layout(shape: torch.Size, qshape: torch.Size) -> tuple[int, int, int] | None:
    """``(outer, channels, inner)`` when ``qshape`` broadcasts to ``shape`` along one dim at most, else ``None``."""
    if len(qshape) > len(shape):
        return None
    qshape = (1,) * (len(shape) - len(qshape)) + tuple(qshape)
    axes = [d for d, n in enumerate(qshape) if n != 1]
    if not axes:
        return 1, 1, shape.numel()
    if len(axes) > 1 or qshape[axes[0]] != shape[axes[0]]:
        return None
    axis = axes[0]
    outer = shape[:axis].numel()
    return outer, shape[axis], shape.numel() // (outer * shape[axis])


@functools.cache
def _library() -> ctypes.CDLL | None:
    global _reason
    if os.environ.get("QUANTRAIN_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _reason = "disabled by QUANTRAIN_NATIVE"
        return None
    try:
        path = _build()
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _reason = f"unavailable ({exc}); using PyTorch operations"
        _log.info("quantrain: native CPU kernels %s", _reason)
        return None
    lib.quantrain_fake_quant.argtypes = [_F32P] * 5 + [_I64] * 3 + [ctypes.POINTER(Plan), _INT]
    lib.quantrain_fake_quant.restype = None
    lib.quantrain_channel_min_max.argtypes = [_F32P] * 3 + [_I64] * 3 + [_INT]
    lib.quantrain_channel_min_max.restype = None
    lib.quantrain_masked_grad.argtypes = [_F32P] * 3 + [_I64, _INT]
    lib.quantrain_masked_grad.restype = None
    lib.quantrain_channel_divide_backward.argtypes = [_F32P] * 5 + [_I64] * 3 + [_INT]
    lib.quantrain_channel_divide_backward.restype = None
    lib.quantrain_observe_fake_quant.argtypes = [_F32P] * 3 + [_I64] * 3 + [ctypes.POINTER(Plan)] + [_F32P] * 7 + [_INT]
    lib.quantrain_observe_fake_quant.restype = None
    _reason = f"loaded: {path}"
    return lib


def _cache_dir() -> Path:
    if os.environ.get("QUANTRAIN_CACHE_DIR"):
        return Path(os.environ["QUANTRAIN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quantrain"


def _build() -> Path:
    """Compile the kernels (once per source, compiler and CPU) and return the shared library's path."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC)")
    source = _SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    cache = _cache_dir()
    errors = []
    for extra in _FLAG_SETS:
        flags = _EXACT + extra
        key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(), _cpu_id()])).hexdigest()
        target = cache / f"quantrain_kernels_{key[:20]}.so"
        if target.exists():
            return target
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as scratch:  # built aside, then renamed: processes may race
            built = Path(scratch) / target.name
            done = subprocess.run(
                [compiler, *flags, str(_SOURCE), "-o", str(built), "-lm"], capture_output=True, text=True, timeout=120
            )
            if done.returncode == 0:
                os.replace(built, target)
                return target
            errors.append(done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"])
    raise RuntimeError(f"{compiler} failed: {errors[0][0]}")


def _cpu_id() -> bytes:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            text += "".join(line for line in info if line.startswith(("model name", "flags", "Features")))[:4096]
    except OSError:
        pass
    return text.encode()
