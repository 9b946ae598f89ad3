"""One attention kernel for every module: SDPA by default, flash-attn when it can run, math for tests.

The official InternVideo2 code imports flash-attn at module load and fails without the CUDA
extension (OpenGVLab/InternVideo issues #102, #138, #208, #226). Here flash-attn is looked up lazily
and used only where it can run (CUDA tensors in fp16/bf16, no arbitrary attention mask); every other
call goes to ``torch.nn.functional.scaled_dot_product_attention``. The ``math`` backend spells the
softmax out and is the reference the tests compare the others against.

Layout everywhere: ``q [B, H, Nq, Dh]``, ``k, v [B, H, Nk, Dh]``. A ``key_padding_mask [B, Nk]``
is True where the key is real (the convention of the data layer's ``*_mask`` tensors).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.models.norm import RMSNorm

Backend = Literal["auto", "sdpa", "math", "flash"]
BACKENDS: tuple[str, ...] = ("auto", "sdpa", "math", "flash")


@functools.cache
def _flash_attn():
    """The flash-attn module, or None when the extension is not installed (checked once)."""
    try:
        import flash_attn
    except Exception:  # ImportError, or an extension built for another torch
        return None
    return flash_attn


def flash_available() -> bool:
    return _flash_attn() is not None


def _flash_can_run(q: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float) -> bool:
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and attn_mask is None
        and q.shape[-1] <= 256
        and q.shape[-1] % 8 == 0
        and _flash_attn() is not None
    )


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attention expects q, k, v of rank 4 [B, H, N, Dh]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"attention expects q [B, H, Nq, Dh] and k, v [B, H, Nk, Dh]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if key_padding_mask is not None and key_padding_mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_padding_mask must be [B, Nk] = {(k.shape[0], k.shape[2])}; got {tuple(key_padding_mask.shape)}"
        )


def _combine_masks(
    q: torch.Tensor,
    k: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    causal: bool,
) -> torch.Tensor | None:
    """One boolean mask (True = may attend) broadcastable to [B, H, Nq, Nk], or None."""
    mask = None
    if key_padding_mask is not None:
        mask = key_padding_mask.bool()[:, None, None, :]
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"attn_mask must be boolean (True = may attend); got {attn_mask.dtype}")
        mask = attn_mask if mask is None else mask & attn_mask
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        # queries are the last nq positions of the key sequence (works for prefix + continuation)
        tri = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(diagonal=nk - nq)
        mask = tri if mask is None else mask & tri
    return mask


def _math_attention(q, k, v, mask, dropout_p, scale):
    scores = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def _flash_attention(q, k, v, key_padding_mask, dropout_p, scale, causal):
    fa = _flash_attn()
    # flash-attn wants [B, N, H, Dh]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if key_padding_mask is None:
        out = fa.flash_attn_func(qt, kt, vt, dropout_p=dropout_p, softmax_scale=scale, causal=causal)
        return out.transpose(1, 2)
    # variable-length path: drop the padded keys, pack the batch, one kernel call
    b, nq, h, d = qt.shape
    nk = kt.shape[1]
    lens_k = key_padding_mask.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * nq, nq, dtype=torch.int32, device=q.device)
    keep = key_padding_mask.reshape(-1)
    k_packed = kt.reshape(b * nk, h, d)[keep]
    v_packed = vt.reshape(b * nk, h, d)[keep]
    out = fa.flash_attn_varlen_func(
        qt.reshape(b * nq, h, d),
        k_packed,
        v_packed,
        cu_q,
        cu_k,
        nq,
        int(lens_k.max()),
        dropout_p=dropout_p,
        softmax_scale=scale,
        causal=causal,
    )
    return out.reshape(b, nq, h, d).transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T * scale + mask) v`` on ``[B, H, N, Dh]`` tensors.

    ``key_padding_mask [B, Nk]`` and ``attn_mask`` (broadcastable to ``[B, H, Nq, Nk]``) are
    boolean with True = may attend. A query row whose keys are all masked returns zeros rather than
    NaN, so callers that pad whole groups stay finite in both directions.
    """
    _check_shapes(q, k, v, key_padding_mask)
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}; got {backend!r}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if backend == "flash" and not _flash_can_run(q, attn_mask, dropout_p):
        raise RuntimeError(
            "backend='flash' needs the flash-attn package (pip install 'iv2-lightning[flash]'), CUDA tensors "
            f"in fp16/bf16 and no attn_mask; got device={q.device}, dtype={q.dtype}, "
            f"flash-attn installed={flash_available()}"
        )
    if backend == "flash" or (backend == "auto" and _flash_can_run(q, attn_mask, dropout_p)):
        return _flash_attention(q, k, v, key_padding_mask, dropout_p, scale, causal)

    mask = _combine_masks(q, k, key_padding_mask, attn_mask, causal)
    empty_rows = None
    if mask is not None:
        # rows with no key to attend to would give NaN: let them see every key, zero them after
        empty_rows = ~mask.any(dim=-1, keepdim=True)
        # compiled: no data-dependent branch (a graph break); the fill is a no-op on full rows
        if torch.compiler.is_compiling() or bool(empty_rows.any()):
            mask = mask | empty_rows
        else:
            empty_rows = None
    if backend == "math":
        out = _math_attention(q, k, v, mask, dropout_p, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if empty_rows is not None:
        out = out.masked_fill(empty_rows, 0.0)
    return out


class Attention(nn.Module):
    """Multi-head self-attention with the official InternVideo2 parameter names.

    ``qkv`` is one Linear (no bias by default, as the official block); ``q_norm``/``k_norm`` are the
    QK-norm over the full width before the heads are split (official ``qk_normalization``);
    ``proj`` has a bias.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = False,
        qk_norm: bool = True,
        norm_layer: type[nn.Module] | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        norm_layer = norm_layer or _default_norm
        self.q_norm = norm_layer(dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project ``x [B, N, D]`` to normalised q, k and v, each ``[B, H, N, Dh]``."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.split_heads(self.q_norm(q)), self.split_heads(self.k_norm(k)), self.split_heads(v)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = x.shape
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, -1)))

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        out = attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            causal=causal,
            dropout_p=self.attn_drop if self.training else 0.0,
            backend=self.backend,
        )
        return self.merge_heads(out)


class CrossAttention(nn.Module):
    """Multi-head attention from queries ``x [B, Nq, D]`` to a memory ``context [B, Nk, Dc]``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int | None = None,
        qkv_bias: bool = True,
        out_dim: int | None = None,
        attn_drop: float = 0.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        context_dim = context_dim or dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.backend = backend
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, out_dim or dim)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, nq, _ = x.shape
        nk = context.shape[1]
        q = self.q(x).view(b, nq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k(context).view(b, nk, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v(context).view(b, nk, self.num_heads, self.head_dim).transpose(1, 2)
        out = attention(
            q,
            k,
            v,
            key_padding_mask=key_padding_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            backend=self.backend,
        )
        return self.proj(out.transpose(1, 2).reshape(b, nq, -1))


def _default_norm(dim: int) -> nn.Module:
    return RMSNorm(dim, eps=1e-6)
