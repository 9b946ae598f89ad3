"""Audio side of InternVideo2: kaldi fbank features and a patch transformer over them.

InternVideo2 stage 2 (arXiv 2403.15377, Sec. 3.2) aligns video with the audio track through an
audio encoder: the official 6B model uses a frozen BEATs over 16 kHz kaldi fbank features
(≤ 10 s, 128 mel bins, normalised with BEATs' AudioSet constants mean 15.41663, std 6.55582 × 2)
and mean-pools it into ``audio_proj``. ``AudioEncoder`` follows the same input convention with a
small trainable transformer in the AST/BEATs style: the spectrogram is a 1-channel image
``[F frames × 128 bins]`` cut into 16×16 patches, with a cls token and a 2D sin-cos position table
built for the actual (time, frequency) grid, so clips of any length up to ``max_frames`` work
without interpolating a learned table.

``compute_fbank`` turns a waveform into those features, as the official BEATs ``preprocess`` does
(16-bit scale, 25 ms / 10 ms frames, no dither); the data layer calls it once per clip. It lives in
:mod:`iv2_lightning.features.fbank` (which ``data/`` imports too) and is re-exported here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# compute_fbank moved to features/ (data/ must not import models/); re-exported for old imports
from iv2_lightning.features.fbank import FBANK_MEAN, FBANK_STD, SAMPLE_RATE, compute_fbank
from iv2_lightning.models.attention import Backend
from iv2_lightning.models.layers import Block, make_norm
from iv2_lightning.models.pos_embed import sincos_2d

__all__ = ["FBANK_MEAN", "FBANK_STD", "SAMPLE_RATE", "AudioEncoder", "AudioOutput", "compute_fbank"]


class AudioOutput(NamedTuple):
    """``cls [B, D]``, patch ``tokens [B, N, D]``, ``mask [B, N]`` (True = real patch)
    (a NamedTuple so that DeepSpeed ZeRO-3 sees its tensors, see ``VideoEncoderOutput``)."""

    cls: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


class AudioEncoder(nn.Module):
    """Patch transformer over normalised fbank features (AST / BEATs input convention).

    ``forward(fbank [B, F, num_mel_bins], frame_mask [B, F] | None) -> AudioOutput``. Padded frames
    (``frame_mask`` False) and the zero frames appended to fill the last patch are set to 0 after
    normalisation, and a patch is real when its first frame is real; padded patches are never
    attended to, so the output at real patches and ``cls`` do not depend on the padding.
    """

    def __init__(
        self,
        num_mel_bins: int = 128,
        dim: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        patch_stride: int | None = None,
        max_frames: int = 1024,
        fbank_mean: float = FBANK_MEAN,
        fbank_std: float = FBANK_STD,
        drop_path_rate: float = 0.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        patch_stride = patch_size if patch_stride is None else patch_stride
        if not 0 < patch_stride <= patch_size:
            raise ValueError(f"patch_stride must be in [1, patch_size={patch_size}]; got {patch_stride}")
        if num_mel_bins < patch_size:
            raise ValueError(f"num_mel_bins {num_mel_bins} is smaller than patch_size {patch_size}")
        if dim % 4 != 0:
            raise ValueError(f"AudioEncoder dim must be divisible by 4 for the 2D sin-cos table; got {dim}")
        self.num_mel_bins = num_mel_bins
        self.dim = self.embed_dim = dim
        self.depth = depth
        self.patch_size = patch_size
        self.patch_stride = patch_stride
        self.max_frames = max_frames
        self.fbank_mean = fbank_mean
        self.fbank_std = fbank_std
        self.num_freq_patches = (num_mel_bins - patch_size) // patch_stride + 1
        self.patch_embed = nn.Conv2d(1, dim, kernel_size=patch_size, stride=patch_stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist() if depth > 0 else []
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                int(dim * mlp_ratio),
                norm="layernorm",
                qk_norm=False,
                qkv_bias=True,
                layerscale_init=None,
                drop_path=rate,
                backend=backend,
            )
            for rate in rates
        )
        self.norm = make_norm("layernorm", dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # patch projection initialised like a Linear over the flattened patch (MAE/BEiT practice)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def num_time_patches(self, num_frames: int) -> int:
        """Time patches for ``num_frames`` frames once the tail is padded to fill the last patch."""
        span = max(num_frames, self.patch_size) - self.patch_size
        return -(-span // self.patch_stride) + 1

    def forward(self, fbank: torch.Tensor, frame_mask: torch.Tensor | None = None) -> AudioOutput:
        if fbank.dim() != 3 or fbank.shape[-1] != self.num_mel_bins:
            raise ValueError(
                f"AudioEncoder expects fbank [B, F, {self.num_mel_bins}]; got shape {tuple(fbank.shape)}"
            )
        b, frames, _ = fbank.shape
        if frames > self.max_frames:
            raise ValueError(
                f"AudioEncoder: audio has {frames} frames, more than max_frames {self.max_frames}"
            )
        if frame_mask is None:
            frame_mask = torch.ones(b, frames, dtype=torch.bool, device=fbank.device)
        elif frame_mask.shape != (b, frames):
            raise ValueError(
                f"AudioEncoder expects frame_mask [B, F] = {(b, frames)} like fbank; got {tuple(frame_mask.shape)}"
            )
        frame_mask = frame_mask.to(device=fbank.device, dtype=torch.bool)

        x = (fbank - self.fbank_mean) / (2 * self.fbank_std)
        # zero the padded frames so a real patch that overlaps the padding sees the same input
        # whatever the padding holds (the data layer pads with anything it likes)
        x = x.masked_fill(~frame_mask[..., None], 0.0)
        n_time = self.num_time_patches(frames)
        pad = (n_time - 1) * self.patch_stride + self.patch_size - frames
        if pad > 0:
            x = F.pad(x, (0, 0, 0, pad))
            frame_mask = F.pad(frame_mask, (0, pad), value=False)

        x = self.patch_embed(x[:, None].to(self.patch_embed.weight.dtype))  # [B, D, T', F']
        x = x.flatten(2).transpose(1, 2)  # [B, T' * F', D], time-major like the table below
        pos = sincos_2d(self.dim, n_time, self.num_freq_patches).to(device=x.device, dtype=x.dtype)
        x = x + pos[None]
        x = torch.cat([self.cls_token.to(x.dtype).expand(b, -1, -1), x], dim=1)

        patch_real = frame_mask[:, :: self.patch_stride][:, :n_time]  # a patch's first frame decides
        patch_mask = patch_real[:, :, None].expand(b, n_time, self.num_freq_patches).reshape(b, -1)
        key_mask = torch.cat([patch_mask.new_ones(b, 1), patch_mask], dim=1)
        for block in self.blocks:
            x = block(x, key_padding_mask=key_mask)
        x = self.norm(x)
        return AudioOutput(cls=x[:, 0], tokens=x[:, 1:], mask=patch_mask)
