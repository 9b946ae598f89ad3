"""Tokenizers shared by the data layer (which tokenizes captions and transcripts) and the text
encoders (which read the ids): the built-in ``ByteTokenizer`` and ``HFTokenizer`` over a local
Hugging Face folder, both returning a ``TokenizedText`` (ids plus a boolean mask, True = real token,
the masking convention of every ``*_mask`` tensor in this library).

They live outside ``models/`` so that ``data/`` never imports ``models/`` (DESIGN.md, "data/ and
models/ share tokenizers and fbank through a small module both import");
``iv2_lightning.models.text`` re-exports them. The official InternVideo2 model tokenizes captions
with BERT-large's WordPiece, 32 tokens (arXiv 2403.15377, Sec. 3.2); ``ByteTokenizer`` keeps the
default configs free of vocabulary files and downloads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Padding = Literal["max_length", "longest"]


@dataclass
class TokenizedText:
    """A batch of token ids ``[B, L]`` and its mask ``[B, L]`` (True = real token)."""

    ids: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> TokenizedText:
        return TokenizedText(self.ids.to(device), self.mask.to(device))


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


def build_tokenizer(spec: str = "byte", max_length: int = 32) -> ByteTokenizer | HFTokenizer:
    """``"byte"`` → the built-in :class:`ByteTokenizer`; anything else is a local Hugging Face
    tokenizer folder (:class:`HFTokenizer`, never downloaded)."""
    if spec == "byte":
        return ByteTokenizer(max_length=max_length)
    return HFTokenizer(spec, max_length=max_length)
