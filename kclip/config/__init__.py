"""The run configuration: dataclass sections (schema.py), YAML files and overrides (files.py), and the checks of what
it names on disk (preflight.py). The checks that combine sections run in kclip.validate, above the models."""
from kclip.config.files import (
    CONFIG_DIR,
    apply_override,
    diff_configs,
    from_dict,
    load_config,
    resolve_config_path,
    save_config,
    to_dict,
)
from kclip.config.schema import (
    CONCEPT_HEAD_KINDS,
    DISTILL_KINDS,
    DISTILL_TARGETS,
    CheckpointConfig,
    ConceptConfig,
    Config,
    ConfigError,
    DataConfig,
    DistConfig,
    EvalConfig,
    LogConfig,
    LossConfig,
    OptimConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "CONFIG_DIR", "apply_override", "diff_configs", "from_dict", "load_config", "resolve_config_path", "save_config",
    "to_dict", "CONCEPT_HEAD_KINDS", "DISTILL_KINDS", "DISTILL_TARGETS", "CheckpointConfig", "ConceptConfig", "Config",
    "ConfigError", "DataConfig", "DistConfig", "EvalConfig", "LogConfig", "LossConfig", "OptimConfig", "StudentConfig",
    "TeacherConfig", "TrainConfig",
]
