"""quantrain: quantization-aware training for PyTorch, with NNI 3.0's QATQuantizer API and semantics.

>>> import torch, quantrain
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
>>> q = quantrain.QATQuantizer(model, [{"op_types": ["Linear"]}])
>>> _ = model(torch.randn(3, 4))
>>> sorted(q.get_calibration_config()["0"])
['_input_0', '_output_0', 'bias', 'weight']
"""

from quantrain.calibration import load_calibration_config, save_calibration_config
from quantrain.checkpoint import load_checkpoint, save_checkpoint
from quantrain.config import (
    Granularity,
    QuantDtype,
    QuantScheme,
    TargetSettings,
    parse_config_list,
    register_default_targets,
    register_weight_axis,
)
from quantrain.config.presets import deployable_config_list
from quantrain.evaluator import Evaluator, TorchEvaluator
from quantrain.fake_quantizer import FakeQuantizer
from quantrain.modules import Add
from quantrain.observer import RangeObserver
from quantrain.ptq import PtqQuantizer
from quantrain.qat import QATQuantizer
from quantrain.schedule import Schedule
from quantrain.spec import load_quantizer_spec, save_quantizer_spec
from quantrain.wrapping import register_float_forward

__version__ = "0.1.0"

__all__ = [
    "Add",
    "Evaluator",
    "FakeQuantizer",
    "Granularity",
    "LightningEvaluator",
    "PtqQuantizer",
    "QATQuantizer",
    "QuantizationCallback",
    "QuantizationTrainerCallback",
    "Schedule",
    "deployable_config_list",
    "QuantDtype",
    "QuantScheme",
    "RangeObserver",
    "TargetSettings",
    "TorchEvaluator",
    "TransformersEvaluator",
    "check_parity",
    "export_onnx",
    "__version__",
    "load_calibration_config",
    "load_checkpoint",
    "load_quantizer_spec",
    "parse_config_list",
    "register_default_targets",
    "register_float_forward",
    "register_weight_axis",
    "save_calibration_config",
    "save_checkpoint",
    "save_quantizer_spec",
]


_LAZY = {
    # Each needs an optional extra (onnx, lightning, transformers): imported only when asked for.
    "export_onnx": "quantrain.deploy",
    "check_parity": "quantrain.deploy",
    "LightningEvaluator": "quantrain.integrations.lightning",
    "QuantizationCallback": "quantrain.integrations.lightning",
    "TransformersEvaluator": "quantrain.integrations.transformers",
    "QuantizationTrainerCallback": "quantrain.integrations.transformers",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quantrain' has no attribute {name!r}")
