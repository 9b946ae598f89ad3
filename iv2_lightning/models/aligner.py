"""VideoTextAligner: the stage-2 model of InternVideo2 as a plain ``nn.Module`` (no Lightning).

InternVideo2 (arXiv 2403.15377, Sec. 3.2) aligns the video encoder with text, audio and speech.
What this model follows from the official stage-2 recipe (OpenGVLab/InternVideo, ``InternVideo2``):

* **VTC** video-text contrastive loss with *multiple positives by sample id* (the official ``idx``:
  every clip of the batch with the caption's sample id is a positive), negatives all-gathered from
  every rank *with gradients*, one learnable temperature (init 0.07, clamped to [0.001, 0.5]);
  :class:`~iv2_lightning.models.losses.InfoNCELoss`. The same loss aligns audio-text (ATC),
  video-audio (VAC), video-speech (VSC: speech enters as its ASR transcript, through the text encoder
  with token type 1; the official model, too, only sees speech as text) and fused audio-video vs text
  (AVTC: ``av_fusion = Linear(2E → E)`` over the concatenated video and audio embeddings, as the
  official 6B model).
* **VTM** video-text matching: for every video one *hard negative* caption and for every caption one
  hard negative video, drawn with ``torch.multinomial`` from ``softmax(sim / temp)`` of the (detached)
  similarity row with the row's positives excluded; the matching head (``itm_head``) reads the
  cross-modal fusion of (video [+ audio], text) and is trained with 2-way cross-entropy, positives
  label 1, negatives 0. Two fusions: ``fusion="bert"``, the official one, runs the caption through the
  upper (fusion) layers of a :class:`~iv2_lightning.models.bert.BertTextEncoder`, cross-attending to
  the video (+ audio) tokens, and the head reads the fused ``[CLS]``; ``"cmfm"`` (default) is the
  gated :class:`~iv2_lightning.models.fusion.CrossModalFusion` (the paper's CMFM), where every modality
  attends to every other and the head reads the mean over every fused token (so every fusion parameter
  takes part in the loss and DDP needs no ``find_unused_parameters``).
* **MLM** (optional, ``mlm > 0``): caption tokens are corrupted with the official probability 0.5
  (BERT's 80 % ``[MASK]`` / 10 % random / 10 % kept), encoded, fused with the video (and audio)
  tokens, and a small head predicts the original tokens.
* Random video-token masking in training mode (``video_mask_ratio``; the official stage 2 uses 0.8),
  none in eval mode.
* Clips longer than the encoder's training frames are cut into windows of that many frames (as
  :class:`~iv2_lightning.models.temporal.HierarchicalTemporalEncoder` splits them); each window goes
  through the encoder on its own and the clip embedding is the normalised mean of the normalised
  window embeddings; :meth:`VideoTextAligner.encode_video_windows` returns the window embeddings too.
  With ``temporal`` (:class:`~iv2_lightning.models.temporal.HierarchicalTemporalEncoder` arguments),
  a long clip's embedding is instead ``video_proj`` of the mean of the windows' pooled features plus
  the HTE's clip embedding (its head starts at zero): the HTE's attention pool and temporal
  transformer read the windows (encoded once, as above) in order, and contrast with the caption
  trains them, so a caption that says in which order things happen can find its clip.

Rows whose modality is absent are masked out of every term; a term is skipped (absent from
``terms``) when fewer than two rows of the whole, gathered, batch have its modalities. The layout
follows anomalib's ``torch_model.py``: the math here, the training loop elsewhere (the Lightning
shell is :class:`~iv2_lightning.stages.contrastive.ContrastiveStage`). Outputs are NamedTuples and
dicts of tensors, which DeepSpeed ZeRO-3 can see into.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.models.distributed import world_size
from iv2_lightning.models.fusion import CrossModalFusion, FusionOutput
from iv2_lightning.models.heads import MatchingHead, ProjectionHead, sample_hard_negatives
from iv2_lightning.models.layers import masked_mean
from iv2_lightning.models.losses import InfoNCELoss, MatchingLoss
from iv2_lightning.models.masking import random_mask
from iv2_lightning.models.temporal import HierarchicalTemporalEncoder

__all__ = [
    "AUDIO_TERMS",
    "DEFAULT_WEIGHTS",
    "FUSION_KINDS",
    "MLM_PROBABILITY",
    "TERM_FIELDS",
    "AlignerFeatures",
    "AlignerOutput",
    "Side",
    "VideoTextAligner",
    "fusion_kind",
    "resolve_loss_weights",
]

#: the batch fields each loss term needs (``VideoBatch.present`` names)
TERM_FIELDS: dict[str, tuple[str, ...]] = {
    "vtc": ("video", "caption"),
    "atc": ("audio", "caption"),
    "vac": ("video", "audio"),
    "avtc": ("video", "audio", "caption"),
    "vsc": ("video", "speech"),
    "vtm": ("video", "caption"),
    "mlm": ("video", "caption"),
}
#: the weight of a term switched on without a weight of its own (MLM is off unless asked for)
DEFAULT_WEIGHTS = {"vtc": 1.0, "atc": 0.5, "vac": 0.5, "vsc": 0.5, "avtc": 0.5, "vtm": 0.5, "mlm": 0.0}
AUDIO_TERMS = ("atc", "vac", "avtc")
FUSION_KINDS = ("cmfm", "bert")
MLM_PROBABILITY = 0.5  # the official stage-2 masking probability (BERT's is 0.15)


def resolve_loss_weights(
    weights: Mapping[str, float | None], data_fields: Iterable[str] | None = None
) -> dict[str, float]:
    """Loss weights with ``None`` resolved: a term without a weight is on (at :data:`DEFAULT_WEIGHTS`)
    when ``data_fields`` holds every field it needs (:data:`TERM_FIELDS`) and off otherwise; with
    ``data_fields`` unknown (None) it is on at its default weight."""
    unknown = sorted(set(weights) - set(TERM_FIELDS))
    if unknown:
        raise ValueError(f"unknown loss terms {unknown}; expected names from {list(TERM_FIELDS)}")
    fields = None if data_fields is None else set(data_fields)
    out = {}
    for term, default in DEFAULT_WEIGHTS.items():
        w = weights.get(term)
        if w is None:
            w = default if fields is None or set(TERM_FIELDS[term]) <= fields else 0.0
        out[term] = float(w)
    return out


def fusion_kind(fusion: Mapping[str, Any] | str | None) -> tuple[str, dict[str, Any]]:
    """``(kind, CrossModalFusion arguments)`` from the ``fusion`` argument: ``"cmfm"`` (or a dict of
    :class:`~iv2_lightning.models.fusion.CrossModalFusion` arguments, or None) = the gated fusion module;
    ``"bert"`` = the fusion layers of a :class:`~iv2_lightning.models.bert.BertTextEncoder` (official)."""
    if fusion is None:
        return "cmfm", {}
    if isinstance(fusion, str):
        if fusion not in FUSION_KINDS:
            raise ValueError(
                f"fusion must be one of {list(FUSION_KINDS)} or a dict of CrossModalFusion arguments; got {fusion!r}"
            )
        return fusion, {}
    return "cmfm", dict(fusion)


class Side(NamedTuple):
    """One encoded modality over the whole batch; rows of absent samples are zeros.

    ``present [B]``, ``emb [B, E]`` (projected, not normalised), ``tokens [B, L, D]``, ``mask [B, L]``.
    """

    present: torch.Tensor
    emb: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor


class AlignerFeatures(NamedTuple):
    """The encoded batch: ``video`` always, the others None when no row of the batch has them."""

    video: Side
    caption: Side | None
    audio: Side | None
    speech: Side | None


class AlignerOutput(NamedTuple):
    """``loss``: the weighted sum of ``terms`` (the per-term losses that were computed; a term is
    absent when its weight is 0 or fewer than two rows have its modalities), connected to the graph
    even when no term was; ``temperature``: the contrastive temperature in use; ``gates``: mean
    last-layer fusion gates of the VTM positives (``gate_<query>_<source>``); ``features``: the
    encoded batch."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    temperature: torch.Tensor
    gates: dict[str, torch.Tensor]
    features: AlignerFeatures

    def scalars(self) -> dict[str, torch.Tensor]:
        """``{"loss", *terms, "temperature", *gates}``: what a training loop logs."""
        return {"loss": self.loss, **self.terms, "temperature": self.temperature, **self.gates}


def _scatter_rows(x: torch.Tensor, index: torch.Tensor, rows: int) -> torch.Tensor:
    """``x [n, ...]`` placed at rows ``index`` of a zero ``[rows, ...]`` tensor (differentiable)."""
    return x.new_zeros((rows, *x.shape[1:])).index_copy(0, index, x)


def _present(mask: torch.Tensor | None, rows: int, device: torch.device) -> torch.Tensor:
    """``[B]`` bool from a token mask ``[B, L]`` (any real token) or a row mask ``[B]``."""
    if mask is None:
        return torch.zeros(rows, dtype=torch.bool, device=device)
    return mask.bool().any(dim=1) if mask.dim() == 2 else mask.bool()


class VideoTextAligner(nn.Module):
    """Video-text(-audio-speech) contrastive alignment, matching and optional MLM.

    ``video_encoder`` (a :class:`~iv2_lightning.models.backbone.VideoEncoder`), ``text_encoder``
    (``TextEncoder`` or ``HFTextEncoder``: ``(ids, mask, token_type)`` → ``TextOutput``),
    ``tokenizer`` (for :meth:`encode_text` on strings and for MLM's mask token); ``audio_encoder``
    is needed, and kept, only when a term that needs audio (``atc``, ``vac``, ``avtc``) has a
    positive weight. ``fusion``: ``"cmfm"`` or :class:`~iv2_lightning.models.fusion.CrossModalFusion`
    arguments except ``input_dims`` (the gated fusion module), or ``"bert"``: the official way, the
    fusion layers of a :class:`~iv2_lightning.models.bert.BertTextEncoder` text encoder (only the text
    tokens are updated; matching reads the fused ``[CLS]``, MLM uses BERT's own head); the fusion is used
    only when ``vtm`` or ``mlm`` is on.
    ``vtc, atc, vac, vsc, avtc, vtm, mlm``: loss weights (0 switches a term and its modules off).
    ``text_pooling``: the sentence feature fed to ``text_proj``: ``"cls"`` = the encoder's own
    (``TextOutput.cls``), ``"mean"`` = the masked mean of the token states.
    ``gather_distributed``: contrastive negatives from every rank (with gradients).

    ``forward`` takes the batch as tensors (the :data:`INPUTS`, named as ``VideoBatch`` names them) and
    returns an :class:`AlignerOutput`.
    """

    #: the keyword arguments of :meth:`forward` (``VideoBatch`` attribute names)
    INPUTS = (
        "video",
        "sample_id",
        "caption_ids",
        "caption_mask",
        "speech_ids",
        "speech_mask",
        "audio",
        "audio_frame_mask",
        "audio_mask",
    )
    TERM_FIELDS = TERM_FIELDS

    def __init__(
        self,
        video_encoder: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        audio_encoder: nn.Module | None = None,
        fusion: dict[str, Any] | str | None = None,
        embed_dim: int = 128,
        temperature: float = 0.07,
        vtc: float = 1.0,
        atc: float = 0.5,
        vac: float = 0.5,
        vsc: float = 0.5,
        avtc: float = 0.5,
        vtm: float = 0.5,
        mlm: float = 0.0,
        text_pooling: Literal["cls", "mean"] = "mean",
        video_mask_ratio: float = 0.5,
        gather_distributed: bool = True,
        temporal: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        weights = {"vtc": vtc, "atc": atc, "vac": vac, "vsc": vsc, "avtc": avtc, "vtm": vtm, "mlm": mlm}
        self._check(
            weights, embed_dim, text_pooling, video_mask_ratio, audio_encoder, tokenizer, text_encoder
        )
        self.loss_weights = {k: float(w) for k, w in weights.items()}
        use_audio = any(weights[k] > 0 for k in AUDIO_TERMS)
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim
        self.text_pooling = text_pooling
        self.video_mask_ratio = video_mask_ratio
        self.video_encoder = video_encoder
        self.text_encoder = text_encoder
        self.audio_encoder = audio_encoder if use_audio else None
        self.video_proj = ProjectionHead(video_encoder.embed_out_dim, embed_dim)
        # the HTE over long clips (optional): its clip embedding has the encoder's pooled width, so the
        # same video_proj maps a window and a whole long clip into the shared space
        self.temporal_encoder: HierarchicalTemporalEncoder | None = None
        if temporal is not None:
            given = dict(temporal)
            if given.get("out_dim", video_encoder.embed_out_dim) != video_encoder.embed_out_dim:
                raise ValueError(
                    f"temporal.out_dim must be the encoder's pooled width {video_encoder.embed_out_dim} "
                    f"(video_proj reads it); got {given['out_dim']}"
                )
            given.pop("own_encoder", None)
            self.temporal_encoder = HierarchicalTemporalEncoder(video_encoder, own_encoder=False, **given)
            # a residual over the mean of the windows' pooled features, its head starting at zero: a
            # pretrained video_proj reads a long clip as the window mean from the first step, and the
            # temporal transformer only has to add what the order says (from a random head the
            # order-free mean twin learned faster than the HTE: zero-shot 24% vs 11% after 3 epochs)
            nn.init.zeros_(self.temporal_encoder.head.weight)
            nn.init.zeros_(self.temporal_encoder.head.bias)
        self.text_proj = ProjectionHead(text_encoder.dim, embed_dim)
        self.audio_proj = ProjectionHead(audio_encoder.dim, embed_dim) if use_audio else None
        self.av_fusion = nn.Linear(2 * embed_dim, embed_dim) if avtc > 0 else None
        # one temperature for every contrastive pair
        self.contrastive = InfoNCELoss(temperature, learnable=True, gather_distributed=gather_distributed)
        self.matching_loss = MatchingLoss()
        self.fusion: CrossModalFusion | None = None
        self.itm_head: MatchingHead | None = None
        self.mlm_head: nn.Module | None = None
        self.audio_memory: nn.Linear | None = None
        self.fusion_kind, fusion_args = fusion_kind(fusion)
        if self.fusion_kind == "bert":
            # BERT's own upper layers fuse (official): the text tokens cross-attend to video (+ audio)
            self._check_bert_fusion(text_encoder, video_encoder, mlm)
            if vtm > 0:
                self.itm_head = MatchingHead(text_encoder.dim)  # on the fused [CLS], as the official itm_head
            # the official 6B concatenates audio and video tokens as one memory of the vision width;
            # ours maps the audio tokens to that width when they differ (a Linear of our own)
            widths_differ = (
                self.audio_encoder is not None and self.audio_encoder.dim != text_encoder.encoder_width
            )
            if widths_differ and (vtm > 0 or mlm > 0):
                self.audio_memory = nn.Linear(self.audio_encoder.dim, text_encoder.encoder_width)
        elif vtm > 0 or mlm > 0:
            dims = {"video": video_encoder.embed_dim, "text": text_encoder.dim}
            if self.audio_encoder is not None:
                dims["audio"] = self.audio_encoder.dim
            self.fusion = CrossModalFusion(dims, **fusion_args)
        if vtm > 0 and self.fusion is not None:
            self.itm_head = MatchingHead(self.fusion.dim)
        if mlm > 0 and self.fusion is not None:
            d = self.fusion.dim
            # BERT's prediction head: transform (Linear, GELU, LayerNorm), then the vocabulary
            self.mlm_head = nn.Sequential(
                nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d), nn.Linear(d, tokenizer.vocab_size)
            )
        # window splitters, outside the module tree (see _window_splitter)
        self._splitters: dict[int, HierarchicalTemporalEncoder] = {}

    @staticmethod
    def _check_bert_fusion(text_encoder: nn.Module, video_encoder: nn.Module, mlm: float) -> None:
        if not callable(getattr(text_encoder, "fuse", None)) or not getattr(
            text_encoder, "has_fusion", False
        ):
            raise ValueError(
                "fusion='bert' fuses inside the text encoder: it needs a BertTextEncoder with fusion layers "
                f"(fusion_layer < depth); got {type(text_encoder).__name__}"
            )
        if text_encoder.encoder_width != video_encoder.embed_dim:
            raise ValueError(
                f"fusion='bert': the fusion layers take {text_encoder.encoder_width}-wide memory tokens "
                f"(encoder_width) but the video tokens are {video_encoder.embed_dim} wide"
            )
        if mlm > 0 and getattr(text_encoder, "cls", None) is None:
            raise ValueError("fusion='bert' with mlm > 0 needs the BERT's MLM head (mlm_head=True)")

    @staticmethod
    def _check(
        weights, embed_dim, text_pooling, video_mask_ratio, audio_encoder, tokenizer, text_encoder
    ) -> None:
        bad = {k: w for k, w in weights.items() if not w >= 0}
        if bad:
            raise ValueError(f"loss weights must be >= 0; got {bad}")
        if not any(w > 0 for w in weights.values()):
            raise ValueError(f"at least one loss weight must be > 0; got {weights}")
        if audio_encoder is None and any(weights[k] > 0 for k in AUDIO_TERMS):
            raise ValueError("atc, vac or avtc > 0 needs an audio_encoder")
        if weights["mlm"] > 0 and getattr(tokenizer, "mask_id", None) is None:
            raise ValueError(
                f"mlm > 0 needs a tokenizer with a mask token; {type(tokenizer).__name__} has none"
            )
        if not 0.0 <= video_mask_ratio < 1.0:
            raise ValueError(f"video_mask_ratio must be in [0, 1); got {video_mask_ratio}")
        vocab = getattr(text_encoder, "vocab_size", None)
        if vocab is not None and tokenizer is not None and tokenizer.vocab_size > vocab:
            name = getattr(tokenizer, "path", type(tokenizer).__name__)
            raise ValueError(
                f"the tokenizer ({name}) has {tokenizer.vocab_size} tokens but the text encoder embeds only "
                f"{vocab}: give the tokenizer the text encoder was trained with (for `iv2 test`/`fit`, "
                "data.init_args.tokenizer: the folder, which the model's tokenizer follows)"
            )
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1; got {embed_dim}")
        if text_pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling must be 'cls' or 'mean'; got {text_pooling!r}")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def set_video_encoder(self, encoder: nn.Module) -> None:
        """Swap the video encoder (e.g. rebuilt for another frame count); forgets the window splitters."""
        self.video_encoder = encoder
        self._splitters.clear()
        if self.temporal_encoder is not None:  # it holds the encoder as a plain attribute, not a submodule
            object.__setattr__(self.temporal_encoder, "encoder", encoder)

    # -- encoders ------------------------------------------------------------------------------

    @property
    def text_max_length(self) -> int:
        return min(int(getattr(self.text_encoder, "max_length", 64)), 128)

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

    def _window_splitter(self, window: int) -> HierarchicalTemporalEncoder:
        # kept in a plain dict, outside the module tree (no parameters of its own in our state_dict);
        # only its window split is used, so its untrained layers are built on the meta device
        if window not in self._splitters:
            with torch.device("meta"):
                self._splitters[window] = HierarchicalTemporalEncoder(
                    self.video_encoder, window=window, tokens_per_window=1, depth=0
                )
        return self._splitters[window]

    def _uses_hte(self, window: int | None) -> bool:
        t = self.temporal_encoder
        return t is not None and (window or self.video_encoder.num_frames) == t.window

    def _windowed(
        self, video: torch.Tensor, window: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows of ``window`` frames (the HTE's split: the tail padded with the last frame) through
        the encoder (token-masked in training, as whole clips are): (window embeddings ``[B, W, E]``
        normalised, ``window_mask [B, W]``, tokens ``[B, W * L, D]``, token mask ``[B, W * L]``, clip
        embedding ``[B, E]`` not normalised: ``video_proj`` of the trained HTE's clip embedding when
        the aligner has one for this window, else the mean of the window embeddings)."""
        splitter = self._window_splitter(window or self.video_encoder.num_frames)
        windows, window_mask = splitter.split_windows(video)
        b, w = window_mask.shape
        out = self.video_encoder(windows, self._video_mask(windows))
        emb = F.normalize(self.video_proj(out.pooled).float(), dim=-1).reshape(b, w, -1)
        tokens = out.tokens.reshape(b, w * out.tokens.shape[1], -1)
        if self._uses_hte(window):
            hte = self.temporal_encoder
            order = hte.aggregate_windows(hte.reduce(out.tokens), out.pooled, window_mask).embedding
            clip = self.video_proj(masked_mean(out.pooled.reshape(b, w, -1), window_mask) + order)
        else:
            clip = masked_mean(emb, window_mask)
        return emb, window_mask, tokens, window_mask.repeat_interleave(out.tokens.shape[1], dim=1), clip

    def encode_video_windows(
        self, video: torch.Tensor, window: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(clip ``[B, E]``, windows ``[B, W, E]``, ``window_mask [B, W]``): the L2-normalised
        embedding of every window of ``window`` frames (default: the encoder's training frames) and
        of the clip: through the trained HTE when the aligner has one for this window, else the
        normalised mean of its windows. ``T`` need not be a multiple of ``window``."""
        emb, window_mask, _, _, clip = self._windowed(video, window)
        return F.normalize(clip.float(), dim=-1), emb, window_mask

    def encode_text(
        self,
        texts: str | Sequence[str] | torch.Tensor,
        mask: torch.Tensor | None = None,
        token_type: int = 0,
    ) -> torch.Tensor:
        """Strings (tokenized here) or ``ids [B, L]`` (+ ``mask``) → L2-normalised ``[B, embed_dim]``.

        ``token_type`` 0 = caption, 1 = speech transcript.
        """
        device = self.device
        if isinstance(texts, torch.Tensor):
            ids = texts.to(device)
            mask = mask.to(device) if mask is not None else None
        else:
            tok = self.tokenizer(texts, max_length=self.text_max_length, padding="longest")
            ids, mask = tok.ids.to(device), tok.mask.to(device)
        out = self.text_encoder(ids, mask, token_type)
        return F.normalize(self.text_proj(self._text_feature(out)).float(), dim=-1)

    def encode_audio(self, fbank: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Kaldi fbank ``[B, F, bins]`` → L2-normalised ``[B, embed_dim]``."""
        if self.audio_encoder is None:
            raise RuntimeError("this aligner has no audio encoder (atc, vac and avtc are all 0)")
        out = self.audio_encoder(fbank, frame_mask)
        return F.normalize(self.audio_proj(out.cls).float(), dim=-1)

    def encode_prompts(self, prompts: Mapping[str, Sequence[str]], chunk: int = 256) -> torch.Tensor:
        """``[C, embed_dim]``: per class (the mapping's order) the normalised mean of the normalised
        embeddings of its prompts (CLIP's prompt ensembling)."""
        texts = [p for ps in prompts.values() for p in ps]
        owner = torch.tensor([i for i, ps in enumerate(prompts.values()) for _ in ps], device=self.device)
        embs = torch.cat([self.encode_text(texts[i : i + chunk]) for i in range(0, len(texts), chunk)])
        sums = embs.new_zeros(len(prompts), embs.shape[1]).index_add(0, owner, embs)
        return F.normalize(sums, dim=-1)

    def _video_mask(self, video: torch.Tensor) -> torch.Tensor | None:
        if not self.training or self.video_mask_ratio <= 0:
            return None
        grid = self.video_encoder.patch_embed.grid(tuple(video.shape))
        n = grid[0] * grid[1] * grid[2]
        return random_mask(video.shape[0], n, self.video_mask_ratio, device=video.device)

    def _text_side(self, ids, mask, present: torch.Tensor, token_type: int) -> Side | None:
        if ids is None or not bool(present.any()):
            return None
        index = present.nonzero().squeeze(1)
        out = self.text_encoder(ids[index], mask[index], token_type)
        b = present.shape[0]
        return Side(
            present=present,
            emb=_scatter_rows(self.text_proj(self._text_feature(out)), index, b),
            tokens=_scatter_rows(out.tokens, index, b),
            mask=_scatter_rows(out.mask, index, b),
        )

    def _audio_side(self, audio, frame_mask, present: torch.Tensor) -> Side | None:
        if self.audio_encoder is None or audio is None or not bool(present.any()):
            return None
        index = present.nonzero().squeeze(1)
        a = self.audio_encoder(audio[index], frame_mask[index] if frame_mask is not None else None)
        b = present.shape[0]
        return Side(
            present=present,
            emb=_scatter_rows(self.audio_proj(a.cls), index, b),
            tokens=_scatter_rows(a.tokens, index, b),
            mask=_scatter_rows(a.mask, index, b),
        )

    def features(
        self,
        video: torch.Tensor,
        caption_ids: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
        speech_ids: torch.Tensor | None = None,
        speech_mask: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        audio_frame_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
    ) -> AlignerFeatures:
        """Encode a batch: every modality the batch has and a term needs (captions always)."""
        b, device = video.shape[0], video.device
        if video.shape[2] > self.video_encoder.num_frames:
            _, _, tokens, token_mask, emb = self._windowed(video)
        else:
            out = self.video_encoder(video, self._video_mask(video))
            emb, tokens = self.video_proj(out.pooled), out.tokens
            token_mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        ones = torch.ones(b, dtype=torch.bool, device=device)
        v = Side(present=ones, emb=emb, tokens=tokens, mask=token_mask)
        caption = self._text_side(caption_ids, caption_mask, _present(caption_mask, b, device), 0)
        speech = None
        if self.loss_weights["vsc"] > 0:
            speech = self._text_side(speech_ids, speech_mask, _present(speech_mask, b, device), 1)
        aud = self._audio_side(audio, audio_frame_mask, _present(audio_mask, b, device))
        return AlignerFeatures(video=v, caption=caption, audio=aud, speech=speech)

    # -- losses --------------------------------------------------------------------------------

    def audio_video_embedding(self, f: AlignerFeatures) -> torch.Tensor | None:
        """``[B, E]`` (not normalised): the clip as AVTC sees it, ``av_fusion`` over its video and audio
        embeddings (zeros for a clip without audio); None without ``av_fusion`` or without audio."""
        if self.av_fusion is None or f.audio is None:
            return None
        return self._fuse_audio_video(f.video.emb, f.audio.emb)

    def _fuse_audio_video(self, video_emb: torch.Tensor, audio_emb: torch.Tensor) -> torch.Tensor:
        # the one AVTC fusion, for the loss and for evaluation alike
        return self.av_fusion(torch.cat([video_emb, audio_emb], dim=-1))

    def _contrastive_terms(self, f: AlignerFeatures, ids: torch.Tensor) -> dict[str, torch.Tensor | None]:
        v, cap, aud, sp = f.video, f.caption, f.audio, f.speech
        b = v.emb.shape[0]
        # with gathering across ranks every rank must join every enabled term's collectives, even
        # one whose batch lacks the modality: it joins with zero rows that are not valid
        sync = self.contrastive.gather_distributed and world_size() > 1
        none = torch.zeros(b, dtype=torch.bool, device=v.emb.device)

        def side(x: Side | None) -> tuple[torch.Tensor, torch.Tensor]:
            return (x.emb, x.present) if x is not None else (v.emb.new_zeros(b, self.embed_dim), none)

        (cap_emb, cap_p), (aud_emb, aud_p), (sp_emb, sp_p) = side(cap), side(aud), side(sp)
        with_audio = aud is not None and cap is not None
        pairs = {
            "vtc": (lambda: v.emb, cap_emb, cap_p, cap is not None),
            "atc": (lambda: aud_emb, cap_emb, aud_p & cap_p, with_audio),
            "avtc": (
                lambda: self._fuse_audio_video(v.emb, aud_emb),
                cap_emb,
                aud_p & cap_p,
                with_audio,
            ),
            "vac": (lambda: v.emb, aud_emb, aud_p, aud is not None),
            "vsc": (lambda: v.emb, sp_emb, sp_p, sp is not None),
        }
        return {
            name: self.contrastive(first(), second, ids, valid)
            for name, (first, second, valid, available) in pairs.items()
            if self.loss_weights[name] > 0 and (available or sync)
        }

    def _fuse(
        self,
        f: AlignerFeatures,
        clip_index: torch.Tensor,
        text_index: torch.Tensor,
        text_tokens: torch.Tensor | None = None,
    ) -> FusionOutput:
        """Fuse the clips ``clip_index`` (video, and audio when encoded) with captions ``text_index``."""
        if self.fusion_kind == "bert":
            tokens, masks = {"video": f.video.tokens[clip_index]}, {"video": f.video.mask[clip_index]}
            if f.audio is not None:
                tokens["audio"] = f.audio.tokens[clip_index]
                masks["audio"] = f.audio.mask[clip_index].bool() & f.audio.present[clip_index, None]
            tokens["text"] = f.caption.tokens[text_index] if text_tokens is None else text_tokens
            masks["text"] = f.caption.mask[text_index]
            return self._bert_fuse(tokens, masks)
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

    def _bert_fuse(
        self, tokens: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> FusionOutput:
        """The text tokens through BERT's fusion layers, cross-attending to the video tokens and, when
        given, the audio tokens (one memory, as the official audio-visual model); ``pooled`` is the
        fused first token, which the matching head reads (the official ``itm_head`` on ``[CLS]``)."""
        memory, memory_mask = [tokens["video"]], [masks["video"].bool()]
        if "audio" in tokens:
            audio = tokens["audio"]
            memory.append(self.audio_memory(audio) if self.audio_memory is not None else audio)
            memory_mask.append(masks["audio"].bool())
        text_mask = masks["text"].bool()
        fused = self.text_encoder.fuse(
            tokens["text"], text_mask, torch.cat(memory, dim=1), torch.cat(memory_mask, dim=1)
        )
        return FusionOutput(
            tokens={"text": fused},
            masks={"text": text_mask},
            fused=fused,
            fused_mask=text_mask,
            pooled=fused[:, 0],
            gates={},
        )

    @staticmethod
    def _gate_means(fused: FusionOutput, rows: int) -> dict[str, torch.Tensor]:
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

    def _temperature(self) -> torch.Tensor:
        """The contrastive temperature, detached: the one this step's contrastive terms used (whole
        under DeepSpeed ZeRO-3, see ``InfoNCELoss.last_temperature``), else the parameter's value."""
        t = self.contrastive.last_temperature
        return t if t is not None else self.contrastive.temperature.detach()

    def _vtm(
        self, f: AlignerFeatures, ids: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
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
            sim = v @ t.T / self._temperature()
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

    def _mlm(
        self, f: AlignerFeatures, caption_ids: torch.Tensor, caption_mask: torch.Tensor
    ) -> torch.Tensor | None:
        rows = f.caption.present.nonzero().squeeze(1)
        if rows.numel() == 0:
            return None
        ids = caption_ids[rows]
        mask = caption_mask[rows]
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
        states = fused.tokens["text"][chosen]
        if self.fusion_kind == "bert":
            logits = self.text_encoder.mlm_logits(states)  # BERT's own head, decoder tied to its embeddings
        else:
            logits = self.mlm_head(states)
        return F.cross_entropy(logits.float(), ids[chosen])

    def losses(
        self,
        f: AlignerFeatures,
        sample_id: torch.Tensor,
        caption_ids: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
    ) -> AlignerOutput:
        """Every switched-on term over encoded features (the caption ids and mask for MLM)."""
        w = self.loss_weights
        self.contrastive.last_temperature = None  # set again by this step's contrastive terms
        terms: dict[str, torch.Tensor | None] = self._contrastive_terms(f, sample_id)
        gates: dict[str, torch.Tensor] = {}
        if w["vtm"] > 0 and f.caption is not None:
            vtm = self._vtm(f, sample_id)
            if vtm is not None:
                terms["vtm"], gates = vtm
        if w["mlm"] > 0 and f.caption is not None:
            terms["mlm"] = self._mlm(f, caption_ids, caption_mask)
        kept = {k: t for k, t in terms.items() if t is not None}
        # a batch with no usable pair still returns a loss connected to the graph (zero gradient)
        loss = f.video.emb.sum() * 0.0
        for k, t in kept.items():
            loss = loss + w[k] * t
        return AlignerOutput(loss, kept, self._temperature(), gates, f)

    def forward(
        self,
        video: torch.Tensor,
        sample_id: torch.Tensor,
        caption_ids: torch.Tensor | None = None,
        caption_mask: torch.Tensor | None = None,
        speech_ids: torch.Tensor | None = None,
        speech_mask: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        audio_frame_mask: torch.Tensor | None = None,
        audio_mask: torch.Tensor | None = None,
    ) -> AlignerOutput:
        """The stage-2 objective of one batch: ``video [B, 3, T, H, W]``, ``sample_id [B]`` (equal ids
        are positives of each other), captions and ASR transcripts as token ids and masks ``[B, L]``
        (a row without any real token is absent), kaldi fbank ``audio [B, F, bins]`` with
        ``audio_frame_mask [B, F]`` and ``audio_mask [B]`` (False where a clip has no audio)."""
        f = self.features(
            video, caption_ids, caption_mask, speech_ids, speech_mask, audio, audio_frame_mask, audio_mask
        )
        return self.losses(f, sample_id, caption_ids, caption_mask)

    # -- matching-head scores (the official ``_match`` re-ranking) ----------------------------

    def match_inputs(self, f: AlignerFeatures) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(tokens, masks) per modality the matching head fuses, for every row of ``f`` (detached; an
        absent modality is one masked token), to keep for :meth:`match_scores` later."""
        b = f.video.emb.shape[0]

        def side(x: Side | None, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
            if x is None:
                empty = torch.zeros(b, 1, dtype=torch.bool, device=f.video.tokens.device)
                return f.video.tokens.new_zeros(b, 1, dim), empty
            return x.tokens.detach(), x.mask.bool() & x.present[:, None]

        tokens, masks = {"video": f.video.tokens.detach()}, {"video": f.video.mask}
        tokens["text"], masks["text"] = side(f.caption, self.text_encoder.dim)
        fuses_audio = self.fusion_kind == "bert" or (
            self.fusion is not None and "audio" in self.fusion.input_dims
        )
        if self.audio_encoder is not None and fuses_audio:
            tokens["audio"], masks["audio"] = side(f.audio, self.audio_encoder.dim)
        return tokens, masks

    def match_scores(
        self, tokens: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """``[n]`` "match" logits of the matching head for fused pairs (``tokens[m] [n, L_m, D_m]``)."""
        if self.itm_head is None:
            raise RuntimeError("match_scores needs the matching head (vtm > 0)")
        if self.fusion_kind == "bert":
            fused = self._bert_fuse(tokens, masks)
        else:
            fused = self.fusion(dict(tokens), dict(masks))
        return self.itm_head(fused.pooled)[:, 1].float()
