"""Finding and reading the clips a command works on, as the evaluation data reads them.

A folder is searched for video files, an annotation file's rows (with ``start``/``end`` spans as
separate clips) are listed, and each clip is decoded with sparse segment sampling at segment middles,
short side resized, centre crop and ImageNet mean/std (:class:`~iv2_lightning.data.transforms.VideoTransform`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from iv2_lightning.data.annotations import load_annotations
from iv2_lightning.data.transforms import VideoTransform
from iv2_lightning.data.video_io import VideoDecodeError, read_clip
from iv2_lightning.use.common import UseError, err_console

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")
ANNOTATION_SUFFIXES = (".jsonl", ".json", ".csv")


@dataclass
class VideoItem:
    """One clip to read: ``key`` names it in an index (the path, plus ``#start-end`` for a span)."""

    key: str
    path: str
    start: float | None = None
    end: float | None = None
    caption: str | None = None


def list_videos(source: str | os.PathLike, root: str | os.PathLike | None = None) -> list[VideoItem]:
    """Video files under a folder (sorted), or the rows of an annotation file (JSONL/JSON/CSV, video
    paths relative to ``root``, default the file's folder), or one video file."""
    src = Path(source)
    if src.is_dir():
        files = sorted(f for f in src.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        return [VideoItem(str(f), str(f)) for f in files]
    if src.is_file() and src.suffix.lower() in ANNOTATION_SUFFIXES:
        rows, errors = load_annotations(src, on_error="skip")
        for e in errors:
            err_console.print(f"[yellow]skipped row[/yellow] {e}")
        base = Path(root) if root is not None else src.parent
        items = []
        for r in rows:
            path = Path(r.video) if Path(r.video).is_absolute() else base / r.video
            span = f"#{r.start:g}-{r.end:g}" if r.start is not None and r.end is not None else ""
            items.append(
                VideoItem(f"{path}{span}", str(path), r.start, r.end, r.caption[0] if r.caption else None)
            )
        return items
    if src.is_file():
        return [VideoItem(str(src), str(src))]
    raise UseError(f"{src} does not exist")


def load_video(
    path: str | os.PathLike,
    num_frames: int,
    image_size: int,
    start: float | None = None,
    end: float | None = None,
) -> torch.Tensor:
    """Normalised ``[3, num_frames, image_size, image_size]`` as the evaluation data reads a clip:
    sparse segment sampling at segment middles, short side resized, centre crop, ImageNet mean/std."""
    return load_clip(path, num_frames, image_size, start, end)[0]


def load_clip(
    path: str | os.PathLike,
    num_frames: int,
    image_size: int,
    start: float | None = None,
    end: float | None = None,
    audio: bool = False,
    max_audio_frames: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(video, audio)``: the video as :func:`load_video` reads it and, with ``audio=True``, the
    file's sound track as kaldi fbank ``[F, 128]`` (None when the file has none), at most
    ``max_audio_frames`` of it, around the sampled frames, as the DataModules crop it."""
    clip = read_clip(
        path,
        num_frames=num_frames,
        sampling="middle",
        size=image_size,
        start=start,
        end=end,
        audio=audio,
        max_audio_frames=max_audio_frames,
    )
    return VideoTransform(image_size, train=False)(clip.video), clip.audio


class _Clips(Dataset):
    """Decodes in DataLoader workers; a file that fails gives ``(key, None, reason)``."""

    def __init__(self, items: Sequence[VideoItem], num_frames: int, image_size: int) -> None:
        self.items, self.num_frames, self.image_size = list(items), num_frames, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str | None]:
        it = self.items[i]
        try:
            return it.key, load_video(it.path, self.num_frames, self.image_size, it.start, it.end), None
        except (VideoDecodeError, OSError, ValueError, RuntimeError) as err:
            reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
            return it.key, None, reason
