"""Map-style datasets over annotation files and real media, and the skip-on-error machinery.

A run must never die on one bad file. :class:`VideoTextDataset` reads a clip with
:func:`~iv2_lightning.data.video_io.read_clip`; when that fails and ``on_error="skip"`` it records
``(path, reason)`` and serves another clip in its place. The record travels inside the returned
sample (``meta["skipped"]``), so it reaches the main process from any worker process, where
:class:`SkipLog` counts it (the DataModules feed it from ``on_after_batch_transfer`` and
:class:`~iv2_lightning.callbacks.DataErrorReport` prints it at epoch end). With
``on_error="raise"`` the exception names the file and the reason.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from torch.utils.data import Dataset

from iv2_lightning.data.annotations import AnnotationRow, CaptionFusion, load_annotations
from iv2_lightning.data.batch import VideoSample
from iv2_lightning.data.transforms import VideoTransform
from iv2_lightning.data.video_io import VideoDecodeError, read_clip

log = logging.getLogger(__name__)

OnError = Literal["skip", "raise"]
CaptionSource = Literal["caption", "fused"]


class SkipLog:
    """Counts skipped samples and keeps the first few (path, reason) pairs for the report."""

    def __init__(self, keep: int = 10) -> None:
        self.keep = keep
        self.count = 0
        self.first: list[tuple[str, str]] = []

    def add(self, entries: Iterable[tuple[str, str]]) -> None:
        for path, reason in entries:
            self.count += 1
            if len(self.first) < self.keep:
                self.first.append((path, reason))

    def add_rows(self, errors) -> None:
        self.add((f"{e.path}:{e.line}", e.reason) for e in errors)

    def summary(self) -> str:
        if not self.count:
            return "no sample was skipped"
        lines = [f"{self.count} sample(s) skipped; first {len(self.first)}:"]
        lines += [f"  {p}: {r}" for p, r in self.first]
        return "\n".join(lines)

    def reset(self) -> None:
        self.count = 0
        self.first = []


class VideoTextDataset(Dataset):
    """Clips listed in an annotation file, decoded from real media.

    ``modalities`` chooses what each sample carries besides the video: ``audio`` (kaldi fbank of the
    clip's audio track, at most ``max_audio_frames`` frames around the sampled frames: see
    ``read_clip``), ``caption``, ``speech`` (the ASR text), ``label`` (an integer, or a name of
    ``label_names``), ``qa``.
    A clip with fewer frames than ``num_frames`` repeats frames (see ``read_clip``).
    """

    def __init__(
        self,
        annotation_file: str | Path,
        root: str | Path | None = None,
        num_frames: int = 8,
        train: bool = False,
        transform: VideoTransform | None = None,
        modalities: Iterable[str] = ("audio", "caption", "speech", "label", "qa"),
        caption_source: CaptionSource = "caption",
        caption_fusion: CaptionFusion | None = None,
        on_error: OnError = "skip",
        max_consecutive_errors: int = 50,
        seed: int = 0,
        max_audio_frames: int | None = None,
        label_names: list[str] | None = None,
        num_mel_bins: int = 128,
    ) -> None:
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error must be 'skip' or 'raise'; got {on_error!r}")
        self.annotation_file = Path(annotation_file)
        self.root = Path(root) if root is not None else self.annotation_file.parent
        self.rows, self.row_errors = load_annotations(self.annotation_file, on_error, label_names)
        if not self.rows:
            reasons = "; ".join(str(e) for e in self.row_errors[:3])
            raise ValueError(
                f"{self.annotation_file}: no usable row{(' (' + reasons + ')') if reasons else ''}"
            )
        if self.row_errors:
            log.warning(
                "%s: skipped %d unusable row(s), e.g. %s",
                annotation_file,
                len(self.row_errors),
                self.row_errors[0],
            )
        self.num_frames = num_frames
        self.train = train
        self.transform = transform or VideoTransform(224, train=train)
        self.modalities = set(modalities)
        unknown = self.modalities - {"audio", "caption", "speech", "label", "qa"}
        if unknown:
            raise ValueError(
                f"unknown modalities {sorted(unknown)}; choose from audio, caption, speech, label, qa"
            )
        self.caption_source = caption_source
        self.fusion = caption_fusion or CaptionFusion()
        self.on_error = on_error
        self.max_consecutive_errors = max_consecutive_errors
        self.seed = seed
        self.max_audio_frames = max_audio_frames
        self.num_mel_bins = num_mel_bins
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def path_of(self, row: AnnotationRow) -> Path:
        p = Path(row.video)
        return p if p.is_absolute() else self.root / p

    def _caption(self, row: AnnotationRow, rng: random.Random) -> str | None:
        if not row.caption:
            return None
        caption = rng.choice(row.caption) if self.train else row.caption[0]
        if self.caption_source == "fused":
            caption = self.fusion(caption, row.audio_caption, row.asr)
        return caption

    def load(self, index: int, rng: random.Random) -> VideoSample:
        """Read one clip; raises VideoDecodeError (or another error) on a bad file."""
        row = self.rows[index]
        path = self.path_of(row)
        clip = read_clip(
            path,
            num_frames=self.num_frames,
            sampling="rand" if self.train else "middle",
            size=self.transform.size,
            start=row.start,
            end=row.end,
            audio="audio" in self.modalities,
            rng=rng,
            max_audio_frames=self.max_audio_frames,
            num_mel_bins=self.num_mel_bins,
        )
        video = self.transform(clip.video, rng)
        return VideoSample(
            video=video,
            sample_id=index,
            caption=self._caption(row, rng) if "caption" in self.modalities else None,
            audio=clip.audio if "audio" in self.modalities else None,
            speech=row.asr if "speech" in self.modalities else None,
            label=row.label if "label" in self.modalities else None,
            qa=list(row.qa) if "qa" in self.modalities else [],
            meta={
                "path": str(path),
                "start": clip.start,
                "end": clip.end,
                "frame_times": list(clip.frame_times),
                "line": row.line,
                "index": index,
            },
        )

    def __getitem__(self, index: int) -> VideoSample:
        rng = random.Random(hash((self.seed, self.epoch, index)) if self.train else index)
        skipped: list[tuple[str, str]] = []
        candidate = index
        for _ in range(self.max_consecutive_errors):
            try:
                sample = self.load(candidate, rng)
            except (VideoDecodeError, OSError, ValueError, RuntimeError) as err:
                path = str(self.path_of(self.rows[candidate]))
                reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
                if self.on_error == "raise":
                    if isinstance(err, VideoDecodeError):
                        raise
                    raise VideoDecodeError(path, reason) from err
                skipped.append((path, reason))
                candidate = rng.randrange(len(self.rows))
                continue
            sample.meta["skipped"] = skipped
            return sample
        first = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise RuntimeError(
            f"{self.annotation_file}: {self.max_consecutive_errors} clips in a row could not be read "
            f"(is every file broken?); first failures: {first}"
        )


def collect_skipped(meta: Iterable[dict]) -> list[tuple[str, str]]:
    """The (path, reason) pairs recorded in a batch's ``meta`` list."""
    out: list[tuple[str, str]] = []
    for m in meta:
        out.extend(tuple(x) for x in m.get("skipped", ()))
    return out
