"""The accuracy benchmark runs end to end on digits and reports drops against its float control."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "accuracy.py"


@pytest.fixture(scope="module")
def accuracy_module():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_digits_run_writes_rows_with_drops_against_the_float_control(accuracy_module, tmp_path, capsys):
    out = tmp_path / "accuracy.json"
    argv = ["--datasets", "digits", "--models", "plain", "--settings", "W8A8", "--seeds", "0", "--json", str(out)]
    assert accuracy_module.main(argv) == 0
    report = json.loads(out.read_text())
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
