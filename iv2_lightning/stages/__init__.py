"""The curriculum: one LightningModule per stage over the shared modules of :mod:`iv2_lightning.models`."""

from iv2_lightning.models.weights import (
    SHARED_MODULES,
    export_shared_weights,
    load_shared_weights,
    read_state_dict,
)
from iv2_lightning.stages.action import ActionStage
from iv2_lightning.stages.base import BaseStage
from iv2_lightning.stages.contrastive import ContrastiveStage
from iv2_lightning.stages.masked import MaskedVideoStage, build_teacher
from iv2_lightning.stages.next_token import NextTokenStage, dialogue_prompt_ids

__all__ = [
    "SHARED_MODULES",
    "ActionStage",
    "BaseStage",
    "ContrastiveStage",
    "MaskedVideoStage",
    "NextTokenStage",
    "build_teacher",
    "dialogue_prompt_ids",
    "export_shared_weights",
    "load_shared_weights",
    "read_state_dict",
]
