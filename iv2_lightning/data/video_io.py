"""Read a sparse clip (a few frames and the audio of the same span) from a video file.

InternVideo2 (arXiv 2403.15377, Sec. 4) trains and evaluates on 4–16 frames per video picked by
the sparse segment sampling of TSN/UMT (``get_frame_indices`` in the UMT and InternVideo2 code):
the span is cut into ``num_frames`` equal segments and one frame is taken from each — at a random
offset for training (``"rand"``), at the segment middle for evaluation (``"middle"``). We sample in
*time* rather than in frame indices, so variable-frame-rate files and ``start``/``end`` spans given
in seconds need no frame index. ``"uniform"`` (first to last frame, evenly spaced) is the other
evaluation convention.

Decoding is sparse: seek (backward, to a keyframe) to the first target time, decode forward, and
seek again only when the stream's keyframe index says a keyframe lies between the current position
and the next target (or, for a container without a usable index, when the next target is more
than ``SEEK_AHEAD_S`` ahead). While far from the next target the decoder drops frames that no
other frame references (most B-frames), which cannot be returned anyway. Only the frames that are
returned are converted to RGB, resized while converting, so memory stays flat whatever the file's
length or resolution. The audio track of the same span is resampled to 16 kHz mono and turned into
the kaldi fbank the audio encoder expects (:func:`iv2_lightning.models.audio.compute_fbank`). With
``max_audio_frames``, a longer track is cropped to the window of that many fbank frames centred on
the sampled frames (:func:`audio_window`), and only that window is decoded.

PyAV is the default backend (``"auto"``) and the reference: it was the fastest reader measured
(benchmarks/data_throughput.py) and the same frames come out on every machine. torchcodec is an
optional second backend, used only when asked for, whose frames match PyAV's for
constant-frame-rate files.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO, Literal

import av
import numpy as np
import torch

from iv2_lightning.features.fbank import compute_fbank

Source = str | os.PathLike | BinaryIO  # a path, or a seekable binary file object (e.g. io.BytesIO)
Sampling = Literal["rand", "middle", "uniform"]
Backend = Literal["auto", "pyav", "torchcodec"]
SAMPLINGS = ("rand", "middle", "uniform")
BACKENDS = ("auto", "pyav", "torchcodec")

AUDIO_RATE = 16_000
# kaldi fbank framing of compute_fbank: 25 ms windows every 10 ms, so n frames span
# (n - 1) * hop + window seconds of sound
FBANK_HOP_S = 0.010
FBANK_WINDOW_S = 0.025
# FFmpeg decoder threading for read_clip: "AUTO" (frame + slice threads), "SLICE", "FRAME", "NONE",
# or None = "SLICE" in the main process and "NONE" inside DataLoader workers, which already decode
# one clip per core. Frame threads lost in benchmarks/data_throughput.py: every seek drains their
# pipeline, and on busy cores they only add contention; slice threads cost nothing on single-slice
# streams and help on multi-slice ones (docs/benchmarks.md has the numbers).
DECODER_THREAD_TYPE: str | None = None
# Without a keyframe index we cannot tell whether a seek lands past the current decode position;
# decoding ~2 s forward (50–60 frames) costs about what a useless seek back to the last keyframe does.
SEEK_AHEAD_S = 2.0
# With an index, a seek pays off only if it skips more than a few frames (it flushes the decoder,
# which then restarts from the keyframe).
MIN_SKIP_S = 0.25
# Skip decoding unreferenced frames that end more than this many frame periods before the next target
# (they cannot be the nearest frame); SKIP_NONREF=False decodes every frame (the benchmark compares).
SKIP_NONREF = True
SKIP_MARGIN_PERIODS = 3.0
# A clip whose decodable frames end this many frame periods before the declared duration is
# reported (a truncated or damaged file), instead of silently repeating its last frame.
SHORT_STREAM_PERIODS = 2.0


class VideoDecodeError(RuntimeError):
    """A file that cannot give the requested clip; ``path`` names the file, ``reason`` says why.

    The one-argument form (the whole message) exists because torch's DataLoader re-raises a worker's
    exception as ``type(err)(message)``; ``path`` is then None.
    """

    def __init__(self, path: str | os.PathLike | None, reason: str | None = None) -> None:
        if reason is None:
            path, reason = None, str(path)
        self.path = None if path is None else os.fspath(path)
        self.reason = reason
        super().__init__(reason if self.path is None else f"{self.path}: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


@dataclass
class Clip:
    """A decoded clip.

    ``video``: uint8 ``[3, T, H, W]``; ``frame_times``: the presentation time (seconds) of each
    returned frame; ``audio``: kaldi fbank ``[F, num_mel_bins]`` of ``audio_span`` or None (no
    audio track, audio not requested, or an unreadable audio track); ``audio_span``: the seconds
    whose sound was read, ``[start, end)`` unless ``max_audio_frames`` cropped it (None without
    audio); ``fps``/``duration``: of the
    video stream; ``start``/``end``: the span the frames were sampled from (``end`` clamped to the
    end of the video); ``decoded_frames``: how many frames the decoder produced to get these
    (PyAV backend; None for torchcodec) — the cost of the sparse read.
    """

    video: torch.Tensor
    frame_times: list[float]
    audio: torch.Tensor | None
    fps: float
    duration: float
    path: str
    start: float
    end: float
    backend: str = "pyav"
    decoded_frames: int | None = None
    audio_span: tuple[float, float] | None = None


# --------------------------------------------------------------------------- stream metadata


def _as_float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _video_fps(stream: av.video.stream.VideoStream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        fps = _as_float(rate)
        # some muxers store a 1/90000-style tick as the rate; no real video runs at > 1000 fps
        if fps is not None and fps <= 1000:
            return fps
    return None


def _scan_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float:
    """End time of the last packet, read from the packets (not decoded): the fallback for streams
    whose header states no duration at all."""
    end = None
    tb = stream.time_base
    for packet in container.demux(stream):
        if packet.pts is None:
            continue
        t = float((packet.pts + (packet.duration or 0)) * tb)
        end = t if end is None else max(end, t)
    container.seek(0)
    if end is None:
        raise ValueError("the video stream has no timestamped packets")
    return end


def _tag_duration(tag: str | None) -> float | None:
    """Seconds from a Matroska ``DURATION`` tag (``HH:MM:SS.nnnnnnnnn``), None if absent or malformed."""
    if not tag:
        return None
    try:
        h, m, sec = tag.strip().split(":")
        return _as_float(int(h) * 3600 + int(m) * 60 + float(sec))
    except ValueError:
        return None


@dataclass
class _StreamInfo:
    t0: float  # presentation time of the first frame (0 for almost every file)
    duration: float
    fps: float | None
    width: int
    height: int
    num_frames: int
    duration_source: str


def _stream_info(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> _StreamInfo:
    tb = stream.time_base
    t0 = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
    fps = _video_fps(stream)
    duration, source = None, "stream"
    if stream.duration is not None and tb:
        duration = _as_float(stream.duration * tb)
    if duration is None:
        # Matroska/WebM store no per-stream duration field, but ffmpeg's muxer (and mkvmerge) tag
        # each track with DURATION; the container duration would be the longest (often audio) track
        duration, source = _tag_duration(stream.metadata.get("DURATION")), "tag"
    if duration is None and container.duration is not None:
        # mkv/webm state only the container (segment) duration: the longest track, measured
        # from the container start
        source = "container"
        c0 = container.start_time / av.time_base if container.start_time is not None else 0.0
        duration = _as_float(container.duration / av.time_base + c0 - t0)
    if duration is None:
        source = "packets"
        duration = _scan_duration(container, stream) - t0
    if stream.frames and stream.frames > 0:
        num_frames = int(stream.frames)
    elif fps is not None:
        num_frames = max(1, round(duration * fps))
    else:
        num_frames = 0  # unknown until decoded
    if fps is None and stream.frames:
        fps = stream.frames / duration
    return _StreamInfo(t0, duration, fps, stream.width, stream.height, num_frames, source)


def _is_file_object(source: Source) -> bool:
    return hasattr(source, "read")


def _name(source: Source) -> str:
    """What errors and ``Clip.path`` call the source: the path, or a file object's name."""
    if _is_file_object(source):
        name = getattr(source, "name", None)
        return os.fspath(name) if isinstance(name, str | os.PathLike) else f"<{type(source).__name__}>"
    return os.fspath(source)


def _remaining_bytes(f: BinaryIO) -> int | None:
    try:
        position = f.tell()
        size = f.seek(0, os.SEEK_END)
        f.seek(position)
    except (OSError, ValueError, AttributeError):
        return None  # not seekable: let the demuxer find out
    return size - position


def _open(source: Source, name: str) -> av.container.InputContainer:
    if _is_file_object(source):
        empty = _remaining_bytes(source) == 0
    else:
        if not os.path.exists(name):
            raise VideoDecodeError(name, "file not found")
        if not os.path.isfile(name):
            raise VideoDecodeError(name, "not a regular file")
        empty = os.path.getsize(name) == 0
    if empty:
        raise VideoDecodeError(name, "file is empty (0 bytes)")
    try:
        return av.open(source, mode="r")
    except Exception as err:  # PyAV raises FFmpegError subclasses, OSError, or UnicodeDecodeError
        raise VideoDecodeError(name, f"cannot open as a media file ({type(err).__name__}: {err})") from err


def _video_stream(path: str, container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams.video:
        kinds = ", ".join(s.type for s in container.streams) or "none"
        raise VideoDecodeError(path, f"no video stream (streams: {kinds})")
    return container.streams.video[0]


def probe_video(path: Source) -> dict[str, Any]:
    """Describe a video from its headers, without decoding frames.

    Returns ``duration`` (seconds, of the video stream), ``fps``, ``num_frames`` (exact when the
    container counts them, as mp4 does; else ``round(duration * fps)``), ``width``, ``height``,
    ``has_audio``, ``start_time`` (first frame time, seconds), ``video_codec``, ``audio_codec``
    and ``duration_source`` (where the duration came from: "stream" header, Matroska "tag",
    "container" duration, or "packets" read to the end).
    Raises :class:`VideoDecodeError` for a missing, empty or unreadable file or one without video.
    """
    source, path = path, _name(path)
    container = _open(source, path)
    try:
        stream = _video_stream(path, container)
        info = _stream_info(container, stream)
        audio = container.streams.audio[0] if container.streams.audio else None
        return {
            "path": path,
            "duration": info.duration,
            "fps": info.fps,
            "num_frames": info.num_frames,
            "width": info.width,
            "height": info.height,
            "has_audio": audio is not None,
            "start_time": info.t0,
            "video_codec": stream.codec_context.name,
            "audio_codec": audio.codec_context.name if audio is not None else None,
            "duration_source": info.duration_source,
        }
    except VideoDecodeError:
        raise
    except Exception as err:
        raise VideoDecodeError(path, f"cannot read the stream headers ({type(err).__name__}: {err})") from err
    finally:
        container.close()


# --------------------------------------------------------------------------- sampling


def sample_times(
    start: float,
    end: float,
    num_frames: int,
    sampling: Sampling = "middle",
    fps: float | None = None,
    t0: float = 0.0,
    rng: random.Random | None = None,
) -> list[float]:
    """Target times (seconds, increasing) of sparse segment sampling over ``[start, end)``.

    ``"middle"``/``"rand"``: ``num_frames`` equal segments, the middle of each / a uniformly random
    time inside each (``rng``, or the global ``random`` that Lightning and DataLoader workers seed).
    ``"uniform"``: evenly spaced from the first to the last frame of the span inclusive, where the
    frames are assumed to sit on the ``t0 + k / fps`` grid (the decoder then takes the nearest).
    """
    if sampling == "uniform":
        if fps is None:
            first, last = start, max(start, end - 1e-6)
        else:
            eps = 1e-6
            first_k = math.ceil((start - t0) * fps - eps)
            last_k = math.ceil((end - t0) * fps - eps) - 1
            first, last = t0 + first_k / fps, t0 + max(first_k, last_k) / fps
        if num_frames == 1:
            return [first]
        step = (last - first) / (num_frames - 1)
        return [first + i * step for i in range(num_frames)]
    seg = (end - start) / num_frames
    if sampling == "middle":
        return [start + (i + 0.5) * seg for i in range(num_frames)]
    draw = rng.random if rng is not None else random.random
    return [start + (i + draw()) * seg for i in range(num_frames)]


def _thread_type() -> str:
    if DECODER_THREAD_TYPE is not None:
        return DECODER_THREAD_TYPE
    return "NONE" if torch.utils.data.get_worker_info() is not None else "SLICE"


def _resized_hw(height: int, width: int, size: int | None) -> tuple[int, int]:
    """(height, width) with the short side = ``size``, aspect ratio kept (rounded half up)."""
    if size is None:
        return height, width
    if height <= width:
        return size, max(1, int(width * size / height + 0.5))
    return max(1, int(height * size / width + 0.5)), size


# --------------------------------------------------------------------------- PyAV video


def _keyframe_before(stream: av.video.stream.VideoStream, t: float) -> float | None:
    """Time of the last indexed keyframe at or before ``t``, or None when the index cannot answer
    (no index, or an index that stops before ``t`` — e.g. built incrementally while reading)."""
    entries = stream.index_entries
    n = len(entries)
    if n == 0:
        return None
    tb = stream.time_base
    ts = int(t / tb)
    if entries[n - 1].timestamp < ts:
        return None
    i = entries.search_timestamp(ts, backward=True)
    if i < 0:
        return None
    return float(entries[i].timestamp * tb)


class _SparseDecoder:
    """One sparse read with PyAV: seek (backward, to a keyframe) to a target, decode forward, give
    each target the frame nearest it among the frames whose pts lies in ``[start, end)``.

    The state (where the decoder is, the next target without a frame, the previous frame) is read by
    three decisions taken per packet or frame — seek or decode on, let the decoder skip unreferenced
    frames, which frame a target gets — so it lives on one object that these steps share.
    """

    def __init__(
        self,
        container: av.container.InputContainer,
        stream: av.video.stream.VideoStream,
        targets: list[float],
        start: float,
        end: float,
        info: _StreamInfo,
        size: int | None,
    ) -> None:
        self.container, self.stream, self.info, self.size = container, stream, info, size
        self.targets, self.start, self.end = targets, start, end
        self.tb = stream.time_base
        self.eps = float(self.tb) / 2 + 1e-9 if self.tb else 1e-6
        self.period = 1.0 / info.fps if info.fps else 1.0 / 30
        n = len(targets)
        self.images: list[np.ndarray | None] = [None] * n
        self.chosen_t = [0.0] * n
        self.reformatter = av.video.reformatter.VideoReformatter()
        # the last frame converted (repeats are adjacent)
        self.converted: tuple[Any, np.ndarray] | None = None
        self.prev: tuple[float, Any] | None = None  # (time, frame): the last frame inside the span
        # (time, frame): the last frame before the span, used if the span holds none
        self.before: tuple[float, Any] | None = None
        self.last_t = -math.inf  # time of the last frame the decoder produced
        self.decoded = 0
        self.i = 0  # the first target still without a frame
        self.seeked_for = -1
        self.error: Exception | None = None
        self.keyframes = [_keyframe_before(stream, t) for t in targets]  # asked once per decoded frame: cache
        self.skipping = False  # whether the codec context is set to skip unreferenced frames

    def should_seek(self, k: int) -> bool:
        position = self.info.t0 if self.last_t == -math.inf else self.last_t
        if self.keyframes[k] is not None:
            return self.keyframes[k] > position + MIN_SKIP_S
        return self.targets[k] - position > SEEK_AHEAD_S

    def frames(self):
        # Frames that nothing references (most B-frames) and that lie well before the next target can
        # be neither returned nor needed to decode another frame: let the decoder skip them. Decided per
        # packet from its own pts, before it is sent (frame threads copy the setting on submission), so
        # every frame within SKIP_MARGIN_PERIODS of a target is decoded in full.
        context = self.stream.codec_context
        tb_s = float(self.tb)
        margin = SKIP_MARGIN_PERIODS * self.period
        targets, n = self.targets, len(self.targets)
        for packet in self.container.demux(self.stream):
            skip = packet.pts is not None and self.i < n and packet.pts * tb_s < targets[self.i] - margin
            if skip != self.skipping and SKIP_NONREF:
                context.skip_frame = "NONREF" if skip else "DEFAULT"
                self.skipping = skip
            yield from packet.decode()

    def take(self, k: int, t: float, frame: Any) -> None:
        # convert (and resize) only the frames returned, as soon as they are known: the decoder
        # then never waits on more than two native-resolution frames held here
        if self.converted is None or self.converted[0] is not frame:
            h, w = _resized_hw(frame.height, frame.width, self.size)
            rgb = self.reformatter.reformat(
                frame, width=w, height=h, format="rgb24", interpolation="BILINEAR"
            )
            self.converted = (frame, rgb.to_ndarray())
        self.images[k], self.chosen_t[k] = self.converted[1], t

    def run(self) -> None:
        """Seek and decode until every target has a frame, the span or the stream ends, or the file
        breaks (the error is kept in ``error``; the frames decoded so far stay)."""
        n = len(self.targets)
        while self.i < n:
            if self.seeked_for != self.i and self.should_seek(self.i):
                self.seeked_for = self.i
                try:
                    target_ts = int(self.targets[self.i] / self.tb)
                    self.container.seek(target_ts, stream=self.stream, backward=True)
                except av.FFmpegError as err:
                    self.error = err
                    return
            if not self.decode_forward():
                return

    def decode_forward(self) -> bool:
        """Decode from the current position, giving frames to targets; True when a seek should be
        tried for the next target, False when decoding is over."""
        targets, n, eps, start, end = self.targets, len(self.targets), self.eps, self.start, self.end
        try:
            for frame in self.frames():
                self.decoded += 1
                if frame.pts is not None:
                    t = frame.time
                else:
                    t = self.last_t + self.period if self.decoded > 1 else self.info.t0
                if t <= self.last_t + eps:
                    continue  # a seek landed behind frames already seen
                self.last_t = t
                if t < start - eps:
                    self.before = (t, frame)
                    continue
                if t >= end - eps:
                    return False
                while self.i < n and targets[self.i] <= t + eps:
                    i = self.i
                    if self.prev is None or targets[i] - self.prev[0] > t - targets[i]:
                        self.take(i, t, frame)
                    else:
                        self.take(i, *self.prev)
                    self.i += 1
                self.prev = (t, frame)
                if self.i >= n:
                    return False
                if self.seeked_for != self.i and self.should_seek(self.i):
                    return True
        except Exception as err:  # a damaged packet: keep the frames decoded so far
            self.error = err
        return False


def _decode_pyav(
    path: str,
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    targets: list[float],
    start: float,
    end: float,
    info: _StreamInfo,
    size: int | None,
) -> tuple[list[np.ndarray], list[float], int]:
    """The frame nearest each target among the frames whose pts lies in ``[start, end)`` (ties go to
    the earlier frame), decoded by seeking and reading forward."""
    reader = _SparseDecoder(container, stream, targets, start, end, info, size)
    reader.run()
    error, n, i, period = reader.error, len(targets), reader.i, reader.period
    last = reader.prev or reader.before
    if last is None:
        reason = "no video frame could be decoded"
        if error is not None:
            reason += f" ({type(error).__name__}: {error})"
        raise VideoDecodeError(path, reason)
    if i < n:
        # the stream ended (or broke) before the last targets: repeat the last frame, the
        # documented behaviour for clips with fewer frames than requested
        if error is not None or targets[-1] - last[0] > SHORT_STREAM_PERIODS * period + (end - start) / n:
            cause = f" ({type(error).__name__}: {error})" if error is not None else ""
            warnings.warn(
                f"{path}: decodable video ends at {last[0]:.3f}s of a span up to {end:.3f}s{cause}; "
                f"repeating the last frame for {n - i} of {n} frames",
                RuntimeWarning,
                stacklevel=3,
            )
        for k in range(i, n):
            reader.take(k, *last)

    return reader.images, reader.chosen_t, reader.decoded


# --------------------------------------------------------------------------- audio


def _read_audio(
    container: av.container.InputContainer,
    stream: av.audio.stream.AudioStream,
    start: float,
    end: float,
) -> np.ndarray | None:
    """16 kHz mono float32 samples of ``[start, end)``; the span before the track starts is
    zero-filled so the features stay aligned with the frames. None when no audio lies in the span."""
    tb = stream.time_base
    container.seek(max(0, int(start / tb)), stream=stream, backward=True)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=AUDIO_RATE)
    chunks: list[np.ndarray] = []
    first_time = None
    for frame in container.decode(stream):
        if frame.pts is None or not frame.sample_rate:
            continue
        t = float(frame.pts * tb)
        if t + frame.samples / frame.sample_rate <= start:
            continue
        if t >= end:
            break
        if first_time is None:
            first_time = t
        chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(frame))
    if first_time is None:
        return None
    chunks.extend(out.to_ndarray().reshape(-1) for out in resampler.resample(None))
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    offset = round((start - first_time) * AUDIO_RATE)
    if offset >= 0:
        wave = wave[offset:]
    else:
        wave = np.concatenate([np.zeros(-offset, np.float32), wave])
    wave = wave[: round((end - start) * AUDIO_RATE)]
    return wave if wave.size else None


def audio_seconds(num_frames: int) -> float:
    """The sound that ``num_frames`` kaldi fbank frames cover (25 ms windows every 10 ms)."""
    return (num_frames - 1) * FBANK_HOP_S + FBANK_WINDOW_S


def audio_window(
    start: float, end: float, frame_times: list[float], max_frames: int | None
) -> tuple[float, float]:
    """The part of ``[start, end)`` whose sound goes with the sampled frames, as ``(start, end)``.

    The whole span when its fbank has at most ``max_frames`` frames (or ``max_frames`` is None);
    otherwise the ``max_frames`` frames' worth of sound centred on the middle of the sampled frames
    (first to last ``frame_times``), moved inside the span where the centre lies near its edge.

    Cropping rather than resampling the spectrogram in time: every fbank frame then stays 10 ms of
    sound and a 16-frame audio patch 160 ms, for every clip length, as in the audio encoders'
    pretraining (BEATs and AST crop to a fixed length, and the official recipe keeps at most 10 s);
    squeezing a minute into ``max_frames`` frames would smear each sound over a different time scale
    per clip. The window is centred on the frames, so the sound in it is what they show (with
    ``"rand"`` sampling it moves with the frames, a small augmentation).
    """
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_audio_frames must be >= 1 or None; got {max_frames}")
    # a span shorter than max_frames + 1 frames' worth of sound gives at most max_frames frames
    if max_frames is None or end - start < audio_seconds(max_frames + 1):
        return start, end
    length = audio_seconds(max_frames)
    centre = (frame_times[0] + frame_times[-1]) / 2 if frame_times else (start + end) / 2
    lo = min(max(centre - length / 2, start), end - length)
    return lo, lo + length


def _audio_features(
    path: str, container: av.container.InputContainer, start: float, end: float, num_mel_bins: int
) -> torch.Tensor | None:
    try:
        if not container.streams.audio:
            return None
        wave = _read_audio(container, container.streams.audio[0], start, end)
        if wave is None:
            return None
        return compute_fbank(
            torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), AUDIO_RATE, num_mel_bins
        )
    except Exception as err:  # a bad audio track must not cost the (good) video
        warnings.warn(
            f"{path}: audio track unreadable ({type(err).__name__}: {err}); returning audio=None",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


# --------------------------------------------------------------------------- torchcodec


@lru_cache(maxsize=1)
def torchcodec_error() -> str | None:
    """None when torchcodec imports and its FFmpeg libraries load; else why not."""
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as err:  # ImportError, or RuntimeError/OSError when FFmpeg's libraries are missing
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return None


def _decode_torchcodec(
    source: Source,
    targets: list[float],
    start: float,
    end: float,
    info: _StreamInfo,
    size: int | None,
) -> tuple[list[np.ndarray], list[float]]:
    """Same frame choice as PyAV for constant-frame-rate files: torchcodec answers "the frame shown
    at time q", so asking at ``target + period / 2`` gives the frame nearest the target, clamped to
    the frames of the span."""
    from torchcodec.decoders import VideoDecoder
    from torchcodec.transforms import Resize

    h, w = _resized_hw(info.height, info.width, size)
    transforms = [Resize(size=(h, w))] if size is not None else None
    if _is_file_object(source):
        # PyAV holds the file object open; torchcodec gets its own copy of the bytes rather than
        # moving the shared file position under PyAV's feet
        position = source.tell()
        source.seek(0)
        data = source.read()
        source.seek(position)
        source = data
    decoder = VideoDecoder(
        source, dimension_order="NHWC", seek_mode="approximate", num_ffmpeg_threads=0, transforms=transforms
    )
    period = 1.0 / info.fps if info.fps else 1.0 / 30
    first = info.t0 + math.ceil((start - info.t0) / period - 1e-6) * period
    last = info.t0 + (math.ceil((end - info.t0) / period - 1e-6) - 1) * period
    last = max(first, min(last, info.t0 + info.duration - period))
    queries = [min(max(t + period / 2 - 1e-6, first + period / 4), last + period / 2) for t in targets]
    batch = decoder.get_frames_played_at(seconds=queries)
    data = batch.data.numpy()
    return [data[k] for k in range(len(targets))], [float(t) for t in batch.pts_seconds]


# --------------------------------------------------------------------------- public entry point


def _check_clip_args(
    num_frames: int,
    sampling: str,
    backend: str,
    size: int | None,
    num_mel_bins: int,
    max_audio_frames: int | None,
) -> None:
    """ValueError for an argument of :func:`read_clip` that no file could satisfy."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be an integer >= 1; got {num_frames!r}")
    if sampling not in SAMPLINGS:
        raise ValueError(f"unknown sampling {sampling!r}; expected one of {', '.join(SAMPLINGS)}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive integer or None; got {size!r}")
    if num_mel_bins < 1:
        raise ValueError(f"num_mel_bins must be >= 1; got {num_mel_bins}")
    if max_audio_frames is not None and (isinstance(max_audio_frames, bool) or max_audio_frames < 1):
        raise ValueError(f"max_audio_frames must be an integer >= 1 or None; got {max_audio_frames!r}")


def _clip_span(path: str, info: _StreamInfo, start: float | None, end: float | None) -> tuple[float, float]:
    """The span ``[start, end)`` in seconds: the whole video by default, ``end`` clamped to the end of
    the video; :class:`VideoDecodeError` for a span that starts outside the video or is empty."""
    video_end = info.t0 + info.duration
    span_start = info.t0 if start is None else float(start)
    span_end = video_end if end is None else min(float(end), video_end)
    span = f"[{start}, {end})"
    if span_start < 0:
        raise VideoDecodeError(path, f"span {span} starts before 0 s (video duration {info.duration:.3f}s)")
    if span_start >= video_end:
        raise VideoDecodeError(
            path, f"span {span} starts at or after the end of the video (duration {info.duration:.3f}s)"
        )
    if span_end <= span_start:
        raise VideoDecodeError(path, f"span {span} is empty (video duration {info.duration:.3f}s)")
    return span_start, span_end


def read_clip(
    path: Source,
    num_frames: int = 8,
    sampling: Sampling = "middle",
    size: int | None = 224,
    start: float | None = None,
    end: float | None = None,
    audio: bool = True,
    num_mel_bins: int = 128,
    backend: Backend = "auto",
    rng: random.Random | None = None,
    max_audio_frames: int | None = None,
) -> Clip:
    """Decode ``num_frames`` frames (and the audio) of ``[start, end)`` of a video file.

    Sampling (UMT / InternVideo2 sparse segment sampling, in seconds): the span is cut into
    ``num_frames`` equal segments; ``"middle"`` takes the segment middles (evaluation), ``"rand"``
    a uniformly random time inside each segment (training; ``rng`` or the global ``random``),
    ``"uniform"`` evenly spaced times from the first to the last frame of the span. Each target
    time maps to the frame whose presentation time is **nearest** (ties: the earlier frame) among
    the frames with pts in ``[start, end)``; ``frame_times`` are those frames' times, so they may
    repeat. A clip with fewer frames than ``num_frames`` is not an error: targets share their
    nearest frame, i.e. frames repeat. A file whose decodable frames stop well before its declared
    duration (truncated, damaged) gives what decodes, repeats the last frame and warns.

    ``start``/``end`` are presentation times in seconds (the first frame of almost every file is at
    0); by default the whole video. ``start < 0``, ``start`` at or past the end of the video, or
    ``end <= start`` raise :class:`VideoDecodeError`; ``end`` past the end of the video is clamped
    to it. ``size`` resizes the short side to ``size`` (aspect kept, bilinear, while converting each
    returned frame to RGB); None keeps the stored resolution (sample aspect ratio and rotation
    metadata are not applied).

    ``audio``: the audio track over ``[start, end)`` as a kaldi fbank ``[F, num_mel_bins]`` (16 kHz
    mono, 10 ms hop: F ≈ 100 per second), None when the file has no audio track; an unreadable
    audio track warns and gives None. ``max_audio_frames``: at most that many fbank frames; a longer
    span's sound is cropped to the window centred on the sampled frames (see :func:`audio_window`
    for why a crop), and only that window is decoded. None keeps the whole span. ``backend``:
    ``"auto"`` and ``"pyav"`` decode with PyAV (the reference); ``"torchcodec"`` uses torchcodec and
    raises :class:`VideoDecodeError` if it cannot be loaded. Audio is always read with PyAV.

    ``path`` may also be a seekable binary file object (``io.BytesIO`` of a file read from a shard);
    errors then name it by its ``name`` attribute, or its type.

    Raises ValueError for invalid arguments and :class:`VideoDecodeError` (with ``path`` and
    ``reason``) for any file that cannot give the clip.
    """
    _check_clip_args(num_frames, sampling, backend, size, num_mel_bins, max_audio_frames)
    source, path = path, _name(path)
    use = "pyav" if backend == "auto" else backend
    if use == "torchcodec" and torchcodec_error() is not None:
        raise VideoDecodeError(
            path, f"backend='torchcodec' requested but torchcodec cannot load ({torchcodec_error()})"
        )

    container = _open(source, path)
    try:
        stream = _video_stream(path, container)
        stream.thread_type = _thread_type()
        info = _stream_info(container, stream)
        span_start, span_end = _clip_span(path, info, start, end)
        targets = sample_times(span_start, span_end, num_frames, sampling, info.fps, info.t0, rng)

        decoded: int | None = None
        if use == "pyav":
            frames, times, decoded = _decode_pyav(
                path, container, stream, targets, span_start, span_end, info, size
            )
        else:
            frames, times = _decode_torchcodec(source, targets, span_start, span_end, info, size)
        fbank, audio_span = None, None
        if audio:
            audio_span = audio_window(span_start, span_end, list(times), max_audio_frames)
            fbank = _audio_features(path, container, *audio_span, num_mel_bins)
            if fbank is not None and max_audio_frames is not None:
                fbank = fbank[:max_audio_frames]  # sample rounding must not add a frame
    except VideoDecodeError:
        raise
    except Exception as err:  # whatever a damaged file makes PyAV raise, name the file and the cause
        raise VideoDecodeError(path, f"decoding failed ({type(err).__name__}: {err})") from err
    finally:
        container.close()

    video = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).contiguous()
    return Clip(
        video=video,
        frame_times=times,
        audio=fbank,
        fps=info.fps if info.fps is not None else float("nan"),
        duration=info.duration,
        path=path,
        start=span_start,
        end=span_end,
        backend=use,
        decoded_frames=decoded,
        audio_span=audio_span if fbank is not None else None,
    )


__all__ = [
    "Clip",
    "VideoDecodeError",
    "audio_seconds",
    "audio_window",
    "probe_video",
    "read_clip",
    "sample_times",
    "torchcodec_error",
]
