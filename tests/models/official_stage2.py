"""A fake official stage-2 checkpoint: the official names and shapes (small sizes, random values).

The vision tensors come from ``test_convert.make_official``; the text side is a Hugging Face
``BertForMaskedLM`` (its names are the official ``text_encoder.bert.*`` / ``text_encoder.cls.*``)
with xbert's cross-attention tensors added by name to the top layers; ``vision_proj``, ``text_proj``,
``itm_head`` and ``temp`` as ``InternVideo2_Stage2`` holds them. Nothing here uses our modules.
"""

from __future__ import annotations

import torch
from test_convert import CLIP, WIDTH, make_official

VOCAB, HIDDEN, LAYERS, FUSION, TEXT_HEADS, EMBED = 60, 32, 3, 2, 2, 16


def bert_tensors(seed: int = 0, fusion: int = FUSION, width: int = WIDTH) -> dict[str, torch.Tensor]:
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=TEXT_HEADS,
        intermediate_size=4 * HIDDEN,
        max_position_embeddings=40,
    )
    sd = dict(transformers.BertForMaskedLM(cfg).state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    for k, v in list(sd.items()):  # HF starts LayerNorms at 1/0 and biases at 0: perturb them all
        if v.is_floating_point():
            sd[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    for i in range(fusion, LAYERS):
        p = f"bert.encoder.layer.{i}.crossattention."
        sd[p + "self.query.weight"] = 0.2 * torch.randn(HIDDEN, HIDDEN, generator=g)
        sd[p + "self.key.weight"] = 0.2 * torch.randn(HIDDEN, width, generator=g)
        sd[p + "self.value.weight"] = 0.2 * torch.randn(HIDDEN, width, generator=g)
        for n in ("query", "key", "value"):
            sd[p + f"self.{n}.bias"] = 0.1 * torch.randn(HIDDEN, generator=g)
        sd[p + "output.dense.weight"] = 0.2 * torch.randn(HIDDEN, HIDDEN, generator=g)
        sd[p + "output.dense.bias"] = 0.1 * torch.randn(HIDDEN, generator=g)
        sd[p + "output.LayerNorm.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=g)
        sd[p + "output.LayerNorm.bias"] = 0.1 * torch.randn(HIDDEN, generator=g)
    return sd


def make_stage2(seed: int = 0, with_audio: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 7)
    sd = {f"vision_encoder.{k}": v for k, v in make_official(seed=seed).items()}
    sd.update({f"text_encoder.{k}": v for k, v in bert_tensors(seed).items()})
    sd["vision_proj.weight"] = 0.2 * torch.randn(EMBED, CLIP, generator=g)
    sd["vision_proj.bias"] = 0.1 * torch.randn(EMBED, generator=g)
    sd["text_proj.weight"] = 0.2 * torch.randn(EMBED, HIDDEN, generator=g)
    sd["text_proj.bias"] = 0.1 * torch.randn(EMBED, generator=g)
    sd["itm_head.weight"] = 0.5 * torch.randn(2, HIDDEN, generator=g)
    sd["itm_head.bias"] = 0.1 * torch.randn(2, generator=g)
    sd["temp"] = torch.tensor(0.0523)
    if with_audio:
        sd["audio_proj.weight"] = torch.randn(EMBED, 8, generator=g)
    return sd


def write_tokenizer(folder, vocab: int = VOCAB) -> str:
    """A WordPiece tokenizer folder with ``vocab`` entries (BERT's special tokens first)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words += ["red", "green", "blue", "circle", "square", "moves", "left", "right", "up", "down", "a", "the"]
    words += [f"w{i}" for i in range(vocab - len(words))]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    return str(folder)
