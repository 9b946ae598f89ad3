"""The released BEATs equations written out as plain tensor functions on a checkpoint's own names,
independently of :class:`~iv2_lightning.models.beats.BEATsEncoder`: the reference its parity tests
compare against.

It follows microsoft/unilm ``beats/BEATs.py`` (``preprocess``, ``extract_features``) and
``beats/backbone.py`` (``TransformerEncoder``, ``TransformerSentenceEncoderLayer``,
``MultiheadAttention``) step by step, in their layout and with their numerics: sequence-first
``[N, B, C]`` tensors, heads folded into the batch for ``bmm``, the query scaled by
``head_dim ** -0.5 / 32`` and the logits multiplied back by 32 after subtracting each row's maximum,
the relative-position buckets computed as the released ``_relative_positions_bucket`` does, the
weight-normalised position convolution through ``torch._weight_norm`` (the function behind
``torch.nn.utils.weight_norm``). The sound enters as a waveform in [-1, 1] at 16 kHz and goes through
``torchaudio.compliance.kaldi.fbank`` with the released arguments, so a test also holds our fbank
features to BEATs' own.

``cfg`` uses the released ``BEATsConfig`` names (``encoder_layers``, ``encoder_embed_dim``,
``gru_rel_pos``, ...). No padding: InternVideo2 calls BEATs without a padding mask.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi

_ALPHA = 32.0  # the released attention's logit scaling trick


def preprocess(
    waveforms: torch.Tensor, num_mel_bins: int = 128, mean: float = 15.41663, std: float = 6.55582
) -> torch.Tensor:
    """``[B, S]`` waveforms -> normalised fbank ``[B, F, num_mel_bins]`` (``BEATs.preprocess``)."""
    banks = []
    for wave in waveforms:
        bank = kaldi.fbank(
            wave[None] * 2**15,
            num_mel_bins=num_mel_bins,
            sample_frequency=16000,
            frame_length=25,
            frame_shift=10,
        )
        banks.append(bank)
    return (torch.stack(banks) - mean) / (2 * std)


def _bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    num_buckets = num_buckets // 2
    buckets = (relative > 0).to(torch.long) * num_buckets
    relative = torch.abs(relative)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    large = max_exact + (
        torch.log(relative.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, relative, large)


def _linear(sd: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, sd[name + ".weight"].float(), sd[name + ".bias"].float())


def _norm(sd: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"].float(), sd[name + ".bias"].float(), 1e-5)


def _attention(
    sd: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, heads: int, cfg: Mapping[str, Any],
    position_bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    tgt_len, bsz, embed_dim = x.shape
    head_dim = embed_dim // heads
    scaling = head_dim**-0.5
    if cfg["relative_position_embedding"] and position_bias is None:
        ctx = torch.arange(tgt_len, dtype=torch.long)[:, None]
        mem = torch.arange(tgt_len, dtype=torch.long)[None, :]
        table = sd[name + ".relative_attention_bias.weight"].float()
        values = F.embedding(_bucket(mem - ctx, cfg["num_buckets"], cfg["max_distance"]), table)
        values = values.permute([2, 0, 1])
        position_bias = values.unsqueeze(0).repeat(bsz, 1, 1, 1).view(bsz * heads, tgt_len, tgt_len)
    q = _linear(sd, name + ".q_proj", x)
    k = _linear(sd, name + ".k_proj", x)
    v = _linear(sd, name + ".v_proj", x)
    q = q * scaling
    q = q * (1 / _ALPHA)
    q = q.contiguous().view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * heads, head_dim).transpose(0, 1)
    weights = torch.bmm(q, k.transpose(1, 2))
    weights = (weights - weights.max(dim=-1, keepdim=True)[0]) * _ALPHA
    if position_bias is not None:
        rel = position_bias
        if cfg["gru_rel_pos"]:
            query = q.view(bsz, heads, tgt_len, head_dim) * _ALPHA / scaling
            gates = torch.sigmoid(
                _linear(sd, name + ".grep_linear", query).view(bsz, heads, tgt_len, 2, 4).sum(-1)
            )
            gate_a, gate_b = gates.chunk(2, dim=-1)
            gate = gate_a * (gate_b * sd[name + ".grep_a"].float() - 1.0) + 2.0
            rel = gate.view(bsz * heads, tgt_len, 1) * position_bias
        weights = weights + rel.view(weights.size())
    probs = F.softmax(weights, dim=-1)
    out = torch.bmm(probs, v).transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
    return _linear(sd, name + ".out_proj", out), position_bias


def beats_tokens(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], fbank: torch.Tensor) -> torch.Tensor:
    """Normalised fbank ``[B, F, bins]`` -> BEATs tokens ``[B, N, encoder_embed_dim]`` (the released
    ``extract_features`` without a padding mask, ``BEATs.forward`` of InternVideo2)."""
    patch = cfg["input_patch_size"]
    feats = F.conv2d(
        fbank[:, None].float(),
        sd["patch_embedding.weight"].float(),
        sd.get("patch_embedding.bias"),
        stride=patch,
    )
    feats = feats.reshape(feats.shape[0], feats.shape[1], -1).transpose(1, 2)
    feats = _norm(sd, "layer_norm", feats)
    if "post_extract_proj.weight" in sd:
        feats = _linear(sd, "post_extract_proj", feats)
    x = feats
    # position convolution: weight-normalised over all axes but 2, "same" padding, GELU
    kernel = cfg["conv_pos"]
    weight = torch._weight_norm(
        sd["encoder.pos_conv.0.weight_v"].float(), sd["encoder.pos_conv.0.weight_g"].float(), 2
    )
    conv = F.conv1d(
        x.transpose(1, 2),
        weight,
        sd["encoder.pos_conv.0.bias"].float(),
        padding=kernel // 2,
        groups=cfg["conv_pos_groups"],
    )
    if kernel % 2 == 0:
        conv = conv[:, :, :-1]
    x = x + F.gelu(conv).transpose(1, 2)
    if not cfg["layer_norm_first"]:
        x = _norm(sd, "encoder.layer_norm", x)
    x = x.transpose(0, 1)
    layers = cfg["encoder_layers"]
    heads = cfg["encoder_attention_heads"]
    alpha = math.pow(2 * layers, 1 / 4) if cfg["deep_norm"] else 1.0
    bias = None
    for i in range(layers):
        name = f"encoder.layers.{i}"
        residual = x
        if cfg["layer_norm_first"]:
            h, bias = _attention(
                sd, name + ".self_attn", _norm(sd, name + ".self_attn_layer_norm", x), heads, cfg, bias
            )
            x = residual + h
            residual = x
            h = _linear(
                sd,
                name + ".fc2",
                F.gelu(_linear(sd, name + ".fc1", _norm(sd, name + ".final_layer_norm", x))),
            )
            x = residual + h
        else:
            h, bias = _attention(sd, name + ".self_attn", x, heads, cfg, bias)
            x = _norm(sd, name + ".self_attn_layer_norm", residual * alpha + h)
            residual = x
            h = _linear(sd, name + ".fc2", F.gelu(_linear(sd, name + ".fc1", x)))
            x = _norm(sd, name + ".final_layer_norm", residual * alpha + h)
    x = x.transpose(0, 1)
    if cfg["layer_norm_first"]:
        x = _norm(sd, "encoder.layer_norm", x)
    return x


def beats_pooled(sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], fbank: torch.Tensor) -> torch.Tensor:
    """InternVideo2's audio feature: the mean of the BEATs tokens (``encode_audio``)."""
    return beats_tokens(sd, cfg, fbank).mean(dim=1)
