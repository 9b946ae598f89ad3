"""Transformer building blocks shared by the video, text, audio and temporal encoders.

``Block`` is the official InternVideo2 vision block (pre-norm, QK-norm attention, LayerScale,
GELU MLP, DropPath) with the official parameter names (``norm1``, ``attn.qkv``, ``attn.q_norm``,
``ls1.gamma``, ``norm2``, ``mlp.fc1``, ``ls2.gamma``), so an official state dict maps onto it by
name. The other encoders reuse it with LayerNorm and without QK-norm.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from iv2_lightning.models.attention import Attention, Backend, attention

# re-exported: the norms lived here before norm.py, and the blocks below use them
from iv2_lightning.models.norm import NormKind as NormKind
from iv2_lightning.models.norm import RMSNorm as RMSNorm
from iv2_lightning.models.norm import make_norm as make_norm

#: MLP activation: exact GELU, or its tanh approximation (flash-attn's ``FusedMLP`` default, which the
#: official InternVideo2 models were pre-trained with when ``use_fused_mlp=True``).
MlpAct = Literal["gelu", "gelu_tanh"]


class Mlp(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        out_dim: int | None = None,
        drop: float = 0.0,
        act: MlpAct = "gelu",
    ) -> None:
        super().__init__()
        if act not in ("gelu", "gelu_tanh"):
            raise ValueError(f"mlp activation must be 'gelu' or 'gelu_tanh'; got {act!r}")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh" if act == "gelu_tanh" else "none")
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Per-channel residual scale (CaiT); the official init is 1e-5 and the parameter stays fp32.

    The product is taken in fp32 and cast back, as the official ``LayerScale(force_fp32=True)``: with
    gamma near 1e-5 a bf16 product would keep only 8 bits of the (small) residual update. In fp32 the
    casts are no-ops."""

    def __init__(self, dim: int, init_value: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() * self.gamma.float()).to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescale the kept ones."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = float(p)
        self.active = self.p > 0.0
        # the keep probability as a tensor: under torch.compile a float attribute is a constant of the
        # graph, so blocks with different rates (a linear drop-path schedule) would each recompile
        self.register_buffer("keep", torch.tensor(1.0 - self.p), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or not self.training:
            return x
        keep = self.keep.to(x.dtype)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

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
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: Backend = "auto",
        mlp_act: MlpAct = "gelu",
    ) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(
            dim,
            num_heads,
            qkv_bias=qkv_bias,
            qk_norm=qk_norm,
            norm_layer=lambda d: make_norm(norm, d),
            attn_drop=attn_drop,
            proj_drop=proj_drop,
            backend=backend,
        )
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path = DropPath(drop_path)
        self.norm2 = make_norm(norm, dim)
        self.mlp = Mlp(dim, mlp_dim, drop=proj_drop, act=mlp_act)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), key_padding_mask, attn_mask, causal)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class PoolCrossAttention(nn.Module):
    """The cross-attention inside the official ``clip_projector``: bias-free q/k/v Linears plus
    separate ``q_bias``/``k_bias``/``v_bias`` parameters, then ``proj`` to the output width."""

    def __init__(self, dim: int, num_heads: int, out_dim: int, backend: Backend = "auto") -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention pool width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = backend
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.k_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, out_dim)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask=None
    ) -> torch.Tensor:
        b, nq, d = q.shape
        nk = k.shape[1]
        h = self.num_heads
        qh = nn.functional.linear(q, self.q.weight, self.q_bias).view(b, nq, h, d // h).transpose(1, 2)
        kh = nn.functional.linear(k, self.k.weight, self.k_bias).view(b, nk, h, d // h).transpose(1, 2)
        vh = nn.functional.linear(v, self.v.weight, self.v_bias).view(b, nk, h, d // h).transpose(1, 2)
        out = attention(qh, kh, vh, key_padding_mask=key_padding_mask, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(b, nq, d))


class AttentionPool(nn.Module):
    """Attention pooling: queries cross-attend to the tokens (official ``clip_projector``).

    With ``num_queries=0`` (the official pool) the single query is the mean of the tokens
    (padding excluded) and the output is ``[B, out_dim]``; with ``num_queries=k`` there are k
    learned queries and the output is ``[B, k, out_dim]``. Separate LayerNorms (eps 1e-5) for
    queries, keys and values, as in the official block.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        out_dim: int | None = None,
        num_queries: int = 0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.out_dim = out_dim or dim
        self.norm1_q = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_k = nn.LayerNorm(dim, eps=1e-5)
        self.norm1_v = nn.LayerNorm(dim, eps=1e-5)
        self.cross_attn = PoolCrossAttention(dim, num_heads, self.out_dim, backend=backend)
        if num_queries > 0:
            self.query = nn.Parameter(torch.randn(num_queries, dim) * 0.02)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"AttentionPool expects tokens [B, N, D]; got {tuple(x.shape)}")
        if self.num_queries > 0:
            q = self.query[None].expand(x.shape[0], -1, -1)
        elif key_padding_mask is None:
            q = x.mean(dim=1, keepdim=True)
        else:
            w = key_padding_mask.to(x.dtype)[..., None]
            q = (x * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1.0)
        out = self.cross_attn(self.norm1_q(q), self.norm1_k(x), self.norm1_v(x), key_padding_mask)
        return out.squeeze(1) if self.num_queries == 0 else out

    @torch.no_grad()
    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N]``: how much the (first) pooling query attends to each token, averaged over heads.

        UMT / InternVideo2 stage 1 draw the visible tokens of the student from these weights of the
        teacher (attention-guided masking).
        """
        q = (
            x.mean(dim=1, keepdim=True)
            if self.num_queries == 0
            else self.query[None, :1].expand(x.shape[0], 1, -1)
        )
        ca = self.cross_attn
        b, n, d = x.shape
        h = ca.num_heads
        qh = (
            nn.functional.linear(self.norm1_q(q), ca.q.weight, ca.q_bias)
            .view(b, 1, h, d // h)
            .transpose(1, 2)
        )
        kh = (
            nn.functional.linear(self.norm1_k(x), ca.k.weight, ca.k_bias)
            .view(b, n, h, d // h)
            .transpose(1, 2)
        )
        scores = (qh @ kh.transpose(-2, -1)) / (d // h) ** 0.5  # [B, H, 1, N]
        return scores.float().softmax(dim=-1).mean(dim=1)[:, 0]


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` counting only positions where ``mask`` is True (mean pooling)."""
    if mask is None:
        return x.mean(dim=dim)
    w = mask.to(x.dtype)
    while w.dim() < x.dim():
        w = w.unsqueeze(-1)
    return (x * w).sum(dim=dim) / w.sum(dim=dim).clamp_min(1.0)
