"""Pure quantization math: no module state, tensors in, tensors out."""

from quantrain.ops.fake_quant import fake_quantize, quantize_dequantize
from quantrain.ops.qparams import calculate_qparams
from quantrain.ops.ranges import block_layout, ema_update, min_max

__all__ = ["block_layout", "calculate_qparams", "ema_update", "fake_quantize", "min_max", "quantize_dequantize"]
