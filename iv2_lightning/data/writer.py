"""Write video files (with an optional audio track) with PyAV.

Used by ``iv2 synth`` to turn synthetic clips into real, playable media, and by the tests to make
mp4 / webm / mkv fixtures. The container follows the file suffix; the default codecs are the ones
each container commonly carries (H.264 + AAC in mp4 and mkv, VP9 + Opus in webm).
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

DEFAULT_CODECS = {".mp4": ("libx264", "aac"), ".mkv": ("libx264", "aac"), ".webm": ("libvpx-vp9", "libopus")}


def _as_uint8_frames(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] (uint8 RGB); got shape {tuple(arr.shape)}")
    if arr.dtype != np.uint8:
        arr = np.clip(np.rint(arr * 255.0) if arr.dtype.kind == "f" and arr.max() <= 1.0 else arr, 0, 255)
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def write_video(
    path: str | os.PathLike,
    frames: torch.Tensor | np.ndarray,
    fps: float = 8.0,
    audio: torch.Tensor | np.ndarray | None = None,
    sample_rate: int = 16000,
    video_codec: str | None = None,
    audio_codec: str | None = None,
    crf: int = 18,
) -> Path:
    """Encode ``frames [T, H, W, 3]`` (uint8, or float in [0, 1]) and an optional mono or
    ``[C, S]`` waveform in [-1, 1] into ``path``. H and W must be even for yuv420p codecs.

    The file is written to a temporary name and renamed, so a crash never leaves half a file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in DEFAULT_CODECS and (video_codec is None or (audio is not None and audio_codec is None)):
        raise ValueError(
            f"unknown container {suffix!r} for {path}; use one of {sorted(DEFAULT_CODECS)} or name the codecs"
        )
    v_codec, a_codec = DEFAULT_CODECS.get(suffix, (None, None))
    v_codec, a_codec = video_codec or v_codec, audio_codec or a_codec
    arr = _as_uint8_frames(frames)
    h, w = arr.shape[1:3]
    if h % 2 or w % 2:
        raise ValueError(f"frame size {h} x {w} must be even for yuv420p video ({path})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(tmp), mode="w") as container:
        vstream = _add_video_stream(container, v_codec, rate, w, h, crf)
        astream = wave = None
        if audio is not None:
            wave = audio.detach().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio)
            wave = np.atleast_2d(wave).astype(np.float32)
            astream = container.add_stream(a_codec, rate=sample_rate)
            astream.layout = "mono" if wave.shape[0] == 1 else "stereo"
        for frame in arr:
            for packet in vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in vstream.encode():
            container.mux(packet)
        if astream is not None:
            _encode_audio(container, astream, wave, sample_rate)
    os.replace(tmp, path)
    return path


def _add_video_stream(
    container: av.container.OutputContainer, codec: str, rate: Fraction, width: int, height: int, crf: int
) -> av.video.stream.VideoStream:
    """A yuv420p video stream; ``crf`` is on x264's scale (VP9 is given ``crf + 14``)."""
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if codec in ("libx264", "h264"):
        stream.options = {"crf": str(crf), "preset": "veryfast"}
    elif codec == "libvpx-vp9":
        stream.options = {"crf": str(crf + 14), "b:v": "0", "deadline": "realtime", "cpu-used": "8"}
    return stream


def _encode_audio(
    container: av.container.OutputContainer,
    stream: av.audio.stream.AudioStream,
    wave: np.ndarray,
    sample_rate: int,
) -> None:
    """The whole waveform ``[C, S]`` as one frame, clipped to [-1, 1], starting at 0."""
    audio_frame = av.AudioFrame.from_ndarray(
        np.ascontiguousarray(np.clip(wave, -1.0, 1.0)), format="fltp", layout=stream.layout.name
    )
    audio_frame.sample_rate = sample_rate
    # an explicit start at 0: without it the AAC encoder's priming delay shifts the track late
    audio_frame.pts = 0
    audio_frame.time_base = Fraction(1, sample_rate)
    for packet in stream.encode(audio_frame):
        container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
