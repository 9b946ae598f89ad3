"""BERT with fusion layers: InternVideo2's stage-2 text side, in BERT's own parameter layout.

The official stage-2 model (OpenGVLab/InternVideo, ``InternVideo2/multi_modality``; arXiv 2403.15377
Sec. 3.2) encodes captions with BERT-large whose layers from ``fusion_layer`` on (19 of 24) are
*fusion layers*: self-attention over the text, then cross-attention from the text tokens to the video
(and audio) tokens, then the feed-forward block, each post-norm as in BERT. The same weights serve
three passes, which :class:`BertTextEncoder` exposes as methods:

* :meth:`~BertTextEncoder.forward` — the text alone through layers ``[0, fusion_layer)`` (the official
  ``mode="text"``); its first token feeds ``text_proj`` for the contrastive terms;
* :meth:`~BertTextEncoder.fuse` — those states through layers ``[fusion_layer, depth)`` with
  cross-attention to a memory of video (+ audio) tokens (``mode="fusion"``); the matching head reads the
  fused first token (``itm_head`` on ``[CLS]``);
* :meth:`~BertTextEncoder.mlm_logits` — BERT's masked-language-model head (``cls.predictions``:
  dense, activation, LayerNorm, then the word-embedding matrix as decoder, plus a bias).

Only the text tokens are updated in the fusion layers (the video tokens are keys and values), which is
why this fusion costs less than the gated :class:`~iv2_lightning.models.fusion.CrossModalFusion`, where
every modality attends to every other.

Parameter names are BERT's (``embeddings.word_embeddings``, ``encoder.layer.{i}.attention.self.query``,
``...crossattention...``, ``cls.predictions.transform.dense``), so a Hugging Face BERT folder
(:meth:`BertTextEncoder.from_pretrained`, never downloaded) and the ``text_encoder.*`` tensors of an
official stage-2 checkpoint load by name. The decoder of the MLM head is tied to the word embeddings, as
in BERT; it is not a parameter of its own (one tensor, not two copies, in checkpoints and exports).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.models.text import TextOutput, _check_text_inputs, _type_ids

__all__ = [
    "BERT_PRESETS",
    "BertConfig",
    "BertLoadReport",
    "BertTextEncoder",
    "bert_state_from_hf",
]


@dataclass(frozen=True)
class BertConfig:
    """The fields of a Hugging Face ``config.json`` that the architecture depends on (BERT's names)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> BertConfig:
        """The known fields of ``values`` (a ``config.json`` holds many more, which are ignored); a
        position scheme other than BERT's absolute table is refused with the file named."""
        kind = values.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(f"{source}: position_embedding_type {kind!r} is not supported (only 'absolute')")
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in values.items() if k in names and v is not None})
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(
                f"{source}: hidden_size {cfg.hidden_size} is not a multiple of num_attention_heads "
                f"{cfg.num_attention_heads}"
            )
        if cfg.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"{source}: hidden_act {cfg.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        return cfg

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> BertConfig:
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh), source=str(path))


#: named sizes: BERT-base/large (Devlin et al. 2019; the official stage 2 uses ``bert-large`` with
#: fusion from layer 19 and ``bert-base`` with fusion from layer 9, ``configs/model.py``) and a tiny one
BERT_PRESETS: dict[str, BertConfig] = {
    "bert-base": BertConfig(),
    "bert-large": BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    "bert-tiny": BertConfig(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=128,
    ),
}

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class _Embeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = (
            self.word_embeddings(ids)
            + self.token_type_embeddings(types)
            + self.position_embeddings(pos)[None]
        )
        return self.dropout(self.LayerNorm(x))


class _QKV(nn.Module):
    """``attention.self``: query from the text, key/value from the text or (cross) from the memory."""

    def __init__(self, cfg: BertConfig, kv_width: int) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(kv_width, d)
        self.value = nn.Linear(kv_width, d)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, source: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, t.shape[1], h, d // h).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(source)), split(self.value(source))
        # keep [B, S] True = attend; BERT adds -10000 to the others, which is 0 after softmax in fp32
        mask = keep[:, None, None, :]
        p = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return out.transpose(1, 2).reshape(b, n, d)


class _DenseNorm(nn.Module):
    """``attention.output`` / ``output``: dense, dropout, then LayerNorm of the residual sum (post-norm)."""

    def __init__(self, cfg: BertConfig, in_width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_width, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Attention(nn.Module):
    def __init__(self, cfg: BertConfig, kv_width: int) -> None:
        super().__init__()
        self.self = _QKV(cfg, kv_width)
        self.output = _DenseNorm(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, source: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, source, keep), x)


class _Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    """One BERT layer; with ``cross_width`` a fusion layer (cross-attention after self-attention)."""

    def __init__(self, cfg: BertConfig, cross_width: int | None = None) -> None:
        super().__init__()
        self.attention = _Attention(cfg, cfg.hidden_size)
        self.crossattention = _Attention(cfg, cross_width) if cross_width is not None else None
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg, cfg.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        keep: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.attention(x, x, keep)
        if self.crossattention is not None:
            if memory is None or memory_keep is None:
                raise ValueError("a fusion layer needs the memory tokens and their mask")
            x = self.crossattention(x, memory, memory_keep)
        return self.output(self.intermediate(x), x)


class _Encoder(nn.Module):
    def __init__(self, layers: list[BertLayer]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)


class _PredictionTransform(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class _Predictions(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.transform = _PredictionTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))


class _MLMHead(nn.Module):
    """``cls``: BERT's ``BertOnlyMLMHead`` (the decoder matrix is the word embeddings, passed in)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.predictions = _Predictions(cfg)

    def forward(self, x: torch.Tensor, decoder: torch.Tensor) -> torch.Tensor:
        return F.linear(self.predictions.transform(x), decoder, self.predictions.bias)


class BertLoadReport(NamedTuple):
    """What :meth:`BertTextEncoder.load_bert_state` did: ``loaded`` our names, ``missing`` our tensors
    the source lacked (left at their initial values: the cross-attention of a plain BERT, for one),
    ``unused`` source names not used (the pooler, NSP head), ``tied_decoder`` whether the source's MLM
    decoder equals its word embeddings (None when it has no decoder)."""

    loaded: list[str]
    missing: list[str]
    unused: list[str]
    tied_decoder: bool | None


def bert_state_from_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face / official BERT state dict in our names: the ``bert.`` prefix of
    ``BertForMaskedLM`` dropped, TensorFlow-era ``LayerNorm.gamma/beta`` renamed, position-id buffers
    dropped; ``cls.*`` kept."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len("bert.") :] if key.startswith("bert.") else key
        if name.endswith("position_ids"):
            continue
        name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[name] = value
    return out


class BertTextEncoder(nn.Module):
    """BERT whose layers from ``fusion_layer`` on cross-attend to a memory of other tokens.

    ``config``: a :class:`BertConfig`, a dict of its fields, or a :data:`BERT_PRESETS` name.
    ``fusion_layer``: the first fusion layer (official BERT-large: 19); default the depth (no fusion:
    a plain BERT). ``encoder_width``: the width of the memory tokens (the video encoder's token width;
    official: the vision ``d_model``); default the hidden size. ``mlm_head``: build BERT's MLM head.

    ``forward(ids, mask, token_type)`` returns :class:`~iv2_lightning.models.text.TextOutput` of the text
    layers (``cls`` = the first token), the interface :class:`~iv2_lightning.models.text.TextEncoder`
    has, so the aligner and the captioner take either.
    """

    def __init__(
        self,
        config: BertConfig | Mapping[str, Any] | str = "bert-base",
        fusion_layer: int | None = None,
        encoder_width: int | None = None,
        mlm_head: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(config, str):
            if config not in BERT_PRESETS:
                raise ValueError(f"unknown BERT preset {config!r}; expected one of {sorted(BERT_PRESETS)}")
            config = BERT_PRESETS[config]
        elif not isinstance(config, BertConfig):
            config = BertConfig.from_dict(dict(config), source="text config")
        self.config = config
        depth = config.num_hidden_layers
        self.fusion_layer = depth if fusion_layer is None else int(fusion_layer)
        if not 0 <= self.fusion_layer <= depth:
            raise ValueError(f"fusion_layer must be in [0, {depth}] (the BERT depth); got {fusion_layer}")
        self.encoder_width = int(encoder_width or config.hidden_size)
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(
            [BertLayer(config, self.encoder_width if i >= self.fusion_layer else None) for i in range(depth)]
        )
        self.cls = _MLMHead(config) if mlm_head else None
        self.dim = self.embed_dim = config.hidden_size
        self.max_length = config.max_position_embeddings
        self.num_types = config.type_vocab_size
        self.pad_id = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.apply(self._init_weights)

    def _init_weights(self, m: nn.Module) -> None:
        # BERT's initialisation: N(0, initializer_range) weights, zero biases, unit LayerNorm
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def has_fusion(self) -> bool:
        return self.fusion_layer < self.config.num_hidden_layers

    def architecture(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this encoder (for manifests and checkpoints)."""
        return {
            "config": asdict(self.config),
            "fusion_layer": self.fusion_layer,
            "encoder_width": self.encoder_width,
            "mlm_head": self.cls is not None,
        }

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor | None = None, token_type: int | torch.Tensor = 0
    ) -> TextOutput:
        """``ids [B, L]``, ``mask [B, L]`` (True = real; default ``ids != pad_id``) through the text
        layers ``[0, fusion_layer)``."""
        _check_text_inputs(ids, mask, self.max_length, "BertTextEncoder")
        mask = (ids != self.pad_id) if mask is None else mask.bool()
        types = _type_ids(token_type, ids, self.num_types, "BertTextEncoder")
        x = self.embeddings(ids, types)
        for layer in self.encoder.layer[: self.fusion_layer]:
            x = layer(x, mask)
        return TextOutput(cls=x[:, 0], tokens=x, mask=mask)

    def fuse(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text states ``[B, L, D]`` (from :meth:`forward`) through the fusion layers, cross-attending
        to ``memory [B, S, encoder_width]`` (``memory_mask [B, S]`` True = real; default all)."""
        if not self.has_fusion:
            raise RuntimeError("this BERT has no fusion layers (fusion_layer == depth)")
        if memory.shape[-1] != self.encoder_width:
            raise ValueError(
                f"memory tokens are {memory.shape[-1]} wide; the fusion layers take {self.encoder_width} "
                "(encoder_width)"
            )
        keep = text_mask.bool()
        if memory_mask is None:
            memory_mask = torch.ones(memory.shape[:2], dtype=torch.bool, device=memory.device)
        memory_keep = memory_mask.bool()
        x = text
        for layer in self.encoder.layer[self.fusion_layer :]:
            x = layer(x, keep, memory, memory_keep)
        return x

    def mlm_logits(self, states: torch.Tensor) -> torch.Tensor:
        """BERT's MLM head over ``states [..., D]`` → ``[..., vocab]`` (decoder = word embeddings)."""
        if self.cls is None:
            raise RuntimeError("this BERT was built without its MLM head (mlm_head=False)")
        return self.cls(states, self.embeddings.word_embeddings.weight)

    # -- loading -------------------------------------------------------------------------------

    def load_bert_state(self, state: Mapping[str, torch.Tensor], source: str = "state") -> BertLoadReport:
        """Load BERT tensors by name (:func:`bert_state_from_hf` first); shapes must match exactly.
        Our tensors the source lacks stay as initialised and are listed in ``missing``."""
        given = bert_state_from_hf(state)
        own = self.state_dict()
        decoder = given.pop("cls.predictions.decoder.weight", None)
        given.pop("cls.predictions.decoder.bias", None)  # the same tensor as cls.predictions.bias
        loaded, unused = [], []
        wrong = []
        for name, value in given.items():
            if name not in own:
                unused.append(name)
            elif tuple(own[name].shape) != tuple(value.shape):
                wrong.append(f"{name}: {tuple(value.shape)} in {source}, {tuple(own[name].shape)} here")
            else:
                loaded.append(name)
        if wrong:
            raise ValueError(f"{source}: BERT tensors of the wrong shape: " + "; ".join(wrong[:6]))
        with torch.no_grad():
            for name in loaded:
                own[name].copy_(given[name].to(own[name].dtype))
        tied = None
        if decoder is not None and "embeddings.word_embeddings.weight" in given:
            words = given["embeddings.word_embeddings.weight"]
            tied = decoder.shape == words.shape and bool(torch.equal(decoder, words))
        missing = sorted(set(own) - set(loaded))
        return BertLoadReport(sorted(loaded), missing, sorted(unused), tied)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        fusion_layer: int | None = None,
        encoder_width: int | None = None,
        mlm_head: bool = True,
        **config_overrides: Any,
    ) -> tuple[BertTextEncoder, BertLoadReport]:
        """A local Hugging Face BERT folder (``config.json`` and ``model.safetensors`` or
        ``pytorch_model.bin``, read weights-only; never downloaded). The fusion layers' cross-attention
        is not in a plain BERT: it starts from BERT's initialisation and the report lists it missing,
        as the official stage 2 starts it."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"BERT path {str(folder)!r} is not a local folder; iv2_lightning never downloads models at "
                "run time: download it once (e.g. `huggingface-cli download google-bert/bert-large-uncased "
                "--local-dir <folder>`) and pass that folder"
            )
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder} has no config.json; is it a Hugging Face BERT folder?")
        config = BertConfig.from_json(config_file)
        if config_overrides:
            config = replace(config, **config_overrides)
        model = cls(config, fusion_layer=fusion_layer, encoder_width=encoder_width, mlm_head=mlm_head)
        weights = _read_weights(folder)
        return model, model.load_bert_state(weights, source=str(folder))


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    st = folder / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    bin_file = folder / "pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")
