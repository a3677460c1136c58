"""Integer-only inference: a reference executor for exported models, and the fixed-point arithmetic it uses."""

from quantrain.integer.executor import IntegerModel
from quantrain.integer.fixed_point import quantize_multiplier, requantize

__all__ = ["IntegerModel", "quantize_multiplier", "requantize"]
