"""Typed run configuration: the sections (`sections`), their cross-field checks (`checks`), loading
from YAML and overrides with located errors (`loading`), the generated reference (`reference`), and
what a config implies about the run's roles (`implied`).

The names below are the package's API; import them from `trainer.config`.
"""

from trainer.config.loading import config_from_dict, config_to_dict, dump_config, load_config
from trainer.config.reference import field_docs, reference, reference_markdown
from trainer.config.sections import (
                                     DEFAULT_TEACHER_TEMPLATE,
                                     ColumnsConfig,
                                     Config,
                                     DataConfig,
                                     LearnerConfig,
                                     LogConfig,
                                     LoraConfig,
                                     LossConfig,
                                     ModelConfig,
                                     RayConfig,
                                     RolloutConfig,
                                     StageConfig,
                                     TeacherConfig,
                                     TrainConfig,
)

__all__ = ["DEFAULT_TEACHER_TEMPLATE", "ColumnsConfig", "Config", "DataConfig", "LearnerConfig", "LogConfig",
           "LoraConfig", "LossConfig", "ModelConfig", "RayConfig", "RolloutConfig", "StageConfig", "TeacherConfig",
           "TrainConfig", "config_from_dict", "config_to_dict", "dump_config", "field_docs", "load_config",
           "reference", "reference_markdown"]
