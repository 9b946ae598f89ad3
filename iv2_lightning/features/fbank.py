"""Kaldi fbank features of a waveform, as the audio encoder expects them (BEATs' ``preprocess``).

The official InternVideo2 6B model encodes audio with BEATs over 16 kHz kaldi fbank features
(≤ 10 s, 128 mel bins, normalised with BEATs' AudioSet constants mean 15.41663, std 6.55582 × 2;
arXiv 2403.15377, Sec. 3.2). The data layer computes the features once per clip and the
``AudioEncoder`` normalises them, so both import this module; it lives outside ``models/`` so that
``data/`` never imports ``models/``. ``iv2_lightning.models.audio`` re-exports it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchaudio

SAMPLE_RATE = 16_000
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582


def compute_fbank(
    waveform: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int = 128,
    window_type: str = "povey",
) -> torch.Tensor:
    """Log-mel kaldi filterbank ``[F, num_mel_bins]`` of a waveform ``[C, S]`` or ``[S]`` in [-1, 1].

    Channels are averaged to mono and the signal is resampled to 16 kHz. The waveform is scaled to
    the 16-bit integer range before the fbank because ``FBANK_MEAN``/``FBANK_STD`` were measured
    that way (BEATs ``preprocess``); ``window_type`` defaults to kaldi's ``povey``, the window those
    constants come from ("hanning" gives the AST-style features).
    """
    if waveform.dim() == 1:
        waveform = waveform[None]
    if waveform.dim() != 2:
        raise ValueError(f"compute_fbank expects a waveform [C, S] or [S]; got shape {tuple(waveform.shape)}")
    if sample_rate <= 0:
        raise ValueError(f"compute_fbank: sample_rate must be positive; got {sample_rate}")
    mono = waveform.float().mean(dim=0, keepdim=True)
    if sample_rate != SAMPLE_RATE:
        mono = torchaudio.functional.resample(mono, sample_rate, SAMPLE_RATE)
    window = int(SAMPLE_RATE * 0.025)
    if mono.shape[1] < window:
        # kaldi returns zero frames for clips shorter than one window; one zero-padded frame keeps
        # a very short clip usable (the encoder pads and masks the rest)
        mono = F.pad(mono, (0, window - mono.shape[1]))
    return torchaudio.compliance.kaldi.fbank(
        mono * 2**15,
        num_mel_bins=num_mel_bins,
        sample_frequency=SAMPLE_RATE,
        frame_length=25.0,
        frame_shift=10.0,
        dither=0.0,
        window_type=window_type,
    )
