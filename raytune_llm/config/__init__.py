"""Run configuration: typed dataclass sections read from one YAML file plus `key=value` overrides.

`load_config(path, overrides)` lets omegaconf read the YAML and merge the dotlist (so `${...}`
interpolation works), then walks the result against the dataclass schema itself. Walking it
ourselves, instead of omegaconf's structured merge, is what lets one pass report *every* error of
a file at once, each with its full dotted key, the value, what is allowed and a "did you mean"
for unknown keys. Only the standard library and omegaconf are imported here, so `raytune-llm
validate` answers in well under a second without torch or Ray.
"""

from raytune_llm.config.load import from_dict, load_config, to_dict
from raytune_llm.config.sections import (
    ALL_LINEAR,
    ClusterSection,
    ConfigError,
    DataSection,
    ExportSection,
    LoraSection,
    ModelSection,
    QuantSection,
    RunConfig,
    ShardingSection,
    TinyModelConfig,
    TrainSection,
    check_name,
)

__all__ = [
    "ALL_LINEAR",
    "ClusterSection",
    "ConfigError",
    "DataSection",
    "ExportSection",
    "LoraSection",
    "ModelSection",
    "QuantSection",
    "RunConfig",
    "ShardingSection",
    "TinyModelConfig",
    "TrainSection",
    "check_name",
    "from_dict",
    "load_config",
    "to_dict",
]
