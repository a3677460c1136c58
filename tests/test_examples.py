"""The examples run as documented."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from quantrain import load_calibration_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_ddp_example_trains_two_ranks_that_agree(tmp_path):
    pytest.importorskip("sklearn", reason="the example trains on scikit-learn's digits")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [str(ROOT / "examples" / "ddp_train.py"), "--epochs", "1", "--out", str(tmp_path)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ranks hold identical scales and zero points: True" in run.stdout
    assert "optimizer steps: 22;" in run.stdout  # 1437 training images // 64 per global batch
    calibration = load_calibration_config(tmp_path / "calibration.json")
    assert calibration["0"]["weight"]["scale"].numel() == 16  # per output channel of the first conv
    assert (tmp_path / "model.pt").is_file()
