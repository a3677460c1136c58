"""Wrap a whole model from its plans (quantizers and fusions), all or nothing, and unwrap it again."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quantrain.config.resolve import ModulePlan, TargetKind
from quantrain.observer import RangeTracking
from quantrain.wrapping.fusion import (
    FUSED_MODULES,
    Fusion,
    link_folded_bn,
    link_fused_relu,
    unlink_folded_bn,
    unlink_fused_relu,
)
from quantrain.wrapping.op_points import OP_CHILD
from quantrain.wrapping.quantized_module import CHILD_NAME, FUSION_NAME, attach, build_fake_quantizers, detach, is_quantized

__all__ = ["OWNED_CHILDREN", "check_wrappable", "unwrap", "wrap"]

OWNED_CHILDREN = (CHILD_NAME, FUSION_NAME, OP_CHILD)
"""Children quantrain adds to a quantized module or to the scope module of a quantized op (their state_dict keys
are quantrain's)."""


def check_wrappable(model: nn.Module, plans: tuple[ModulePlan, ...] | None = None, op_plans: tuple = ()) -> None:
    """Raise ``ValueError`` if the model is already quantized or a planned module (or the scope module of a planned
    op) lacks room for quantrain's children."""
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if is_quantized(module):
            raise ValueError(
                f"module {name or type(model).__name__!r} is already quantized by quantrain; call "
                "unwrap_model() on its quantizer first"
            )
    for plan in plans or ():
        for child in OWNED_CHILDREN:
            if hasattr(modules[plan.name], child):
                raise ValueError(f"module {plan.name!r} already has an attribute {child!r}, which quantrain needs")
    for plan in op_plans:
        scope = modules[plan.call.scope]
        if hasattr(scope, OP_CHILD):
            where = f"module {plan.call.scope!r}" if plan.call.scope else type(model).__name__
            raise ValueError(f"{where} already has an attribute {OP_CHILD!r}, which quantrain needs for op {plan.name!r}")


def wrap(
    model: nn.Module, plans: tuple[ModulePlan, ...], tracking: Callable[[TargetKind], RangeTracking], device: torch.device | None
) -> dict[str, nn.Module]:
    """Attach every plan's quantizers and fusion; on any failure the model is restored before re-raising."""
    modules = dict(model.named_modules())
    built = [(modules[p.name], p, build_fake_quantizers(p.name, modules[p.name], p, device, tracking)) for p in plans]
    wrapped = {plan.name: module for module, plan, _ in built}
    try:
        for module, plan, fake_quant in built:
            attach(module, plan, fake_quant)
            if plan.fusion is not None:
                bn = modules[plan.fusion.bn] if plan.fusion.bn is not None else None
                fusion = Fusion(plan.fusion.group, bn, plan.fusion.activation).to(device)
                module.add_module(FUSION_NAME, fusion)
                if bn is not None:
                    link_folded_bn(bn, fusion)
                relu_name = plan.fusion.group[-1]
                relu = modules[relu_name] if relu_name not in wrapped else None
                # a plain ReLU/ReLU6 module (one quantrain quantizes itself applies its activation again)
                if plan.fusion.activation is not None and type(relu) is FUSED_MODULES[plan.fusion.activation]:
                    link_fused_relu(relu, fusion)
    except BaseException:
        unwrap(wrapped)
        raise
    return wrapped


def unwrap(wrapped: dict[str, nn.Module]) -> None:
    """Undo :func:`wrap` for these modules (and the BatchNorms folded into them)."""
    for module in wrapped.values():
        fusion = module._modules.get(FUSION_NAME)
        if isinstance(fusion, Fusion):
            if fusion.bn is not None:
                unlink_folded_bn(fusion.bn)
            if fusion.relu is not None:
                unlink_fused_relu(fusion.relu)
        detach(module)
