"""Lightning callbacks of iv2_lightning."""

from iv2_lightning.callbacks.data_report import DataErrorReport
from iv2_lightning.callbacks.pictures import ContrastivePictures
from iv2_lightning.callbacks.reconstruction import ReconstructionImages
from iv2_lightning.callbacks.stage_transition import StageTransition
from iv2_lightning.callbacks.text_samples import CaptionSamples

__all__ = [
    "CaptionSamples",
    "ContrastivePictures",
    "DataErrorReport",
    "ReconstructionImages",
    "StageTransition",
]
