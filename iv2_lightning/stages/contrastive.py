"""Stage 2 of the curriculum: multimodal contrastive alignment, matching and (optionally) MLM.

InternVideo2 (arXiv 2403.15377, Sec. 3.2) aligns the video encoder with text, audio and speech.
What this stage follows from the official stage-2 recipe (OpenGVLab/InternVideo, ``InternVideo2``):

* **VTC** video-text contrastive loss with *multiple positives by sample id* (the official ``idx``:
  every clip of the batch with the caption's sample id is a positive), negatives all-gathered from
  every rank *with gradients*, one learnable temperature (init 0.07, clamped to [0.001, 0.5]).
  The same loss aligns audio-text (ATC), video-audio (VAC), video-speech (VSC: speech enters as its
  ASR transcript, through the text encoder with token type 1; the official model, too, only sees
  speech as text) and
  fused audio-video vs text (AVTC: ``av_fusion = Linear(2E → E)`` over the concatenated video and
  audio embeddings, as the official 6B model).
* **VTM** video-text matching: for every video one *hard negative* caption and for every caption
  one hard negative video, drawn with ``torch.multinomial`` from ``softmax(sim / temp)`` of the
  (detached) similarity row with the row's positives excluded; the matching head (``itm_head``)
  reads the cross-modal fusion of (video [+ audio], text) and is trained with 2-way cross-entropy,
  positives label 1, negatives 0. The official model fuses inside BERT's upper layers; here the
  fusion is the gated :class:`~iv2_lightning.models.fusion.CrossModalFusion` (the paper's CMFM),
  and the matching head reads its pooled output (the mean over every fused token, so every fusion
  parameter takes part in the loss and DDP needs no ``find_unused_parameters``).
* **MLM** (optional, ``mlm > 0``): caption tokens are corrupted with the official probability 0.5
  (BERT's 80 % ``[MASK]`` / 10 % random / 10 % kept), encoded, fused with the video (and audio)
  tokens, and a small head predicts the original tokens.
* Random video-token masking during training (``video_mask_ratio``; the official stage 2 uses 0.8),
  none at evaluation.
* Evaluation as the official zero-shot retrieval: cosine scores (``_emb``) and dual-softmax
  rescoring (``_dsl``, ``sim * softmax(sim, dim=0)``), R@1/5/10 and median rank in both directions
  (:mod:`iv2_lightning.metrics`; a hit is any candidate with the query's sample id), plus CLIP-style
  zero-shot classification from text prompts. The official ``_match`` re-ranking of the top 128 by
  the matching head is not done here.

Distributed training: contrastive terms gather every rank's rows (``gather_distributed``) and
mask the rows whose modality is absent, so ranks with different modality counts stay in step; a
term is skipped on every rank at once when fewer than two rows in the whole batch have its
modalities. A rank whose batch lacks a modality entirely leaves that encoder unused for the step,
so a DDP run over data with missing modalities needs ``strategy: ddp_find_unused_parameters_true``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from iv2_lightning.data.batch import VideoBatch
from iv2_lightning.metrics import dual_softmax, positives_from_ids, retrieval_metrics, zero_shot_accuracy
from iv2_lightning.models.fusion import CrossModalFusion, FusionOutput
from iv2_lightning.models.heads import MatchingHead, ProjectionHead, sample_hard_negatives
from iv2_lightning.models.layers import masked_mean
from iv2_lightning.models.losses import InfoNCELoss, MatchingLoss, gather_no_grad, gather_with_grad
from iv2_lightning.models.masking import random_mask
from iv2_lightning.stages.base import BaseStage

AUDIO_TERMS = ("atc", "vac", "avtc")
#: logged keys whose presence is decided the same way on every rank (see _eval_step)
_SYNCED_KEYS = ("loss", "temperature", "vtc", "atc", "avtc", "vac", "vsc")
MLM_PROBABILITY = 0.5  # the official stage-2 masking probability (BERT's is 0.15)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _scatter_rows(x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """``x [n, ...]`` placed at rows ``index`` of a zero ``[rows, ...]`` tensor (differentiable)."""
    return x.new_zeros((rows, *x.shape[1:])).index_copy(0, index, x)


def masked_info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    sample_ids: torch.Tensor,
    valid: torch.Tensor,
    temperature: torch.Tensor | float,
    gather_distributed: bool = True,
) -> torch.Tensor | None:
    """Symmetric multi-positive InfoNCE over the rows of ``a, b [B, E]`` with ``valid [B]`` True.

    Equal to :class:`~iv2_lightning.models.losses.InfoNCELoss` on the valid rows in one process
    (columns with the row's sample id are its positives, the target spread evenly over them).
    Across ranks (``gather_distributed``), every rank's rows are gathered with gradients, each
    rank sums the loss of its own valid rows against every rank's valid columns and divides by the
    global number of valid rows, times the world size, which DDP's gradient averaging cancels: the
    gradient is that of the mean over all valid rows however they are spread over the ranks, and
    every rank takes part in the same collectives whatever its own rows hold. Returns None, on every
    rank alike, when fewer than two rows are valid in the whole (gathered) batch.
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    world = _world_size() if gather_distributed else 1
    if world > 1:
        # all_gather needs one shape on every rank, and a rank's batch can be shorter (a clip that
        # failed to load is dropped by the collate): pad to the longest with rows that are not valid
        sizes = gather_no_grad(torch.tensor([a.shape[0]], device=a.device))
        pad = int(sizes.max()) - a.shape[0]
        if pad > 0:
            a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, 0, 0, pad))
            sample_ids = torch.cat([sample_ids, sample_ids.new_zeros(pad)])
            valid = torch.cat([valid, valid.new_zeros(pad)])
        a_all, b_all = gather_with_grad(a), gather_with_grad(b)
        ids_all, valid_all = gather_no_grad(sample_ids), gather_no_grad(valid)
    else:
        a_all, b_all, ids_all, valid_all = a, b, sample_ids, valid
    total = int(valid_all.sum())
    if total < 2:
        return None
    positive = (sample_ids[:, None] == ids_all[None, :]) & valid_all[None, :]
    target = positive.float() / positive.sum(dim=1, keepdim=True).clamp_min(1).float()

    def row_losses(logits: torch.Tensor) -> torch.Tensor:
        logp = logits.masked_fill(~valid_all[None, :], float("-inf")).log_softmax(dim=1)
        # where, not multiply: target 0 times logp -inf (an invalid column) would be NaN
        return -torch.where(positive, target * logp, torch.zeros_like(logp)).sum(dim=1)

    per_row = (row_losses(a @ b_all.T / temperature) + row_losses(b @ a_all.T / temperature)) / 2
    return torch.where(valid, per_row, torch.zeros_like(per_row)).sum() * world / total


@dataclass
class _Side:
    """One encoded modality over the whole batch: rows of absent samples are zeros.

    ``present [B]``, ``emb [B, E]`` (projected, not normalised), ``tokens [B, L, D]``, ``mask [B, L]``.
    """

    present: torch.Tensor
    emb: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


@dataclass
class _Features:
    video: _Side
    caption: _Side | None
    audio: _Side | None
    speech: _Side | None


class ContrastiveStage(BaseStage):
    """Stage 2: video-text(-audio-speech) contrastive alignment, matching and optional MLM.

    ``text``: :class:`~iv2_lightning.models.text.TextEncoder` overrides (e.g. ``{"dim": 256,
    "depth": 4}``) or, with ``text_model`` a local Hugging Face folder, ``HFTextEncoder`` options.
    ``text_pooling``: the sentence feature fed to ``text_proj``: ``"cls"`` = the encoder's own
    (``TextOutput.cls``: the first token, or what an ``HFTextEncoder``'s ``pooling`` says), as the
    official model with its pretrained BERT; ``"mean"`` = the masked mean of the token states.
    ``"auto"`` picks ``"mean"`` for a text encoder trained from scratch (its first token starts out
    identical for every caption, and on the synthetic data VTC stayed at chance for 120 steps with
    ``"cls"`` while ``"mean"`` learned) and ``"cls"`` for a pretrained one.
    ``audio``: :class:`~iv2_lightning.models.audio.AudioEncoder` overrides; the audio encoder exists
    only when a term that needs audio (``atc``, ``vac``, ``avtc``) has a positive weight.
    ``fusion``: :class:`~iv2_lightning.models.fusion.CrossModalFusion` arguments except
    ``input_dims``; the fusion exists only when ``vtm`` or ``mlm`` is on.
    ``vtc, atc, vac, vsc, avtc, vtm, mlm``: loss weights (0 switches a term and its modules off).
    ``zeroshot_prompts``: class name → prompts for zero-shot classification (class index = position
    in ``label_names``, default the dict order); None = the synthetic data's direction prompts.
    """

    stage_name = "stage2"

    def __init__(
        self,
        text: dict[str, Any] | None = None,
        text_model: str = "scratch",
        text_pooling: Literal["auto", "cls", "mean"] = "auto",
        audio: dict[str, Any] | None = None,
        fusion: dict[str, Any] | None = None,
        embed_dim: int = 128,
        temperature: float = 0.07,
        vtc: float = 1.0,
        atc: float = 0.5,
        vac: float = 0.5,
        vsc: float = 0.5,
        avtc: float = 0.5,
        vtm: float = 0.5,
        mlm: float = 0.0,
        video_mask_ratio: float = 0.5,
        gather_distributed: bool = True,
        zeroshot_prompts: dict[str, list[str]] | None = None,
        label_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.loss_weights = {
            "vtc": vtc,
            "atc": atc,
            "vac": vac,
            "vsc": vsc,
            "avtc": avtc,
            "vtm": vtm,
            "mlm": mlm,
        }
        bad = {k: w for k, w in self.loss_weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"loss weights must be >= 0; got {bad}")
        if not any(w > 0 for w in self.loss_weights.values()):
            raise ValueError(f"at least one loss weight must be > 0; got {self.loss_weights}")
        if not 0.0 <= video_mask_ratio < 1.0:
            raise ValueError(f"video_mask_ratio must be in [0, 1); got {video_mask_ratio}")
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1; got {embed_dim}")
        self.embed_dim = embed_dim
        self.video_mask_ratio = video_mask_ratio
        self.gather_distributed = gather_distributed
        if text_pooling not in ("auto", "cls", "mean"):
            raise ValueError(f"text_pooling must be 'auto', 'cls' or 'mean'; got {text_pooling!r}")
        if text_pooling == "auto":
            text_pooling = "mean" if text_model == "scratch" else "cls"
        self.text_pooling = text_pooling

        self.video_encoder = self.build_video_encoder()
        self.text_encoder = self.build_text_encoder(text, text_model)
        use_audio = any(self.loss_weights[k] > 0 for k in AUDIO_TERMS)
        self.audio_encoder = self.build_audio_encoder(audio) if use_audio else None

        self.video_proj = ProjectionHead(self.video_encoder.embed_out_dim, embed_dim)
        self.text_proj = ProjectionHead(self.text_encoder.dim, embed_dim)
        self.audio_proj = ProjectionHead(self.audio_encoder.dim, embed_dim) if use_audio else None
        self.av_fusion = nn.Linear(2 * embed_dim, embed_dim) if avtc > 0 else None
        # one temperature for every contrastive pair: InfoNCELoss holds and clamps it, the masked
        # and gathered loss itself is masked_info_nce
        self.contrastive = InfoNCELoss(temperature=temperature, learnable=True)
        self.matching_loss = MatchingLoss()

        self.fusion: CrossModalFusion | None = None
        self.itm_head: MatchingHead | None = None
        self.mlm_head: nn.Module | None = None
        if vtm > 0 or mlm > 0:
            dims = {"video": self.video_encoder.embed_dim, "text": self.text_encoder.dim}
            if self.audio_encoder is not None:
                dims["audio"] = self.audio_encoder.dim
            self.fusion = CrossModalFusion(dims, **(fusion or {}))
        if vtm > 0:
            self.itm_head = MatchingHead(self.fusion.dim)
        if mlm > 0:
            if getattr(self.tokenizer, "mask_id", None) is None:
                raise ValueError(
                    f"mlm > 0 needs a tokenizer with a mask token; {self.tokenizer_name!r} has none"
                )
            d = self.fusion.dim
            # BERT's prediction head: transform (Linear, GELU, LayerNorm), then the vocabulary
            self.mlm_head = nn.Sequential(
                nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, self.tokenizer.vocab_size)
            )

        prompts = zeroshot_prompts
        if prompts is None:
            from iv2_lightning.data.synthetic import direction_prompts

            prompts = direction_prompts()
        names = list(prompts) if label_names is None else list(label_names)
        missing = [n for n in names if n not in prompts or not prompts[n]]
        if missing:
            raise ValueError(
                f"label_names {missing} have no prompts in zeroshot_prompts (classes: {list(prompts)})"
            )
        self.label_names = names
        self.zeroshot_prompts = {n: list(prompts[n]) for n in names}
        self._prompt_tokens = None
        self._eval_store: list[dict[str, torch.Tensor]] = []
        self.finish_init()

    # -- encoders ------------------------------------------------------------------------------

    @property
    def text_max_length(self) -> int:
        return min(int(getattr(self.text_encoder, "max_length", 64)), 128)

    def _tokenize(self, texts: str | Sequence[str]):
        return self.tokenizer(texts, max_length=self.text_max_length, padding="longest")

    def _text_feature(self, out) -> torch.Tensor:
        return out.cls if self.text_pooling == "cls" else masked_mean(out.tokens, out.mask)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """``video [B, 3, T, H, W]`` → L2-normalised ``[B, embed_dim]`` (never masked)."""
        out = self.video_encoder(video)
        return F.normalize(self.video_proj(out.pooled).float(), dim=-1)

    def encode_text(
        self,
        texts: str | Sequence[str] | torch.Tensor,
        mask: torch.Tensor | None = None,
        token_type: int = 0,
    ) -> torch.Tensor:
        """Strings (tokenized here) or ``ids [B, L]`` (+ ``mask``) → L2-normalised ``[B, embed_dim]``.

        ``token_type`` 0 = caption, 1 = speech transcript.
        """
        if isinstance(texts, torch.Tensor):
            ids = texts.to(self.device)
            mask = mask.to(self.device) if mask is not None else None
        else:
            tok = self._tokenize(texts)
            ids, mask = tok.ids.to(self.device), tok.mask.to(self.device)
        return F.normalize(
            self.text_proj(self._text_feature(self.text_encoder(ids, mask, token_type))).float(), dim=-1
        )

    def encode_audio(self, fbank: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Kaldi fbank ``[B, F, bins]`` → L2-normalised ``[B, embed_dim]``."""
        if self.audio_encoder is None:
            raise RuntimeError("this ContrastiveStage has no audio encoder (atc, vac and avtc are all 0)")
        out = self.audio_encoder(fbank, frame_mask)
        return F.normalize(self.audio_proj(out.cls).float(), dim=-1)

    def _video_mask(self, video: torch.Tensor) -> torch.Tensor | None:
        if not self.training or self.video_mask_ratio <= 0:
            return None
        grid = self.video_encoder.patch_embed.grid(tuple(video.shape))
        n = grid[0] * grid[1] * grid[2]
        return random_mask(video.shape[0], n, self.video_mask_ratio, device=video.device)

    def _text_side(self, ids, mask, present: torch.Tensor, token_type: int) -> _Side | None:
        if ids is None or not bool(present.any()):
            return None
        index = present.nonzero().squeeze(1)
        out = self.text_encoder(ids[index], mask[index], token_type)
        b = present.shape[0]
        return _Side(
            present=present,
            emb=_scatter_rows(self.text_proj(self._text_feature(out)), index, b),
            tokens=_scatter_rows(out.tokens, index, b),
            mask=_scatter_rows(out.mask, index, b),
        )

    def _features(self, batch: VideoBatch) -> _Features:
        b = len(batch)
        out = self.video_encoder(batch.video, self._video_mask(batch.video))
        video = _Side(
            present=batch.present("video"),
            emb=self.video_proj(out.pooled),
            tokens=out.tokens,
            mask=torch.ones(out.tokens.shape[:2], dtype=torch.bool, device=out.tokens.device),
        )
        caption = self._text_side(batch.caption_ids, batch.caption_mask, batch.present("caption"), 0)
        speech = None
        if self.loss_weights["vsc"] > 0:
            speech = self._text_side(batch.speech_ids, batch.speech_mask, batch.present("speech"), 1)
        audio = None
        present = batch.present("audio")
        if self.audio_encoder is not None and batch.audio is not None and bool(present.any()):
            index = present.nonzero().squeeze(1)
            frame_mask = batch.audio_frame_mask[index] if batch.audio_frame_mask is not None else None
            a = self.audio_encoder(batch.audio[index], frame_mask)
            audio = _Side(
                present=present,
                emb=_scatter_rows(self.audio_proj(a.cls), index, b),
                tokens=_scatter_rows(a.tokens, index, b),
                mask=_scatter_rows(a.mask, index, b),
            )
        return _Features(video=video, caption=caption, audio=audio, speech=speech)

    # -- losses --------------------------------------------------------------------------------

    def _contrastive(
        self, a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor
    ) -> torch.Tensor | None:
        return masked_info_nce(a, b, ids, valid, self.contrastive.temperature, self.gather_distributed)

    def _fuse(
        self,
        f: _Features,
        clip_index: torch.Tensor,
        text_index: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
    ) -> FusionOutput:
        """Fuse the clips ``clip_index`` (video, and audio when encoded) with captions ``text_index``."""
        tokens = {"video": f.video.tokens[clip_index]}
        masks = {"video": f.video.mask[clip_index]}
        present = {"video": f.video.present[clip_index]}
        tokens["text"] = f.caption.tokens[text_index] if text_tokens is None else text_tokens
        masks["text"] = f.caption.mask[text_index]
        present["text"] = f.caption.present[text_index]
        if f.audio is not None and "audio" in self.fusion.input_dims:
            tokens["audio"] = f.audio.tokens[clip_index]
            masks["audio"] = f.audio.mask[clip_index]
            present["audio"] = f.audio.present[clip_index]
        return self.fusion(tokens, masks, present)

    def _gate_means(self, fused: FusionOutput, rows: int) -> dict[str, torch.Tensor]:
        """Mean last-layer gate per (query ← source) pair over the first ``rows`` samples that have both."""
        out = {}
        present = {m: mask[:rows].any(dim=1) for m, mask in fused.masks.items()}
        for q, row in fused.gates.items():
            for s, g in row.items():
                if q not in present or s not in present:
                    continue
                both = present[q] & present[s]
                if bool(both.any()):
                    out[f"gate_{q}_{s}"] = g[:rows][both].detach().float().mean()
        return out

    def _vtm(self, f: _Features, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        rows = f.caption.present.nonzero().squeeze(1)
        if rows.numel() < 2:
            return None
        row_ids = ids[rows]
        has_negative = (row_ids[:, None] != row_ids[None, :]).any(dim=1)
        if not bool(has_negative.any()):
            return None
        with torch.no_grad():
            v = F.normalize(f.video.emb[rows].float(), dim=-1)
            t = F.normalize(f.caption.emb[rows].float(), dim=-1)
            sim = v @ t.T / self.contrastive.temperature
        sel = has_negative.nonzero().squeeze(1)
        neg_text = sample_hard_negatives(sim[sel], row_ids[sel], column_ids=row_ids)
        neg_video = sample_hard_negatives(sim.T[sel], row_ids[sel], column_ids=row_ids)
        # positives, (video i, hard text), (hard video, text i); audio always travels with its video
        clip_index = torch.cat([rows, rows[sel], rows[neg_video]])
        text_index = torch.cat([rows, rows[neg_text], rows[sel]])
        fused = self._fuse(f, clip_index, text_index)
        logits = self.itm_head(fused.pooled)
        p = rows.numel()
        return self.matching_loss(logits[:p], logits[p:]), self._gate_means(fused, p)

    def _mlm(self, f: _Features, batch: VideoBatch) -> torch.Tensor | None:
        rows = f.caption.present.nonzero().squeeze(1)
        if rows.numel() == 0:
            return None
        ids = batch.caption_ids[rows]
        mask = batch.caption_mask[rows]
        tok = self.tokenizer
        special = torch.zeros_like(mask)
        for sid in {tok.pad_id, getattr(tok, "bos_id", None), getattr(tok, "eos_id", None)}:
            if sid is not None:
                special |= ids == sid
        candidates = mask & ~special
        chosen = candidates & (torch.rand(ids.shape, device=ids.device) < MLM_PROBABILITY)
        if not bool(chosen.any()):
            return None
        u = torch.rand(ids.shape, device=ids.device)
        low = int(getattr(tok, "num_special", 0))
        random_ids = torch.randint(low, tok.vocab_size, ids.shape, device=ids.device)
        corrupted = torch.where(chosen & (u < 0.8), torch.full_like(ids, tok.mask_id), ids)
        corrupted = torch.where(chosen & (u >= 0.8) & (u < 0.9), random_ids, corrupted)
        out = self.text_encoder(corrupted, mask, 0)
        fused = self._fuse(f, rows, rows, text_tokens=out.tokens)
        logits = self.mlm_head(fused.tokens["text"][chosen])
        return F.cross_entropy(logits.float(), ids[chosen])

    def _losses(self, f: _Features, batch: VideoBatch) -> dict[str, torch.Tensor]:
        ids = batch.sample_id
        w = self.loss_weights
        v, cap, aud, sp = f.video, f.caption, f.audio, f.speech
        b = len(batch)
        # with gathering across ranks every rank must join every enabled term's collectives, even
        # one whose batch lacks the modality: it joins with zero rows that are not valid
        sync = self.gather_distributed and _world_size() > 1
        none = torch.zeros(b, dtype=torch.bool, device=v.emb.device)

        def side(x: _Side | None) -> tuple[torch.Tensor, torch.Tensor]:
            return (x.emb, x.present) if x is not None else (v.emb.new_zeros(b, self.embed_dim), none)

        (cap_emb, cap_p), (aud_emb, aud_p), (sp_emb, sp_p) = side(cap), side(aud), side(sp)
        pairs = {
            "vtc": (lambda: v.emb, cap_emb, cap_p, cap is not None),
            "atc": (lambda: aud_emb, cap_emb, aud_p & cap_p, aud is not None and cap is not None),
            "avtc": (
                lambda: self.av_fusion(torch.cat([v.emb, aud_emb], dim=-1)),
                cap_emb,
                aud_p & cap_p,
                aud is not None and cap is not None,
            ),
            "vac": (lambda: v.emb, aud_emb, aud_p, aud is not None),
            "vsc": (lambda: v.emb, sp_emb, sp_p, sp is not None),
        }
        terms: dict[str, torch.Tensor | None] = {}
        for name, (first, second, valid, available) in pairs.items():
            if w[name] > 0 and (available or sync):
                terms[name] = self._contrastive(first(), second, ids, valid)
        extras: dict[str, torch.Tensor] = {}
        if w["vtm"] > 0 and cap is not None:
            vtm = self._vtm(f, ids)
            if vtm is not None:
                terms["vtm"], extras = vtm
        if w["mlm"] > 0 and cap is not None:
            terms["mlm"] = self._mlm(f, batch)
        kept = {k: t for k, t in terms.items() if t is not None}
        # a batch with no usable pair still returns a loss connected to the graph (zero gradient)
        loss = v.emb.sum() * 0.0
        for k, t in kept.items():
            loss = loss + w[k] * t
        return {"loss": loss, **kept, "temperature": self.contrastive.temperature.detach(), **extras}

    def compute_loss(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        """Weighted sum of the stage-2 terms; a term is absent from the dict when it was skipped
        (weight 0, or fewer than two rows with its modalities)."""
        return self._losses(self._features(batch), batch)

    # -- evaluation ----------------------------------------------------------------------------

    def validation_step(self, batch: VideoBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: VideoBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._eval_store = []

    def on_test_epoch_start(self) -> None:
        self._eval_store = []

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_step(self, batch: VideoBatch, prefix: str) -> None:
        f = self._features(batch)
        out = self._losses(f, batch)
        for k, v in out.items():
            # only keys that every rank logs at every step may be synced (a sync is a collective);
            # VTM, MLM and the gates depend on the rank's own rows, so they stay rank-local
            self.log(
                f"{prefix}/{k}",
                v.detach(),
                on_step=False,
                on_epoch=True,
                batch_size=len(batch),
                sync_dist=k in _SYNCED_KEYS,
            )
        b = len(batch)
        cap = f.caption
        self._eval_store.append(
            {
                "video": F.normalize(f.video.emb.detach().float(), dim=-1),
                "text": F.normalize(cap.emb.detach().float(), dim=-1)
                if cap is not None
                else f.video.emb.new_zeros(b, self.embed_dim),
                "text_present": cap.present
                if cap is not None
                else torch.zeros(b, dtype=torch.bool, device=self.device),
                "sample_id": batch.sample_id,
                "label": batch.label
                if batch.label is not None
                else torch.full((b,), -100, dtype=torch.long, device=self.device),
            }
        )

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``x [n, ...]`` over ranks (ranks may hold different ``n``)."""
        if self._trainer is None or self.trainer.world_size <= 1:
            return x
        n = torch.tensor([x.shape[0]], device=x.device)
        sizes = self.all_gather(n).flatten().tolist()
        most = max(sizes)
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = self.all_gather(padded)  # [world, most, ...]
        return torch.cat([parts[r, : sizes[r]] for r in range(len(sizes))])

    def _eval_epoch_end(self, prefix: str) -> None:
        store, self._eval_store = self._eval_store, []
        if not store:
            return
        cat = {k: torch.cat([s[k] for s in store]) for k in store[0]}
        cat = {k: self._gather_rows(v) for k, v in cat.items()}
        metrics = self.retrieval_scores(cat["video"], cat["text"], cat["sample_id"], cat["text_present"])
        labelled = cat["label"] >= 0
        if bool(labelled.any()):
            with torch.no_grad():
                classes = self.class_text_embeddings()
            metrics["zs_acc"] = zero_shot_accuracy(cat["video"][labelled], classes, cat["label"][labelled])
        for k, v in metrics.items():
            # identical on every rank (computed from the gathered embeddings): syncing is a no-op
            self.log(f"{prefix}/{k}", float(v), on_step=False, on_epoch=True, sync_dist=True)

    @staticmethod
    def retrieval_scores(
        video_emb: torch.Tensor,
        text_emb: torch.Tensor,
        sample_ids: torch.Tensor,
        text_present: torch.Tensor | None = None,
    ) -> dict[str, float]:
        """T2V / V2T R@1/5/10, median and mean rank, with cosine and with dual-softmax scores.

        ``video_emb``/``text_emb [N, E]`` normalised, ``sample_ids [N]``; only texts with
        ``text_present`` are used. A candidate is a hit when it has the query's sample id. Keys:
        ``t2v_r1 ... v2t_meanr`` and the same with ``_dsl`` appended.
        """
        if text_present is None:
            text_present = torch.ones_like(sample_ids, dtype=torch.bool)
        out: dict[str, float] = {}
        if not bool(text_present.any()):
            return out
        t, t_ids = text_emb[text_present].float(), sample_ids[text_present]
        v = video_emb.float()
        t2v = t @ v.T
        pos_t2v = positives_from_ids(t_ids, sample_ids)
        for suffix, scores in (("", (t2v, t2v.T)), ("_dsl", (dual_softmax(t2v), dual_softmax(t2v.T)))):
            for name, sim, pos in (("t2v", scores[0], pos_t2v), ("v2t", scores[1], pos_t2v.T)):
                m = retrieval_metrics(sim, pos)
                for k in ("r1", "r5", "r10", "medr", "meanr"):
                    out[f"{name}_{k}{suffix}"] = m[k]
        return out

    def class_text_embeddings(self) -> torch.Tensor:
        """``[C, embed_dim]``: per class (``label_names`` order) the normalised mean of the
        normalised prompt embeddings (CLIP's prompt ensembling)."""
        if self._prompt_tokens is None:
            texts = [p for n in self.label_names for p in self.zeroshot_prompts[n]]
            owner = [i for i, n in enumerate(self.label_names) for _ in self.zeroshot_prompts[n]]
            tok = self._tokenize(texts)
            self._prompt_tokens = (tok.ids, tok.mask, torch.tensor(owner))
        ids, mask, owner = self._prompt_tokens
        embs = torch.cat(
            [self.encode_text(ids[i : i + 256], mask[i : i + 256]) for i in range(0, ids.shape[0], 256)]
        )
        owner = owner.to(embs.device)
        sums = embs.new_zeros(len(self.label_names), embs.shape[1]).index_add(0, owner, embs)
        return F.normalize(sums, dim=-1)

    def predict_step(self, batch: VideoBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Normalised video (and caption, where present) embeddings of a batch, with ids and labels."""
        out: dict[str, Any] = {"video_emb": self.encode_video(batch.video), "sample_id": batch.sample_id}
        present = batch.present("caption")
        if bool(present.any()):
            out["text_emb"] = self.encode_text(batch.caption_ids[present], batch.caption_mask[present])
            out["text_present"] = present
        if batch.label is not None:
            out["label"] = batch.label
        return out


__all__ = ["ContrastiveStage", "masked_info_nce"]
