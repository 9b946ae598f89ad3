"""Text side of InternVideo2: tokenizers and the text encoder (captions and ASR transcripts).

InternVideo2 stage 2 (arXiv 2403.15377, Sec. 3.2 "multimodal contrastive alignment") aligns video
with captions and with speech, where speech enters as its ASR transcript, i.e. as text. The
official model uses a pretrained BERT-large (``bert-large-uncased``, 32 tokens per caption); this
module offers two interchangeable encoders behind one ``forward(ids, mask, token_type)`` and one
``TextOutput``:

* ``TextEncoder``: a BERT-like bidirectional transformer trained from scratch (token + position +
  token-type embeddings, post-embedding LayerNorm, the shared ``Block`` with LayerNorm and no
  QK-norm), with type 0 = caption and type 1 = speech transcript. Paired with ``ByteTokenizer``
  it needs no file and no network, so the default configs run anywhere.
* ``HFTextEncoder``: any local Hugging Face encoder folder (BERT, MiniLM, ...) loaded with
  ``local_files_only=True``, paired with ``HFTokenizer``. It never downloads: a hub name that is
  not a local folder fails with a message naming it.

The tokenizers (``ByteTokenizer``, ``HFTokenizer``, ``build_tokenizer``, ``TokenizedText``) live in
:mod:`iv2_lightning.features.tokenizers`, which the data layer imports too; they are re-exported here.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from torch import nn

# the tokenizers moved to features/ (data/ must not import models/); re-exported for old imports
from iv2_lightning.features.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    Padding,
    TokenizedText,
    _check_local_folder,
    _import_transformers,
    build_tokenizer,
)
from iv2_lightning.models.attention import Backend
from iv2_lightning.models.layers import Block, make_norm, masked_mean

__all__ = [
    "ByteTokenizer",
    "HFTextEncoder",
    "HFTokenizer",
    "Padding",
    "TextEncoder",
    "TextOutput",
    "TokenizedText",
    "build_tokenizer",
]


class TextOutput(NamedTuple):
    """``cls [B, D]`` (the sentence feature), ``tokens [B, L, D]``, ``mask [B, L]`` (True = real)
    (a NamedTuple so that DeepSpeed ZeRO-3 sees its tensors, see ``VideoEncoderOutput``)."""

    cls: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


# ---------------------------------------------------------------------------------------------
# encoders
# ---------------------------------------------------------------------------------------------


def _check_text_inputs(ids: torch.Tensor, mask: torch.Tensor | None, max_length: int, name: str) -> None:
    if ids.dim() != 2:
        raise ValueError(f"{name} expects ids [B, L]; got shape {tuple(ids.shape)}")
    if mask is not None and mask.shape != ids.shape:
        raise ValueError(f"{name} expects mask [B, L] = {tuple(ids.shape)} like ids; got {tuple(mask.shape)}")
    if ids.shape[1] > max_length:
        raise ValueError(f"{name}: text length {ids.shape[1]} exceeds max_length {max_length}")


def _type_ids(token_type: int | torch.Tensor, ids: torch.Tensor, num_types: int, name: str) -> torch.Tensor:
    """Broadcast ``token_type`` (an int, ``[B]`` or ``[B, L]``) to ``[B, L]`` and range-check it."""
    if isinstance(token_type, int):
        if not 0 <= token_type < num_types:
            raise ValueError(f"{name}: token_type {token_type} is outside [0, {num_types})")
        return torch.full_like(ids, token_type)
    tt = token_type.to(device=ids.device, dtype=torch.long)
    if tt.dim() == 1 and tt.shape[0] == ids.shape[0]:
        tt = tt[:, None].expand_as(ids)
    if tt.shape != ids.shape:
        raise ValueError(
            f"{name}: token_type must be an int, [B] = ({ids.shape[0]},) or [B, L] = {tuple(ids.shape)}; "
            f"got {tuple(tt.shape)}"
        )
    if tt.numel() and (int(tt.min()) < 0 or int(tt.max()) >= num_types):
        raise ValueError(f"{name}: token_type values must be in [0, {num_types}); got {tt.unique().tolist()}")
    return tt


class TextEncoder(nn.Module):
    """BERT-like bidirectional text transformer trained from scratch.

    ``embed`` = LayerNorm(token + position + token-type embeddings) as in BERT; then ``depth``
    pre-norm ``Block``s (LayerNorm, no QK-norm, qkv bias, no LayerScale) that never attend to
    padding; then a final LayerNorm. ``cls`` is the state at position 0, where tokenizers put
    BOS / [CLS]. Token type 0 marks captions, 1 marks speech (ASR) transcripts.
    """

    def __init__(
        self,
        vocab_size: int = 260,
        dim: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        max_length: int = 64,
        num_types: int = 2,
        pad_id: int = 0,
        drop_path_rate: float = 0.0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.dim = self.embed_dim = dim
        self.depth = depth
        self.max_length = max_length
        self.num_types = num_types
        self.pad_id = pad_id
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_length, dim)
        self.type_embed = nn.Embedding(num_types, dim)
        self.embed_norm = make_norm("layernorm", dim)
        # stochastic depth grows linearly with depth (the schedule of BERT-free ViT/BEiT recipes)
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
        self.register_buffer("position_ids", torch.arange(max_length), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # BERT initialisation: N(0, 0.02) truncated for weights, zero biases, unit LayerNorm
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def embed(self, ids: torch.Tensor, token_type: int | torch.Tensor = 0) -> torch.Tensor:
        """``[B, L, D]`` input embeddings (exposed for MLM heads and fusion layers that reuse them)."""
        _check_text_inputs(ids, None, self.max_length, "TextEncoder")
        types = _type_ids(token_type, ids, self.num_types, "TextEncoder")
        pos = self.position_ids[: ids.shape[1]]
        x = self.token_embed(ids) + self.pos_embed(pos)[None] + self.type_embed(types)
        return self.embed_norm(x)

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor | None = None, token_type: int | torch.Tensor = 0
    ) -> TextOutput:
        """``ids [B, L]``, ``mask [B, L]`` (True = real; default ``ids != pad_id``), ``token_type``
        an int or ``[B]`` / ``[B, L]`` tensor of type ids."""
        _check_text_inputs(ids, mask, self.max_length, "TextEncoder")
        mask = (ids != self.pad_id) if mask is None else mask.bool()
        x = self.embed(ids, token_type)
        for block in self.blocks:
            x = block(x, key_padding_mask=mask)
        x = self.norm(x)
        return TextOutput(cls=x[:, 0], tokens=x, mask=mask)


class HFTextEncoder(nn.Module):
    """A local Hugging Face encoder (BERT, MiniLM, ...) behind ``TextEncoder``'s interface.

    ``pooling="cls"`` takes the first token state (the official InternVideo2 text feature);
    ``"mean"`` averages the real tokens, the pooling sentence-transformers models are trained with.
    ``token_type`` is passed on as ``token_type_ids`` when ``use_token_types`` is set and the model
    has that many types; otherwise it is ignored (sentence-embedding models only ever saw type 0).
    """

    def __init__(
        self,
        path: str,
        pooling: Literal["cls", "mean"] = "cls",
        use_token_types: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean'; got {pooling!r}")
        transformers = _import_transformers()
        self.path = _check_local_folder(path, "model", ("config.json",))
        try:
            self.model = transformers.AutoModel.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"could not load a Hugging Face model from {self.path!r}: {err}") from err
        config: Any = self.model.config
        if not hasattr(config, "hidden_size"):
            raise ValueError(
                f"model at {self.path!r} has no hidden_size in its config; is it a text encoder?"
            )
        self.pooling = pooling
        self.use_token_types = use_token_types
        self.dim = self.embed_dim = int(config.hidden_size)
        self.max_length = int(getattr(config, "max_position_embeddings", 512))
        self.num_types = int(getattr(config, "type_vocab_size", 0) or 0)
        self.pad_id = int(config.pad_token_id) if getattr(config, "pad_token_id", None) is not None else 0

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor | None = None, token_type: int | torch.Tensor = 0
    ) -> TextOutput:
        _check_text_inputs(ids, mask, self.max_length, "HFTextEncoder")
        mask = (ids != self.pad_id) if mask is None else mask.bool()
        kwargs: dict[str, torch.Tensor] = {}
        if self.use_token_types:
            if self.num_types < 1:
                raise ValueError(
                    f"model at {self.path!r} has no token-type embeddings; set use_token_types=False"
                )
            kwargs["token_type_ids"] = _type_ids(token_type, ids, self.num_types, "HFTextEncoder")
        tokens = self.model(input_ids=ids, attention_mask=mask.long(), **kwargs).last_hidden_state
        cls = tokens[:, 0] if self.pooling == "cls" else masked_mean(tokens, mask)
        return TextOutput(cls=cls, tokens=tokens, mask=mask)
