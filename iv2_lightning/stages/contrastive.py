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
  zero-shot classification from text prompts (``zeroshot_prompts``, or ``zeroshot_classes`` x
  ``prompt_templates``). With ``rerank_k > 0`` also the official ``_match`` scores: each query's
  top ``rerank_k`` candidates by cosine re-ranked by the matching head (``_match`` keys;
  :func:`~iv2_lightning.metrics.rerank_top_k`).
* Clips longer than the encoder's training frames are cut into windows of that many frames (as
  :class:`~iv2_lightning.models.temporal.HierarchicalTemporalEncoder` splits them); each window goes
  through the encoder on its own and the clip embedding is the normalised mean of the normalised
  window embeddings (no stage trains the HTE's temporal transformer, so its own ``embedding``
  would be untrained); ``encode_video_windows`` returns the window embeddings too.
* Evaluation pictures in TensorBoard (``visual_clips`` clips of the first batch of every
  validation/test epoch, rank 0): the text-video similarity heat map, top-k retrieval strips, the
  attention pool's weights over frames and the fusion gates (:mod:`iv2_lightning.visualize`).

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
from iv2_lightning.metrics import (
    dual_softmax,
    positives_from_ids,
    rerank_top_k,
    retrieval_metrics,
    zero_shot_accuracy,
)
from iv2_lightning.models.fusion import CrossModalFusion, FusionOutput
from iv2_lightning.models.heads import MatchingHead, ProjectionHead, sample_hard_negatives
from iv2_lightning.models.layers import masked_mean
from iv2_lightning.models.losses import InfoNCELoss, MatchingLoss, gather_no_grad, gather_with_grad
from iv2_lightning.models.masking import random_mask
from iv2_lightning.models.temporal import HierarchicalTemporalEncoder
from iv2_lightning.stages.base import BaseStage

AUDIO_TERMS = ("atc", "vac", "avtc")
#: evaluation settings of ContrastiveStage, kept out of its saved hyperparameters (class docstring)
EVAL_ARGUMENTS = ("zeroshot_classes", "prompt_templates", "rerank_k", "visual_clips")
#: what the evaluation keeps for the matching head's re-ranking (``rerank_k``), padded at epoch end
_MATCH_TOKEN_KEYS = (
    "video_tokens",
    "video_token_mask",
    "text_tokens",
    "text_mask",
    "audio_tokens",
    "audio_mask",
)
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

    Evaluation settings (:data:`EVAL_ARGUMENTS`; checkpoints do not record them, so an evaluation
    config sets them even on ``iv2 test --ckpt_path``, where LightningCLI replaces the config's model
    arguments by the ones the checkpoint recorded):
    ``zeroshot_classes``: class names in label order for zero-shot classification, each put into
    every template of ``prompt_templates`` (``{}`` marks the name; default ``["{}"]``, the bare
    name); they replace ``zeroshot_prompts`` and ``label_names``.
    ``rerank_k``: in validation/test also score retrieval with the matching head over each query's
    top ``rerank_k`` candidates (the official ``_match``, which uses 128; needs ``vtm > 0``).
    ``visual_clips``: how many clips of the first evaluation batch the TensorBoard pictures show
    (0: none).
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
        zeroshot_classes: list[str] | None = None,
        prompt_templates: list[str] | None = None,
        rerank_k: int = 0,
        visual_clips: int = 16,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for key in EVAL_ARGUMENTS:  # see the class docstring
            self.hparams.pop(key, None)
            getattr(self, "_hparams_initial", {}).pop(key, None)
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
        if rerank_k < 0 or visual_clips < 0:
            raise ValueError(f"rerank_k and visual_clips must be >= 0; got {rerank_k}, {visual_clips}")
        if rerank_k > 0 and vtm <= 0:
            raise ValueError("rerank_k > 0 re-ranks with the matching head, which needs vtm > 0")
        self.rerank_k = rerank_k
        self.visual_clips = visual_clips
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
        if zeroshot_classes is not None:
            templates = list(prompt_templates or ["{}"])
            if not zeroshot_classes or any("{}" not in t for t in templates):
                raise ValueError(
                    "zeroshot_classes needs at least one class and prompt_templates that each hold '{}' for "
                    f"the class name; got {zeroshot_classes}, {templates}"
                )
            prompts = {c: [t.replace("{}", c) for t in templates] for c in zeroshot_classes}
            label_names = list(zeroshot_classes)
        elif prompt_templates is not None:
            raise ValueError("prompt_templates needs zeroshot_classes (the class names to put into them)")
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
        self._visuals: dict[str, Any] | None = None
        self._splitters: dict[int, HierarchicalTemporalEncoder] = {}
        self.finish_init()

    # -- encoders ------------------------------------------------------------------------------

    @property
    def text_max_length(self) -> int:
        return min(int(getattr(self.text_encoder, "max_length", 64)), 128)

    def _tokenize(self, texts: str | Sequence[str]):
        return self.tokenizer(texts, max_length=self.text_max_length, padding="longest")

    def _text_feature(self, out) -> torch.Tensor:
        return out.cls if self.text_pooling == "cls" else masked_mean(out.tokens, out.mask)

    def encode_video(self, video: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """``video [B, 3, T, H, W]`` → L2-normalised ``[B, embed_dim]`` (never masked). A clip longer
        than ``window`` frames (default: the encoder's training frames) goes through windows
        (:meth:`encode_video_windows`)."""
        if video.shape[2] > (window or self.video_encoder.num_frames):
            return self.encode_video_windows(video, window)[0]
        out = self.video_encoder(video)
        return F.normalize(self.video_proj(out.pooled).float(), dim=-1)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the video encoder at the frame count its weights were trained with.

        The CLI links the data's ``num_frames`` into the stage, so evaluating longer clips (``iv2
        test --ckpt_path ... --data.init_args.num_frames 32``) would build a longer encoder whose
        position table no longer fits the checkpoint. The encoder is rebuilt with the checkpoint's
        frame count instead: longer clips then go through windows of it (:meth:`_windowed`),
        shorter ones through interpolated positions. Other shape mismatches are left to the load.
        """
        saved = (checkpoint.get("state_dict") or {}).get("video_encoder.pos_embed")
        enc = self.video_encoder
        if saved is None or saved.shape == enc.pos_embed.shape or saved.dim() != 3:
            return
        per_frame = enc.grid_size[1] * enc.grid_size[2]
        tokens = saved.shape[1] - enc.num_prefix
        if tokens <= 0 or tokens % per_frame or saved.shape[2] != enc.embed_dim:
            return
        self.encoder_config = {**self.encoder_config, "num_frames": tokens // per_frame * enc.tubelet_size}
        self.video_encoder = self.build_video_encoder().to(enc.pos_embed.device)
        self._splitters.clear()
        if self.freeze_names:
            self.freeze_parameters(self.freeze_names)

    def _window_splitter(self, window: int) -> HierarchicalTemporalEncoder:
        # kept in a plain dict, outside the module tree (no parameters of its own in our state_dict);
        # only its window split is used, so its untrained layers are built on the meta device
        if window not in self._splitters:
            with torch.device("meta"):
                self._splitters[window] = HierarchicalTemporalEncoder(
                    self.video_encoder, window=window, tokens_per_window=1, depth=0
                )
        return self._splitters[window]

    def _windowed(
        self, video: torch.Tensor, window: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows of ``window`` frames (the HTE's split: the tail padded with the last frame) through
        the encoder (token-masked in training, as whole clips are): (window embeddings ``[B, W, E]``
        normalised, ``window_mask [B, W]``, tokens ``[B, W * L, D]``, token mask ``[B, W * L]``)."""
        splitter = self._window_splitter(window or self.video_encoder.num_frames)
        windows, window_mask = splitter.split_windows(video)
        b, w = window_mask.shape
        out = self.video_encoder(windows, self._video_mask(windows))
        emb = F.normalize(self.video_proj(out.pooled).float(), dim=-1).reshape(b, w, -1)
        tokens = out.tokens.reshape(b, w * out.tokens.shape[1], -1)
        return emb, window_mask, tokens, window_mask.repeat_interleave(out.tokens.shape[1], dim=1)

    def encode_video_windows(
        self, video: torch.Tensor, window: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clip ``[B, E]``, windows ``[B, W, E]``, ``window_mask [B, W]``): the L2-normalised
        embedding of every window of ``window`` frames (default: the encoder's training frames) and
        the normalised mean of a clip's windows. ``T`` need not be a multiple of ``window``."""
        emb, window_mask, _, _ = self._windowed(video, window)
        return F.normalize(masked_mean(emb, window_mask), dim=-1), emb, window_mask

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
        if batch.video.shape[2] > self.video_encoder.num_frames:
            windows, window_mask, tokens, token_mask = self._windowed(batch.video)
            emb = masked_mean(windows, window_mask)
        else:
            out = self.video_encoder(batch.video, self._video_mask(batch.video))
            emb, tokens = self.video_proj(out.pooled), out.tokens
            token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        video = _Side(present=batch.present("video"), emb=emb, tokens=tokens, mask=token_mask)
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
        self._eval_step(batch, "val", batch_idx)

    def test_step(self, batch: VideoBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test", batch_idx)

    def on_validation_epoch_start(self) -> None:
        self._eval_store = []

    def on_test_epoch_start(self) -> None:
        self._eval_store = []

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_step(self, batch: VideoBatch, prefix: str, batch_idx: int = 0) -> None:
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
        entry = {
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
        if self.rerank_k > 0:
            entry.update(self._match_tokens(f, b))  # the matching head re-ranks at epoch end
        self._eval_store.append(entry)
        if batch_idx == 0 and self._wants_pictures():
            self._visuals = self._picture_record(batch, f, out, entry)

    def _match_tokens(self, f: _Features, b: int) -> dict[str, torch.Tensor]:
        """The tokens the matching head fuses, for every row (an absent modality: one masked token);
        :meth:`_eval_epoch_end` pads them to one length."""

        def side(x: _Side | None, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
            if x is None:
                return f.video.tokens.new_zeros(b, 1, dim), torch.zeros(
                    b, 1, dtype=torch.bool, device=self.device
                )
            return x.tokens.detach(), x.mask & x.present[:, None]

        out = {"video_tokens": f.video.tokens.detach(), "video_token_mask": f.video.mask}
        out["text_tokens"], out["text_mask"] = side(f.caption, self.text_encoder.dim)
        if self.audio_encoder is not None and "audio" in self.fusion.input_dims:
            out["audio_tokens"], out["audio_mask"] = side(f.audio, self.audio_encoder.dim)
        return out

    def _wants_pictures(self) -> bool:
        if self.visual_clips <= 0 or self._trainer is None:
            return False
        trainer = self.trainer
        if trainer.sanity_checking or not trainer.is_global_zero:
            return False
        return any(hasattr(getattr(lg, "experiment", None), "add_image") for lg in self.loggers)

    @torch.no_grad()
    def _picture_record(
        self, batch: VideoBatch, f: _Features, out: dict[str, torch.Tensor], entry: dict[str, torch.Tensor]
    ) -> dict[str, Any]:
        """What the evaluation pictures need from the first batch (on the CPU)."""
        n = min(self.visual_clips, len(batch))
        record: dict[str, Any] = {
            "video": batch.video[:n].detach().float().cpu(),
            "video_emb": entry["video"][:n].cpu(),
            "text_emb": entry["text"][:n].cpu(),
            "text_present": entry["text_present"][:n].cpu(),
            "sample_id": batch.sample_id[:n].cpu(),
            "captions": list(batch.captions[:n]),
            "gates": {k[len("gate_") :]: float(v) for k, v in out.items() if k.startswith("gate_")},
            "attention": None,
            "tubelet": self.video_encoder.tubelet_size,
        }
        enc = self.video_encoder
        grid = enc.patch_embed.grid(tuple(batch.video.shape))
        tokens = f.video.tokens[:n]
        if enc.clip_projector is not None and tokens.shape[1] == enc.num_prefix + grid[0] * grid[1] * grid[2]:
            weights = enc.clip_projector.attention_weights(tokens)[:, enc.num_prefix :]
            record["attention"] = weights.reshape(n, *grid).float().cpu()
        return record

    def _log_pictures(self, prefix: str) -> None:
        from iv2_lightning.visualize import contrastive_pictures

        record, self._visuals = self._visuals, None
        if record is None:
            return
        images, text = contrastive_pictures(record)
        for lg in self.loggers:
            writer = getattr(lg, "experiment", None)
            if not hasattr(writer, "add_image"):
                continue
            for tag, image in images.items():
                writer.add_image(f"{prefix}/{tag}", image, self.global_step)
            if text and hasattr(writer, "add_text"):
                writer.add_text(f"{prefix}/retrieval_queries", text, self.global_step)

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
        for key in _MATCH_TOKEN_KEYS:
            if key in store[0]:  # token counts differ between batches (and ranks): pad to the longest
                width = max(s[key].shape[1] for s in store)
                if self._trainer is not None and self.trainer.world_size > 1:
                    width = int(self.all_gather(torch.tensor(width, device=self.device)).max())
                for s in store:
                    padded = s[key].new_zeros((s[key].shape[0], width, *s[key].shape[2:]))
                    padded[:, : s[key].shape[1]] = s[key]
                    s[key] = padded
        cat = {k: torch.cat([s[k] for s in store]) for k in store[0]}
        cat = {k: self._gather_rows(v) for k, v in cat.items()}
        metrics = self.retrieval_scores(cat["video"], cat["text"], cat["sample_id"], cat["text_present"])
        labelled = cat["label"] >= 0
        if bool(labelled.any()):
            with torch.no_grad():
                classes = self.class_text_embeddings()
            metrics["zs_acc"] = zero_shot_accuracy(cat["video"][labelled], classes, cat["label"][labelled])
        if self.rerank_k > 0 and "video_tokens" in cat:
            metrics.update(self.match_scores(cat))
        for k, v in metrics.items():
            # identical on every rank (computed from the gathered embeddings): syncing is a no-op
            self.log(f"{prefix}/{k}", float(v), on_step=False, on_epoch=True, sync_dist=True)
        self._log_pictures(prefix)

    @torch.no_grad()
    def match_scores(self, cat: dict[str, torch.Tensor], chunk: int = 256) -> dict[str, float]:
        """The official ``_match`` evaluation: T2V and V2T R@1/5/10, median and mean rank after the
        matching head re-ranks each query's top ``rerank_k`` candidates by cosine (its "match"
        logit of the fused pair: the video's tokens, with its audio's when the clips have audio, as
        VTM trained it, and the caption's). ``cat`` holds the epoch's ``video``/``text`` embeddings,
        ``sample_id``, ``text_present`` and the stored tokens; keys end in ``_match``."""
        rows = cat["text_present"].nonzero().squeeze(1)
        if rows.numel() == 0:
            return {}
        sim = cat["text"][rows].float() @ cat["video"].float().T  # [Nt, Nv]
        positive = positives_from_ids(cat["sample_id"][rows], cat["sample_id"])

        with_audio = "audio_tokens" in cat and bool(cat["audio_mask"].any())

        def itm(text_index: torch.Tensor, video_index: torch.Tensor) -> torch.Tensor:
            scores = []
            for i in range(0, text_index.numel(), chunk):
                t, v = rows[text_index[i : i + chunk]], video_index[i : i + chunk]
                tokens = {"video": cat["video_tokens"][v], "text": cat["text_tokens"][t]}
                masks = {"video": cat["video_token_mask"][v], "text": cat["text_mask"][t]}
                if with_audio:  # audio travels with its video, as in training
                    tokens["audio"], masks["audio"] = cat["audio_tokens"][v], cat["audio_mask"][v]
                fused = self.fusion(tokens, masks)
                scores.append(self.itm_head(fused.pooled)[:, 1].float())
            return torch.cat(scores)

        out: dict[str, float] = {}
        t2v = rerank_top_k(sim, self.rerank_k, itm)
        v2t = rerank_top_k(sim.T, self.rerank_k, lambda r, c: itm(c, r))
        for name, scores, pos in (("t2v", t2v, positive), ("v2t", v2t, positive.T)):
            m = retrieval_metrics(scores, pos)
            for k in ("r1", "r5", "r10", "medr", "meanr"):
                out[f"{name}_{k}_match"] = m[k]
        return out

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
