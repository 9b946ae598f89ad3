"""The official stage-2 text side written out from its equations, independently of
:class:`~iv2_lightning.models.bert.BertTextEncoder` and of the aligner: the reference that
``iv2 convert --verify`` compares a converted stage-2 checkpoint against.

It follows the official model (OpenGVLab/InternVideo, ``InternVideo2/multi_modality``:
``models/internvideo2_stage2.py`` and the BERT of ``models/backbones/bert/xbert.py``) with plain
tensor functions on the checkpoint's own names (``text_encoder.bert.*``, ``vision_proj``,
``text_proj``, ``itm_head``):

* text features: word + position + token-type-0 embeddings, LayerNorm; BERT layers below
  ``fusion_layer`` with the additive ``(1 - mask) * -10000`` attention mask and the softmax spelled out;
  the first token's state through ``text_proj``;
* the retrieval similarity of the official ``_emb`` evaluation: ``normalize(vision_proj(pooled)) @
  normalize(text_proj(text_cls)).T``;
* the ``_match`` score: the text states through the fusion layers (self-attention, cross-attention to
  the vision tokens with an all-ones memory mask, feed-forward), ``itm_head`` on the first token, the
  "match" logit (index 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

_NEG = -10000.0  # BERT's additive mask value


def _ln(sd: Mapping[str, torch.Tensor], name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    w = sd[name + ".weight"] if name + ".weight" in sd else sd[name + ".gamma"]
    b = sd[name + ".bias"] if name + ".bias" in sd else sd[name + ".beta"]
    return F.layer_norm(x, w.shape, w.float(), b.float(), eps)


def _lin(sd: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return x @ sd[name + ".weight"].float().T + sd[name + ".bias"].float()


def _attend(
    sd: Mapping[str, torch.Tensor],
    p: str,
    x: torch.Tensor,
    src: torch.Tensor,
    add_mask: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    b, n, d = x.shape
    hd = d // heads
    q = _lin(sd, p + ".self.query", x).reshape(b, n, heads, hd).permute(0, 2, 1, 3)
    k = _lin(sd, p + ".self.key", src).reshape(b, src.shape[1], heads, hd).permute(0, 2, 1, 3)
    v = _lin(sd, p + ".self.value", src).reshape(b, src.shape[1], heads, hd).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + add_mask[:, None, None, :]
    ctx = (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(b, n, d)
    return _ln(sd, p + ".output.LayerNorm", _lin(sd, p + ".output.dense", ctx) + x, EPS)


EPS = 1e-12  # BERT's layer_norm_eps


def _layer(
    sd: Mapping[str, torch.Tensor],
    i: int,
    x: torch.Tensor,
    add_mask: torch.Tensor,
    heads: int,
    memory: torch.Tensor | None = None,
) -> torch.Tensor:
    p = f"text_encoder.bert.encoder.layer.{i}"
    x = _attend(sd, p + ".attention", x, x, add_mask, heads)
    if memory is not None:
        zeros = memory.new_zeros(memory.shape[:2])  # all memory tokens attended (official eval)
        x = _attend(sd, p + ".crossattention", x, memory, zeros, heads)
    h = F.gelu(_lin(sd, p + ".intermediate.dense", x))
    return _ln(sd, p + ".output.LayerNorm", _lin(sd, p + ".output.dense", h) + x, EPS)


def reference_text_states(
    sd: Mapping[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, heads: int, fusion_layer: int
) -> torch.Tensor:
    """``[B, L, D]`` text states after the layers below ``fusion_layer`` (official ``mode="text"``)."""
    e = "text_encoder.bert.embeddings."
    n = ids.shape[1]
    x = (
        sd[e + "word_embeddings.weight"].float()[ids]
        + sd[e + "position_embeddings.weight"].float()[:n][None]
        + sd[e + "token_type_embeddings.weight"].float()[0]
    )
    x = _ln(sd, e + "LayerNorm", x, EPS)
    add_mask = (1.0 - mask.float()) * _NEG
    for i in range(fusion_layer):
        x = _layer(sd, i, x, add_mask, heads)
    return x


def reference_similarity(
    sd: Mapping[str, torch.Tensor], vision_pooled: torch.Tensor, text_states: torch.Tensor
) -> torch.Tensor:
    """The official ``_emb`` similarity ``[videos, texts]`` (cosine of the projected features)."""
    v = F.normalize(_lin(sd, "vision_proj", vision_pooled.float()), dim=-1)
    t = F.normalize(_lin(sd, "text_proj", text_states[:, 0]), dim=-1)
    return v @ t.T


def reference_match_scores(
    sd: Mapping[str, torch.Tensor],
    vision_tokens: torch.Tensor,
    text_states: torch.Tensor,
    mask: torch.Tensor,
    heads: int,
    fusion_layer: int,
    depth: int,
) -> torch.Tensor:
    """``[n]`` match logits of pairs (``vision_tokens[i]``, text ``i``): the fusion layers, then
    ``itm_head`` on the first token, logit 1 (what the official ``_match`` ranks by)."""
    x = text_states
    add_mask = (1.0 - mask.float()) * _NEG
    for i in range(fusion_layer, depth):
        x = _layer(sd, i, x, add_mask, heads, memory=vision_tokens.float())
    return _lin(sd, "itm_head", x[:, 0])[:, 1]


__all__ = ["reference_match_scores", "reference_similarity", "reference_text_states"]
