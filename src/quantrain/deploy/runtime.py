"""What this machine's ONNX Runtime integer kernels compute exactly.

On x86-64 CPUs without VNNI (AVX2 and AVX-512 machines that lack AVX512-VNNI / AVX-VNNI, e.g. AMD Zen 1-3 and
Intel before Cascade Lake), ONNX Runtime multiplies uint8 activations by int8 weights with ``vpmaddubsw``, which adds
each pair of products in 16 bits with saturation: ``255 * 127 + 255 * 127 = 64770`` becomes ``32767``. Convolutions
and matrix products with large activations and weights then differ from exact integer arithmetic, and from the
trained fake-quant model. ONNX Runtime's documentation recommends 7-bit weights there ("reduce_range"); quantrain
can also store the same int8 weights as uint8 with zero point 128 (``export_onnx(..., weight_dtype="uint8")``),
which those kernels compute exactly.

>>> isinstance(u8s8_saturates(), bool)
True
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["u8s8_saturates"]

_PROBE_DEPTH = 64  # long enough for ONNX Runtime's packed kernel, as in a real layer


@functools.cache
def u8s8_saturates() -> bool:
    """Whether ONNX Runtime on this machine saturates uint8 x int8 products (see the module docstring).

    Measured once per process, by multiplying 64 activations of 255 by 64 weights of 127 with ``MatMulInteger``:
    exact arithmetic gives ``64 * 255 * 127``, the saturating kernel ``32 * 32767``.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    activations = helper.make_tensor_value_info("a", TensorProto.UINT8, [1, _PROBE_DEPTH])
    product = helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])
    weights = numpy_helper.from_array(np.full((_PROBE_DEPTH, 1), 127, np.int8), "w")
    node = helper.make_node("MatMulInteger", ["a", "w"], ["y"])
    graph = helper.make_graph([node], "probe", [activations], [product], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"a": np.full((1, _PROBE_DEPTH), 255, np.uint8)})
    return int(result[0, 0]) != _PROBE_DEPTH * 255 * 127
