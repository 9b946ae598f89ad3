"""Data: decoding, sampling, the synthetic multimodal dataset, annotation datasets, DataModules and
the typed :class:`VideoBatch` that every stage consumes."""

from iv2_lightning.data.batch import VideoBatch, VideoCollate, VideoSample
from iv2_lightning.data.transforms import IMAGENET_MEAN, IMAGENET_STD, VideoTransform
from iv2_lightning.data.writer import write_video

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VideoBatch",
    "VideoCollate",
    "VideoSample",
    "VideoTransform",
    "write_video",
]
