"""Lightning callbacks of iv2_lightning."""

from iv2_lightning.callbacks.data_report import DataErrorReport
from iv2_lightning.callbacks.stage_transition import StageTransition

__all__ = ["DataErrorReport", "StageTransition"]
