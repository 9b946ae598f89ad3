"""The official InternVideo2 vision encoder written out from its equations, independently of
:class:`~iv2_lightning.models.backbone.VideoEncoder`: the reference that ``iv2 convert --verify``
and :func:`~iv2_lightning.models.official.verify_official` compare a converted encoder against.

It follows the official block (OpenGVLab/InternVideo, ``InternVideo2/``; arXiv 2403.15377 Sec. 3)
with plain tensor functions on the checkpoint's own bare-named tensors: no module of ours is reused,
so a wrong mapping or a wrong block shows up as a parity error. The position table is resampled as
the official loader does it (time first, linear; then space, bicubic).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from iv2_lightning.models.official.layouts import ANCHOR
from iv2_lightning.models.official.mapping import compose_sep_pos


def reference_pos(
    sub: Mapping[str, torch.Tensor], src: tuple[int, int, int], dst: tuple[int, int, int], p: int
) -> torch.Tensor:
    """The position table resampled the way the official loader does it: time first (linear),
    then space (bicubic), both with align_corners=False."""
    if "pos_embed" in sub:
        pos = sub["pos_embed"].float().reshape(1, -1, sub["pos_embed"].shape[-1])
    else:
        pos, _, _ = compose_sep_pos(sub)
    extra, table = pos[:, :p], pos[0, p:]
    (t, h, w), (t2, h2, w2) = src, dst
    c = table.shape[-1]
    x = table.reshape(t, h * w, c)
    if t != t2:
        x = F.interpolate(x.permute(1, 2, 0), size=t2, mode="linear", align_corners=False).permute(2, 0, 1)
    x = x.reshape(t2, h, w, c)
    if (h, w) != (h2, w2):
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(h2, w2), mode="bicubic", align_corners=False)
        x = x.permute(0, 2, 3, 1)
    return torch.cat([extra, x.reshape(1, t2 * h2 * w2, c)], dim=1)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, nq, c = q.shape
    nk = k.shape[1]
    dh = c // heads
    qh = q.reshape(b, nq, heads, dh).transpose(1, 2)
    kh = k.reshape(b, nk, heads, dh).transpose(1, 2)
    vh = v.reshape(b, nk, heads, dh).transpose(1, 2)
    probs = torch.softmax((qh * dh**-0.5) @ kh.transpose(-2, -1), dim=-1)
    return (probs @ vh).transpose(1, 2).reshape(b, nq, c)


def official_reference_forward(
    state: Mapping[str, torch.Tensor],
    video: torch.Tensor,
    num_heads: int,
    attn_pool_heads: int = 16,
    pos_embed: torch.Tensor | None = None,
    mlp_act: str = "gelu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official vision encoder's equations on a bare-named state dict: ``(tokens, pooled)``.

    Written straight from the official block, independently of :class:`VideoEncoder`: Conv3d patches,
    cls token, ``+ pos_embed``; per block ``x + ls1 * proj(attn(rms_qk(qkv(rms(x)))))`` and
    ``x + ls2 * fc2(gelu(fc1(rms(x))))`` (RMSNorm eps 1e-6, QK-norm over the full width before the
    heads are split, softmax spelled out); no final norm; attention pool with the mean of all tokens
    (cls included) as query, LayerNorm eps 1e-5 on q / k / v inputs, bias-free q / k / v projections
    plus separate biases, then ``proj``. ``pos_embed`` replaces the stored table (e.g. resampled).
    """
    sd = {k: v.float() for k, v in state.items()}
    w = sd[ANCHOR]
    x = F.conv3d(video.float(), w, sd.get("patch_embed.proj.bias"), stride=tuple(w.shape[2:]))
    x = x.flatten(2).transpose(1, 2)
    b, c = x.shape[0], x.shape[-1]
    if "cls_token" in sd:
        x = torch.cat([sd["cls_token"].reshape(1, 1, c).expand(b, 1, c), x], dim=1)
    pos = pos_embed if pos_embed is not None else sd["pos_embed"].reshape(1, -1, c)
    x = x + pos
    x = _reference_blocks(sd, x, num_heads, mlp_act)
    return x, _reference_attention_pool(sd, x, attn_pool_heads)


def _reference_blocks(
    sd: Mapping[str, torch.Tensor], x: torch.Tensor, num_heads: int, mlp_act: str
) -> torch.Tensor:
    """The official blocks, one after the other; no final norm."""
    c = x.shape[-1]

    def norm(t: torch.Tensor, key: str) -> torch.Tensor:
        if key + ".bias" in sd:  # LayerNorm variant
            return F.layer_norm(t, (c,), sd[key + ".weight"], sd[key + ".bias"], eps=1e-6)
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[key + ".weight"]

    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    approximate = "tanh" if mlp_act == "gelu_tanh" else "none"
    for i in range(depth):
        p = f"blocks.{i}."
        qkv = F.linear(norm(x, p + "norm1"), sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
        q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
        if p + "attn.q_norm.weight" in sd:
            q, k = norm(q, p + "attn.q_norm"), norm(k, p + "attn.k_norm")
        a = F.linear(
            _reference_attention(q, k, v, num_heads), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]
        )
        x = x + a * sd.get(p + "ls1.gamma", torch.ones(()))
        h = F.gelu(
            F.linear(norm(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]),
            approximate=approximate,
        )
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]) * sd.get(
            p + "ls2.gamma", torch.ones(())
        )
    return x


def _reference_attention_pool(sd: Mapping[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """The official ``clip_projector``: the mean of all tokens (cls included) as the query."""
    c = x.shape[-1]
    cp = "clip_projector."

    def ln(t: torch.Tensor, key: str) -> torch.Tensor:
        return F.layer_norm(t, (c,), sd[cp + key + ".weight"], sd[cp + key + ".bias"], eps=1e-5)

    ca = cp + "cross_attn."
    q = F.linear(ln(x.mean(dim=1, keepdim=True), "norm1_q"), sd[ca + "q.weight"], sd[ca + "q_bias"])
    k = F.linear(ln(x, "norm1_k"), sd[ca + "k.weight"], sd[ca + "k_bias"])
    v = F.linear(ln(x, "norm1_v"), sd[ca + "v.weight"], sd[ca + "v_bias"])
    pooled = F.linear(_reference_attention(q, k, v, heads), sd[ca + "proj.weight"], sd[ca + "proj.bias"])
    return pooled.squeeze(1)


__all__ = ["official_reference_forward", "reference_pos"]
