"""The spatio-temporal video backbone: 3D patches, divided or joint attention, attention pooling.

Two block types share one encoder:

* ``attention="joint"``: one attention over every (t, h, w) token, the official InternVideo2
  vision block (arXiv 2403.15377, Sec. 3.1; pre-norm RMSNorm, bias-free qkv, QK-norm over the
  full width, LayerScale 1e-5). Parameter names follow the official code so its checkpoints load
  by renaming at most.
* ``attention="divided"``: the paper summary's factorised space x time attention in the
  TimeSformer order (Bertasius et al. 2021): attention across the frames at each spatial position,
  then attention within each frame. The cls token is left out of temporal attention and, in
  spatial attention, a copy of it joins every frame; the copies' updates are averaged.

Masked tokens are dropped before the first block, so the cost follows the visible count.
``frame_wise=True`` is the order-free ablation: no attention across frames and one position table
for every frame, so the encoder sees the clip as an unordered bag of frames. The
presets reproduce the official widths, depths and heads; their parameter counts match the official
vision encoders (with the attention pool, without a classifier).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from iv2_lightning.models.attention import Attention, Backend
from iv2_lightning.models.layers import (
    AttentionPool,
    Block,
    DropPath,
    LayerScale,
    Mlp,
    MlpAct,
    NormKind,
    make_norm,
    masked_mean,
)
from iv2_lightning.models.pos_embed import interpolate_pos_embed_3d, sincos_3d

AttentionKind = Literal["joint", "divided"]


class VideoEncoderOutput(NamedTuple):
    """What :class:`VideoEncoder` returns.

    ``tokens``: ``[B, (1 +) N_visible, D]`` final token states, cls first when the encoder has one.
    ``pooled``: ``[B, E]`` clip embedding (attention pool, or mean of the tokens).
    ``mask``: the ``[B, N]`` drop mask that was applied (True = dropped), or None.
    ``grid``: the token grid ``(T', H', W')`` of this input.
    ``hidden_states``: the outputs of the last ``return_hidden`` blocks (oldest first).
    ``num_prefix``: how many leading tokens are not patches (1 with a cls token, else 0).

    A NamedTuple, not a dataclass: DeepSpeed ZeRO-3 re-gathers a module's partitioned parameters for
    the backward pass through hooks on the tensors the module returns, and it finds them only in
    tensors, tuples (named ones included), lists and dicts (``deepspeed.runtime.zero.utils.
    apply_to_tensors_only``); a dataclass hides them and the backward pass fails.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor | None
    grid: tuple[int, int, int]
    # an empty tuple, not a list: a NamedTuple default is one object shared by every instance
    hidden_states: Sequence[torch.Tensor] = ()
    num_prefix: int = 1

    @property
    def patch_tokens(self) -> torch.Tensor:
        """The token states without the cls token."""
        return self.tokens[:, self.num_prefix :]


class PatchEmbed3D(nn.Module):
    """Video ``[B, C, T, H, W]`` → tokens ``[B, T'*H'*W', D]`` by a Conv3d with kernel = stride =
    (tubelet, patch, patch); tokens come out in (t, h, w) order."""

    def __init__(
        self, patch_size: int = 14, tubelet_size: int = 1, in_chans: int = 3, embed_dim: int = 768
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.in_chans = in_chans
        self.proj = nn.Conv3d(
            in_chans,
            embed_dim,
            kernel_size=(tubelet_size, patch_size, patch_size),
            stride=(tubelet_size, patch_size, patch_size),
        )

    def grid(self, video_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """Check a video shape and return its token grid (T', H', W')."""
        expected = f"[B, {self.in_chans}, T, H, W]"
        if len(video_shape) != 5:
            raise ValueError(f"video must have rank 5 {expected}; got shape {tuple(video_shape)}")
        _, c, t, h, w = video_shape
        if c != self.in_chans:
            raise ValueError(
                f"video must be {expected} with {self.in_chans} channels; got shape {tuple(video_shape)}"
            )
        if t % self.tubelet_size != 0:
            raise ValueError(
                f"frame count T={t} is not divisible by the tubelet size {self.tubelet_size} (video shape {tuple(video_shape)})"
            )
        if h % self.patch_size != 0 or w % self.patch_size != 0:
            raise ValueError(
                f"frame size H x W = {h} x {w} is not divisible by the patch size {self.patch_size} "
                f"(video shape {tuple(video_shape)})"
            )
        return t // self.tubelet_size, h // self.patch_size, w // self.patch_size

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        self.grid(tuple(video.shape))
        return self.proj(video).flatten(2).transpose(1, 2)


class DividedBlock(nn.Module):
    """Divided space-time block: temporal attention (``norm_t``/``attn_t``/``ls_t``), then spatial
    attention and the MLP with the official names (``norm1``/``attn``/``ls1``, ``norm2``/``mlp``/``ls2``),
    so the spatial half can start from a joint-attention checkpoint."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        norm: NormKind = "rmsnorm",
        qk_norm: bool = True,
        qkv_bias: bool = False,
        layerscale_init: float | None = 1e-5,
        drop_path: float = 0.0,
        backend: Backend = "auto",
        mlp_act: MlpAct = "gelu",
    ) -> None:
        super().__init__()

        def attn() -> Attention:
            return Attention(
                dim,
                num_heads,
                qkv_bias=qkv_bias,
                qk_norm=qk_norm,
                norm_layer=lambda d: make_norm(norm, d),
                backend=backend,
            )

        def scale() -> nn.Module:
            return LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()

        self.norm_t, self.attn_t, self.ls_t = make_norm(norm, dim), attn(), scale()
        self.norm1, self.attn, self.ls1 = make_norm(norm, dim), attn(), scale()
        self.norm2, self.ls2 = make_norm(norm, dim), scale()
        self.mlp = Mlp(dim, mlp_dim, act=mlp_act)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
        if not layout.frame_wise:
            x = x + self.drop_path(self.ls_t(layout.temporal(self.attn_t, self.norm_t(x))))
        x = x + self.drop_path(self.ls1(layout.spatial(self.attn, self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class _Layout:
    """How the tokens of one forward pass group into frames and spatial positions.

    Without a mask the tokens form a full (T, S) grid and each attention is a reshape into many
    short sequences. With a mask the visible tokens no longer form a grid; then one attention runs
    over the visible tokens with a boolean mask that only lets tokens of the same spatial position
    (temporal) or the same frame (spatial) see each other.
    """

    def __init__(
        self,
        batch: int,
        t: int,
        s: int,
        has_cls: bool,
        keep_index: torch.Tensor | None,
        frame_wise: bool = False,
    ) -> None:
        self.b, self.t, self.s, self.has_cls = batch, t, s, has_cls
        self.frame_wise = frame_wise
        self.p = 1 if has_cls else 0
        self.temporal_mask = self.spatial_mask = None
        if keep_index is not None:
            frame = keep_index // s  # [B, Nv]
            pos = keep_index % s
            self.temporal_mask = (pos[:, :, None] == pos[:, None, :])[:, None]
            if has_cls:  # copies of cls, one per frame, lead the spatial sequence
                cls_frames = torch.arange(t, device=keep_index.device).expand(batch, t)
                frame = torch.cat([cls_frames, frame], dim=1)
            self.spatial_mask = (frame[:, :, None] == frame[:, None, :])[:, None]

    def temporal(self, attn: Attention, x: torch.Tensor) -> torch.Tensor:
        b, p, t, s = self.b, self.p, self.t, self.s
        patches = x[:, p:]
        d = x.shape[-1]
        if self.temporal_mask is None:
            seq = patches.reshape(b, t, s, d).transpose(1, 2).reshape(b * s, t, d)
            out = attn(seq).reshape(b, s, t, d).transpose(1, 2).reshape(b, t * s, d)
        else:
            out = attn(patches, attn_mask=self.temporal_mask)
        # the cls token takes no part in temporal attention
        return torch.cat([torch.zeros_like(x[:, :p]), out], dim=1)

    def spatial(self, attn: Attention, x: torch.Tensor) -> torch.Tensor:
        b, p, t, s = self.b, self.p, self.t, self.s
        d = x.shape[-1]
        cls, patches = x[:, :p], x[:, p:]
        if self.spatial_mask is None:
            seq = patches.reshape(b * t, s, d)
            if p:
                seq = torch.cat([cls[:, None].expand(b, t, 1, d).reshape(b * t, 1, d), seq], dim=1)
            out = attn(seq).reshape(b, t, p + s, d)
            cls_out, patch_out = out[:, :, :p].mean(dim=1), out[:, :, p:].reshape(b, t * s, d)
        else:
            seq = torch.cat([cls.expand(b, t, d), patches], dim=1) if p else patches
            out = attn(seq, attn_mask=self.spatial_mask)
            cls_out = out[:, :t].mean(dim=1, keepdim=True) if p else out[:, :0]
            patch_out = out[:, t:] if p else out
        return torch.cat([cls_out, patch_out], dim=1)


def _frame_wise_joint_block(blk: Block, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """A joint block whose attention is confined to each frame (the ``frame_wise`` ablation)."""
    x = x + blk.drop_path(blk.ls1(layout.spatial(blk.attn, blk.norm1(x))))
    return x + blk.drop_path(blk.ls2(blk.mlp(blk.norm2(x))))


class VideoEncoder(nn.Module):
    """Video ``[B, 3, T, H, W]`` (+ optional drop mask ``[B, N]``) → :class:`VideoEncoderOutput`.

    Build one from a preset with :func:`build_video_encoder`; every argument here is a typed
    constructor argument so configs can set it. ``mlp_act="gelu_tanh"`` uses the tanh-approximate
    GELU of flash-attn's ``FusedMLP``, the activation the official models were pre-trained with on
    their fused fast path; the default exact GELU is their plain-PyTorch path. ``depth_scaled_init``
    applies the official ``fix_init_weight`` after the truncated-normal init (see ``reset_parameters``).
    """

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_dim: int = 1536,
        patch_size: int = 14,
        tubelet_size: int = 1,
        num_frames: int = 8,
        image_size: int = 224,
        in_chans: int = 3,
        attention: AttentionKind = "joint",
        norm: NormKind = "rmsnorm",
        qk_norm: bool = True,
        qkv_bias: bool = False,
        layerscale_init: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        use_cls_token: bool = True,
        pool: Literal["attention", "mean"] = "attention",
        clip_embed_dim: int = 768,
        attn_pool_heads: int = 16,
        grad_checkpointing: bool | int = False,
        frame_wise: bool = False,
        backend: Backend = "auto",
        mlp_act: MlpAct = "gelu",
        depth_scaled_init: bool = False,
    ) -> None:
        super().__init__()
        if attention not in ("joint", "divided"):
            raise ValueError(f"attention must be 'joint' or 'divided'; got {attention!r}")
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if num_frames % tubelet_size != 0:
            raise ValueError(f"num_frames {num_frames} is not divisible by tubelet_size {tubelet_size}")
        if frame_wise and tubelet_size != 1:
            raise ValueError(
                f"frame_wise=True needs tubelet_size=1 (got {tubelet_size}): a tubelet spans several frames, "
                "so its tokens would still see the order of the frames"
            )
        self.embed_dim = embed_dim
        self.depth = depth
        self.attention = attention
        self.num_frames = num_frames
        self.image_size = image_size
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.grad_checkpointing = grad_checkpointing
        self.frame_wise = frame_wise
        self.depth_scaled_init = depth_scaled_init
        self.num_prefix = 1 if use_cls_token else 0
        self.grid_size = (num_frames // tubelet_size, image_size // patch_size, image_size // patch_size)
        self.num_patches = math.prod(self.grid_size)

        self.patch_embed = PatchEmbed3D(patch_size, tubelet_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if use_cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + self.num_patches, embed_dim))
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear stochastic-depth rule
        block_cls = Block if attention == "joint" else DividedBlock
        self.blocks = nn.ModuleList(
            block_cls(
                embed_dim,
                num_heads,
                mlp_dim,
                norm=norm,
                qk_norm=qk_norm,
                qkv_bias=qkv_bias,
                layerscale_init=layerscale_init,
                drop_path=dpr[i],
                backend=backend,
                mlp_act=mlp_act,
            )
            for i in range(depth)
        )
        self.pool = pool
        self.embed_out_dim = clip_embed_dim if pool == "attention" else embed_dim
        self.clip_projector = (
            AttentionPool(embed_dim, attn_pool_heads, clip_embed_dim, backend=backend)
            if pool == "attention"
            else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.pos_embed.copy_(
                sincos_3d(self.embed_dim, *self.grid_size, cls_token=bool(self.num_prefix))[None]
            )
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # the patch projection as a Linear over the flattened patch (MAE)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        if self.depth_scaled_init:
            # the official ``fix_init_weight`` (BEiT's): block i's residual outputs (attention proj, MLP
            # fc2) divided by sqrt(2 i), i from 1, so deep stacks start with small residual updates
            with torch.no_grad():
                for i, blk in enumerate(self.blocks, start=1):
                    for name, m in blk.named_modules():
                        if name in ("attn.proj", "attn_t.proj", "mlp.fc2"):
                            m.weight.div_(math.sqrt(2.0 * i))

    def adapt_state_dict(self, state: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
        """Adapt, in place, the tensors of ``state`` under ``prefix`` that differ from this encoder
        only in their time extent, and return a note per adapted tensor.

        * ``patch_embed.proj.weight`` of another tubelet size: from ``k`` frames to 1 the kernel is
          summed over time (one frame through it equals that frame repeated ``k`` times through the
          original); from 1 to ``k`` it is repeated and divided by ``k`` (I3D's inflation).
        * ``pos_embed`` of another number of token frames (same spatial grid): resampled linearly
          in time, as when the frame count changes at run time.
        Shapes that differ in any other way are left for the caller to report.
        """
        notes = []
        key = f"{prefix}patch_embed.proj.weight"
        own = self.patch_embed.proj.weight
        w = state.get(key)
        if w is not None and w.dim() == 5 and w.shape != own.shape:
            k_src, k_dst = w.shape[2], own.shape[2]
            if w.shape[:2] + w.shape[3:] == own.shape[:2] + own.shape[3:]:
                if k_dst == 1:
                    state[key] = w.sum(dim=2, keepdim=True)
                elif k_src == 1:
                    state[key] = w.repeat(1, 1, k_dst, 1, 1) / k_dst
                if state[key].shape == own.shape:
                    notes.append(f"{key}: tubelet {k_src} -> {k_dst}")
        key = f"{prefix}pos_embed"
        pos = state.get(key)
        if pos is not None and pos.dim() == 3 and pos.shape != self.pos_embed.shape:
            _, h, w_ = self.grid_size
            n = pos.shape[1] - self.num_prefix
            if pos.shape[2] == self.embed_dim and n > 0 and n % (h * w_) == 0:
                src = (n // (h * w_), h, w_)
                state[key] = interpolate_pos_embed_3d(pos, src, self.grid_size, self.num_prefix)
                notes.append(f"{key}: {src[0]} -> {self.grid_size[0]} token frames")
        return notes

    # -- forward -----------------------------------------------------------------------------

    def _pos_embed_for(self, grid: tuple[int, int, int]) -> torch.Tensor:
        pos = interpolate_pos_embed_3d(self.pos_embed, self.grid_size, grid, self.num_prefix)
        if self.frame_wise:  # the same table for every frame: time is no longer encoded
            t, h, w = grid
            p = self.num_prefix
            per_frame = pos[:, p:].reshape(1, t, h * w, -1).mean(dim=1, keepdim=True).expand(1, t, h * w, -1)
            pos = torch.cat([pos[:, :p], per_frame.reshape(1, t * h * w, -1)], dim=1)
        return pos

    def _check_mask(self, mask: torch.Tensor, batch: int, n: int, grid) -> torch.Tensor:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor [B, N] (True = dropped); got dtype {mask.dtype}")
        if mask.shape != (batch, n):
            raise ValueError(
                f"mask must be [B, N] = {(batch, n)} for a token grid {grid}; got {tuple(mask.shape)}"
            )
        counts = mask.sum(dim=1)
        if batch > 0 and not bool((counts == counts[0]).all()):
            raise ValueError(
                f"mask must drop the same number of tokens in every sample; got counts {counts.tolist()}"
            )
        if batch > 0 and int(counts[0]) == n:
            raise ValueError(f"mask drops all {n} tokens; at least one must stay visible")
        return mask

    def _run_block(self, i: int, blk: nn.Module, x: torch.Tensor, layout: _Layout | None) -> torch.Tensor:
        ckpt = self.grad_checkpointing
        use_ckpt = (
            self.training
            and torch.is_grad_enabled()
            and (ckpt is True or (not isinstance(ckpt, bool) and i < int(ckpt)))
        )
        fn, args = blk, ((x,) if layout is None else (x, layout))
        if isinstance(blk, Block) and layout is not None:  # a joint block run frame by frame
            fn = partial(_frame_wise_joint_block, blk)
        if use_ckpt:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(
        self, video: torch.Tensor, mask: torch.Tensor | None = None, return_hidden: int = 0
    ) -> VideoEncoderOutput:
        grid = self.patch_embed.grid(tuple(video.shape))
        if mask is None and not return_hidden:
            x, hidden = self.embed_tokens(video), []
        else:
            x, mask, hidden = self._tokens(video, grid, mask, return_hidden)
        if self.clip_projector is not None:
            pooled = self.clip_projector(x)
        else:
            pooled = masked_mean(x[:, self.num_prefix :], None)
        return VideoEncoderOutput(
            tokens=x, pooled=pooled, mask=mask, grid=grid, hidden_states=hidden, num_prefix=self.num_prefix
        )

    def embed_tokens(self, video: torch.Tensor) -> torch.Tensor:
        """The last block's tokens ``[B, num_prefix + N, D]`` of whole clips (no mask), before the
        attention pool: the part of ``forward`` a frozen trunk's feature cache memoises
        (:func:`~iv2_lightning.models.feature_cache.cache_video_trunk`)."""
        return self._tokens(video, self.patch_embed.grid(tuple(video.shape)), None, 0)[0]

    def _tokens(
        self, video: torch.Tensor, grid: tuple[int, int, int], mask: torch.Tensor | None, return_hidden: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        b = video.shape[0]
        x = self.patch_embed(video)
        n = x.shape[1]
        pos = self._pos_embed_for(grid).to(x.dtype)
        x = x + pos[:, self.num_prefix :]
        keep_index = None
        if mask is not None:
            mask = self._check_mask(mask, b, n, grid)
            # stable sort keeps the visible tokens in their (t, h, w) order
            keep_index = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, : n - int(mask[0].sum())]
            x = torch.gather(x, 1, keep_index[..., None].expand(-1, -1, x.shape[-1]))
        if self.cls_token is not None:
            cls = (self.cls_token + pos[:, :1]).expand(b, -1, -1)
            x = torch.cat([cls.to(x.dtype), x], dim=1)

        layout = None
        if self.attention == "divided" or self.frame_wise:
            layout = _Layout(
                b, grid[0], grid[1] * grid[2], self.cls_token is not None, keep_index, self.frame_wise
            )
        hidden: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            x = self._run_block(i, blk, x, layout)
            if return_hidden and i >= len(self.blocks) - return_hidden:
                hidden.append(x)
        return x, mask, hidden


# -- presets -----------------------------------------------------------------------------------

_OFFICIAL = dict(
    patch_size=14,
    tubelet_size=1,
    num_frames=8,
    image_size=224,
    attention="joint",
    norm="rmsnorm",
    qk_norm=True,
    qkv_bias=False,
    layerscale_init=1e-5,
    use_cls_token=True,
    pool="attention",
    clip_embed_dim=768,
    attn_pool_heads=16,
)

#: Named sizes. The official ones use the widths, depths, heads and MLP sizes of the released
#: InternVideo2 vision encoders (S14/B14/L14 distilled, 1B and 6B); ``tiny`` is the CPU demo.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        embed_dim=128,
        depth=4,
        num_heads=4,
        mlp_dim=512,
        patch_size=8,
        tubelet_size=1,
        num_frames=8,
        image_size=64,
        attention="divided",
        norm="layernorm",
        qk_norm=True,
        qkv_bias=False,
        layerscale_init=0.1,
        use_cls_token=True,
        pool="attention",
        clip_embed_dim=128,
        attn_pool_heads=4,
    ),
    "s14": dict(_OFFICIAL, embed_dim=384, depth=12, num_heads=6, mlp_dim=1536),
    "b14": dict(_OFFICIAL, embed_dim=768, depth=12, num_heads=12, mlp_dim=3072),
    "l14": dict(_OFFICIAL, embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096),
    "1b": dict(_OFFICIAL, embed_dim=1408, depth=40, num_heads=16, mlp_dim=6144, drop_path_rate=0.25),
    "6b": dict(_OFFICIAL, embed_dim=3200, depth=48, num_heads=25, mlp_dim=12800, drop_path_rate=0.3),
}

#: Parameter counts of the official vision encoders (attention pool included, classifier not),
#: from the InternVideo2 model cards; the tests check the joint presets against them.
OFFICIAL_PARAM_COUNTS: dict[str, float] = {
    "s14": 23.0e6,
    "b14": 89.4e6,
    "l14": 308.9e6,
    "1b": 1.02e9,
    "6b": 5.94e9,
}


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The constructor arguments of preset ``name`` with ``overrides`` applied (checked by name)."""
    if name not in PRESETS:
        raise ValueError(f"unknown video encoder preset {name!r}; choose one of {sorted(PRESETS)}")

    valid = set(inspect.signature(VideoEncoder.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(
            f"unknown VideoEncoder argument(s) {unknown} for preset {name!r}; valid: {sorted(valid)}"
        )
    return {**PRESETS[name], **overrides}


def build_video_encoder(name: str = "tiny", **overrides: Any) -> VideoEncoder:
    """Build the preset ``name`` (see :data:`PRESETS`) with keyword overrides.

    >>> enc = build_video_encoder("tiny", num_frames=4)
    """
    return VideoEncoder(**preset_config(name, **overrides))


def count_parameters(name: str, **overrides: Any) -> int:
    """Parameters of a preset, built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        enc = build_video_encoder(name, **overrides)
    return sum(p.numel() for p in enc.parameters())
