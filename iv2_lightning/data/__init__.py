"""Data: decoding, sampling, the synthetic multimodal dataset, annotation datasets, DataModules and
the typed :class:`VideoBatch` that every stage consumes."""

from iv2_lightning.data.annotations import AnnotationError, CaptionFusion, load_annotations, write_annotations
from iv2_lightning.data.batch import SkippedSample, VideoBatch, VideoCollate, VideoSample
from iv2_lightning.data.datamodules import (
    StreamingVideoDataModule,
    SyntheticVideoDataModule,
    VideoDataModuleBase,
    VideoTextDataModule,
)
from iv2_lightning.data.datasets import SkipLog, VideoTextDataset
from iv2_lightning.data.synthetic import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    SHAPES,
    SyntheticClip,
    SyntheticVideoDataset,
    attributes_from_text,
    direction_prompts,
    generate_clip,
    render_clip,
)
from iv2_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, VideoTransform
from iv2_lightning.data.video_io import Clip, VideoDecodeError, probe_video, read_clip
from iv2_lightning.data.writer import write_video

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "DIRECTIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SHAPES",
    "AnnotationError",
    "CaptionFusion",
    "Clip",
    "SkipLog",
    "SkippedSample",
    "StreamingVideoDataModule",
    "SyntheticClip",
    "SyntheticVideoDataModule",
    "SyntheticVideoDataset",
    "VideoBatch",
    "VideoCollate",
    "VideoDataModuleBase",
    "VideoDecodeError",
    "VideoSample",
    "VideoTextDataModule",
    "VideoTextDataset",
    "VideoTransform",
    "attributes_from_text",
    "direction_prompts",
    "generate_clip",
    "load_annotations",
    "probe_video",
    "read_clip",
    "render_clip",
    "write_annotations",
    "write_video",
]
