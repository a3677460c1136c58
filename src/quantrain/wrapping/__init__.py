"""Glue that attaches fake quantizers to a model's modules."""

from quantrain.wrapping.forwards import FLOAT_FORWARDS, register_float_forward
from quantrain.wrapping.quantized_module import QuantizedModule, attach, build_fake_quantizers, detach, is_quantized

__all__ = [
    "FLOAT_FORWARDS",
    "QuantizedModule",
    "attach",
    "build_fake_quantizers",
    "detach",
    "is_quantized",
    "register_float_forward",
]
