"""quantrain.report: the training recorder, per-layer activation SQNR, and the HTML report with its plots."""

from __future__ import annotations

import copy
import json
import math
import re
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantrain import PtqQuantizer, QATQuantizer
from quantrain.demo import build_model, demo_config_list
from quantrain.report import RangeHistory, TrainingRecorder, activation_sqnr, float_reference, sqnr_db, write_report

INT8_OUTPUT = {"target_names": ["_output_"], "quant_dtype": "int8", "quant_scheme": "symmetric"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _linear(weight: list[list[float]]) -> nn.Linear:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
    return layer


def _calibrated(model: nn.Module, config_list: list[dict], x: torch.Tensor) -> PtqQuantizer:
    quantizer = PtqQuantizer(model.eval(), config_list)
    quantizer.track_forward(x)
    quantizer.compress()
    return quantizer


def _trained_digits_quantizer(steps: int = 3) -> tuple[nn.Module, QATQuantizer, torch.optim.Optimizer]:
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    quantizer = QATQuantizer(model, demo_config_list(8), fuse="auto", integer_bias=True, example_inputs=torch.zeros(1, 1, 8, 8))
    _train(model, optimizer, steps)
    return model, quantizer, optimizer


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    model.train()
    for _ in range(steps):
        x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


# ---- SQNR --------------------------------------------------------------------------------------------------


def test_sqnr_db_is_ten_log10_of_signal_over_noise():
    assert sqnr_db(1000.0, 1.0) == pytest.approx(30.0)
    assert sqnr_db(2.0, 2.0) == 0.0
    assert sqnr_db(1.0, 0.0) == math.inf and sqnr_db(0.0, 1.0) == -math.inf


def test_activation_sqnr_hand_computed():
    # Layer 0 is the identity with an int8 symmetric output: the range [-0.5, 1.27] gives scale 1.27 / 127 = 0.01,
    # so 0.013 -> 0.01 and 0.004 -> 0.0 (errors 0.003, 0.004) while 1.27 and -0.5 are on the grid.
    # Layer 1 doubles its input with an unquantized output: it carries layer 0's noise, doubled like its signal.
    model = nn.Sequential(_linear([[1, 0], [0, 1]]), _linear([[2, 0], [0, 2]]))
    x = torch.tensor([[1.27, 0.013], [-0.5, 0.004]])
    config_list = [{"op_names": ["0"], **INT8_OUTPUT}, {"op_names": ["1"], "target_names": ["weight"], "quant_dtype": "int8"}]
    quantizer = _calibrated(model, config_list, x)
    expected = 10 * math.log10((1.27**2 + 0.013**2 + 0.5**2 + 0.004**2) / (0.003**2 + 0.004**2))  # 48.72 dB
    sqnr = activation_sqnr(None, quantizer, x)
    assert list(sqnr) == ["0", "1"]
    assert sqnr["0"] == pytest.approx(expected, abs=1e-3) and expected == pytest.approx(48.723, abs=1e-3)
    assert sqnr["1"] == pytest.approx(expected, abs=1e-3)  # weight 2 is exact in int8 (scale 2 / 127)


def test_activation_sqnr_is_infinite_on_the_grid():
    x = torch.tensor([[63.5, -1.0], [0.5, 2.0]])  # scale 63.5 / 127 = 0.5: every value is on the grid
    quantizer = _calibrated(nn.Sequential(_linear([[1, 0], [0, 1]])), [INT8_OUTPUT | {"op_types": ["Linear"]}], x)
    assert activation_sqnr(None, quantizer, x) == {"0": math.inf}


def test_float_reference_equals_a_float_model_with_the_same_weights():
    # The digits CNN with conv-BN-ReLU folded: each fused layer is compared with the float chain's last module.
    model, quantizer, _ = _trained_digits_quantizer()
    pure = build_model()
    pure.load_state_dict(model.state_dict(), strict=False)  # the same weights and BN statistics, no quantizer
    x = torch.rand(64, 1, 8, 8)
    reference, against_pure = activation_sqnr(None, quantizer, x), activation_sqnr(pure, quantizer, x)
    assert list(reference) == ["0", "3", "8", "10"]
    for name, value in reference.items():
        assert 10.0 < value < 80.0
        assert against_pure[name] == pytest.approx(value, abs=1e-3)


def test_activation_sqnr_changes_nothing():
    model, quantizer, _ = _trained_digits_quantizer()
    model[4].eval()  # a mixed mode, to be restored as it was
    state = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    flags = [fq.fake_quant_enabled.item() for fq in quantizer.fake_quantizers()]
    reference = float_reference(model)
    activation_sqnr(reference, model, torch.rand(16, 1, 8, 8))  # the model instead of the quantizer works too
    assert [m.training for m in model.modules()] == modes
    assert [fq.fake_quant_enabled.item() for fq in quantizer.fake_quantizers()] == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert quantizer.current_step == 3


def test_activation_sqnr_rejects_what_it_cannot_compare():
    model, quantizer, _ = _trained_digits_quantizer(steps=1)
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match="not quantized"):
        activation_sqnr(None, build_model(), x)
    with pytest.raises(ValueError, match="quantized model itself"):
        activation_sqnr(model, quantizer, x)
    with pytest.raises(ValueError, match="no module named '10'"):
        activation_sqnr(build_model()[:9], quantizer, x)
    with pytest.raises(TypeError, match="Quantizer"):
        activation_sqnr(None, "model", x)


# ---- recorder ----------------------------------------------------------------------------------------------


def test_recorder_copies_ranges_at_counted_steps():
    model, quantizer, optimizer = _trained_digits_quantizer(steps=0)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)  # steps of another model are not counted
    recorder = TrainingRecorder(quantizer, every=2)
    seen = {}
    for _ in range(5):
        _train(model, optimizer, 1)
        other.step()
        seen[quantizer.current_step] = quantizer.get_calibration_config()["3"]["_output_0"]["tracked_max"]
    recorder.close()
    _train(model, optimizer, 2)  # closed: no more records
    assert list(recorder.ranges) == ["0._input_0", "0._output_0", "3._output_0", "8._output_0", "10._output_0"]
    history = recorder.ranges["3._output_0"]
    steps, mins, maxs = history.as_tensors()
    assert steps.tolist() == [2, 4] and mins.shape == maxs.shape == (2,) and mins.device.type == "cpu"
    assert maxs.tolist() == [seen[2].item(), seen[4].item()]  # copies, not views of the live buffers
    assert (mins <= maxs).all()


def test_recorder_without_hook_and_metrics():
    model, quantizer, optimizer = _trained_digits_quantizer(steps=0)
    recorder = TrainingRecorder(hook=False)
    recorder.record_metric("float", 0, 10)
    with pytest.raises(RuntimeError, match="watch"):
        recorder.record_ranges()
    recorder.watch(quantizer)
    recorder.record_ranges()  # nothing seeded yet: nothing recorded
    _train(model, optimizer, 3)
    assert recorder.ranges == {}
    recorder.record_ranges()
    recorder.record_ranges(step=7)
    recorder.record_metric("QAT", quantizer.current_step, 97.5)
    assert recorder.ranges["0._input_0"].steps == [3, 7]
    assert recorder.metrics == {"float": [(0, 10.0)], "QAT": [(3, 97.5)]}
    with pytest.raises(ValueError, match="every"):
        TrainingRecorder(quantizer, every=0)


def test_recorder_envelope_of_per_channel_ranges():
    model = nn.Sequential(nn.Conv2d(1, 3, 3))
    config = {"op_types": ["Conv2d"], "target_names": ["_output_"], "quant_dtype": "uint8", "granularity": "per_channel"}
    quantizer = QATQuantizer(model, [config])
    with TrainingRecorder(quantizer, hook=False) as recorder:
        for step in range(2):
            model(torch.randn(4, 1, 6, 6))
            recorder.record_ranges(step)
    steps, mins, maxs = recorder.ranges["0._output_0"].as_tensors()
    assert steps.tolist() == [0, 1] and mins.shape == (2, 1, 3, 1, 1)
    _, low, high = recorder.ranges["0._output_0"].envelope()
    assert torch.equal(low, mins.flatten(1).amin(1)) and torch.equal(high, maxs.flatten(1).amax(1))
    assert RangeHistory().as_tensors()[0].numel() == 0


# ---- the report --------------------------------------------------------------------------------------------


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _pixels(path):
    image = pytest.importorskip("matplotlib.image")
    return image.imread(str(path))


def test_write_report_writes_the_page_and_its_plots(tmp_path):
    pytest.importorskip("matplotlib")
    backend_modules = {name for name in sys.modules if name.startswith("matplotlib.pyplot")}
    model, quantizer, optimizer = _trained_digits_quantizer(steps=0)
    recorder = TrainingRecorder(quantizer)
    for step in range(6):
        _train(model, optimizer, 1)
        recorder.record_metric("int8 QAT", step + 1, 50.0 + 5 * step)
        recorder.record_metric("float", step + 1, 60.0 + 4 * step)
    recorder.close()
    sqnr = activation_sqnr(None, quantizer, torch.rand(32, 1, 8, 8))
    table = [
        {"model": "float32", "test accuracy": "98.61%", "ORT latency": "1.80 ms", "size": "150.8 KiB"},
        {"model": "int8 in ONNX Runtime", "test accuracy": 97.5, "ORT latency": "1.21 ms", "size": "44.5 KiB"},
    ]
    path = write_report(tmp_path / "out", recorder=recorder, sqnr=sqnr, table=table, title="QAT <run>", notes=["a & b"])

    assert path == tmp_path / "out" / "report.html"
    page = path.read_text(encoding="utf-8")
    assert re.findall(r'<img src="([^"]+)"', page) == ["accuracy.png", "ranges.png", "sqnr.png"]
    for name in ("accuracy.png", "ranges.png", "sqnr.png"):
        width, height = _png_size(tmp_path / "out" / name)
        assert 400 <= width <= 2000 and 150 <= height <= 2000
        assert _pixels(tmp_path / "out" / name)[..., :3].std() > 0.05  # not a blank image
    for value in ("98.61%", "97.50", "1.21 ms", "44.5 KiB", "int8 in ONNX Runtime", f"{sqnr['3']:.2f}"):
        assert f"<td>{value}</td>" in page
    assert "<title>QAT &lt;run&gt;</title>" in page and "<p>a &amp; b</p>" in page
    assert {name for name in sys.modules if name.startswith("matplotlib.pyplot")} == backend_modules  # no pyplot


def test_write_report_with_a_table_only(tmp_path):
    path = write_report(tmp_path, table=[{"model": "int8", "accuracy": 1.0}])
    page = path.read_text(encoding="utf-8")
    assert "<img" not in page and "<td>1.00</td>" in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def test_write_report_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    recorder = TrainingRecorder()
    recorder.record_metric("float", 1, 50.0)
    with pytest.raises(ImportError, match=re.escape("pip install 'quantrain[report]'")):
        write_report(tmp_path, recorder=recorder)


def test_recorder_step_offset_puts_ranges_on_the_metrics_axis():
    model, quantizer, optimizer = _trained_digits_quantizer(steps=0)
    with TrainingRecorder(quantizer, step_offset=100) as recorder:
        _train(model, optimizer, 3)
    assert recorder.ranges["3._output_0"].steps == [101, 102, 103]
    recorder.watch(quantizer, step_offset=7)  # a new offset from here on
    with recorder:
        _train(model, optimizer, 1)
    assert recorder.ranges["3._output_0"].steps == [101, 102, 103, 11]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="step_offset must be a non-negative int"):
            TrainingRecorder(step_offset=bad)


# ---- plots -------------------------------------------------------------------------------------------------

CURVES = {
    "float": [(0, 10.0), (50, 90.0), (100, 98.0)],
    "float control": [(100, 98.0), (110, 98.5), (120, 98.25)],
    "int8 QAT": [(100, 98.0), (110, 98.5), (120, 97.75)],
}


def test_zoomed_limits_golden():
    from quantrain.report.plots import zoomed_limits

    assert zoomed_limits([98.0, 98.5, 97.75], min_span=0.5) == (97.6375, 98.6125)  # span 0.75, 15% margins
    assert zoomed_limits([98.0, 98.5, 97.75], min_span=1.0) == (97.475, 98.775)  # widened to 1.0 around 98.125
    assert zoomed_limits([5.0], min_span=2.0) == (3.7, 6.3)


def test_plot_accuracy_zooms_from_focus_from_and_marks_events(tmp_path):
    pytest.importorskip("matplotlib")
    from quantrain.report.plots import plot_accuracy, zoomed_limits

    events = {"quantization starts": 100, "BatchNorm frozen": 116}
    drawn = plot_accuracy(CURVES, str(tmp_path / "a.png"), events=events, focus_from=100)
    whole, zoom = drawn["panels"]
    assert _png_size(tmp_path / "a.png") == (1200, 480)
    after = [98.0, 98.0, 98.5, 98.25, 98.0, 98.5, 97.75]
    assert tuple(zoom["ylim"]) == zoomed_limits(after, min_span=1.0) == (97.475, 98.775)
    assert zoom["xlim"] == [99.6, 120.4] and whole["ylim"][0] < 10.0 < 98.775 < whole["ylim"][1]
    assert (whole["title"], zoom["title"]) == ("whole run", "from step 100, zoomed")
    for panel in (whole, zoom):
        assert panel["xlabel"] == "optimizer step"
        assert [(e["label"], e["step"], e["labelled"]) for e in panel["events"]] == [
            ("quantization starts", 100.0, True),
            ("BatchNorm frozen", 116.0, True),
        ]
        assert [(line["label"], line["color"], line["linestyle"], line["marker"]) for line in panel["lines"]] == [
            ("float", "#1f77b4", "-", "o"),
            ("float control", "#ff7f0e", "--", "s"),
            ("int8 QAT", "#2ca02c", "-.", "^"),
        ]


def test_plot_accuracy_without_focus_is_one_panel_fitted_to_the_data(tmp_path):
    pytest.importorskip("matplotlib")
    from quantrain.report.plots import plot_accuracy

    (panel,) = plot_accuracy({"QAT": [(1, 97.0), (2, 98.0)]}, str(tmp_path / "a.png"))["panels"]
    assert panel["events"] == [] and panel["title"] == ""
    assert 96.5 < panel["ylim"][0] < 97.0 and 98.0 < panel["ylim"][1] < 98.5  # matplotlib's margins, not 0-100


def test_write_report_keeps_the_plots_data_in_report_json(tmp_path):
    pytest.importorskip("matplotlib")
    model, quantizer, optimizer = _trained_digits_quantizer(steps=0)
    recorder = TrainingRecorder(quantizer, step_offset=100)
    for name, points in CURVES.items():
        for step, value in points:
            recorder.record_metric(name, step, value)
    _train(model, optimizer, 2)
    recorder.close()
    sqnr = {"0 Conv2d": 40.5, "3 Conv2d": math.inf}
    events = {"quantization starts": 100}
    path = write_report(tmp_path, recorder=recorder, sqnr=sqnr, events=events, focus_from=100)
    data = json.loads((tmp_path / "report.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert data["events"] == events and data["focus_from"] == 100 and data["sqnr"] == {"0 Conv2d": 40.5, "3 Conv2d": "inf"}
    assert data["metrics"]["int8 QAT"] == [[100, 98.0], [110, 98.5], [120, 97.75]]
    assert data["ranges"]["3._output_0"]["steps"] == [101, 102]
    assert data["ranges"]["3._output_0"]["max"] == recorder.ranges["3._output_0"].envelope()[2].tolist()
    assert list(data["plots"]) == ["accuracy.png", "ranges.png", "sqnr.png"]
    assert [len(data["plots"][name]["panels"]) for name in data["plots"]] == [2, 5, 1]
    page = path.read_text(encoding="utf-8")
    assert "zoomed to 97.47-98.78" in page and "Dotted vertical lines: quantization starts at step 100." in page
