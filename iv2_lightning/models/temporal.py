"""Hierarchical Temporal Encoder (HTE): long videos as windows, then attention across windows.

The InternVideo2 paper summary describes chunking a long video into temporal windows, encoding
them and aggregating at a higher level so length does not cost quadratic attention. Here:

1. the clip ``[B, 3, T_long, H, W]`` is cut into windows of ``window`` frames (the last window is
   padded by repeating the final frame, and marked as padded in ``frame_mask``);
2. each window goes through the :class:`~iv2_lightning.models.backbone.VideoEncoder` on its own,
   several windows per batch, so no attention ever spans more than one window of frames;
3. an attention pool with ``tokens_per_window`` learned queries reduces each window to k tokens;
4. a small transformer attends over all window tokens (with a sin-cos position of the window in
   time) and a global cls token gives the clip embedding.

Activations of steps 2-3 scale with the number of windows (linear in ``T_long``); step 4 is
quadratic only in ``num_windows * k``, a few hundred tokens for minutes of video.

``aggregate="mean"`` replaces step 4 by the mean of the window tokens (the baseline: order-free
across windows, whatever each window holds). ``own_encoder=False`` keeps the encoder out of this
module's parameters and state dict, for an owner that already holds it under its own name (the
classifier's ``video_encoder``), so checkpoints keep one copy of the trunk under the usual keys.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from iv2_lightning.models.attention import Backend
from iv2_lightning.models.backbone import VideoEncoder
from iv2_lightning.models.layers import AttentionPool, Block
from iv2_lightning.models.pos_embed import sincos_1d


class HTEOutput(NamedTuple):
    """``embedding [B, E]`` for the whole clip; ``window_tokens [B, W, k, D]`` after the temporal
    transformer; ``window_embeddings [B, W, E_enc]`` the encoder's pooled output per window;
    ``window_mask [B, W]`` True where a window holds at least one real frame (see ``frame_mask``)
    (a NamedTuple so that DeepSpeed ZeRO-3 sees its tensors, see ``VideoEncoderOutput``)."""

    embedding: torch.Tensor
    window_tokens: torch.Tensor
    window_embeddings: torch.Tensor
    window_mask: torch.Tensor


class HierarchicalTemporalEncoder(nn.Module):
    def __init__(
        self,
        encoder: VideoEncoder,
        window: int | None = None,
        tokens_per_window: int = 4,
        dim: int | None = None,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        out_dim: int | None = None,
        window_batch: int = 0,
        checkpoint_windows: bool = False,
        backend: Backend = "auto",
        aggregate: Literal["transformer", "mean"] = "transformer",
        own_encoder: bool = True,
    ) -> None:
        super().__init__()
        if aggregate not in ("transformer", "mean"):
            raise ValueError(f"aggregate must be 'transformer' or 'mean'; got {aggregate!r}")
        self.aggregate = aggregate
        if own_encoder:
            self.encoder = encoder
        else:  # a plain attribute: not a submodule, so neither a parameter nor a state-dict key here
            object.__setattr__(self, "encoder", encoder)
        self.window = window or encoder.num_frames
        if self.window % encoder.tubelet_size != 0:
            raise ValueError(
                f"window {self.window} is not divisible by the encoder's tubelet {encoder.tubelet_size}"
            )
        self.tokens_per_window = tokens_per_window
        self.dim = dim or encoder.embed_dim
        self.window_batch = window_batch
        self.checkpoint_windows = checkpoint_windows
        self.out_dim = out_dim or encoder.embed_out_dim
        self.reduce = AttentionPool(
            encoder.embed_dim, num_heads, self.dim, num_queries=tokens_per_window, backend=backend
        )
        self.slot_embed = nn.Parameter(torch.randn(tokens_per_window, self.dim) * 0.02)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, self.dim))
        self.blocks = nn.ModuleList(
            Block(
                self.dim,
                num_heads,
                int(self.dim * mlp_ratio),
                norm="layernorm",
                qk_norm=False,
                qkv_bias=True,
                layerscale_init=None,
                backend=backend,
            )
            for _ in range(depth if aggregate == "transformer" else 0)
        )
        self.norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.head = nn.Linear(self.dim, self.out_dim)

    def split_windows(
        self, video: torch.Tensor, frame_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, T, H, W]`` → windows ``[B * W, C, window, H, W]`` and ``window_mask [B, W]``.

        ``frame_mask [B, T]`` (True = real frame) marks padded tails of shorter videos in a batch;
        a window without any real frame is masked out of the temporal transformer.
        """
        if video.dim() != 5:
            raise ValueError(f"video must have rank 5 [B, C, T, H, W]; got shape {tuple(video.shape)}")
        b, c, t, h, w = video.shape
        if t == 0:
            raise ValueError(f"video has no frames; got shape {tuple(video.shape)}")
        n_win = math.ceil(t / self.window)
        pad = n_win * self.window - t
        if pad:
            video = torch.cat([video, video[:, :, -1:].expand(b, c, pad, h, w)], dim=2)
        windows = (
            video.reshape(b, c, n_win, self.window, h, w)
            .transpose(1, 2)
            .reshape(b * n_win, c, self.window, h, w)
        )
        if frame_mask is None:
            return windows, torch.ones(b, n_win, dtype=torch.bool, device=video.device)
        if frame_mask.shape != (b, t):
            raise ValueError(f"frame_mask must be [B, T] = {(b, t)}; got {tuple(frame_mask.shape)}")
        frame_mask = torch.cat([frame_mask.bool(), frame_mask.new_zeros(b, pad, dtype=torch.bool)], dim=1)
        window_mask = frame_mask.reshape(b, n_win, self.window).any(dim=2)
        if not bool(window_mask.any(dim=1).all()):
            raise ValueError("frame_mask marks every frame of some video as padding")
        return windows, window_mask

    def _encode(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(windows)
        return self.reduce(out.tokens), out.pooled

    def encode_windows(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder and the window reduction, ``window_batch`` windows at a time."""
        step = self.window_batch or windows.shape[0]
        slots, pooled = [], []
        for chunk in windows.split(step, dim=0):
            if self.checkpoint_windows and torch.is_grad_enabled():
                s, p = checkpoint(self._encode, chunk, use_reentrant=False)
            else:
                s, p = self._encode(chunk)
            slots.append(s)
            pooled.append(p)
        return torch.cat(slots), torch.cat(pooled)

    def forward(self, video: torch.Tensor, frame_mask: torch.Tensor | None = None) -> HTEOutput:
        windows, window_mask = self.split_windows(video, frame_mask)
        slots, pooled = self.encode_windows(windows)  # [B*W, k, D], [B*W, E]
        return self.aggregate_windows(slots, pooled, window_mask)

    def aggregate_windows(
        self, slots: torch.Tensor, pooled: torch.Tensor, window_mask: torch.Tensor
    ) -> HTEOutput:
        """Steps 3-4 on windows an owner has already encoded: ``slots [B * W, k, D]`` (``reduce`` of the
        encoder's tokens), ``pooled [B * W, E]`` and ``window_mask [B, W]`` (the stage-2 aligner encodes
        the windows once, token-masked, for its fusion and for this)."""
        b, n_win = window_mask.shape
        k, d = self.tokens_per_window, self.dim
        if self.aggregate == "mean":  # the mean over real windows: no order across windows
            x = slots.reshape(b, n_win, k, d) + self.slot_embed[None, None]
            w = window_mask[:, :, None, None].to(x.dtype)
            x = self.norm((x * w).sum(1) / w.sum(1))  # [B, k, D]
            return HTEOutput(
                embedding=self.head(x.mean(1)),
                window_tokens=x[:, None].expand(b, n_win, k, d),
                window_embeddings=pooled.reshape(b, n_win, -1),
                window_mask=window_mask,
            )
        when = sincos_1d(d, torch.arange(n_win)).to(slots)  # the window's place in time
        x = slots.reshape(b, n_win, k, d) + when[None, :, None, :] + self.slot_embed[None, None]
        x = torch.cat([self.cls_token.expand(b, -1, -1).to(x.dtype), x.reshape(b, n_win * k, d)], dim=1)
        key_mask = torch.cat(
            [torch.ones(b, 1, dtype=torch.bool, device=x.device), window_mask.repeat_interleave(k, dim=1)],
            dim=1,
        )
        for blk in self.blocks:
            x = blk(x, key_padding_mask=key_mask)
        x = self.norm(x)
        return HTEOutput(
            embedding=self.head(x[:, 0]),
            window_tokens=x[:, 1:].reshape(b, n_win, k, d),
            window_embeddings=pooled.reshape(b, n_win, -1),
            window_mask=window_mask,
        )
