"""The sound of a synthetic clip: one gliding harmonic tone per object at 16 kHz.

The tone ties the audio track to the scene, so stage-2 alignment (arXiv 2403.15377 Sec. 3.2: video,
audio, speech and text in one space) has something to align: base pitch names the shape, timbre
(harmonic amplitudes) the colour, loudness the size, and the pitch glides *up* for right/up and
*down* for left/down, direction information that only the order of the samples carries. Like the
renderer it uses NumPy, which starts no worker threads.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from iv2_lightning.data.synthetic.scene import ClipParams

SAMPLE_RATE = 16_000

# audio: base pitch per shape (Hz), harmonic amplitudes per colour, loudness per size
_BASE_HZ = {"circle": 220.0, "square": 330.0, "triangle": 494.0, "cross": 740.0}
_HARMONICS = {
    "red": (1.0, 0.5, 0.33, 0.25),
    "green": (1.0,),
    "blue": (1.0, 0.0, 0.33, 0.0, 0.2),
    "yellow": (1.0, 0.6, 0.0, 0.3),
}
_LOUDNESS = {"small": 0.35, "large": 0.6}
_GLIDE_OCTAVES = 0.5  # total pitch change over the clip; ranges of different shapes never overlap


def synthesize_audio(params: ClipParams, fps: float = 8.0, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """float32 ``[round(T / fps * sample_rate)]`` waveform in [-1, 1]: one gliding tone per object."""
    n = max(1, round(params.num_frames / fps * sample_rate))
    u = np.arange(n, dtype=np.float64) / max(n - 1, 1)  # 0 -> 1 over the clip
    wave = np.zeros(n, dtype=np.float64)
    for obj in params.objects:
        sign = 1.0 if obj.direction in ("right", "up") else -1.0
        freq = _BASE_HZ[obj.shape] * np.power(2.0, sign * _GLIDE_OCTAVES * (u - 0.5))
        phase = 2 * math.pi * np.cumsum(freq) / sample_rate
        amps = _HARMONICS[obj.color]
        tone = np.zeros(n, dtype=np.float64)
        for h, amp in enumerate(amps, start=1):
            if amp > 0 and h * _BASE_HZ[obj.shape] * 2**_GLIDE_OCTAVES < sample_rate / 2:
                tone += amp * np.sin(h * phase)
        wave += _LOUDNESS[obj.size] * tone / sum(amps)
    wave /= len(params.objects)
    ramp = min(n // 2, max(1, round(0.015 * sample_rate)))  # 15 ms fades: no clicks at the edges
    env = np.ones(n, dtype=np.float64)
    env[:ramp] = np.linspace(0, 1, ramp)
    env[n - ramp :] = np.linspace(1, 0, ramp)
    return torch.from_numpy(np.clip(wave * env, -1, 1).astype(np.float32))


__all__ = ["SAMPLE_RATE", "synthesize_audio"]
