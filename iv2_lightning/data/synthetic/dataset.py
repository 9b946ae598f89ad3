"""One synthetic clip with all its modalities (:func:`generate_clip`) and the map-style dataset
that renders them on the fly (:class:`SyntheticVideoDataset`), yielding :class:`VideoSample`.

The same ``(seed, split, index)`` always gives the same bytes in any process: every draw comes from
one ``random.Random`` seeded by :func:`~iv2_lightning.data.synthetic.scene.clip_seed`, parameters
first and text after, so :func:`~iv2_lightning.data.synthetic.scene.sample_params` is a cheap prefix
of :func:`generate_clip`. The audio is turned into kaldi fbank frames like a real clip's track
(arXiv 2403.15377 Sec. 3.2, the audio encoder's input).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import Dataset

from iv2_lightning.data.batch import VideoSample
from iv2_lightning.data.synthetic.render import render_clip
from iv2_lightning.data.synthetic.scene import (
    DIRECTIONS,
    ClipParams,
    check_geometry,
    clip_seed,
    draw_params,
    sample_id_of,
    sample_params,
    with_direction,
)
from iv2_lightning.data.synthetic.sound import SAMPLE_RATE, synthesize_audio
from iv2_lightning.data.synthetic.text import (
    LABEL_ATTRIBUTES,
    make_audio_caption,
    make_caption,
    make_qa,
    make_speech,
    sequence_caption,
    sequence_of,
)
from iv2_lightning.data.transforms import VideoTransform
from iv2_lightning.features.fbank import compute_fbank


@dataclass
class SyntheticClip:
    """One generated clip. ``frames`` uint8 ``[T, H, W, 3]``; ``waveform`` float32 ``[S]`` at
    ``sample_rate`` (None when generated without audio); ``label`` = index of the first object's
    direction in ``DIRECTIONS``; ``attributes``: see :meth:`ClipParams.attributes`."""

    frames: torch.Tensor
    waveform: torch.Tensor | None
    sample_rate: int
    fps: float
    caption: str
    speech: str
    audio_caption: str
    qa: list[tuple[str, str]]
    label: int
    sample_id: int
    attributes: dict[str, Any]
    params: ClipParams
    index: int
    split: str
    seed: int
    directions: tuple[str, ...] = ()


def check_label(label: str, windows: int) -> None:
    """ValueError naming the field when ``label`` or ``windows`` is not one the clips can give."""
    if label not in (*LABEL_ATTRIBUTES, "sequence"):
        raise ValueError(f"label must be one of {sorted((*LABEL_ATTRIBUTES, 'sequence'))}; got {label!r}")
    if windows < 1:
        raise ValueError(f"windows must be >= 1; got {windows}")


def generate_clip(
    index: int,
    split: str = "train",
    seed: int = 0,
    num_frames: int = 8,
    image_size: int = 64,
    fps: float = 8.0,
    max_objects: int = 1,
    with_audio: bool = True,
    windows: int = 1,
) -> SyntheticClip:
    """Clip ``index`` of ``split``: identical bytes for the same arguments, in any process.

    ``windows > 1``: a long clip of ``windows * num_frames`` frames in which the first object turns
    at every window boundary (the next direction drawn among the 3 others); ``directions`` lists the
    direction of every window and the caption reads "..., then up". Each window alone is an ordinary
    clip (its unordered frames hide the direction), and the mean of per-window features holds only
    the *set* of directions, not their order: the hierarchical temporal encoder's task."""
    if fps <= 0:
        raise ValueError(f"fps must be positive; got {fps}")
    if windows < 1:
        raise ValueError(f"windows must be >= 1; got {windows}")
    check_geometry(num_frames, image_size, max_objects)
    rng = random.Random(clip_seed(seed, split, index))
    params = draw_params(rng, num_frames, image_size, max_objects)
    # text draws come after the parameter draws, so sample_params stays a cheap prefix of this
    caption = make_caption(params, rng)
    speech = make_speech(params, rng)
    audio_caption = make_audio_caption(params, rng)
    qa = make_qa(params, rng, max_objects)
    first = params.objects[0]
    directions = [first.direction]
    turns = random.Random(clip_seed(seed, f"{split}/turns", index))  # leaves the one-window clip as it was
    for _ in range(windows - 1):
        directions.append(turns.choice([d for d in DIRECTIONS if d != directions[-1]]))
    parts = [params]  # one ClipParams per window
    if windows > 1:
        parts = [replace(params, objects=(with_direction(first, d), *params.objects[1:])) for d in directions]
        caption = sequence_caption(caption, tuple(directions), rng)

    def joined(pieces: list[torch.Tensor]) -> torch.Tensor:
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    return SyntheticClip(
        frames=joined([render_clip(q) for q in parts]),
        waveform=joined([synthesize_audio(q, fps, SAMPLE_RATE) for q in parts]) if with_audio else None,
        sample_rate=SAMPLE_RATE,
        fps=float(fps),
        caption=caption,
        speech=speech,
        audio_caption=audio_caption,
        qa=qa,
        label=DIRECTIONS.index(first.direction),
        sample_id=sample_id_of(first.color, first.shape, first.direction),
        attributes=params.attributes(),
        params=params,
        index=index,
        split=split,
        seed=seed,
        directions=tuple(directions),
    )


class SyntheticVideoDataset(Dataset):
    """Map-style dataset of :class:`VideoSample` rendered on the fly from ``(seed, split, index)``.

    ``video``: ``transform`` of the ``[3, T, H, W]`` uint8 clip (default: evaluation
    ``VideoTransform(image_size)``, i.e. normalisation only); ``audio``: kaldi fbank of the
    waveform (``compute_fbank``); ``speech``: the ASR-style transcript; ``sample_id``: one id per
    (colour, shape, direction) of the first object; ``meta``: index, split, seed, attributes,
    audio caption.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 2000,
        num_frames: int = 8,
        image_size: int = 64,
        seed: int = 0,
        fps: float = 8.0,
        max_objects: int = 1,
        with_audio: bool = True,
        with_speech: bool = True,
        transform: VideoTransform | None = None,
        cache: bool = False,
        label: str = "direction",
        windows: int = 1,
    ) -> None:
        if not split:
            raise ValueError("split must be a non-empty name such as 'train', 'val' or 'test'")
        if size < 0:
            raise ValueError(f"size must be >= 0; got {size}")
        if fps <= 0:
            raise ValueError(f"fps must be positive; got {fps}")
        check_geometry(num_frames, image_size, max_objects)
        check_label(label, windows)
        self.label = label
        self.windows = windows
        self.split = split
        self.size = size
        self.num_frames = num_frames
        self.image_size = image_size
        self.seed = seed
        self.fps = fps
        self.max_objects = max_objects
        self.with_audio = with_audio
        self.with_speech = with_speech
        self.transform = transform if transform is not None else VideoTransform(image_size, train=False)
        self.cache = cache
        # index -> (uint8 frames [3, T, H, W], fbank or None, clip without its frames and waveform)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor | None, SyntheticClip]] = {}

    def __len__(self) -> int:
        return self.size

    def _index(self, i: int) -> int:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for SyntheticVideoDataset of size {self.size}")
        return i % self.size if self.size else i

    def clip(self, i: int) -> SyntheticClip:
        return generate_clip(
            self._index(i),
            self.split,
            self.seed,
            self.num_frames,
            self.image_size,
            self.fps,
            self.max_objects,
            with_audio=self.with_audio,
            windows=self.windows,
        )

    def attributes(self, i: int) -> dict[str, Any]:
        """The clip's attributes without rendering it."""
        return sample_params(
            self._index(i),
            self.split,
            self.seed,
            self.num_frames,
            self.image_size,
            self.max_objects,
        ).attributes()

    def _rendered(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None, SyntheticClip]:
        """Clip ``i``'s frames ``[3, T, H, W]`` (uint8), fbank and clip, from the cache when ``cache``."""
        i = self._index(i)
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        clip = self.clip(i)
        frames = clip.frames.permute(3, 0, 1, 2).contiguous()
        audio = compute_fbank(clip.waveform, clip.sample_rate) if clip.waveform is not None else None
        if self.cache:  # a clip is a pure function of (seed, split, index): render it once
            clip = replace(clip, frames=clip.frames[:0], waveform=None)
            self._cache[i] = (frames, audio, clip)
        return frames, audio, clip

    def _label_of(self, clip: SyntheticClip) -> int:
        if self.label == "sequence":
            return sequence_of(clip.directions)
        first = clip.params.objects[0]
        return LABEL_ATTRIBUTES[self.label].index(getattr(first, self.label))

    def __getitem__(self, i: int) -> VideoSample:
        frames, audio, clip = self._rendered(i)
        video = self.transform(frames)
        return VideoSample(
            video=video,
            sample_id=clip.sample_id,
            caption=clip.caption,
            audio=audio,
            speech=clip.speech if self.with_speech else None,
            label=self._label_of(clip),
            qa=list(clip.qa),
            meta={
                "index": clip.index,
                "split": clip.split,
                "seed": clip.seed,
                "attributes": clip.attributes,
                "audio_caption": clip.audio_caption,
                "source": "synthetic",
            },
        )


__all__ = ["SyntheticClip", "SyntheticVideoDataset", "check_label", "generate_clip"]
