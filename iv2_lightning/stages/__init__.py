"""The curriculum: one LightningModule per stage over the shared modules of :mod:`iv2_lightning.models`."""

from iv2_lightning.stages.action import ActionStage
from iv2_lightning.stages.base import SHARED_MODULES, BaseStage
from iv2_lightning.stages.contrastive import ContrastiveStage, masked_info_nce
from iv2_lightning.stages.masked import MaskedVideoStage, build_teacher
from iv2_lightning.stages.next_token import NextTokenStage, dialogue_prompt_ids
from iv2_lightning.stages.weights import export_shared_weights, load_shared_weights, read_state_dict

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
    "masked_info_nce",
    "read_state_dict",
]
