"""QueryResampler: a Q-Former-style bridge from video tokens to a language model's input space.

InternVideo2's stage 3 (arXiv 2403.15377, Sec. 3.3) connects the video encoder to a large language
model the way VideoChat2 does (Li et al., "MVBench", CVPR 2024; OpenGVLab/Ask-Anything): a
Q-Former (BLIP-2, Li et al. 2023) turns a variable number of video tokens into a fixed number of
query tokens, which a Linear maps into the LM's embedding space, where they are prepended to the
text as a prefix. Each layer here is a BLIP-2 Q-Former layer on the query side only: self-attention
among the queries, cross-attention from the queries to the (normalised) video tokens, then an MLP,
all pre-norm residual. The last LayerNorm and Linear are BLIP-2's ``llm_proj``.

Pure PyTorch: usable in a plain training loop and under any Lightning stage.
"""

from __future__ import annotations

import torch
from torch import nn

from iv2_lightning.models.attention import Attention, Backend, CrossAttention
from iv2_lightning.models.layers import Mlp


def default_num_heads(dim: int) -> int:
    """The most heads (of 16, 12, 8, 6, 4, 2, 1) that divide ``dim`` with at least 32 channels each."""
    for h in (16, 12, 8, 6, 4, 2):
        if dim % h == 0 and dim // h >= 32:
            return h
    return 1


class ResamplerLayer(nn.Module):
    """``q + SA(norm(q))``, then ``q + CA(norm(q), context)``, then ``q + MLP(norm(q))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int,
        mlp_ratio: float = 4.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, qkv_bias=True, qk_norm=False, backend=backend)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads, context_dim=context_dim, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(
        self, q: torch.Tensor, context: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = q + self.self_attn(self.norm1(q))
        q = q + self.cross_attn(self.norm_cross(q), context, key_padding_mask=key_padding_mask)
        return q + self.mlp(self.norm2(q))


class QueryResampler(nn.Module):
    """Learned queries that read a token sequence: ``[B, N, context_dim]`` → ``[B, num_queries, out_dim]``.

    ``dim`` is the width of the queries (default ``context_dim``; BLIP-2 runs its Q-Former at 768
    whatever the LLM's width), ``out_dim`` the width of the language model's embeddings. The
    output does not depend on the values of context tokens whose ``key_padding_mask`` is False.
    """

    def __init__(
        self,
        context_dim: int,
        out_dim: int,
        num_queries: int = 32,
        depth: int = 2,
        dim: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise ValueError(f"num_queries must be >= 1; got {num_queries}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}")
        dim = dim or context_dim
        num_heads = num_heads or default_num_heads(dim)
        if dim % num_heads != 0:
            raise ValueError(f"resampler width {dim} is not divisible by num_heads {num_heads}")
        self.context_dim = context_dim
        self.dim = dim
        self.out_dim = out_dim
        self.num_queries = num_queries
        self.query = nn.Parameter(torch.empty(num_queries, dim))
        # VideoChat2 normalises the vision features once before its Q-Former
        self.context_norm = nn.LayerNorm(context_dim)
        self.layers = nn.ModuleList(
            ResamplerLayer(dim, num_heads, context_dim, mlp_ratio, backend) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.query, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, context: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``context [B, N, context_dim]``, ``key_padding_mask [B, N]`` (True = real) → ``[B, Q, out_dim]``."""
        if context.dim() != 3 or context.shape[-1] != self.context_dim:
            raise ValueError(f"context must be [B, N, {self.context_dim}]; got {tuple(context.shape)}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != tuple(context.shape[:2]):
            raise ValueError(
                f"key_padding_mask must be [B, N] = {tuple(context.shape[:2])}; got {tuple(key_padding_mask.shape)}"
            )
        ctx = self.context_norm(context)
        q = self.query.to(ctx.dtype)[None].expand(context.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, ctx, key_padding_mask)
        return self.proj(self.norm(q))
