"""The deploy benchmark runs end to end on the MLP and reports latency ratios and sizes."""

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "deploy.py"


def test_mlp_rows(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("deploy_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "deploy.json"
    assert module.main(["--models", "mlp", "--runs", "3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {row["variant"]: row for row in report["rows"]}
    assert set(rows) == {"fp32", "ort_static", "quantrain", "quantrain-uint8"}
    assert rows["fp32"]["speedup_vs_fp32"] == 1.0 and rows["ort_static"]["vs_ort_static"] == 1.0
    for variant in ("quantrain", "quantrain-uint8"):
        assert rows[variant]["size_vs_fp32"] < 0.3  # 8-bit weights: about a quarter of fp32
    assert rows["quantrain-uint8"]["parity_steps"] <= 1.0 + 1e-4  # exact on every CPU
    if not report["u8s8_saturates"]:
        assert rows["quantrain"]["parity_steps"] <= 1.0 + 1e-4
    assert rows["fp32"]["parity_steps"] is None
    assert "| mlp (256) | quantrain-uint8 |" in capsys.readouterr().out
