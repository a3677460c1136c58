"""``quantrain inspect``: ONNX QDQ exports and calibration configs, checked against what training produced."""

from __future__ import annotations

import json
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

from quantrain import QATQuantizer, load_calibration_config, save_calibration_config
from quantrain.cli import main
from quantrain.summary import (
    CalibrationSummary,
    OnnxSummary,
    format_summary,
    module_name,
    summarize_calibration_config,
    summarize_file,
    summarize_onnx,
    summary_to_dict,
)

pytest.importorskip("onnx")

ACTIVATIONS = {"quant_dtype": "uint8", "quant_scheme": "affine"}
CONFIG_LIST = [
    {"op_names": ["features.0"], "target_names": ["_input_"], **ACTIVATIONS},
    {  # int8 per-channel conv, BatchNorm folded into it
        "op_names": ["features.0"],
        "target_names": ["weight", "_output_"],
        **ACTIVATIONS,
        "target_settings": {"weight": {"quant_dtype": "int8", "quant_scheme": "symmetric", "granularity": "out_channel"}},
    },
    {  # int4 per-tensor fully connected layer (stored in int8 containers); "head" stays float
        "op_names": ["fc"],
        "target_names": ["weight", "_output_"],
        **ACTIVATIONS,
        "target_settings": {"weight": {"quant_dtype": "int4", "quant_scheme": "symmetric"}},
    },
]


def build_model() -> nn.Module:
    features = nn.Sequential(nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2))
    layers = {"features": features, "flatten": nn.Flatten(), "fc": nn.Linear(6 * 3 * 3, 12), "relu": nn.ReLU()}
    return nn.Sequential(OrderedDict(**layers, head=nn.Linear(12, 4)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A trained, quantized model; its ONNX export and its calibration config (in memory and as JSON)."""
    from quantrain import export_onnx

    torch.manual_seed(0)
    model = build_model()
    quantizer = QATQuantizer(model, CONFIG_LIST, fuse="auto", integer_bias=True, example_inputs=torch.zeros(1, 1, 8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(4):
        loss = model(torch.randn(16, 1, 8, 8)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    folder = tmp_path_factory.mktemp("inspect")
    path = folder / "model.onnx"
    export_onnx(model, torch.randn(1, 1, 8, 8), path, weight_dtype="int8")  # as stored on any machine
    export_onnx(model, torch.randn(1, 1, 8, 8), folder / "unsigned.onnx", weight_dtype="uint8")
    calibration = quantizer.get_calibration_config()
    save_calibration_config(calibration, folder / "calibration.json")
    return model, calibration, path, folder / "calibration.json"


def test_weights_stored_as_uint8_show_as_such_with_the_same_scales(exported):
    path = exported[2]
    signed, unsigned = summarize_file(path), summarize_file(path.with_name("unsigned.onnx"))
    conv, conv_u8 = _layer(signed, "features.0"), _layer(unsigned, "features.0")
    assert (conv_u8.dtype, conv_u8.bits, conv_u8.scheme) == ("uint8", 8, "symmetric")
    assert conv_u8.zero_point_min == conv_u8.zero_point_max == 128
    assert (conv_u8.scale_min, conv_u8.scale_max, conv_u8.channels) == (conv.scale_min, conv.scale_max, conv.channels)


def _layer(summary: OnnxSummary, module: str):
    return next(layer for layer in summary.layers if layer.module == module)


def test_onnx_layers_match_the_calibration_config(exported):
    _, calibration, path, _ = exported
    summary = summarize_file(path)
    assert isinstance(summary, OnnxSummary) and summary.opset == 18
    assert [(layer.module, layer.op_type) for layer in summary.layers] == [
        ("features.0", "Conv"),
        ("fc", "Gemm"),
        ("head", "Gemm"),
    ]

    conv, fc, head = (_layer(summary, name) for name in ("features.0", "fc", "head"))
    scale = calibration["features.0"]["weight"]["scale"]
    assert (conv.dtype, conv.bits, conv.scheme, conv.granularity, conv.axis, conv.channels) == (
        "int8",
        8,
        "symmetric",
        "per-channel",
        0,
        6,
    )
    assert conv.weight_shape == (6, 1, 3, 3) and conv.zero_point_min == conv.zero_point_max == 0
    assert conv.scale_min == float(scale.min()) and conv.scale_max == float(scale.max())  # exact: both float32
    assert (conv.input_dtype, conv.output_dtype) == ("uint8", "uint8")

    fc_scale = float(calibration["fc"]["weight"]["scale"])
    assert (fc.dtype, fc.bits, fc.granularity, fc.axis, fc.channels) == ("int8", 4, "per-tensor", None, 1)
    assert fc.scale_min == fc.scale_max == fc_scale and fc.weight_shape == (12, 54)
    assert (fc.input_dtype, fc.output_dtype) == ("uint8", "uint8")  # the ReLU after fc is fused into its output

    assert not head.quantized and head.dtype == "float32" and head.weight_shape == (4, 12)
    assert head.scale_min is None and head.input_dtype == "uint8" and head.output_dtype is None


def test_onnx_totals_count_integer_and_float_constants(exported):
    model, _, path, _ = exported
    summary = summarize_onnx(str(path))
    integer = model.features[0].weight.numel() + model.fc.weight.numel()
    # float constants: the folded conv bias (one per channel), fc's bias, and the float head's weight and bias
    floats = 6 + model.fc.bias.numel() + model.head.weight.numel() + model.head.bias.numel()
    assert (summary.integer_weight_elements, summary.float_elements) == (integer, floats)
    assert summary.integer_share == pytest.approx(integer / (integer + floats))
    assert summary.integer_weight_bytes == integer and summary.float_bytes == 4 * floats
    assert summary.file_bytes == path.stat().st_size


def test_onnx_activation_points_carry_the_trained_scales(exported):
    _, calibration, path, _ = exported
    points = {point.label: point for point in summarize_onnx(path).activations}
    for label in ("features.0._input_0", "features.0._output_0", "fc._output_0"):
        module, _, target = label.rpartition(".")
        entry = calibration[module][target]
        point = points[label]
        assert point.named and point.dtype == "uint8" and point.granularity == "per-tensor"
        assert point.scale_min == point.scale_max == float(entry["scale"])
        assert point.zero_point_min == point.zero_point_max == int(entry["zero_point"])
    inserted = [point for point in points.values() if not point.named]
    assert {point.label.rsplit("/", 1)[-1] for point in inserted} >= {"MaxPool_q", "Reshape_q"}  # nn.Flatten exports as Reshape


def test_cli_inspect_onnx_prints_a_table_and_json(exported, capsys):
    _, calibration, path, _ = exported
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    summary = summarize_onnx(path)
    assert text.strip() == format_summary(summary)
    conv_row = next(line for line in text.splitlines() if line.startswith("features.0 "))
    cells = [cell.strip() for cell in conv_row.split("|")]
    assert cells[:7] == ["features.0", "Conv", "6x1x3x3", "int8", "8", "symmetric", "per-channel (axis 0, 6)"]
    assert cells[7] == f"{float(calibration['features.0']['weight']['scale'].min()):.4g}"
    assert f"({100 * summary.integer_share:.2f}%)" in text

    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "onnx" and data == summary_to_dict(summary)
    assert data["layers"][1]["bits"] == 4 and data["layers"][2]["quantized"] is False


def test_inspect_calibration_json_saved_by_quantrain(exported, capsys):
    _, calibration, _, json_path = exported
    assert main(["inspect", str(json_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kind"] == "calibration_config" and data["modules"] == ["features.0", "fc"]
    targets = {(t["module"], t["target"]): t for t in data["targets"]}
    weight = targets["features.0", "weight"]
    entry = calibration["features.0"]["weight"]
    assert (weight["granularity"], weight["axis"], weight["channels"], weight["shape"]) == ("per-channel", 0, 6, [6, 1, 1, 1])
    assert (weight["dtype"], weight["bits"], weight["scheme"], weight["kind"]) == ("int8", 8, "symmetric", "parameter")
    assert weight["scale_min"] == float(entry["scale"].min()) and weight["scale_max"] == float(entry["scale"].max())
    assert weight["tracked_min"] == float(entry["tracked_min"].min()) and weight["tracked_max"] == float(
        entry["tracked_max"].max()
    )
    fc = targets["fc", "weight"]
    assert (fc["dtype"], fc["bits"], fc["granularity"], fc["shape"]) == ("int4", 4, "per-tensor", [])
    output = targets["fc", "_output_0"]
    assert output["kind"] == "activation" and output["zero_point_min"] == float(calibration["fc"]["_output_0"]["zero_point"])

    assert main(["inspect", str(json_path)]) == 0
    text = capsys.readouterr().out
    assert "2 modules, 5 targets (2 parameters, 3 activations)" in text
    row = next(line for line in text.splitlines() if line.startswith("features.0 | weight"))
    assert "per-channel (axis 0, 6)" in row and "int8" in row and "symmetric" in row


NNI_STYLE = {
    "conv1": {
        "weight": {
            "scale": [[[[0.01]]], [[[0.04]]]],
            "zero_point": [[[[0]]], [[[0]]]],
            "quant_dtype": "int8",
            "quant_scheme": "symmetric",
            "quant_bits": 8,
            "tracked_min": [[[[-1.2]]], [[[-5.0]]]],
            "tracked_max": [[[[1.27]]], [[[3.0]]]],
        },
        "_input_0": {
            "scale": 0.5,
            "zero_point": 3,
            "quant_dtype": "uint8",
            "quant_scheme": "affine",
            "quant_bits": 8,
            "tracked_min": -1.5,
            "tracked_max": 126.0,
        },
    },
    "fc": {"weight": {"scale": [[0.1, 0.2], [0.3, 0.4]], "zero_point": [[0, 0], [0, 0]], "quant_bits": 4}},
}


@pytest.mark.parametrize("name", ["nni.json", "calibration"])  # without a suffix, the content decides
def test_inspect_hand_written_nni_style_json(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_text(json.dumps(NNI_STYLE))
    summary = summarize_file(path)
    assert isinstance(summary, CalibrationSummary) and summary.modules == ("conv1", "fc")
    weight, activation, block = summary.targets
    assert (weight.granularity, weight.axis, weight.channels, weight.shape) == ("per-channel", 0, 2, (2, 1, 1, 1))
    assert (weight.scale_min, weight.scale_max) == (pytest.approx(0.01), pytest.approx(0.04))
    assert (weight.tracked_min, weight.tracked_max) == (pytest.approx(-5.0), pytest.approx(3.0))
    assert (activation.granularity, activation.dtype, activation.scheme, activation.kind) == (
        "per-tensor",
        "uint8",
        "affine",
        "activation",
    )
    assert activation.zero_point_min == 3 and activation.scale_min == 0.5 and activation.tracked_max == 126.0
    assert (block.granularity, block.shape, block.dtype, block.bits, block.tracked_min) == ("per-block", (2, 2), None, 4, None)

    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "per-block 2x2" in text and "4 bits" in text and "-5 .. 3" in text
    assert summarize_calibration_config(load_calibration_config(path)).targets == summary.targets


def test_module_names_from_the_exporters_scopes():
    assert module_name("/features/features.0/Conv") == "features.0"
    assert module_name("/layer1/layer1.0/conv1/Conv") == "layer1.0.conv1"
    assert module_name("/0/0.1/Conv") == "0.1"
    assert module_name("/blocks/blocks.2/blocks.2.3/fc/MatMul") == "blocks.2.3.fc"
    assert module_name("/0/0.0/subs.0/subs.0.0/Gemm") == "0.0.subs.0.0"  # subs: a ModuleList, never called
    assert module_name("Conv_0") is None and module_name("/Gemm") is None


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("broken.onnx", b"\x00\x01 not a protobuf \xff" * 20, "not an ONNX model"),
        ("empty.onnx", b"", "not an ONNX model"),
        ("notes.json", b"{not json", "not valid JSON"),
        ("spec.json", b'{"config_list": []}', "config_list"),
    ],
)
def test_inspect_bad_files_exit_4(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["inspect", str(path)]) == 4
    err = capsys.readouterr().err
    assert err.startswith("quantrain: error: ") and message in err and "Traceback" not in err


def test_inspect_missing_file_exit_4(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing.onnx")]) == 4
    assert capsys.readouterr().err == f"quantrain: error: {tmp_path / 'nothing.onnx'}: no such file\n"


def test_inspect_onnx_without_the_onnx_package_exit_3(exported, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    assert main(["inspect", str(exported[2])]) == 3
    err = capsys.readouterr().err
    assert err.startswith("quantrain: error: ") and "pip install 'quantrain[onnx]'" in err
    assert main(["inspect", str(exported[3])]) == 0  # a calibration JSON needs no onnx


def test_interrupt_exit_130(exported, capsys, monkeypatch):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr("quantrain.summary.summarize_file", interrupted)
    assert main(["inspect", str(exported[2]), "--quiet"]) == 130
    assert capsys.readouterr().err == "quantrain: interrupted\n"


def test_inspect_a_folder_lists_the_files_it_reads_exit_4(exported, tmp_path, capsys):
    _, _, onnx_path, json_path = exported
    folder = tmp_path / "run"
    folder.mkdir()
    for source, name in ((onnx_path, "b_int8.onnx"), (json_path, "a_calibration.json")):
        (folder / name).write_bytes(source.read_bytes())
    (folder / "quant.json").write_text('{"config_list": []}')  # a quantizer spec: not something inspect reads
    (folder / "notes.txt").write_text("hello")
    assert main(["inspect", str(folder)]) == 4
    assert capsys.readouterr().err == (
        f"quantrain: error: {folder}: is a folder, not a file; inspect reads one file, e.g. one of these in it: "
        f"{folder / 'a_calibration.json'}, {folder / 'b_int8.onnx'}\n"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["inspect", str(empty)]) == 4
    err = capsys.readouterr().err
    assert err == (
        f"quantrain: error: {empty}: is a folder, not a file, and holds no .onnx model or calibration config .json "
        "that inspect reads\n"
    )


def test_inspect_a_demo_results_json_shows_its_calibration_config(exported, tmp_path, capsys):
    _, _, _, json_path = exported
    results = {"format": "quantrain.demo_results", "version": 1, "qat_accuracy": 97.5}
    path = tmp_path / "results.json"
    path.write_text(json.dumps({**results, "calibration_config": json.loads(json_path.read_text())}))
    assert main(["inspect", str(path)]) == 0
    shown = capsys.readouterr().out
    assert main(["inspect", str(json_path)]) == 0
    direct = capsys.readouterr().out
    assert shown.splitlines()[0].startswith(f"{path}: calibration config, ")
    assert shown.splitlines()[1:] == direct.splitlines()[1:]  # the same tables

    broken = {"modules": {"conv": {"weight": {"scale": [0.1, -0.2], "zero_point": [0, 0]}}}}
    path.write_text(
        json.dumps({**results, "calibration_config": {"format": "quantrain.calibration_config", "version": 1, **broken}})
    )
    assert main(["inspect", str(path)]) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"quantrain: error: {path} ['calibration_config']: ['conv']['weight']: scale must be positive")
    path.write_text(json.dumps(results))
    assert main(["inspect", str(path)]) == 4
    assert f"{path}: a quantrain demo results file without its 'calibration_config'" in capsys.readouterr().err
