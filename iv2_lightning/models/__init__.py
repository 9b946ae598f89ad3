"""Pure-PyTorch model parts of InternVideo2 (no Lightning import anywhere in this package).

>>> from iv2_lightning.models import build_video_encoder, PRESETS
>>> enc = build_video_encoder("tiny")
"""

from iv2_lightning.models.attention import Attention, CrossAttention, attention, flash_available
from iv2_lightning.models.backbone import (
    OFFICIAL_PARAM_COUNTS,
    PRESETS,
    DividedBlock,
    PatchEmbed3D,
    VideoEncoder,
    VideoEncoderOutput,
    build_video_encoder,
    count_parameters,
    preset_config,
)
from iv2_lightning.models.layers import AttentionPool, Block, DropPath, LayerScale, Mlp, masked_mean
from iv2_lightning.models.masking import attention_guided_mask, make_mask, random_mask, tube_mask
from iv2_lightning.models.pos_embed import interpolate_pos_embed_3d, sincos_1d, sincos_2d, sincos_3d
from iv2_lightning.models.temporal import HierarchicalTemporalEncoder, HTEOutput

__all__ = [
    "OFFICIAL_PARAM_COUNTS",
    "PRESETS",
    "Attention",
    "AttentionPool",
    "Block",
    "CrossAttention",
    "DividedBlock",
    "DropPath",
    "HTEOutput",
    "HierarchicalTemporalEncoder",
    "LayerScale",
    "Mlp",
    "PatchEmbed3D",
    "VideoEncoder",
    "VideoEncoderOutput",
    "attention",
    "attention_guided_mask",
    "build_video_encoder",
    "count_parameters",
    "flash_available",
    "interpolate_pos_embed_3d",
    "make_mask",
    "masked_mean",
    "preset_config",
    "random_mask",
    "sincos_1d",
    "sincos_2d",
    "sincos_3d",
    "tube_mask",
]
