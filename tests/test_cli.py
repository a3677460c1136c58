"""The command line and the demo."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

from quantrain import load_calibration_config
from quantrain.cli import main
from quantrain.demo import build_model, demo_config_list, format_table, load_digits, run_demo


def test_demo_trains_float_and_int8_to_high_accuracy():
    result = run_demo(epochs=4, qat_epochs=1, progress=False)
    assert result.test_size == 360 and result.artifacts is None and result.report_path is None
    assert result.float_accuracy > 90.0
    assert result.qat_accuracy > 90.0
    assert result.control_accuracy > 90.0
    assert abs(result.qat_accuracy - result.control_accuracy) < 3.0
    layers = {name for name, module in build_model().named_modules() if type(module).__name__ in ("Conv2d", "Linear")}
    assert set(result.calibration_config) == layers
    deployed = result.deployment
    assert abs(deployed.int8_accuracy - result.qat_accuracy) <= 0.3 and deployed.top1_agreement >= 99.7
    assert deployed.int8_bytes < 0.35 * deployed.float_bytes and deployed.int8_latency_ms > 0
    rows = _table(format_table(result))
    assert rows[0] == ["model", "epochs", "test accuracy", "train time", "ORT latency", "size"]
    assert rows[1][:4] == ["float32", "4", f"{result.float_accuracy:.2f}%", f"{result.float_seconds:.1f} s"]
    assert rows[2][:4] == [
        "float32 + 1 epochs (control)",
        "4 + 1",
        f"{result.control_accuracy:.2f}%",
        f"{result.control_seconds:.1f} s",
    ]
    assert rows[3][:4] == ["int8 QAT (fake-quant)", "4 + 1 QAT", f"{result.qat_accuracy:.2f}%", f"{result.qat_seconds:.1f} s"]
    assert rows[4][:5] == [
        "int8 in ONNX Runtime",
        "4 + 1 QAT",
        f"{deployed.int8_accuracy:.2f}%",
        "",
        f"{deployed.int8_latency_ms:.2f} ms",
    ]
    assert result.warmup_seconds > 0 and f"untimed {result.warmup_seconds:.1f} s warm-up" in format_table(result)


def _table(text: str) -> list[list[str]]:
    """The cells of the printed table's rows (the rule under the header and the notes left out)."""
    lines = [line for line in text.splitlines() if " | " in line]
    return [[cell.strip() for cell in line.split("|")] for line in lines]


def test_digits_split_is_deterministic_and_disjoint():
    x_train, y_train, x_test, _ = load_digits(seed=0)
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert float(x_train.min()) >= 0.0 and float(x_train.max()) <= 1.0
    again = load_digits(seed=0)
    assert (again[1] == y_train).all()


def test_demo_config_is_int_weights_and_uint_activations_each_quantized_once():
    first, layers = demo_config_list(4)
    assert first == {"op_names": ["0"], "target_names": ["_input_"], "quant_dtype": "uint4", "quant_scheme": "affine"}
    assert layers["target_names"] == ["weight", "_output_"] and layers["quant_dtype"] == "uint4"
    assert layers["target_settings"]["weight"]["quant_dtype"] == "int4"


@pytest.fixture(scope="module")
def cli_demo(tmp_path_factory):
    """``quantrain demo`` run as a user runs it: in a folder of its own, default --out, --json next to it."""
    folder = tmp_path_factory.mktemp("cli_demo")
    out, err = io.StringIO(), io.StringIO()
    with _cwd(folder), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["demo", "--epochs", "1", "--qat-epochs", "1", "--quiet", "--json", "results.json"])
    return {"folder": folder, "code": code, "out": out.getvalue(), "err": err.getvalue()}


@contextlib.contextmanager
def _cwd(folder):
    saved = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(saved)


def _printed_files(text: str) -> dict[str, str]:
    """``{what: path}`` from the printed list of files (between ``files in ...:`` and ``try:``)."""
    lines = text.splitlines()
    start, end = next(i for i, line in enumerate(lines) if line.startswith("files in ")), lines.index("try:")
    return dict(re.match(r"  (.+?)  +(\S+)$", line).groups() for line in lines[start + 1 : end])


def _printed_commands(text: str) -> list[list[str]]:
    lines = text.splitlines()
    return [shlex.split(line) for line in lines[lines.index("try:") + 1 :]]


def test_cli_demo_prints_where_each_file_went(cli_demo):
    assert cli_demo["code"] == 0 and cli_demo["err"] == ""  # --quiet: no progress bars, no messages
    folder = cli_demo["folder"]
    assert f"files in quantrain-demo/ ({folder / 'quantrain-demo'}):" in cli_demo["out"]
    files = _printed_files(cli_demo["out"])
    assert files == {
        "int8 model, QDQ ONNX": "quantrain-demo/digits_int8.onnx",
        "float control, fp32 ONNX": "quantrain-demo/digits_fp32.onnx",
        "calibration config": "quantrain-demo/calibration.json",
        "checkpoint (state_dict after QAT)": "quantrain-demo/checkpoint.pt",
        "quantizer spec": "quantrain-demo/quant.json",
        "test inputs (360 images)": "quantrain-demo/test_inputs.npy",
        "report": "quantrain-demo/report.html",
        "results and calibration config": "results.json",
    }
    assert all((folder / path).is_file() and (folder / path).stat().st_size > 0 for path in files.values())
    assert np.load(folder / "quantrain-demo/test_inputs.npy").shape == (360, 1, 8, 8)


def test_the_commands_the_demo_prints_pass(cli_demo, monkeypatch, capsys):
    monkeypatch.chdir(cli_demo["folder"])
    commands = _printed_commands(cli_demo["out"])
    assert [command[:3] for command in commands] == [
        ["quantrain", "inspect", "quantrain-demo/digits_int8.onnx"],
        ["quantrain", "inspect", "quantrain-demo/calibration.json"],
        ["quantrain", "parity", "quantrain-demo/digits_int8.onnx"],
    ]
    assert commands[2][3:5] == ["--model", "quantrain.demo:build_digits_model"] and "--min-agreement" in commands[2]
    for command in commands:
        assert main(command[1:]) == 0, command
    printed = capsys.readouterr().out
    assert "4 of 4 Conv/Gemm/MatMul layers with integer weights" in printed  # inspect of the int8 ONNX model
    assert "4 modules, 9 targets (4 parameters, 5 activations)" in printed  # inspect of the calibration config
    agreement = re.search(r"output_0 +\| ([0-9.]+)%", printed)  # parity: the int8 model in ONNX Runtime
    assert agreement is not None and float(agreement.group(1)) >= 99.0


def test_cli_demo_json_holds_the_results_and_the_calibration_config(cli_demo, monkeypatch, capsys):
    folder = cli_demo["folder"]
    summary = json.loads((folder / "results.json").read_text())
    rows = _table(cli_demo["out"])
    assert (summary["format"], summary["dataset"], summary["epochs"], summary["qat_epochs"]) == (
        "quantrain.demo_results",
        "digits",
        1,
        1,
    )
    assert rows[3][2] == f"{summary['qat_accuracy']:.2f}%" and rows[1][3] == f"{summary['float_seconds']:.1f} s"
    assert (
        summary["warmup_seconds"] > 0
        and summary["onnx_runtime"]["int8_bytes"] == (folder / "quantrain-demo/digits_int8.onnx").stat().st_size
    )
    assert summary["commands"] == [shlex.join(command) for command in _printed_commands(cli_demo["out"])]
    calibration = load_calibration_config(folder / "quantrain-demo/calibration.json")
    embedded = summary["calibration_config"]["modules"]
    assert set(embedded) == set(calibration) == {"0", "3", "8", "10"}
    assert torch.equal(torch.tensor(embedded["0"]["weight"]["scale"]), calibration["0"]["weight"]["scale"])
    assert calibration["0"]["weight"]["scale"].shape == (16, 1, 1, 1)

    monkeypatch.chdir(folder)
    assert main(["inspect", "results.json", "--json"]) == 0
    from_results = json.loads(capsys.readouterr().out)
    assert main(["inspect", "quantrain-demo/calibration.json", "--json"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert from_results["path"] == "results.json" and from_results["kind"] == "calibration_config"
    assert {**from_results, "path": None, "file_bytes": None} == {**from_file, "path": None, "file_bytes": None}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "a_file"], "--out a_file: is a file, not a folder"),
        (["--out", "a_file/sub"], "--out a_file/sub: {cwd}/a_file is a file, not a folder"),
        (["--out", "/proc"], "--out /proc: cannot write files there"),
        (["--json", "missing/results.json"], "--json missing/results.json: its folder missing does not exist"),
        (["--json", "a_folder"], "--json a_folder: is a folder; give a file path, e.g. --json a_folder/results.json"),
        (["--json", "a_file/results.json"], "--json a_file/results.json: its folder a_file is a file, not a folder"),
    ],
)
def test_demo_checks_its_paths_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    import quantrain.demo

    if argv[1] == "/proc" and not os.path.isdir("/proc"):
        pytest.skip("no /proc here: it is the folder this case cannot write to")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_folder").mkdir()
    monkeypatch.setattr(quantrain.demo, "run_demo", lambda **kwargs: pytest.fail("run_demo ran despite a bad path"))
    assert main(["demo", "--quiet", *argv]) == 4
    err = capsys.readouterr().err
    assert err.startswith(f"quantrain: error: {message.format(cwd=tmp_path)}")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "a_folder"]  # nothing made, not even the default --out


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--bits", "9"],
        ["demo", "--epochs", "0"],
        ["demo", "--dataset", "cifar10"],
        ["demo", "--seed", "-1"],
        ["demo", "--seed", str(2**32)],
        ["demo", "--threads", "0"],
        ["inspect"],
        ["inspect", "a.onnx", "--tables"],
        ["parity", "model.onnx"],
        ["nonsense"],
        [],
    ],
)
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "quantrain" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["demo"], ["inspect"], ["parity"]])
def test_help_for_every_command_lists_examples_and_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "exit codes:" in text
    assert all(f"  {code} " in text for code in ("0", "1", "2", "3", "4", "130"))
    assert command == [] or "--quiet" in text


def test_top_level_help_names_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert all(command in text for command in ("demo", "inspect", "parity"))


def test_version(capsys):
    from quantrain import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"quantrain {__version__}\n"


def test_demo_flags_reach_run_demo(monkeypatch, capsys, tmp_path):
    import quantrain.demo

    seen = {}

    def fake_run_demo(**kwargs):
        seen.update(kwargs)
        raise KeyboardInterrupt  # stop before training; also checks the exit code for Ctrl-C

    monkeypatch.setattr(quantrain.demo, "run_demo", fake_run_demo)
    monkeypatch.setattr(quantrain.demo.data, "check_dataset", lambda name: None)  # with or without the Debian files
    argv = [
        "demo",
        "--dataset",
        "fashion-mnist",
        "--bits",
        "4",
        "--epochs",
        "2",
        "--qat-epochs",
        "3",
        "--out",
        str(tmp_path),
        "-q",
    ]
    assert main(argv) == 130
    assert capsys.readouterr().err == "quantrain: interrupted\n"
    assert seen == {
        "dataset": "fashion-mnist",
        "epochs": 2,
        "qat_epochs": 3,
        "bits": 4,
        "seed": 0,
        "progress": False,
        "out_dir": str(tmp_path),
    }


def test_demo_without_scikit_learn_exits_3(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert main(["demo", "--epochs", "1", "--qat-epochs", "1", "--quiet"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("quantrain: error: ") and "pip install 'quantrain[demo]'" in err and "Traceback" not in err


def test_demo_json_may_go_into_the_folder_it_creates(tmp_path, monkeypatch, capsys):
    import quantrain.demo

    def stop(**kwargs):
        raise KeyboardInterrupt  # the checks passed: run_demo was reached

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(quantrain.demo, "run_demo", stop)
    assert main(["demo", "-q", "--out", "new/run", "--json", "new/run/results.json"]) == 130
    assert (tmp_path / "new" / "run").is_dir() and list((tmp_path / "new" / "run").iterdir()) == []
    assert main(["demo", "-q", "--out", "new/run", "--json", "new/run"]) == 4  # a folder, where a file is expected
    assert "--json new/run: is a folder; give a file path" in capsys.readouterr().err


def test_demo_default_folder_taken_by_a_file_says_how_to_choose_another(tmp_path, monkeypatch, capsys):
    import quantrain.demo

    monkeypatch.chdir(tmp_path)
    (tmp_path / "quantrain-demo").write_text("a file of the user's")
    monkeypatch.setattr(quantrain.demo, "run_demo", lambda **kwargs: pytest.fail("run_demo ran despite a bad path"))
    assert main(["demo"]) == 4
    assert capsys.readouterr().err == (
        "quantrain: error: the default --out quantrain-demo: is a file, not a folder; choose a folder with --out DIR "
        "(created if missing)\n"
    )
    assert (tmp_path / "quantrain-demo").read_text() == "a file of the user's"


def test_demo_with_missing_dataset_files_exits_4_before_any_work(tmp_path, monkeypatch, capsys):
    import quantrain.demo
    import quantrain.demo.data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(quantrain.demo.data, "FASHION_MNIST_DIR", str(tmp_path / "datasets"))
    monkeypatch.setattr(quantrain.demo, "run_demo", lambda **kwargs: pytest.fail("run_demo ran without its dataset"))
    assert main(["demo", "--dataset", "fashion-mnist"]) == 4
    err = capsys.readouterr().err
    missing = tmp_path / "datasets" / "train-images-idx3-ubyte.gz"
    assert err.startswith(f"quantrain: error: --dataset fashion-mnist: Fashion-MNIST not found ({missing}, ")
    assert err.endswith("apt-get install dataset-fashion-mnist (quantrain downloads nothing)\n")
    assert list(tmp_path.iterdir()) == []  # not even the output folder


def test_a_folder_where_a_file_is_expected_exits_4(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    argv = ["parity", str(tmp_path), "--model", "m:f", "--checkpoint", "c.pt", "--config", "q.json", "--data", "x.npy"]
    assert main(argv) == 4
    assert capsys.readouterr().err == f"quantrain: error: MODEL.onnx {tmp_path}: is a folder, not a file\n"


@pytest.mark.slow
def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "quantrain", "demo", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--qat-epochs" in result.stdout


@pytest.mark.slow
def test_module_entry_point_exit_code_and_error_line(tmp_path):
    missing = str(tmp_path / "missing.onnx")
    result = subprocess.run([sys.executable, "-m", "quantrain", "inspect", missing], capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (4, "", f"quantrain: error: {missing}: no such file\n")


@pytest.mark.slow
def test_the_printed_commands_pass_in_a_shell(tmp_path):
    # The console script, as a user types the printed commands; python -m quantrain where it is not installed.
    script = os.path.join(os.path.dirname(sys.executable), "quantrain")
    program = [script] if os.path.isfile(script) else [sys.executable, "-m", "quantrain"]
    demo = subprocess.run(
        [*program, "demo", "--epochs", "1", "--qat-epochs", "1", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert demo.returncode == 0, demo.stderr
    commands = _printed_commands(demo.stdout)
    assert len(commands) == 3
    for command in commands:
        result = subprocess.run([*program, *command[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout.startswith(command[2])  # each names the file it read first


def test_demo_help_states_where_files_go_and_how_long_it_takes(capsys):
    from quantrain.cli.demo import DIGITS_SECONDS, FASHION_MNIST_SECONDS

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the options' help
    assert f"8-bit, digits: about {DIGITS_SECONDS} s on a 2-core machine" in text
    assert f"28x28 images: about {FASHION_MNIST_SECONDS} s on a 2-core machine" in text
    assert "default ./quantrain-demo/, created if missing" in text and "'quantrain inspect PATH'" in text
