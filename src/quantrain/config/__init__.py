"""Configuration: the config_list language, parsed once into frozen, typed settings."""

from quantrain.config.parse import ConfigEntry, canonical_target_name, parse_config_list
from quantrain.config.resolve import (
    DEFAULT_TARGETS,
    WEIGHT_AXES,
    ModulePlan,
    TargetKind,
    TargetPlan,
    out_channel_axis,
    register_default_targets,
    register_weight_axis,
    resolve,
)
from quantrain.config.settings import Granularity, GranularityKind, QuantDtype, QuantScheme, TargetSettings

__all__ = [
    "DEFAULT_TARGETS",
    "ConfigEntry",
    "Granularity",
    "GranularityKind",
    "ModulePlan",
    "QuantDtype",
    "QuantScheme",
    "TargetKind",
    "TargetPlan",
    "TargetSettings",
    "WEIGHT_AXES",
    "canonical_target_name",
    "out_channel_axis",
    "parse_config_list",
    "register_default_targets",
    "register_weight_axis",
    "resolve",
]
