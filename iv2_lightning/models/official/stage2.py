"""Whole official stage-2 checkpoints → our stage-2 model (:class:`~iv2_lightning.models.aligner.VideoTextAligner`).

An official stage-2 file (OpenGVLab/InternVideo, ``InternVideo2/multi_modality``, the 1B layout of
``models/internvideo2_stage2.py``) holds the vision encoder (``vision_encoder.*``, loaded by
:func:`~iv2_lightning.models.official.load.load_checkpoint`), BERT with fusion layers
(``text_encoder.bert.*``, MLM head ``text_encoder.cls.*``), ``vision_proj``, ``text_proj``, ``itm_head``
and ``temp``. :func:`read_stage2` reads them and the ContrastiveStage arguments that rebuild the model
(built by ``iv2 convert``, which writes the stage checkpoint: this module stays free of Lightning), and
:func:`load_stage2` maps every tensor into the aligner built with
``text_model: bert``, ``fusion: bert`` and the official loss weights (vtc = vtm = mlm = 1, the 1B
``scripts/pretraining/stage2/1B/config.py``), so ``iv2 embed``, ``iv2 search`` and ``iv2 test`` load the
result as they load a checkpoint of our own. The 6B file's audio side is reported as not converted:
its BEATs (``audio_encoder.*``) loads into :class:`~iv2_lightning.models.beats.BEATsEncoder` on its own,
but the 6B model also projects the video and audio tokens before the fusion layers
(``av_concat_vision_proj``, ``av_concat_audio_proj``) and fuses the two embeddings for the
audio-visual terms (``av_fusion``, ``avtm_head``), which our aligner does not have.

:func:`verify_stage2` checks the converted model against
:mod:`~iv2_lightning.models.official.reference_text` (the official equations on the file's own tensors):
the video-text similarity matrix and the matching-head scores on random clips and random token ids.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from iv2_lightning.models.backbone import PRESETS
from iv2_lightning.models.bert import BertConfig, bert_state_from_hf
from iv2_lightning.models.official.errors import OfficialCheckpointError
from iv2_lightning.models.official.load import LoadedCheckpoint, load_checkpoint
from iv2_lightning.models.official.reference import official_reference_forward, reference_pos
from iv2_lightning.models.official.reference_text import (
    reference_match_scores,
    reference_similarity,
    reference_text_states,
)

TEXT_PREFIX = "text_encoder."
#: official name → our name (VideoTextAligner state dict) for the heads around the two towers
HEADS = {
    "vision_proj.weight": "video_proj.proj.weight",
    "vision_proj.bias": "video_proj.proj.bias",
    "text_proj.weight": "text_proj.proj.weight",
    "text_proj.bias": "text_proj.proj.bias",
    "itm_head.weight": "itm_head.fc.weight",
    "itm_head.bias": "itm_head.fc.bias",
}
_AUDIO = ("audio_encoder.", "audio_proj.", "av_fusion.", "audio_")


@dataclass
class Stage2Report:
    """What :func:`convert_stage2` did: the vision report, the BERT architecture found, which tensors
    went where and which were left out (with why)."""

    vision: Any
    bert: dict[str, Any]
    mapped: dict[str, str] = field(default_factory=dict)
    unmapped: dict[str, str] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    outside: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # the file's other tensors

    def summary(self) -> str:
        b = self.bert
        cfg = b["config"]
        lines = [
            self.vision.summary(),
            f"text: BERT {cfg['num_hidden_layers']} layers x {cfg['hidden_size']} ({cfg['num_attention_heads']} "
            f"heads, vocab {cfg['vocab_size']}), fusion layers {b['fusion_layer']}..{cfg['num_hidden_layers'] - 1} "
            f"cross-attending to {b['encoder_width']}-wide video tokens, MLM head: {b['mlm_head']}",
            f"mapped {len(self.mapped)} stage-2 tensor(s) outside the vision encoder",
        ]
        if self.unmapped:
            lines.append(f"not converted ({len(self.unmapped)}):")
            lines += [f"  {k}: {why}" for k, why in sorted(self.unmapped.items())[:20]]
        return "\n".join(lines)


def infer_bert(text: Mapping[str, torch.Tensor], name: str, heads: int | None = None) -> dict[str, Any]:
    """The BERT architecture from its tensors (``text_encoder.*`` with the prefix removed): sizes from
    the shapes, the fusion layer from the first layer with ``crossattention``; heads default to
    ``hidden / 64`` (BERT-base 12, BERT-large 16)."""
    sd = bert_state_from_hf(text)
    words = sd.get("embeddings.word_embeddings.weight")
    if words is None:
        raise OfficialCheckpointError(
            f"{name}: no text_encoder.bert.embeddings.word_embeddings.weight: not an official stage-2 "
            "checkpoint with its text encoder (only the vision encoder can be converted: give a .safetensors "
            "or folder destination)"
        )
    layers = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise OfficialCheckpointError(f"{name}: BERT layers are not numbered 0..N-1: {layers[:8]}...")
    cross = [i for i in layers if f"encoder.layer.{i}.crossattention.self.key.weight" in sd]
    depth = len(layers)
    fusion_layer = cross[0] if cross else depth
    if cross != list(range(fusion_layer, depth)):
        raise OfficialCheckpointError(
            f"{name}: cross-attention must be in the top layers; found it in {cross}"
        )
    hidden = int(words.shape[1])
    config = BertConfig(
        vocab_size=int(words.shape[0]),
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=int(heads or max(1, hidden // 64)),
        intermediate_size=int(sd["encoder.layer.0.intermediate.dense.weight"].shape[0]),
        max_position_embeddings=int(sd["embeddings.position_embeddings.weight"].shape[0]),
        type_vocab_size=int(sd["embeddings.token_type_embeddings.weight"].shape[0]),
    )
    width = int(sd[f"encoder.layer.{cross[0]}.crossattention.self.key.weight"].shape[1]) if cross else hidden
    return {
        "config": asdict(config),
        "fusion_layer": fusion_layer,
        "encoder_width": width,
        "mlm_head": "cls.predictions.bias" in sd,
    }


def stage2_hparams(
    loaded: LoadedCheckpoint,
    bert: dict[str, Any],
    embed_dim: int,
    temperature: float,
    tokenizer: str,
    has_itm: bool,
) -> dict[str, Any]:
    """ContrastiveStage arguments that rebuild the official model (official 1B loss weights)."""
    cfg = dict(loaded.report.config)
    num_frames, image_size = cfg.pop("num_frames"), cfg.pop("image_size")
    text = {**bert["config"], "fusion_layer": bert["fusion_layer"]}
    return {
        # a size without a preset of its own ("custom") takes any preset: the encoder fields override all
        "preset": loaded.report.preset if loaded.report.preset in PRESETS else "s14",
        "encoder": cfg,
        "num_frames": num_frames,
        "image_size": image_size,
        "tokenizer": tokenizer,
        "text_model": "bert",
        "text": text,
        "text_pooling": "cls",  # the official text feature is BERT's [CLS] state
        "fusion": "bert",
        "embed_dim": embed_dim,
        "temperature": temperature,
        "vtc": 1.0,
        "vtm": 1.0 if has_itm else 0.0,
        "mlm": 1.0 if bert["mlm_head"] else 0.0,
        "atc": 0.0,
        "vac": 0.0,
        "vsc": 0.0,
        "avtc": 0.0,
        "video_mask_ratio": 0.8,  # official stage-2 training masks 80 % of the video tokens
    }


def read_stage2(
    source: str | os.PathLike | Mapping[str, Any],
    tokenizer: str,
    num_frames: int = 8,
    image_size: int = 224,
    preset: str | None = None,
    source_frames: int | None = None,
    text_heads: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, LoadedCheckpoint, Stage2Report]:
    """``(vision encoder, loaded, report)`` of the official stage-2 checkpoint ``source``; the report's
    ``hparams`` are the ContrastiveStage arguments that rebuild the model (``tokenizer``: the local folder
    of its BERT tokenizer, bert-large-uncased for the released files) and ``outside`` the file's other
    tensors, for :func:`load_stage2`."""
    encoder, loaded = load_checkpoint(
        source, preset, num_frames, image_size, source_frames, True, dict(overrides or {})
    )
    name = loaded.report.source
    outside = loaded.outside
    text = {k[len(TEXT_PREFIX) :]: v for k, v in outside.items() if k.startswith(TEXT_PREFIX)}
    bert = infer_bert(text, name, text_heads)
    for needed in ("vision_proj.weight", "text_proj.weight", "temp"):
        if needed not in outside:
            raise OfficialCheckpointError(f"{name}: no {needed!r}: not an official stage-2 checkpoint")
    temp = float(outside["temp"].float().reshape(-1)[0])
    embed_dim = int(outside["vision_proj.weight"].shape[0])
    hparams = stage2_hparams(loaded, bert, embed_dim, temp, tokenizer, "itm_head.weight" in outside)
    return encoder, loaded, Stage2Report(vision=loaded.report, bert=bert, hparams=hparams, outside=outside)


def load_stage2(model: torch.nn.Module, encoder: torch.nn.Module, report: Stage2Report) -> None:
    """Every tensor of the file into ``model`` (the :class:`~iv2_lightning.models.aligner.VideoTextAligner`
    that ``report.hparams`` build), recording in ``report`` where each went or why it did not."""
    name, outside = report.vision.source, report.outside
    bert = report.bert
    if model.tokenizer.vocab_size != bert["config"]["vocab_size"]:
        raise OfficialCheckpointError(
            f"tokenizer {report.hparams['tokenizer']!r} has {model.tokenizer.vocab_size} tokens but the BERT "
            f"of {name} has {bert['config']['vocab_size']}: give the tokenizer the checkpoint was trained "
            "with (bert-large-uncased for the released InternVideo2 stage-2 files)"
        )
    text = {k[len(TEXT_PREFIX) :]: v for k, v in outside.items() if k.startswith(TEXT_PREFIX)}
    with torch.no_grad():
        model.video_encoder.load_state_dict(encoder.state_dict())
        bert_report = model.text_encoder.load_bert_state(text, source=f"{name} text_encoder")
        if bert_report.missing:
            raise OfficialCheckpointError(
                f"{name}: BERT tensors missing from the file: {bert_report.missing[:10]}"
            )
        if bert_report.tied_decoder is False:
            report.unmapped["text_encoder.cls.predictions.decoder.weight"] = (
                "differs from the word embeddings; ours ties the MLM decoder to them as BERT does (not loaded)"
            )
        own = model.state_dict()
        for off, ours in HEADS.items():
            if off in outside and ours in own:
                own[ours].copy_(outside[off].to(own[ours].dtype))
                report.mapped[off] = ours
        model.contrastive.temp.fill_(float(outside["temp"].float().reshape(-1)[0]))
        report.mapped["temp"] = "contrastive.temp"
    for k, v in text.items():
        key = TEXT_PREFIX + k
        if k.startswith("bert.pooler") or k.endswith("position_ids"):
            report.unmapped[key] = "not used by the stage-2 model"
        elif k == "cls.predictions.decoder.bias":  # BERT stores its MLM bias twice
            report.mapped[key] = "text_encoder.cls.predictions.bias (the same tensor)"
        elif k == "cls.predictions.decoder.weight":
            if bert_report.tied_decoder:
                report.mapped[key] = "tied: text_encoder.embeddings.word_embeddings.weight"
        else:
            report.mapped[key] = "text_encoder." + bert_state_from_hf({k: v}).popitem()[0]
    for k in outside:
        if k.startswith(TEXT_PREFIX) or k in report.mapped or k in report.unmapped:
            continue
        if k.startswith(_AUDIO):
            report.unmapped[k] = (
                "BEATs: load with BEATsEncoder.load_beats_state (it strips 'audio_encoder.')"
                if k.startswith("audio_encoder.")
                else "audio-visual head of the 6B model (audio_proj, av_concat_*, av_fusion): not converted"
            )
        elif k not in ("itm_head.weight", "itm_head.bias"):
            report.unmapped[k] = "not part of the stage-2 model we rebuild"
    for k in list(report.vision.unmapped):  # the vision report lists them as outside its encoder
        if k in report.mapped or k in report.unmapped:
            del report.vision.unmapped[k]


@dataclass
class Stage2Verify:
    ok: bool
    checked: list[str]
    problems: list[str]

    def summary(self) -> str:
        lines = [f"verification: {'PASSED' if self.ok else 'FAILED'}"]
        lines += [f"  ok: {c}" for c in self.checked] + [f"  FAIL: {p}" for p in self.problems]
        return "\n".join(lines)


def verify_stage2(
    model: torch.nn.Module,
    loaded: LoadedCheckpoint,
    report: Stage2Report,
    seed: int = 0,
    clips: int = 3,
    rtol: float = 1e-4,
) -> Stage2Verify:
    """Similarity matrix and match scores of the converted model (a VideoTextAligner) against the official equations on the
    file's own tensors (:mod:`.reference_text`, :func:`.official_reference_forward`), on ``clips``
    random clips and captions; passes when the largest error is below ``rtol * max|reference|``."""
    model = model.eval()
    g = torch.Generator().manual_seed(seed)
    cfg = loaded.report.config
    video = torch.randn(clips, 3, cfg["num_frames"], cfg["image_size"], cfg["image_size"], generator=g)
    bert = report.bert
    vocab, n = bert["config"]["vocab_size"], 12
    ids = torch.randint(1, vocab, (clips, n), generator=g)
    mask = torch.ones(clips, n, dtype=torch.bool)
    mask[1:, n // 2 :] = False  # padded captions too
    ids[~mask] = 0
    sd = {}
    for k, v in report.outside.items():  # the reference reads BertForMaskedLM's names (text_encoder.bert.*)
        bare = k.startswith(TEXT_PREFIX) and not k.startswith((TEXT_PREFIX + "bert.", TEXT_PREFIX + "cls."))
        sd[TEXT_PREFIX + "bert." + k[len(TEXT_PREFIX) :] if bare else k] = v
    checked, problems = [], []
    with torch.no_grad():
        out = model.video_encoder(video)
        pos = reference_pos(
            loaded.sub, loaded.report.source_grid, loaded.report.grid, model.video_encoder.num_prefix
        )
        ref_tokens, ref_pooled = official_reference_forward(
            loaded.sub, video, cfg["num_heads"], cfg["attn_pool_heads"], pos, cfg.get("mlp_act", "gelu")
        )
        heads = bert["config"]["num_attention_heads"]
        ref_text = reference_text_states(sd, ids, mask, heads, bert["fusion_layer"])
        ref_sim = reference_similarity(sd, ref_pooled, ref_text)
        v = model.encode_video(video)
        t = model.encode_text(ids, mask)
        sim = v @ t.T
        _compare("video-text similarity matrix", sim, ref_sim, rtol, checked, problems)
        if model.itm_head is not None:
            rows = torch.arange(clips).repeat_interleave(clips)
            cols = torch.arange(clips).repeat(clips)
            text_out = model.text_encoder(ids, mask)
            tokens = {"video": out.tokens[rows], "text": text_out.tokens[cols]}
            masks = {"video": torch.ones(out.tokens.shape[:2], dtype=torch.bool)[rows], "text": mask[cols]}
            scores = model.match_scores(tokens, masks)
            ref_scores = reference_match_scores(
                sd,
                ref_tokens[rows],
                ref_text[cols],
                mask[cols],
                heads,
                bert["fusion_layer"],
                bert["config"]["num_hidden_layers"],
            )
            _compare("matching-head (ITM) scores", scores, ref_scores, rtol, checked, problems)
    return Stage2Verify(not problems, checked, problems)


def _compare(
    what: str, got: torch.Tensor, ref: torch.Tensor, rtol: float, checked: list, problems: list
) -> None:
    err = float((got.float() - ref.float()).abs().max())
    bound = rtol * max(float(ref.abs().max()), 1e-12)
    rel = err / max(float(ref.abs().max()), 1e-12)
    msg = f"{what} ({tuple(ref.shape)}): max abs error {err:.3g}, relative {rel:.2g} (bound {rtol:g})"
    (checked if err <= bound else problems).append(msg)


__all__ = ["Stage2Report", "Stage2Verify", "infer_bert", "load_stage2", "read_stage2", "verify_stage2"]
