"""Interrupted training: a QAT run killed with SIGKILL and resumed from its last checkpoint ends exactly where an
uninterrupted run ends; checkpoints and calibration files load without unpickling objects, and damaged ones fail
with a ValueError naming the file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from quantrain import QATQuantizer, load_calibration_config, save_calibration_config
from quantrain.checkpoint import FORMAT, VERSION, atomic_write, load_checkpoint, save_checkpoint, state_digest

SCRIPT = Path(__file__).with_name("resume_script.py")
STEPS, EVERY = 36, 5
STARTUP_TIMEOUT = 120.0  # seconds for a run to import torch and write its first checkpoint (slow, shared machines)


def _start(directory: Path, *options: str) -> subprocess.Popen:
    command = [sys.executable, str(SCRIPT), str(directory), "--steps", str(STEPS), "--every", str(EVERY), *options]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=STARTUP_TIMEOUT)
    assert process.returncode == 0, stderr
    return stdout


def _kill_mid_run(directory: Path, process: subprocess.Popen) -> None:
    """SIGKILL the run once it has written a checkpoint and gone on training (a few steps later)."""
    checkpoint = directory / "checkpoint.pt"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not checkpoint.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the run wrote no checkpoint"
        time.sleep(0.01)
    time.sleep(0.15)  # a few steps more: killed between checkpoints, or while writing one
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL


def _final_state(directory: Path) -> tuple[dict, dict]:
    final = load_checkpoint(directory / "final.pt")
    assert final["step"] == STEPS
    return final["model"], load_calibration_config(directory / "calibration.json")


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_a_killed_run_resumes_to_the_same_calibration_config_and_weights(tmp_path):
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    whole.mkdir()
    interrupted.mkdir()
    reference = _start(whole)
    killed = _start(interrupted, "--delay", "0.03")
    _kill_mid_run(interrupted, killed)
    _finish(reference)
    assert not (interrupted / "calibration.json").exists()  # it really was stopped mid-run
    saved_step = load_checkpoint(interrupted / "checkpoint.pt")["step"]
    assert 0 < saved_step < STEPS and saved_step % EVERY == 0

    output = _finish(_start(interrupted, "--resume"))
    assert f"starting at step {saved_step}" in output

    (weights_a, config_a), (weights_b, config_b) = _final_state(whole), _final_state(interrupted)
    assert weights_a.keys() == weights_b.keys()
    assert "quantrain_step" in weights_a and int(weights_b["quantrain_step"]) == STEPS
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key  # bit for bit
    assert (whole / "calibration.json").read_bytes() == (interrupted / "calibration.json").read_bytes()
    assert config_a.keys() == config_b.keys() == {"0", "3", "8"}  # every layer calibrated


# ---- checkpoints -------------------------------------------------------------------------------------------------


def _trained_state() -> dict:
    model = nn.Sequential(nn.Linear(4, 3))
    optimizer = torch.optim.Adam(model.parameters())
    QATQuantizer(model, [{"op_types": ["Linear"]}])
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(), "step": 2}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_a_checkpoint_round_trips_exactly_and_is_a_plain_weights_only_file(tmp_path):
    state = _trained_state()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(state, path)
    assert _same(load_checkpoint(path), state)
    raw = torch.load(path, weights_only=True)  # any PyTorch reads it, without quantrain
    assert raw["format"] == FORMAT and raw["version"] == VERSION and raw["sha256"] == state_digest(state)
    assert [name for name in os.listdir(tmp_path)] == ["ckpt.pt"]  # no temporary file left


@pytest.mark.parametrize("keep", [0, 1, 64, 0.25, 0.5, 0.9, -22, -1])
def test_a_truncated_checkpoint_is_a_value_error_naming_the_file(tmp_path, keep):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(_trained_state(), path)
    data = path.read_bytes()
    size = int(len(data) * keep) if isinstance(keep, float) else keep % len(data) if keep < 0 else keep
    path.write_bytes(data[:size])
    with pytest.raises(ValueError, match=r"not a readable checkpoint \(truncated or corrupted\?\)|checksum mismatch") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


class _Payload:
    """An arbitrary object: unpickling it would call ``Path.touch`` on the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_checkpoint_holding_a_pickled_object_is_refused_without_running_it(tmp_path, wrapped):
    marker, path = tmp_path / "marker", tmp_path / "ckpt.pt"
    state = {"model": {"w": torch.ones(2)}, "extra": _Payload(marker)}
    if wrapped:  # in quantrain's own format, as if the file had been tampered with
        state = {"format": FORMAT, "version": VERSION, "sha256": "0" * 64, "state": state}
    torch.save(state, path)
    with pytest.raises(ValueError, match="refused: the file holds pickled objects") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()  # nothing ran (pickle.load or torch.load(weights_only=False) would have run it)


def test_a_checkpoint_whose_tensor_bytes_changed_fails_its_checksum(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"w": torch.arange(1000, dtype=torch.float32)}, path)
    data = bytearray(path.read_bytes())
    at = bytes(data).find(torch.arange(1000, dtype=torch.float32)[500:502].numpy().tobytes())
    data[at] ^= 0x01  # one bit of one weight: torch.load alone does not notice
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["state"]["w"], torch.arange(1000, dtype=torch.float32))
    with pytest.raises(ValueError, match="checksum mismatch") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content, match",
    [
        ({"model": {"w": torch.ones(1)}}, "not a quantrain checkpoint"),  # a plain torch.save file
        ({"format": FORMAT, "version": 99, "state": {}, "sha256": ""}, "unsupported checkpoint version 99"),
        ({"format": FORMAT, "version": VERSION, "state": [], "sha256": ""}, "damaged checkpoint"),
        ([1, 2], "not a quantrain checkpoint"),
    ],
)
def test_files_that_are_not_quantrain_checkpoints(tmp_path, content, match):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_other_files_and_a_missing_one(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint at all")
    with pytest.raises(
        ValueError, match=r"not a readable checkpoint \(truncated or corrupted\?\): not a torch.save zip archive"
    ) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_saving_what_weights_only_cannot_read_back_is_refused_naming_the_entry(tmp_path):
    with pytest.raises(TypeError, match=r"state\['extra'\]\['fn'\] is a function"):
        save_checkpoint({"extra": {"fn": lambda: None}}, tmp_path / "ckpt.pt")
    with pytest.raises(TypeError, match="must be a dict"):
        save_checkpoint([torch.ones(1)], tmp_path / "ckpt.pt")
    assert os.listdir(tmp_path) == []


def test_a_write_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # e.g. interrupted while writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_atomic_write_keeps_the_usual_file_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "a.json") as f:
            f.write("{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644


# ---- calibration files -------------------------------------------------------------------------------------------


def _calibrated_path(tmp_path: Path) -> Path:
    model = nn.Sequential(nn.Linear(4, 3))
    quantizer = QATQuantizer(model, [{"op_types": ["Linear"]}])
    model(torch.randn(8, 4))
    path = tmp_path / "calibration.json"
    save_calibration_config(quantizer.get_calibration_config(), path)
    return path


@pytest.mark.parametrize("keep", [0, 1, 0.3, 0.7, -2])
def test_a_truncated_calibration_file_is_a_value_error_naming_the_file(tmp_path, keep):
    path = _calibrated_path(tmp_path)
    text = path.read_text()
    size = int(len(text) * keep) if isinstance(keep, float) else keep % len(text) if keep < 0 else keep
    path.write_text(text[:size])
    with pytest.raises(ValueError, match="not valid JSON") as info:
        load_calibration_config(path)
    assert str(path) in str(info.value)


def _edit(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data["modules"]["0"]["weight"], data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda entry, data: data.update(modules=[]), "expected an object"),
        (lambda entry, data: entry.pop("scale"), "lacks"),
        (lambda entry, data: entry.update(scale={"a": 1}), "not a number"),
        (lambda entry, data: entry.update(scale=0.0), "positive"),
        (lambda entry, data: entry.update(tracked_min=1.0, tracked_max=-1.0), "tracked_min is greater than tracked_max"),
        (lambda entry, data: entry.update(tracked_max=[1.0, 2.0]), "tracked_max"),
        (lambda entry, data: entry.update(quant_scheme="sideways"), "sideways"),
    ],
)
def test_a_calibration_file_with_wrong_structure_or_values_is_a_value_error(tmp_path, edit, match):
    path = _calibrated_path(tmp_path)
    _edit(path, edit)
    with pytest.raises(ValueError, match=match) as info:
        load_calibration_config(path)
    assert str(path) in str(info.value)


def test_a_binary_file_is_not_a_calibration_file(tmp_path):
    path = tmp_path / "calibration.json"
    save_checkpoint({"w": torch.randn(8)}, path)  # a zip archive, not UTF-8 text
    with pytest.raises(ValueError, match="not a UTF-8 text file") as info:
        load_calibration_config(path)
    assert str(path) in str(info.value)


def test_values_that_do_not_fit_the_quantizer_are_refused_when_loaded_into_it(tmp_path):
    path = _calibrated_path(tmp_path)
    _edit(path, lambda entry, data: entry.update(zero_point=0.5))  # int8 affine: zero points are integers
    model = nn.Sequential(nn.Linear(4, 3))
    quantizer = QATQuantizer(model, [{"op_types": ["Linear"]}])
    with pytest.raises(ValueError, match=r"0\.weight: zero_point must hold integers"):
        quantizer.set_calibration_config(load_calibration_config(path))
    assert quantizer.get_calibration_config() == {}  # nothing changed


def test_saving_a_calibration_file_is_atomic(tmp_path, monkeypatch):
    path = _calibrated_path(tmp_path)
    before = path.read_bytes()

    def crash(obj, f, **kwargs):
        f.write('{"format": "quantrain.calibration_config", "modul')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", crash)
    with pytest.raises(OSError, match="disk full"):
        save_calibration_config({}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["calibration.json"]
