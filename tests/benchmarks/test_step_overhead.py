"""The step-overhead benchmark runs its workers end to end on digits and reports step times against float."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_overhead.py"


def test_digits_rows(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("step_overhead_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    out = tmp_path / "step_overhead.json"
    methods = ["float", "quantrain", "torch.ao", "nni"]
    argv = ["--models", "digits", "--methods", *methods, "--rounds", "2", "--steps", "2", "--warmup", "1", "--threads", "1"]
    assert module.main([*argv, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["method"]: row for row in report["rows"]}
    assert set(rows) == {"float", "quantrain", "torch.ao"} and report["errors"] == []
    assert "nni" in report["skipped"]  # not importable here; and there is no NNI column where it is
    for row in rows.values():
        assert row["model"] == "digits" and row["steps"] == 4
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["x_float"] > 0
        assert row["train_peak_mib"] >= 0 and row["peak_mib"] >= row["baseline_mib"]
    assert rows["float"]["x_float"] == 1.0 and rows["float"]["x_float_memory"] in (1.0, None)
    quantrain = rows["quantrain"]["prepared"]
    assert quantrain["quantized_modules"] == 4 and quantrain["fake_quantizers"] > 0
    assert quantrain["quantizer_steps"] == 1 + 4  # the quantizer counted every optimizer step: QAT was on
    assert rows["torch.ao"]["prepared"]["fake_quantizers"] > 0
    assert report["environment"]["threads"] == 1
    output = capsys.readouterr().out
    assert "| digits (64) | quantrain |" in output and "nni column skipped" in output
