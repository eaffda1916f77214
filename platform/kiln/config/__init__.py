"""Run configuration: TrainingConfig, TrainingConfigBuilder and its presets, TaskSpec."""

from kiln.config.builder import PRESETS, TrainingConfigBuilder, get_preset
from kiln.config.modes import MetricMode
from kiln.config.task import TaskSpec, TaskType
from kiln.config.training import TrainingConfig, read_mapping

__all__ = [
    "PRESETS",
    "MetricMode",
    "TaskSpec",
    "TaskType",
    "TrainingConfig",
    "TrainingConfigBuilder",
    "get_preset",
    "read_mapping",
]
