"""Training checkpoints: written atomically, read without unpickling arbitrary objects, checked against corruption.

:func:`save_checkpoint` writes ``state`` (nested dicts, lists and tuples of tensors, numbers, strings, ``None``:
what ``model.state_dict()``, ``optimizer.state_dict()``, an LR scheduler's state and ``torch.get_rng_state()`` are
made of) with ``torch.save`` to a temporary file in the same directory, flushes it to disk and renames it over
``path``: a run killed at any moment leaves the previous checkpoint or the new one, never half a file. Anything
that ``torch.load(weights_only=True)`` would refuse to read back is refused when saving, naming where it is.

The file is an ordinary ``torch.save`` file, ``{"format", "version", "sha256", "state"}``. :func:`load_checkpoint`
reads it with ``torch.load(weights_only=True)`` (no class can be instantiated and no code run by loading it) and
recomputes the SHA-256 of the state's contents, so a truncated file, a file that is not a checkpoint, one holding
pickled objects, and one whose bytes changed after it was written each raise a ``ValueError`` naming the file.

To resume QAT, save ``model.state_dict()``, which holds quantrain's state (ranges, scales, schedule flags and the
step count ``quantrain_step``), and the optimizer's: loading the model's state_dict into a model quantized with the
same config_list resyncs the quantizer's ``current_step``, so the schedule continues where it stopped.

>>> import os, tempfile, torch
>>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
>>> save_checkpoint({"model": {"w": torch.ones(2)}, "step": 7}, path)
>>> load_checkpoint(path)["step"]
7
>>> with open(path, "r+b") as f:
...     _ = f.truncate(100)
>>> load_checkpoint(path)  # doctest: +ELLIPSIS
Traceback (most recent call last):
ValueError: ...ckpt.pt: not a readable checkpoint (truncated or corrupted?)...
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import secrets
import zipfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

import torch

__all__ = ["FORMAT", "VERSION", "atomic_write", "load_checkpoint", "save_checkpoint", "state_digest"]

FORMAT = "quantrain.checkpoint"
VERSION = 1

_SCALARS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (see the module docstring).

    Raises ``TypeError`` naming the entry when ``state`` holds something other than tensors, numbers, strings,
    ``None`` and dicts, lists or tuples of them (``torch.load(weights_only=True)`` could not read it back).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"save_checkpoint: state must be a dict, got {type(state).__name__}")
    digest = state_digest(state)
    with atomic_write(path, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, "sha256": digest, "state": dict(state)}, f)


def load_checkpoint(path: str | os.PathLike, map_location: Any = None) -> dict[str, Any]:
    """Read the ``state`` that :func:`save_checkpoint` wrote to ``path``, with ``torch.load(weights_only=True)``.

    ``map_location`` is passed to ``torch.load``. A missing file raises ``FileNotFoundError``; every other problem
    (truncated or corrupted, not a quantrain checkpoint, holding pickled objects, modified after it was written)
    raises ``ValueError`` naming the file.
    """
    data = _torch_load(path, map_location)
    if not (isinstance(data, dict) and data.get("format") == FORMAT):
        raise ValueError(f"{path}: not a quantrain checkpoint (expected a file written by quantrain.checkpoint.save_checkpoint)")
    if data.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {data.get('version')!r} (this quantrain reads {VERSION})")
    state, expected = data.get("state"), data.get("sha256")
    if not isinstance(state, dict) or not isinstance(expected, str):
        raise ValueError(f"{path}: damaged checkpoint: its 'state' or 'sha256' entry is missing or of the wrong type")
    if state_digest(state) != expected:
        raise ValueError(f"{path}: checksum mismatch: the checkpoint was modified or corrupted after it was written")
    return state


def _torch_load(path: str | os.PathLike, map_location: Any) -> Any:
    """``torch.load(weights_only=True)``, its failures turned into a ``ValueError`` naming ``path``."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a truncated one has lost its directory
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupted?): not a torch.save zip archive")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = _refused_global(exc)
        if refused is None:
            raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupted?): {_first_line(exc)}") from None
        raise ValueError(
            f"{path}: refused: the file holds pickled objects other than tensors, numbers, strings and containers, "
            f"which torch.load(weights_only=True) does not create ({refused})"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: not a readable checkpoint (truncated or corrupted?): {type(exc).__name__}: {exc}") from None


def _refused_global(exc: Exception) -> str | None:
    """The line of torch's weights-only refusal naming the class or function it would not load, if it names one."""
    for line in str(exc).splitlines():
        if "Unsupported global" in line or "GLOBAL" in line:
            return line.strip()[:300]
    return None


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def state_digest(state: Any) -> str:
    """SHA-256 of ``state``'s contents: every tensor's dtype, shape and bytes, every key and value, in order."""
    digest = hashlib.sha256()
    _update(digest, state, "state")
    return digest.hexdigest()


def _update(digest: Any, value: Any, where: str) -> None:
    if isinstance(value, torch.Tensor):
        tensor = value.detach().to("cpu").contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _update(digest, key, f"{where} key")
            _update(digest, item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for index, item in enumerate(value):
            _update(digest, item, f"{where}[{index}]")
    elif isinstance(value, _SCALARS):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(
            f"save_checkpoint: {where} is a {type(value).__name__}; a checkpoint holds only tensors, numbers, strings, "
            "None and dicts, lists or tuples of them (what torch.load(weights_only=True) reads back)"
        )


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on success it is flushed to disk and renamed to ``path``
    (``os.replace``, atomic), on failure removed, so ``path`` always holds either its old or its new content."""
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _sync_directory(directory)


def _sync_directory(directory: str) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
