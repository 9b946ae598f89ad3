"""Audio encoder and fbank features: shapes for any length, padding invariance, gradients, errors,
and a spectral sanity check of ``compute_fbank`` on pure tones."""

from __future__ import annotations

import math

import pytest
import torch

from iv2_lightning.models.audio import FBANK_MEAN, AudioEncoder, AudioOutput, compute_fbank


def tiny_encoder(**kw) -> AudioEncoder:
    torch.manual_seed(0)
    args = dict(dim=32, depth=2, num_heads=2, mlp_ratio=2.0, max_frames=256)
    args.update(kw)
    return AudioEncoder(**args).eval()


def fake_fbank(b: int, frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return FBANK_MEAN + 6.0 * torch.randn(b, frames, 128, generator=g)


# --------------------------------------------------------------------------- AudioEncoder


@pytest.mark.parametrize(
    ("frames", "stride", "time_patches", "freq_patches"),
    [
        (96, None, 6, 8),  # exact multiple of the patch
        (90, None, 6, 8),  # tail padded to 96
        (5, None, 1, 8),  # shorter than one patch
        (100, 10, 10, 12),  # overlapping patches: (100 - 16) / 10 rounded up, + 1
    ],
)
def test_audio_encoder_shapes(frames, stride, time_patches, freq_patches):
    enc = tiny_encoder(patch_stride=stride)
    out = enc(fake_fbank(2, frames))
    n = time_patches * freq_patches
    assert isinstance(out, AudioOutput)
    assert out.cls.shape == (2, 32) and out.tokens.shape == (2, n, 32) and out.mask.shape == (2, n)
    assert out.mask.all()  # every patch starts on a real frame
    assert torch.isfinite(out.tokens).all()
    assert enc.dim == enc.embed_dim == 32


def test_audio_encoder_mask_follows_frame_mask():
    enc = tiny_encoder()
    frame_mask = torch.ones(2, 100, dtype=torch.bool)
    frame_mask[1, 40:] = False
    out = enc(fake_fbank(2, 100), frame_mask)
    # 7 time patches start at frames 0, 16, ..., 96; sample 1 has real starts 0, 16, 32 only
    assert out.mask.shape == (2, 7 * 8)
    assert out.mask[0].all()
    assert out.mask[1].view(7, 8).all(dim=1).tolist() == [True] * 3 + [False] * 4


def test_audio_encoder_is_invariant_to_padded_frames():
    enc = tiny_encoder()
    fbank = fake_fbank(2, 100)
    frame_mask = torch.ones(2, 100, dtype=torch.bool)
    frame_mask[1, 40:] = False
    noisy = fbank.clone()
    noisy[1, 40:] = fake_fbank(1, 60, seed=3)[0] * 3.0
    a = enc(fbank, frame_mask)
    b = enc(noisy, frame_mask)
    m = a.mask
    assert torch.allclose(a.cls, b.cls, atol=1e-5)
    assert torch.allclose(a.tokens[m], b.tokens[m], atol=1e-5)
    # the padded sample equals the same clip given alone, unpadded: 40 frames, 3 time patches
    alone = enc(fbank[1:, :40])
    assert alone.tokens.shape == (1, 3 * 8, 32)
    assert torch.allclose(alone.cls[0], a.cls[1], atol=1e-5)
    assert torch.allclose(alone.tokens[0], a.tokens[1][m[1]], atol=1e-5)
    # and the clip really is encoded: a different clip gives a different cls
    assert (enc(fbank[:1, :40]).cls - alone.cls).abs().max() > 1e-3


def test_audio_encoder_gradient_reaches_every_parameter():
    enc = tiny_encoder(drop_path_rate=0.1).train()
    frame_mask = torch.ones(2, 50, dtype=torch.bool)
    frame_mask[0, 30:] = False
    out = enc(fake_fbank(2, 50), frame_mask)
    torch.manual_seed(1)
    # a random projection: a plain sum would be flat through the final LayerNorm
    loss = (out.tokens * torch.randn_like(out.tokens)).sum() + (out.cls * torch.randn_like(out.cls)).sum()
    loss.backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_audio_encoder_errors():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match=r"AudioEncoder: audio has 257 frames, more than max_frames 256"):
        enc(fake_fbank(1, 257))
    with pytest.raises(ValueError, match=r"AudioEncoder expects fbank \[B, F, 128\]; got shape \(50, 128\)"):
        enc(fake_fbank(1, 50)[0])
    with pytest.raises(
        ValueError, match=r"AudioEncoder expects fbank \[B, F, 128\]; got shape \(1, 50, 64\)"
    ):
        enc(torch.zeros(1, 50, 64))
    with pytest.raises(
        ValueError, match=r"AudioEncoder expects frame_mask \[B, F\] = \(1, 50\) like fbank; got \(1, 49\)"
    ):
        enc(fake_fbank(1, 50), torch.ones(1, 49, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"patch_stride must be in \[1, patch_size=16\]; got 20"):
        AudioEncoder(patch_stride=20)


# --------------------------------------------------------------------------- compute_fbank


def kaldi_mel_bin(freq: float, num_bins: int = 128, low: float = 20.0, high: float = 8000.0) -> float:
    """Index of the mel filter centred on ``freq`` (kaldi's mel scale and equally spaced centres)."""

    def mel(f: float) -> float:
        return 1127.0 * math.log(1.0 + f / 700.0)

    delta = (mel(high) - mel(low)) / (num_bins + 1)
    return (mel(freq) - mel(low)) / delta - 1.0


def tone(freq: float, sample_rate: int, seconds: float = 1.0, channels: int = 2) -> torch.Tensor:
    t = torch.arange(int(sample_rate * seconds)) / sample_rate
    return (0.5 * torch.sin(2 * math.pi * freq * t)).expand(channels, -1).contiguous()


def test_compute_fbank_puts_a_tone_in_its_mel_bin():
    low = compute_fbank(tone(440.0, 44_100), 44_100)
    high = compute_fbank(tone(3000.0, 44_100), 44_100)
    # 1 s at 16 kHz, 25 ms windows every 10 ms: 1 + (16000 - 400) // 160 = 98 frames
    assert low.shape == high.shape == (98, 128)
    bin_440, bin_3k = kaldi_mel_bin(440.0), kaldi_mel_bin(3000.0)
    peak_low = int(low.mean(dim=0).argmax())
    peak_high = int(high.mean(dim=0).argmax())
    assert abs(peak_low - bin_440) <= 1.5, (peak_low, bin_440)
    assert abs(peak_high - bin_3k) <= 1.5, (peak_high, bin_3k)
    # the 440 Hz tone carries far more energy than the 3 kHz one around 440 Hz, and the reverse
    near_440 = slice(round(bin_440) - 1, round(bin_440) + 2)
    near_3k = slice(round(bin_3k) - 1, round(bin_3k) + 2)
    assert low[:, near_440].mean() > high[:, near_440].mean() + 5.0
    assert high[:, near_3k].mean() > low[:, near_3k].mean() + 5.0


def test_compute_fbank_mono_and_short_clips():
    wave = tone(440.0, 16_000, seconds=0.5, channels=1)
    mono = compute_fbank(wave[0], 16_000)
    assert mono.shape == (48, 128)
    assert torch.allclose(compute_fbank(wave.expand(2, -1), 16_000), mono)
    # a clip shorter than one 25 ms window still gives one frame instead of an empty tensor
    assert compute_fbank(wave[:, :100], 16_000).shape == (1, 128)
    with pytest.raises(
        ValueError, match=r"compute_fbank expects a waveform \[C, S\] or \[S\]; got shape \(1, 1, 8000\)"
    ):
        compute_fbank(wave[None], 16_000)


def test_fbank_feeds_the_encoder():
    fbank = compute_fbank(tone(440.0, 22_050, seconds=0.6), 22_050)
    out = tiny_encoder()(fbank[None])
    assert out.tokens.shape == (1, 4 * 8, 32)  # 58 frames → 4 time patches
    assert torch.isfinite(out.cls).all()
