"""Every docstring example runs, and the code is ruff-clean."""

import doctest
import importlib
import pkgutil
import shutil
import subprocess
from pathlib import Path

import pytest

import quantrain

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(quantrain.__path__, "quantrain.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", ["quantrain", *MODULES])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_the_examples_exist():
    examples = sum(doctest.testmod(importlib.import_module(name), verbose=False).attempted for name in MODULES)
    assert examples >= 20


@pytest.mark.parametrize("command", [["check"], ["format", "--check"]])
def test_ruff_is_clean(command):
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed; install the test extra: pip install -e '.[test]'")
    result = subprocess.run([ruff, *command, "src", "tests", "examples", "benchmarks"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
