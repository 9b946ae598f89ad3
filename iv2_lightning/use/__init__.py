"""Use a trained model from the command line: ``iv2 embed | search | caption | chat``.

One module per job: :mod:`~iv2_lightning.use.checkpoints` (which file ``--ckpt`` means; the torch
model inside it), :mod:`~iv2_lightning.use.clips` (listing and reading clips),
:mod:`~iv2_lightning.use.index` (the embedding index), :mod:`~iv2_lightning.use.embed` (``iv2 embed``,
``iv2 search``) and :mod:`~iv2_lightning.use.generate` (``iv2 caption``, ``iv2 chat``). The commands
load torch models (``VideoTextAligner``, ``VideoCaptioner``), not Lightning stages.
"""

from iv2_lightning.use.checkpoints import LoadedModel, load_model, resolve_checkpoint
from iv2_lightning.use.clips import VideoItem, list_videos, load_clip, load_video
from iv2_lightning.use.common import UseError
from iv2_lightning.use.embed import embed_clips, embed_main, search_main
from iv2_lightning.use.generate import caption_main, chat_main
from iv2_lightning.use.index import EmbeddingIndex

__all__ = [
    "EmbeddingIndex",
    "LoadedModel",
    "UseError",
    "VideoItem",
    "caption_main",
    "chat_main",
    "embed_clips",
    "embed_main",
    "list_videos",
    "load_clip",
    "load_model",
    "load_video",
    "resolve_checkpoint",
    "search_main",
]
