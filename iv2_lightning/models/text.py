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

Tokenizers return a ``TokenizedText`` (ids plus a boolean mask, True = real token), the masking
convention of every ``*_mask`` tensor in this library.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from iv2_lightning.models.attention import Backend
from iv2_lightning.models.layers import Block, make_norm, masked_mean

Padding = Literal["max_length", "longest"]


@dataclass
class TokenizedText:
    """A batch of token ids ``[B, L]`` and its mask ``[B, L]`` (True = real token)."""

    ids: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> TokenizedText:
        return TokenizedText(self.ids.to(device), self.mask.to(device))


@dataclass
class TextOutput:
    """``cls [B, D]`` (the sentence feature), ``tokens [B, L, D]``, ``mask [B, L]`` (True = real)."""

    cls: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


def _as_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    texts = list(texts)
    if not all(isinstance(t, str) for t in texts):
        raise TypeError(f"tokenizer expects a str or a list of str; got {[type(t).__name__ for t in texts]}")
    return texts


def _id_rows(ids: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2:
            raise ValueError(f"batch_decode expects ids [B, L]; got shape {tuple(ids.shape)}")
        return ids.tolist()
    return [list(row) for row in ids]


# ---------------------------------------------------------------------------------------------
# tokenizers
# ---------------------------------------------------------------------------------------------


class ByteTokenizer:
    """Byte-level tokenizer built in: UTF-8 byte ``b`` is id ``4 + b``; ids 0-3 are specials.

    Any text in any script round-trips without a vocabulary file, which keeps the default configs
    free of downloads (DESIGN.md, "never download at run time"). Sequences are
    ``[BOS, bytes..., EOS, PAD...]``.
    """

    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    mask_id: int = 3
    num_special: int = 4
    vocab_size: int = 260
    _special_names: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<mask>")

    def __init__(self, max_length: int = 32, padding: Padding = "max_length") -> None:
        self.max_length = max_length
        self.padding = padding

    def encode(self, text: str) -> list[int]:
        """The byte ids of ``text`` without BOS/EOS."""
        return [self.num_special + b for b in text.encode("utf-8")]

    def _truncate(self, body: list[int], room: int) -> list[int]:
        if len(body) <= room:
            return body
        # do not cut a multi-byte character in half: back off while the first dropped byte is a
        # UTF-8 continuation byte (0b10xxxxxx), so a truncated caption still decodes cleanly
        cut = room
        while cut > 0 and (body[cut] - self.num_special) & 0xC0 == 0x80:
            cut -= 1
        return body[:cut]

    def __call__(
        self, texts: str | Sequence[str], max_length: int | None = None, padding: Padding | None = None
    ) -> TokenizedText:
        """Tokenize, add BOS/EOS, truncate (EOS kept), pad right with PAD to ``max_length`` (or the longest)."""
        max_length = self.max_length if max_length is None else max_length
        padding = padding or self.padding
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (BOS and EOS); got {max_length}")
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest'; got {padding!r}")
        rows = [
            [self.bos_id, *self._truncate(self.encode(t), max_length - 2), self.eos_id]
            for t in _as_list(texts)
        ]
        length = max_length if padding == "max_length" else max((len(r) for r in rows), default=2)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        return TokenizedText(ids, mask)

    def decode(self, ids: torch.Tensor | Sequence[int], skip_special: bool = True) -> str:
        """Text of one id sequence; invalid UTF-8 (e.g. a model's sample) becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects ids [L]; got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        parts: list[str] = []
        pending = bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"id {i} is outside the byte vocabulary [0, {self.vocab_size})")
            if i >= self.num_special:
                pending.append(i - self.num_special)
                continue
            if not skip_special:
                # flush first so a special token between two halves of a character stays visible
                parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
                parts.append(self._special_names[i])
        parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)

    def batch_decode(
        self, ids: torch.Tensor | Sequence[Sequence[int]], skip_special: bool = True
    ) -> list[str]:
        return [self.decode(row, skip_special) for row in _id_rows(ids)]


_HF_HINT = "pip install 'iv2-lightning[hf]'"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "tokenizer.model")


def _import_transformers():
    try:
        import transformers  # optional dependency, imported only when asked for
    except ImportError as err:
        raise ImportError(
            f"the Hugging Face text encoder and tokenizer need the transformers package: {_HF_HINT}"
        ) from err
    return transformers


def _check_local_folder(path: str, what: str, needed: Sequence[str]) -> str:
    """Fail fast, with the path in the message, before transformers might treat it as a hub id."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{what} path {path!r} is not a local folder; iv2_lightning never downloads models at run "
            "time: download it once (e.g. `huggingface-cli download <repo> --local-dir <folder>`) "
            "and pass that folder"
        )
    if not any(os.path.isfile(os.path.join(path, name)) for name in needed):
        raise ValueError(
            f"{what} folder {path!r} contains none of {list(needed)}; is it a Hugging Face {what} folder?"
        )
    return path


class HFTokenizer:
    """``ByteTokenizer``'s interface over a local Hugging Face tokenizer folder.

    BERT-style tokenizers map ``bos_id``/``eos_id`` to ``[CLS]``/``[SEP]``; tokenizers without them
    fall back to their BOS/EOS tokens.
    """

    def __init__(self, path: str, max_length: int = 32, padding: Padding = "max_length") -> None:
        transformers = _import_transformers()
        self.path = _check_local_folder(path, "tokenizer", _TOKENIZER_FILES)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"could not load a tokenizer from {self.path!r}: {err}") from err
        self.max_length = max_length
        self.padding = padding
        tok = self.tokenizer
        self.pad_id: int = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.bos_id: int | None = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        self.eos_id: int | None = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        self.mask_id: int | None = tok.mask_token_id
        if self.pad_id is None:
            raise ValueError(f"tokenizer at {self.path!r} has neither a pad nor an eos token to pad with")

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)  # includes added tokens, unlike tokenizer.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def __call__(
        self, texts: str | Sequence[str], max_length: int | None = None, padding: Padding | None = None
    ) -> TokenizedText:
        max_length = self.max_length if max_length is None else max_length
        padding = padding or self.padding
        if padding not in ("max_length", "longest"):
            raise ValueError(f"padding must be 'max_length' or 'longest'; got {padding!r}")
        enc = self.tokenizer(
            _as_list(texts),
            padding=padding,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return TokenizedText(enc["input_ids"].long(), enc["attention_mask"].bool())

    def decode(self, ids: torch.Tensor | Sequence[int], skip_special: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special)

    def batch_decode(
        self, ids: torch.Tensor | Sequence[Sequence[int]], skip_special: bool = True
    ) -> list[str]:
        return [self.decode(row, skip_special) for row in _id_rows(ids)]


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


def build_tokenizer(spec: str = "byte", max_length: int = 32) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` → the built-in :class:`ByteTokenizer`; anything else is a local Hugging Face
    tokenizer folder (:class:`HFTokenizer`, never downloaded)."""
    if spec == "byte":
        return ByteTokenizer(max_length=max_length)
    return HFTokenizer(spec, max_length=max_length)
