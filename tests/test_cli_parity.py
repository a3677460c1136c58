"""``quantrain parity``: rebuild the trained model from a factory, a quantizer spec and a checkpoint; compare with
ONNX Runtime. Also the quantizer spec format and the exit codes."""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap

import numpy as np
import pytest
import torch

from quantrain import QATQuantizer, deployable_config_list
from quantrain.cli import load_quantizer_spec, main, save_quantizer_spec

pytest.importorskip("onnxruntime")

MODELS = textwrap.dedent(
    """
    from torch import nn

    def build():
        return nn.Sequential(nn.Conv2d(1, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(8 * 3 * 3, 10))

    def not_a_model():
        return 42
    """
)
MODULE = "quantrain_cli_parity_models"  # a name no other test imports


def _import(path):
    spec = importlib.util.spec_from_file_location("_parity_models_for_the_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rebuilt(module, config_list, state):
    model = module.build()
    QATQuantizer(model, config_list, fuse="auto", integer_bias=True, freeze_bn_step=6, example_inputs=torch.zeros(1, 1, 8, 8))
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A QAT-trained model's ONNX export, state_dict, quantizer spec, model factory and inputs, as files."""
    from quantrain import export_onnx

    folder = tmp_path_factory.mktemp("parity")
    (folder / f"{MODULE}.py").write_text(MODELS)
    module = _import(folder / f"{MODULE}.py")
    torch.manual_seed(0)
    model = module.build()
    config_list = deployable_config_list(8, 8)
    quantizer = QATQuantizer(
        model, config_list, fuse="auto", integer_bias=True, freeze_bn_step=6, example_inputs=torch.zeros(1, 1, 8, 8)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(8):
        x = torch.randn(32, 1, 8, 8)
        loss = torch.nn.functional.cross_entropy(model(x), (x.mean(dim=(1, 2, 3)) > 0).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    export_onnx(model, torch.randn(1, 1, 8, 8), folder / "model.onnx")
    torch.save(model.state_dict(), folder / "state.pt")
    save_quantizer_spec(folder / "quant.json", config_list, quantizer)
    x = torch.randn(100, 1, 8, 8)
    np.save(folder / "x.npy", x.numpy())
    torch.save(x, folder / "x.pt")
    torch.save({"x": x, "y": torch.zeros(100)}, folder / "dict_x.pt")
    torch.save({"inputs": x.double()}, folder / "dict_inputs.pt")
    np.savez(folder / "x.npz", inputs=x.numpy(), labels=np.zeros(100))
    return {"folder": folder, "module": module, "config_list": config_list, "model": model.eval(), "x": x}


def _argv(files, **changes):
    folder = files["folder"]
    args = {
        "onnx": str(folder / "model.onnx"),
        "--model": f"{folder / MODULE}.py:build",
        "--checkpoint": str(folder / "state.pt"),
        "--config": str(folder / "quant.json"),
        "--data": str(folder / "x.npy"),
    }
    args.update(changes)
    return ["parity", args.pop("onnx"), *[item for pair in args.items() for item in pair]]


def _row(text):
    line = next(line for line in text.splitlines() if line.startswith("output_0"))
    return [cell.strip() for cell in line.split("|")]


def test_parity_round_trip_is_exact(files, capsys):
    from quantrain import check_parity

    assert main([*_argv(files), "--min-agreement", "0.99", "--max-diff-steps", "0", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert _row(captured.out) == ["output_0", "100.00%", "0", "0.00", "inf"]
    assert "100 inputs" in captured.out
    direct = check_parity(files["model"], files["folder"] / "model.onnx", files["x"]).outputs[0]
    assert direct.top1_agreement == 1.0 and direct.max_abs_diff == 0.0


@pytest.fixture
def in_models_folder(files, monkeypatch):
    """Run from the folder holding the models module, as a user would; forget the module afterwards."""
    monkeypatch.chdir(files["folder"])
    yield
    sys.modules.pop(MODULE, None)


@pytest.mark.parametrize("data", ["x.pt", "dict_x.pt", "dict_inputs.pt", "x.npz"])
def test_parity_reads_each_data_format_and_imports_from_the_current_folder(files, capsys, in_models_folder, data):
    assert main(_argv(files, **{"--model": f"{MODULE}:build", "--data": data, "--batch-size": "32"})) == 0
    captured = capsys.readouterr()
    assert _row(captured.out)[1] == "100.00%"
    assert "quantrain: comparing" in captured.err and "100 inputs (4 batches)" in captured.err  # informational


def _perturbed(files, tmp_path, scale):
    """A checkpoint whose fully connected weights differ from the exported ones, and its rebuilt model."""
    state = {k: v.clone() for k, v in files["model"].state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    state["5.weight"] += scale * torch.randn(state["5.weight"].shape, generator=generator)
    path = tmp_path / "perturbed.pt"
    torch.save(state, path)
    return path, _rebuilt(files["module"], files["config_list"], state)


def test_batches_combine_to_the_single_batch_result(files, tmp_path, capsys):
    from quantrain import check_parity

    path, model = _perturbed(files, tmp_path, 0.002)
    direct = check_parity(model, files["folder"] / "model.onnx", files["x"]).outputs[0]
    assert direct.max_abs_diff > 0 and direct.sqnr_db < 60  # the comparison is not trivial
    results = []
    for batch_size in ("1000", "7"):
        assert main([*_argv(files, **{"--checkpoint": str(path), "--batch-size": batch_size}), "--json", "-q"]) == 0
        results.append(json.loads(capsys.readouterr().out)["outputs"][0])
    whole, batched = results
    assert whole["top1_agreement"] == direct.top1_agreement and whole["sqnr_db"] == direct.sqnr_db
    assert batched["top1_agreement"] == pytest.approx(direct.top1_agreement, abs=1e-12)
    assert batched["max_abs_diff"] == direct.max_abs_diff and batched["max_diff_in_steps"] == direct.max_diff_in_steps
    assert batched["sqnr_db"] == pytest.approx(direct.sqnr_db, rel=1e-9)


def test_float64_compares_both_runtimes_with_the_model_in_float64_batch_by_batch(files, tmp_path, capsys):
    from quantrain import check_parity

    path, model = _perturbed(files, tmp_path, 0.002)
    direct = check_parity(model, files["folder"] / "model.onnx", files["x"], float64=True)
    assert main([*_argv(files, **{"--checkpoint": str(path), "--batch-size": "7"}), "--float64", "--json", "-q"]) == 0
    document = json.loads(capsys.readouterr().out)
    for key in ("pytorch_vs_float64", "onnx_vs_float64"):
        (batched,), (expected,) = document[key], getattr(direct, key)
        assert batched["max_abs_diff"] == expected.max_abs_diff > 0, key  # float32 is never exactly float64 here
        assert batched["top1_agreement"] == pytest.approx(expected.top1_agreement, abs=1e-12)
        assert batched["max_diff_in_steps"] == expected.max_diff_in_steps
    assert document["notes"] == list(direct.notes)
    assert main([*_argv(files, **{"--checkpoint": str(path)}), "--float64", "-q"]) == 0
    text = capsys.readouterr().out
    assert "PyTorch's float32 forward vs the model in float64" in text and "ONNX Runtime vs the model in float64" in text
    assert main([*_argv(files), "--json", "-q"]) == 0
    assert "onnx_vs_float64" not in json.loads(capsys.readouterr().out)  # only when asked for


def test_agreement_below_the_threshold_exits_1(files, tmp_path, capsys):
    path, _ = _perturbed(files, tmp_path, 0.05)
    argv = _argv(files, **{"--checkpoint": str(path)})
    assert main([*argv, "--min-agreement", "0.99", "--quiet"]) == 1
    captured = capsys.readouterr()
    agreement = _row(captured.out)[1]
    assert float(agreement.rstrip("%")) < 99.0
    assert f"quantrain: check failed: output_0: top-1 agreement {agreement} is below --min-agreement 99.00%" in captured.err
    assert main([*argv, "--max-diff-steps", "0.5", "--quiet"]) == 1
    assert "more than --max-diff-steps 0.5" in capsys.readouterr().err
    assert main([*argv, "--quiet"]) == 0  # without thresholds it only reports


def _spec(files, tmp_path, content):
    path = tmp_path / "spec.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return {"--config": str(path)}


def _file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


BAD_INPUTS = {
    "missing checkpoint": (lambda f, t: {"--checkpoint": str(t / "nope.pt")}, "--checkpoint", "no such file"),
    "truncated checkpoint": (
        lambda f, t: {"--checkpoint": _file(t, "cut.pt", (f["folder"] / "state.pt").read_bytes()[:300])},
        "--checkpoint",
        "not a state_dict saved with torch.save",
    ),
    "float checkpoint": (
        lambda f, t: {"--checkpoint": _save(t, f["module"].build().state_dict())},
        "does not fit the quantized model: it lacks 'quantrain_step', '0.fake_quant.weight.scale'",
        "it looks like a float checkpoint",
    ),
    "pickled object checkpoint": (
        lambda f, t: {"--checkpoint": _save(t, {"weights": object()})},
        "--checkpoint",
        "holds Python objects besides tensors, which a weights-only load refuses",
    ),
    "damaged onnx": (lambda f, t: {"onnx": _file(t, "bad.onnx", b"\x08\x07garbage" * 50)}, "not a valid ONNX model", ""),
    "missing data": (lambda f, t: {"--data": str(t / "nope.npy")}, "--data", "no such file"),
    "data without x": (lambda f, t: {"--data": _save(t, {"images": torch.zeros(3)})}, "--data", "key 'x' or 'inputs'"),
    "data of the wrong shape": (lambda f, t: {"--data": _save(t, torch.zeros(4, 3))}, "--data: the model's graph", "conv2d"),
    "spec not json": (lambda f, t: _spec(f, t, "{oops"), "not valid JSON", ""),
    "spec unknown key": (lambda f, t: _spec(f, t, {"config_list": [], "quantiser": {}}), "unknown key 'quantiser'", ""),
    "spec unknown option": (
        lambda f, t: _spec(f, t, {"config_list": [], "quantizer": {"fuse_mode": "auto"}}),
        "key 'quantizer.fuse_mode': unknown option",
        "",
    ),
    "spec bad option": (
        lambda f, t: _spec(f, t, {"config_list": [], "quantizer": {"freeze_bn_step": -3}}),
        "key 'quantizer.freeze_bn_step'",
        "non-negative integer",
    ),
    "spec bad config_list": (
        lambda f, t: _spec(f, t, {"config_list": [{"op_types": ["Linear"], "quant_dtyp": "int8"}]}),
        "key 'config_list': config_list[0]: key 'quant_dtyp'",
        "",
    ),
    "spec not fitting the model": (
        lambda f, t: _spec(f, t, {"config_list": [{"op_names": ["encoder"]}]}),
        "does not fit the model",
        "encoder",
    ),
    "model without colon": (lambda f, t: {"--model": "models.build"}, "expected MODULE:FACTORY", ""),
    "model module missing": (lambda f, t: {"--model": "no_such_module_xyz:build"}, "cannot import no_such_module_xyz", ""),
    "model attribute missing": (lambda f, t: {"--model": f"{f['folder'] / MODULE}.py:nope"}, "has no attribute 'nope'", ""),
    "model not a module": (lambda f, t: {"--model": f"{f['folder'] / MODULE}.py:not_a_model"}, "not a torch.nn.Module", ""),
}


def _save(tmp_path, value):
    path = tmp_path / f"saved_{len(list(tmp_path.iterdir()))}.pt"
    torch.save(value, path)
    return str(path)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_files_exit_4_with_a_clear_message(files, tmp_path, capsys, case):
    change, *fragments = BAD_INPUTS[case]
    assert main([*_argv(files, **change(files, tmp_path)), "--quiet"]) == 4  # --quiet keeps errors
    err = capsys.readouterr().err
    assert err.startswith("quantrain: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert all(fragment in err for fragment in fragments), err


def test_missing_onnxruntime_exits_3(files, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(_argv(files)) == 3
    assert capsys.readouterr().err == "quantrain: error: quantrain parity needs onnxruntime: pip install 'quantrain[onnx]'\n"


@pytest.mark.parametrize(
    "extra",
    [["--min-agreement", "1.5"], ["--min-agreement", "ninety"], ["--batch-size", "0"], ["--max-diff-steps", "-1"]],
)
def test_bad_option_values_exit_2(files, capsys, extra):
    with pytest.raises(SystemExit) as info:
        main([*_argv(files), *extra])
    assert info.value.code == 2 and "quantrain parity: error:" in capsys.readouterr().err


def test_missing_required_option_exits_2(files, capsys):
    with pytest.raises(SystemExit) as info:
        main(["parity", str(files["folder"] / "model.onnx"), "--data", "x.npy"])
    assert info.value.code == 2 and "--model" in capsys.readouterr().err


def test_quantizer_spec_round_trip(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    config_list = [{"op_types": ["Linear"], "target_names": ["_input_", "weight"]}]
    quantizer = QATQuantizer(model, config_list, quant_start_step=3, freeze_range_step=9, weight_range="minmax")
    save_quantizer_spec(tmp_path / "spec.json", config_list, quantizer, integer_bias=True)
    loaded_config, options = load_quantizer_spec(tmp_path / "spec.json")
    assert loaded_config == config_list
    assert options == {
        "fuse": None,
        "integer_bias": True,  # the explicit option wins over the quantizer's
        "quant_start_step": 3,
        "activation_start_step": None,
        "freeze_bn_step": None,
        "freeze_range_step": 9,
        "weight_range": "minmax",
    }
    rebuilt = torch.nn.Sequential(torch.nn.Linear(4, 4))
    again = QATQuantizer(rebuilt, loaded_config, **options)
    assert again.schedule == quantizer.schedule and again.integer_bias


def test_quantizer_spec_rejects_what_it_cannot_load(tmp_path):
    with pytest.raises(ValueError, match=r"key 'quantizer.weight_range': must be 'ema' or 'minmax'"):
        save_quantizer_spec(tmp_path / "a.json", [{"op_types": ["Linear"]}], weight_range="max")
    with pytest.raises(TypeError, match="cannot be written as JSON"):
        save_quantizer_spec(tmp_path / "b.json", [{"op_types": [torch.nn.Linear]}])
    (tmp_path / "c.json").write_text(json.dumps({"format": "quantrain.quantizer_spec", "version": 2, "config_list": []}))
    with pytest.raises(ValueError, match="unsupported version 2"):
        load_quantizer_spec(tmp_path / "c.json")
    (tmp_path / "d.json").write_text(json.dumps({"quantizer": {}}))
    with pytest.raises(ValueError, match="key 'config_list' is missing"):
        load_quantizer_spec(tmp_path / "d.json")
