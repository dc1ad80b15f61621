"""Typed run configuration: dataclasses, presets, YAML in/out and dotted overrides.

One YAML file fully describes a run. It is resolved in three layers, each overriding
the last: the preset (``tiny-cpu`` by default), the user's YAML file, then ``--set
a.b=c`` overrides. The result is validated as a whole, so that a bad value is reported
with the dotted name of the field at fault before any work starts, not as a shape error
deep inside a training step.

The package is cut along those steps: ``sections`` and ``cluster`` (the typed sections),
``presets``, ``loading`` (files and overrides into a :class:`Config`) and ``validation``
(the cross-field rules). Import from here.
"""

from ldm_core.config.cluster import (
    ClusterConfig,
    StageResources,
    Toleration,
    TrainingResources,
)
from ldm_core.config.errors import ConfigError
from ldm_core.config.loading import from_dict, load_config, parse_override
from ldm_core.config.presets import DEFAULT_PRESET, PRESETS
from ldm_core.config.sections import (
    LR_DECAYS,
    AutoencoderConfig,
    AutoencoderTrainConfig,
    Config,
    DataConfig,
    DiffusionTrainConfig,
    EvaluationConfig,
    ModelConfig,
    SamplingConfig,
    SchedulerConfig,
    ServingConfig,
    StorageConfig,
    TrainConfig,
    UNetConfig,
)
from ldm_core.config.validation import check_trained_range, validate

__all__ = [
    "DEFAULT_PRESET",
    "LR_DECAYS",
    "PRESETS",
    "AutoencoderConfig",
    "AutoencoderTrainConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DiffusionTrainConfig",
    "EvaluationConfig",
    "ModelConfig",
    "SamplingConfig",
    "SchedulerConfig",
    "ServingConfig",
    "StageResources",
    "StorageConfig",
    "Toleration",
    "TrainConfig",
    "TrainingResources",
    "UNetConfig",
    "check_trained_range",
    "from_dict",
    "load_config",
    "parse_override",
    "validate",
]
