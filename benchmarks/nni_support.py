"""Finding NNI 3.0 for the benchmarks' NNI columns, and what its processes need.

NNI 3.0 and quantrain live in separate virtual environments here, so every NNI column runs in a subprocess of an
interpreter that has NNI. :func:`find_nni_python` picks that interpreter, in this order:

1. the path given on the command line (``--nni-python PATH``);
2. the environment variable ``QUANTRAIN_NNI_PYTHON``;
3. ``/opt/nni-venv/bin/python``, if it exists;
4. the current interpreter, if ``import nni`` works in it.

It then runs the interpreter once to check that ``nni.compression.quantization`` imports and that its version is
3.x; where anything fails, :attr:`NniPython.reason` says why, and the benchmarks print ``skipped: <reason>`` in
their NNI column. This module uses only the standard library: NNI's interpreter imports it too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

ENV_VAR = "QUANTRAIN_NNI_PYTHON"
DEFAULT_NNI_PYTHON = "/opt/nni-venv/bin/python"
SRC_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
PROBE = (
    "import json, sys, torch, nni, nni.compression.quantization\n"
    "print(json.dumps({'nni': nni.__version__, 'torch': torch.__version__, 'python': sys.version.split()[0]}))"
)


@dataclass(frozen=True)
class NniPython:
    """An interpreter with NNI (``path``, with the versions it reported), or the reason there is none."""

    path: str | None
    source: str  # where the path came from: "--nni-python", ENV_VAR, "default" or "current interpreter"
    versions: dict[str, str] | None = None
    reason: str | None = None

    @property
    def available(self) -> bool:
        return self.reason is None

    def describe(self) -> str:
        if not self.available:
            return f"skipped: {self.reason}"
        v = self.versions or {}
        return f"{self.path} (NNI {v.get('nni')}, torch {v.get('torch')}, Python {v.get('python')}; from {self.source})"


def find_nni_python(given: str | None = None, timeout: float = 600.0) -> NniPython:
    """The interpreter to run NNI in (see the module docstring); ``given`` is ``--nni-python``'s value."""
    if given is not None:
        path, source = given, "--nni-python"
    elif os.environ.get(ENV_VAR):
        path, source = os.environ[ENV_VAR], ENV_VAR
    elif os.path.exists(DEFAULT_NNI_PYTHON):
        path, source = DEFAULT_NNI_PYTHON, "default"
    else:
        path, source = sys.executable, "current interpreter"
    if not path:
        return NniPython(None, source, reason=f"no NNI interpreter given ({source} is empty)")
    if not os.path.exists(path):
        return NniPython(None, source, reason=f"{path} (from {source}) does not exist")
    try:
        probe = subprocess.run([path, "-c", PROBE], capture_output=True, text=True, timeout=timeout, env=worker_env())
    except (OSError, subprocess.TimeoutExpired) as error:
        return NniPython(None, source, reason=f"{path} (from {source}) could not be run: {error}")
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["(no output)"])[-1]
        return NniPython(None, source, reason=f"NNI is not importable in {path} (from {source}): {last}")
    versions = json.loads(probe.stdout.strip().splitlines()[-1])
    if not versions["nni"].startswith("3."):
        return NniPython(None, source, versions, f"{path} has NNI {versions['nni']}; these benchmarks compare with NNI 3.x")
    return NniPython(path, source, versions)


def worker_env(with_quantrain_source: bool = False, threads: int | None = None) -> dict[str, str]:
    """The environment of a benchmark's worker process: with ``with_quantrain_source`` this checkout's ``src`` on
    ``PYTHONPATH``, so that a benchmark script that imports quantrain at its top (for its models, e.g.
    ``quantrain.Add``) also loads in NNI's interpreter, where quantrain is not installed (the NNI column itself never
    calls quantrain); ``threads`` sets the OpenMP/MKL thread counts."""
    env = dict(os.environ)
    if with_quantrain_source:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (SRC_DIR, env.get("PYTHONPATH")) if p)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env
