"""The typed batch every DataModule yields and every stage consumes, and the collate that builds it.

A dataset returns one :class:`VideoSample` per clip: the decoded, normalised video plus whatever
other modalities the clip has (audio fbank, caption, ASR transcript, label, question/answer turns).
:class:`VideoCollate` tokenises the text, pads text and audio, and marks the missing modalities,
so a stage never looks up magic dictionary keys and never sees a ragged tensor.

Masks follow one convention across the library: True = real (token, frame, sample present).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from iv2_lightning.features.tokenizers import ByteTokenizer, TokenizedText

Tokenizer = Callable[..., TokenizedText]

#: what a sample may carry besides the video
MODALITIES = ("audio", "caption", "speech", "label", "qa")


@dataclass
class VideoSample:
    """One clip as a dataset returns it.

    ``video``: float ``[3, T, H, W]``, already normalised. ``audio``: kaldi fbank ``[F, 128]`` or None
    when the clip has no audio track. ``caption``: the (possibly fused) caption. ``speech``: the ASR
    transcript or None. ``label``: class index or None. ``qa``: dialogue turns ``[(question, answer)]``.
    ``sample_id``: clips with the same id are positives of each other in contrastive learning.
    ``meta``: anything else (path, start/end seconds, frame times, generator attributes).
    """

    video: torch.Tensor
    sample_id: int
    caption: str | None = None
    audio: torch.Tensor | None = None
    speech: str | None = None
    label: int | None = None
    qa: list[tuple[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkippedSample:
    """What a streaming dataset returns in place of a clip it could not read (``on_error="skip"``);
    the collate drops it and keeps ``(path, reason)`` in the batch's ``meta[0]["skipped"]``."""

    path: str
    reason: str


@dataclass
class VideoBatch:
    """A collated batch.

    ``video [B, 3, T, H, W]`` normalised; ``sample_id [B]``.
    ``audio [B, F, 128]`` fbank padded with zeros, ``audio_frame_mask [B, F]``, ``audio_mask [B]``
    (False where the clip has no audio) — all None/False when no clip of the batch has audio.
    ``caption_ids/caption_mask [B, L]`` and ``captions`` (the raw strings).
    ``speech_ids/speech_mask [B, L]``: a clip without transcript has an all-False mask row.
    ``label [B]`` (-100 where a clip has none) or None when no clip has one.
    ``dialogue_ids/dialogue_mask/dialogue_target_mask [B, L]``: the question/answer turns as one
    token sequence; the target mask is True on answer tokens (the ones a next-token loss counts).
    ``meta``: one dict per clip.
    """

    video: torch.Tensor
    sample_id: torch.Tensor
    audio: torch.Tensor | None = None
    audio_frame_mask: torch.Tensor | None = None
    audio_mask: torch.Tensor | None = None
    caption_ids: torch.Tensor | None = None
    caption_mask: torch.Tensor | None = None
    speech_ids: torch.Tensor | None = None
    speech_mask: torch.Tensor | None = None
    label: torch.Tensor | None = None
    dialogue_ids: torch.Tensor | None = None
    dialogue_mask: torch.Tensor | None = None
    dialogue_target_mask: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.video.shape[0]

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> VideoBatch:
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> VideoBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> VideoBatch:
        """Called by ``DataLoader(pin_memory=True)`` on custom batch types."""
        return self._map(lambda t: t.pin_memory())

    def present(self, modality: str) -> torch.Tensor:
        """``[B]`` bool: which clips have ``modality`` (video, audio, caption, speech, label, dialogue)."""
        b = len(self)
        device = self.video.device
        if modality == "video":
            return torch.ones(b, dtype=torch.bool, device=device)
        if modality == "audio":
            return (
                self.audio_mask
                if self.audio_mask is not None
                else torch.zeros(b, dtype=torch.bool, device=device)
            )
        if modality == "label":
            return (
                self.label >= 0 if self.label is not None else torch.zeros(b, dtype=torch.bool, device=device)
            )
        masks = {
            "caption": self.caption_mask,
            "speech": self.speech_mask,
            "dialogue": self.dialogue_target_mask,
        }
        if modality not in masks:
            raise ValueError(
                f"unknown modality {modality!r}; expected one of video, audio, label, {', '.join(masks)}"
            )
        mask = masks[modality]
        return mask.any(dim=1) if mask is not None else torch.zeros(b, dtype=torch.bool, device=device)


class VideoCollate:
    """Build a :class:`VideoBatch` from :class:`VideoSample` objects.

    Text goes through ``tokenizer`` (the built-in :class:`ByteTokenizer` by default) padded to the
    longest in the batch, at most ``max_text_length`` tokens; audio is padded (and cut) to at most
    ``max_audio_frames`` frames. ``modalities`` (default: all of audio, caption, speech, label, qa)
    is the one place where a switched-off modality is dropped, whatever dataset made the sample.
    Picklable, so it works with worker processes.
    """

    def __init__(
        self,
        tokenizer: Tokenizer | None = None,
        max_text_length: int = 32,
        max_dialogue_length: int = 128,
        max_audio_frames: int = 1024,
        modalities: Iterable[str] | None = None,
    ) -> None:
        self.modalities = set(MODALITIES if modalities is None else modalities)
        unknown = sorted(self.modalities - set(MODALITIES))
        if unknown:
            raise ValueError(f"unknown modalities {unknown}; choose from {list(MODALITIES)}")
        self.tokenizer = tokenizer or ByteTokenizer()
        self.max_text_length = max_text_length
        self.max_dialogue_length = max_dialogue_length
        self.max_audio_frames = max_audio_frames

    def _select(self, sample: VideoSample) -> VideoSample:
        off = {"audio": None, "caption": None, "speech": None, "label": None, "qa": []}
        return replace(sample, **{k: v for k, v in off.items() if k not in self.modalities})

    def _text(self, texts: Sequence[str | None]) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        if all(t is None for t in texts):
            return None, None
        tok = self.tokenizer([t or "" for t in texts], max_length=self.max_text_length, padding="longest")
        mask = tok.mask.clone()
        for i, t in enumerate(texts):
            if t is None:
                mask[i] = False
        return tok.ids, mask

    def _audio(self, samples: Sequence[VideoSample]):
        if all(s.audio is None for s in samples):
            return None, None, None
        mel = next(s.audio for s in samples if s.audio is not None).shape[-1]
        lengths = [0 if s.audio is None else min(s.audio.shape[0], self.max_audio_frames) for s in samples]
        frames = max(max(lengths), 1)
        audio = torch.zeros(len(samples), frames, mel)
        frame_mask = torch.zeros(len(samples), frames, dtype=torch.bool)
        for i, (s, n) in enumerate(zip(samples, lengths)):
            if s.audio is not None and n > 0:
                if s.audio.dim() != 2 or s.audio.shape[-1] != mel:
                    raise ValueError(
                        f"audio of sample {s.sample_id} ({s.meta.get('path', '?')}) must be fbank [F, {mel}]; "
                        f"got {tuple(s.audio.shape)}"
                    )
                audio[i, :n] = s.audio[:n]
                frame_mask[i, :n] = True
        return audio, frame_mask, frame_mask.any(dim=1)

    def _dialogue(self, samples: Sequence[VideoSample]):
        if not any(s.qa for s in samples):
            return None, None, None
        tok = self.tokenizer
        rows, targets = [], []
        for s in samples:
            ids: list[int] = [tok.bos_id]
            target: list[bool] = [False]
            for q, a in s.qa:
                q_ids = tok.encode(f"Q: {q} A:")
                a_ids = tok.encode(f" {a}\n")
                ids += q_ids + a_ids
                target += [False] * len(q_ids) + [True] * len(a_ids)
            ids.append(tok.eos_id)
            target.append(bool(s.qa))  # ending the dialogue is part of answering
            rows.append(ids[: self.max_dialogue_length])
            targets.append(target[: self.max_dialogue_length])
        length = max(len(r) for r in rows)
        out = torch.full((len(rows), length), tok.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        tmask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, (r, t) in enumerate(zip(rows, targets)):
            out[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = True
            tmask[i, : len(t)] = torch.tensor(t)
        return out, mask, tmask

    def __call__(self, samples: Sequence[VideoSample | SkippedSample]) -> VideoBatch:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        skipped = [(s.path, s.reason) for s in samples if isinstance(s, SkippedSample)]
        if skipped:
            samples = [s for s in samples if not isinstance(s, SkippedSample)]
            if not samples:
                first = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
                raise RuntimeError(f"every sample of a batch failed to load ({len(skipped)}); first: {first}")
            samples[0].meta["skipped"] = [*samples[0].meta.get("skipped", []), *skipped]
        samples = [self._select(s) for s in samples]
        shapes = {tuple(s.video.shape) for s in samples}
        if len(shapes) != 1:
            raise ValueError(f"all videos of a batch must have one shape [3, T, H, W]; got {sorted(shapes)}")
        caption_ids, caption_mask = self._text([s.caption for s in samples])
        speech_ids, speech_mask = self._text([s.speech for s in samples])
        audio, audio_frame_mask, audio_mask = self._audio(samples)
        dialogue_ids, dialogue_mask, dialogue_target = self._dialogue(samples)
        labels = [s.label for s in samples]
        label = (
            None
            if all(x is None for x in labels)
            else torch.tensor([-100 if x is None else x for x in labels])
        )
        return VideoBatch(
            video=torch.stack([s.video for s in samples]),
            sample_id=torch.tensor([s.sample_id for s in samples], dtype=torch.long),
            audio=audio,
            audio_frame_mask=audio_frame_mask,
            audio_mask=audio_mask,
            caption_ids=caption_ids,
            caption_mask=caption_mask,
            speech_ids=speech_ids,
            speech_mask=speech_mask,
            label=label,
            dialogue_ids=dialogue_ids,
            dialogue_mask=dialogue_mask,
            dialogue_target_mask=dialogue_target,
            captions=[s.caption or "" for s in samples],
            meta=[dict(s.meta) for s in samples],
        )
