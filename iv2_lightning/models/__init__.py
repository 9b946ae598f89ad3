"""Pure-PyTorch model parts of InternVideo2 (no Lightning import anywhere in this package).

>>> from iv2_lightning.models import build_video_encoder, PRESETS
>>> enc = build_video_encoder("tiny")
"""

from iv2_lightning.models.aligner import AlignerOutput, VideoTextAligner
from iv2_lightning.models.attention import Attention, CrossAttention, attention, flash_available
from iv2_lightning.models.audio import AudioEncoder, AudioOutput, compute_fbank
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
from iv2_lightning.models.beats import BEATsConfig, BEATsEncoder
from iv2_lightning.models.captioner import CaptionerOutput, VideoCaptioner, dialogue_prompt_ids
from iv2_lightning.models.classifier import VideoClassifier
from iv2_lightning.models.distributed import gather_no_grad, gather_with_grad
from iv2_lightning.models.fusion import CrossModalFusion, FusionOutput
from iv2_lightning.models.generation import Generation, generate_tokens, nucleus_sample
from iv2_lightning.models.heads import (
    CausalDecoder,
    ClassificationHead,
    DistillHead,
    MatchingHead,
    NextTokenLoss,
    PixelDecoder,
    ProjectionHead,
    next_token_loss,
    norm_pixel_targets,
    patchify,
    pixel_reconstruction_loss,
    sample_hard_negatives,
    unpatchify,
)
from iv2_lightning.models.layers import AttentionPool, Block, DropPath, LayerScale, Mlp, masked_mean
from iv2_lightning.models.losses import CosineDistillLoss, InfoNCELoss, MatchingLoss
from iv2_lightning.models.masked_video import MaskedVideoModel, MaskedVideoOutput
from iv2_lightning.models.masking import attention_guided_mask, make_mask, random_mask, tube_mask
from iv2_lightning.models.official import ConversionReport, load_official
from iv2_lightning.models.pos_embed import interpolate_pos_embed_3d, sincos_1d, sincos_2d, sincos_3d
from iv2_lightning.models.resampler import QueryResampler
from iv2_lightning.models.teachers import ConvFrameTeacher, TeacherOutput, build_teacher
from iv2_lightning.models.temporal import HierarchicalTemporalEncoder, HTEOutput
from iv2_lightning.models.text import (
    ByteTokenizer,
    HFTextEncoder,
    HFTokenizer,
    TextEncoder,
    TextOutput,
    TokenizedText,
    build_tokenizer,
)

__all__ = [
    "OFFICIAL_PARAM_COUNTS",
    "PRESETS",
    "AlignerOutput",
    "Attention",
    "AttentionPool",
    "AudioEncoder",
    "AudioOutput",
    "BEATsConfig",
    "BEATsEncoder",
    "Block",
    "ByteTokenizer",
    "CaptionerOutput",
    "CausalDecoder",
    "ClassificationHead",
    "ConvFrameTeacher",
    "ConversionReport",
    "CosineDistillLoss",
    "CrossAttention",
    "CrossModalFusion",
    "DistillHead",
    "DividedBlock",
    "DropPath",
    "FusionOutput",
    "Generation",
    "HFTextEncoder",
    "HFTokenizer",
    "HTEOutput",
    "HierarchicalTemporalEncoder",
    "InfoNCELoss",
    "LayerScale",
    "MaskedVideoModel",
    "MaskedVideoOutput",
    "MatchingHead",
    "MatchingLoss",
    "Mlp",
    "NextTokenLoss",
    "PatchEmbed3D",
    "PixelDecoder",
    "ProjectionHead",
    "QueryResampler",
    "TeacherOutput",
    "TextEncoder",
    "TextOutput",
    "TokenizedText",
    "VideoCaptioner",
    "VideoClassifier",
    "VideoEncoder",
    "VideoEncoderOutput",
    "VideoTextAligner",
    "attention",
    "attention_guided_mask",
    "build_teacher",
    "build_tokenizer",
    "build_video_encoder",
    "compute_fbank",
    "count_parameters",
    "dialogue_prompt_ids",
    "flash_available",
    "gather_no_grad",
    "gather_with_grad",
    "generate_tokens",
    "interpolate_pos_embed_3d",
    "load_official",
    "make_mask",
    "masked_mean",
    "next_token_loss",
    "norm_pixel_targets",
    "nucleus_sample",
    "patchify",
    "pixel_reconstruction_loss",
    "preset_config",
    "random_mask",
    "sample_hard_negatives",
    "sincos_1d",
    "sincos_2d",
    "sincos_3d",
    "tube_mask",
    "unpatchify",
]
