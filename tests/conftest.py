import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# First: where torchvision's compiled operators do not load, transformers' import of torchvision needs the stand-ins
# that zoo defines (see zoo.TORCHVISION_STATUS).
import zoo

if os.environ.get("PYTEST_XDIST_WORKER"):  # several workers share the cores: one thread each, no oversubscription
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    """Say what this machine's integer kernels do: on x86 CPUs without VNNI, ONNX Runtime's uint8 x int8 kernels
    saturate, and the deploy tests' exports store weights as uint8 (quantrain.deploy.runtime)."""
    try:
        from quantrain.deploy.runtime import u8s8_saturates

        saturates = u8s8_saturates()
    except ImportError as error:
        return f"quantrain: ONNX Runtime not importable ({error})"
    models = f"quantrain: the model zoo's torchvision models: {zoo.TORCHVISION_STATUS}"
    if saturates:
        kernels = "quantrain: ONNX Runtime's uint8 x int8 kernels saturate on this CPU (no VNNI): exports store weights as uint8"
    else:
        kernels = "quantrain: ONNX Runtime's uint8 x int8 kernels are exact on this CPU"
    return [kernels, models]
