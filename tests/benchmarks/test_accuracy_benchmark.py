"""The accuracy benchmark runs end to end on digits and reports drops against its float control."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="module")
def accuracy_module():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_digits_run_writes_rows_with_drops_against_the_float_control(accuracy_module, tmp_path, capsys):
    out = tmp_path / "accuracy.json"
    argv = ["--datasets", "digits", "--models", "plain", "--settings", "W8A8", "--seeds", "0", "--json", str(out)]
    no_nni = str(tmp_path / "no-such-python")  # the NNI column is skipped, with the reason, where NNI is not found
    assert accuracy_module.main([*argv, "--nni-python", no_nni]) == 0
    report = json.loads(out.read_text())
    assert "does not exist" in report["skipped"]["nni"]
    rows = {(row["setting"], row["method"]): row for row in report["rows"]}
    assert set(rows) == {
        ("float", "checkpoint"),
        ("float", "float control"),
        ("W8A8", "quantrain PTQ"),
        ("W8A8", "quantrain QAT"),
        ("W8A8", "torch.ao QAT"),
    }
    control = rows[("float", "float control")]["accuracy_mean"]
    for row in rows.values():
        assert row["drop_mean"] == pytest.approx(control - row["accuracy_mean"])
        assert 80.0 < row["accuracy_mean"] <= 100.0
    assert report["test_sizes"] == {"digits": 360}
    assert "| digits (360) | plain | W8A8 | quantrain QAT |" in capsys.readouterr().out


def test_nni_qat_in_nni_interpreter(accuracy_module, tmp_path):
    if not os.environ.get("QUANTRAIN_NNI_PYTHON"):  # NNI lives in its own venv: opt in (it takes a while)
        pytest.skip("set QUANTRAIN_NNI_PYTHON to an interpreter with NNI 3.0 to run the NNI column")
    nni_python = accuracy_module.find_nni_python()
    if not nni_python.available:
        pytest.skip(f"no interpreter with NNI 3.0: {nni_python.reason}")
    torch.manual_seed(0)
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save(accuracy_module.MODELS["plain"]().state_dict(), checkpoint)  # untrained: one epoch of NNI QAT from scratch
    spec = {"dataset": "digits", "train_subset": None, "model": "plain", "seed": 0, "setting": "W8A8", "lr": 2e-3}
    accuracy, seconds = accuracy_module.run_in_nni(nni_python, {**spec, "checkpoint": str(checkpoint), "threads": 1})
    assert 30.0 < accuracy <= 100.0 and seconds > 0  # chance is 10%


def test_summary_drops_are_per_seed(accuracy_module):
    result = accuracy_module.Result
    runs = [
        result("d", "m", "float", "float control", 0, 90.0, 1.0),
        result("d", "m", "float", "float control", 1, 80.0, 1.0),
        result("d", "m", "W4A4", "q", 0, 89.0, 2.0),
        result("d", "m", "W4A4", "q", 1, 77.0, 4.0),
    ]
    (row,) = [r for r in accuracy_module.summarize(runs) if r["method"] == "q"]
    assert row["drop_mean"] == pytest.approx(2.0) and row["drop_spread"] == pytest.approx(2.0)
    assert row["accuracy_mean"] == pytest.approx(83.0) and row["seconds_median"] == pytest.approx(3.0)
