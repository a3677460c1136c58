"""Ready-made config_lists.

>>> deployable_config_list(4, 8)[1]["target_settings"]["weight"]["quant_dtype"]
'int4'
"""

from __future__ import annotations

__all__ = ["deployable_config_list"]


def deployable_config_list(
    weight_bits: int = 8,
    activation_bits: int = 8,
    *,
    input_module: str = "0",
    op_types: tuple[str, ...] = ("Conv2d", "Linear"),
    output_op_types: tuple[str, ...] = (),
) -> list[dict]:
    """The layout that exports exactly to ONNX Runtime's integer kernels.

    int<weight_bits> symmetric weights, one scale per output channel; uint<activation_bits> affine activations, each
    quantized once where an integer engine would: the input of ``input_module`` (the model's first layer), and the
    output of every ``op_types`` layer (after the ReLU that ``fuse='auto'`` fuses into it) and of every
    ``output_op_types`` module (e.g. ``("Add",)`` for :class:`quantrain.Add` residuals).
    """
    activations = {"quant_dtype": f"uint{activation_bits}", "quant_scheme": "affine"}
    weights = {"quant_dtype": f"int{weight_bits}", "quant_scheme": "symmetric", "granularity": "out_channel"}
    config = [
        {"op_names": [input_module], "target_names": ["_input_"], **activations},
        {
            "op_types": list(op_types),
            "target_names": ["weight", "_output_"],
            **activations,
            "target_settings": {"weight": weights},
        },
    ]
    if output_op_types:
        config.append({"op_types": list(output_op_types), "target_names": ["_output_"], **activations})
    return config
