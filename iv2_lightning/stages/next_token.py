"""NextTokenStage: stage 3 of the InternVideo2 curriculum, next-token prediction on captions and dialogue.

The model (video → Q-Former prefix → language model, the losses and the decoding) is the plain
PyTorch :class:`~iv2_lightning.models.captioner.VideoCaptioner` (arXiv 2403.15377, Sec. 3.3;
VideoChat2). This shell builds it from the stage's arguments, trains it on
``caption_weight · caption loss + dialogue_weight · answer loss``, and evaluates it: validation/test
log the loss, teacher-forced token accuracy and, on the first ``val_generate_batches`` batches,
BLEU-4/BLEU-1, ROUGE-L and, for synthetic clips, whether the greedy caption names the right colour,
shape and direction (:class:`~iv2_lightning.metrics_text.CaptionMetrics`); a model that fuses
audio/speech is also scored on captions from the video alone (``*_video_only``). The first captions
of each evaluation epoch go to TensorBoard (:class:`~iv2_lightning.callbacks.text_samples.CaptionSamples`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from iv2_lightning.callbacks.text_samples import CaptionSamples, clip_name
from iv2_lightning.data.batch import VideoBatch
from iv2_lightning.metrics_text import VIDEO_ONLY, CaptionMetrics
from iv2_lightning.models.captioner import INPUT_FIELDS, PREFIX_FIELDS, VideoCaptioner, dialogue_prompt_ids
from iv2_lightning.stages.base import BaseStage

log = logging.getLogger(__name__)

#: how many (clip, generated, reference) rows are written to TensorBoard per evaluation epoch
TEXT_SAMPLES = 4

__all__ = ["TEXT_SAMPLES", "NextTokenStage", "dialogue_prompt_ids"]


class NextTokenStage(BaseStage):
    """Stage 3: video (+ audio, speech) → Q-Former queries → language model prefix; next-token loss.

    ``lm``: ``"builtin"`` (:class:`~iv2_lightning.models.heads.CausalDecoder` over the tokenizer's
    vocabulary, prefix mode; ``lm_config`` overrides ``dim``, ``depth``, ``num_heads``,
    ``max_length``, ``mlp_ratio``), ``"gpt2-tiny"`` (a random two-layer GPT-2, no download;
    ``lm_config`` overrides GPT2Config fields) or a local Hugging Face causal-LM folder (``lm_config``
    goes to ``from_pretrained``; set ``tokenizer`` to the same folder so the ids match the LM's
    vocabulary). ``num_queries``/``resampler_depth``: the Q-Former's size; ``resampler`` overrides
    its ``dim``, ``num_heads``, ``mlp_ratio``. ``use_audio``/``use_speech``: fuse audio / ASR tokens
    into the video tokens with ``fusion`` before the resampler (``text``, ``audio``, ``fusion``
    configure those modules; ``init_from`` a stage-2 export fills them). ``prompt``: text put between
    BOS and the caption, in training and in :meth:`caption` (not counted by the loss).
    ``val_generate_batches``: how many validation/test batches also decode captions for BLEU,
    ROUGE-L and attribute accuracy (decoding is slow). ``pooled_token``: put the encoder's pooled clip
    embedding, projected to the LM width, in front of the queries; it carries stage 2's alignment
    into stage 3 directly, which matters when stage 2 froze the trunk and what it learned lives in
    the pool. The batch contract: the caption term needs captions, the dialogue term question/answer
    turns, ``use_audio``/``use_speech`` audio/speech.
    """

    stage_name = "stage3"

    def __init__(
        self,
        lm: str = "builtin",
        lm_config: dict[str, Any] | None = None,
        num_queries: int = 16,
        resampler_depth: int = 1,
        resampler: dict[str, Any] | None = None,
        use_audio: bool = False,
        use_speech: bool = False,
        text: dict[str, Any] | None = None,
        audio: dict[str, Any] | None = None,
        fusion: dict[str, Any] | None = None,
        caption_weight: float = 1.0,
        dialogue_weight: float = 1.0,
        label_smoothing: float = 0.0,
        max_new_tokens: int = 40,
        val_generate_batches: int = 2,
        prompt: str = "",
        pooled_token: bool = False,
        **kwargs: Any,
    ) -> None:
        # the model checks its own arguments (weights, lengths) when build_model builds it
        if val_generate_batches < 0:
            raise ValueError(f"val_generate_batches must be >= 0; got {val_generate_batches}")
        super().__init__(**kwargs)

    def build_model(self) -> VideoCaptioner:
        hp = self.hparams
        video_encoder = self.build_video_encoder()
        audio_encoder = self.build_audio_encoder(hp.audio) if hp.use_audio else None
        text_encoder = self.build_text_encoder(hp.text) if hp.use_speech else None
        if not (hp.use_audio or hp.use_speech) and (hp.text or hp.audio or hp.fusion):
            log.warning("stage3: text/audio/fusion configs are ignored without use_audio or use_speech")
        modules = {"audio_encoder": audio_encoder, "text_encoder": text_encoder}
        return VideoCaptioner(
            **self.hparams_for(
                VideoCaptioner, video_encoder=video_encoder, tokenizer=self.tokenizer, **modules
            )
        )

    def configure_metrics(self) -> None:
        self.eval_metrics = torch.nn.ModuleDict({"val": CaptionMetrics(), "test": CaptionMetrics()})

    def configure_callbacks(self) -> list[CaptionSamples]:
        return [CaptionSamples(rows=TEXT_SAMPLES)]

    def batch_contract(self) -> Mapping[str, Iterable[str]]:
        hp = self.hparams
        contract: dict[str, list[str]] = {}
        if hp.caption_weight > 0:
            contract["caption"] = ["video", "caption"]
        if hp.dialogue_weight > 0:
            contract["dialogue"] = ["video", "qa"]
        if hp.use_audio:
            contract["use_audio"] = ["video", "audio"]
        if hp.use_speech:
            contract["use_speech"] = ["video", "speech"]
        return contract

    # -- training --------------------------------------------------------------------------------

    @staticmethod
    def model_inputs(batch: VideoBatch) -> dict[str, Any]:
        """The batch's tensors as :meth:`VideoCaptioner.forward` takes them."""
        return {f: getattr(batch, f) for f in INPUT_FIELDS}

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """The language model prefix of ``video [B, 3, T, H, W]``: ``[B, prefix_length, lm_dim]``."""
        return self.model.visual_prefix(video)

    def compute_loss(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        """``loss`` = caption_weight · caption loss + dialogue_weight · answer loss; ``token_acc`` is the
        teacher-forced next-token accuracy on caption tokens (on answer tokens when the batch has no
        captions), ``answer_acc`` the one on answer tokens."""
        parts = self.model(**self.model_inputs(batch))
        out: dict[str, torch.Tensor] = {"loss": parts.loss}
        if parts.caption_loss is not None:
            out["caption_loss"] = parts.caption_loss.detach()
        if parts.dialogue_loss is not None:
            out["dialogue_loss"] = parts.dialogue_loss.detach()
            out["answer_acc"] = parts.answer_correct / parts.answer_total.clamp_min(1)
        if parts.caption_total is not None and bool(parts.caption_total > 0):
            out["token_acc"] = parts.caption_correct / parts.caption_total
        elif parts.answer_total is not None:
            out["token_acc"] = parts.answer_correct / parts.answer_total.clamp_min(1)
        return out

    # -- evaluation ------------------------------------------------------------------------------

    def validation_step(self, batch: VideoBatch, batch_idx: int, dataloader_idx: int = 0) -> dict | None:
        return self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: VideoBatch, batch_idx: int, dataloader_idx: int = 0) -> dict | None:
        return self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: VideoBatch, batch_idx: int, split: str) -> dict[str, list[str]] | None:
        """Losses on every batch; on the first ``val_generate_batches`` also greedy captions, scored
        and returned (``{"captions": [...]}``, which :class:`CaptionSamples` shows)."""
        metrics: CaptionMetrics = self.eval_metrics[split]
        inputs = self.model_inputs(batch)
        prefix = self.model.visual_prefix(inputs["video"], **{f: inputs[f] for f in PREFIX_FIELDS})
        metrics.update_losses(len(batch), **self.model(**inputs, prefix=prefix)._asdict())
        if batch_idx >= self.hparams.val_generate_batches:
            return None
        generated = self.model.captions_of_prefix(prefix)
        has_caption = batch.present("caption").tolist()
        metrics.update_captions(
            [g for g, h in zip(generated, has_caption) if h],
            [c for c, h in zip(batch.captions, has_caption) if h],
        )
        attributes = [m.get("attributes") for m in batch.meta or [{} for _ in generated]]
        metrics.update_attributes(generated, attributes)
        if self.model.use_audio or self.model.use_speech:
            alone = self.model.captions_of_prefix(self.model.visual_prefix(batch.video))
            metrics.update_attributes(alone, attributes, suffix=VIDEO_ONLY)
        return {"captions": generated}

    def _log_epoch(self, split: str) -> None:
        metrics: CaptionMetrics = self.eval_metrics[split]
        for key, value in metrics.compute().items():
            # already reduced over ranks by torchmetrics, so identical everywhere; sync_dist only
            # keeps Lightning's epoch-level bookkeeping uniform across ranks
            self.log(f"{split}/{key}", value, prog_bar=key == "loss", sync_dist=True)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    # -- inference -------------------------------------------------------------------------------

    def predict_step(
        self, batch: VideoBatch, batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict[str, str]]:
        captions = self.model.caption(batch)
        metas = batch.meta or [{}] * len(batch)
        names = [clip_name(m, int(s)) for m, s in zip(metas, batch.sample_id.tolist())]
        return [{"clip": n, "caption": c} for n, c in zip(names, captions)]

    def caption(self, video: torch.Tensor | VideoBatch, **sampling: Any) -> list[str]:
        """:meth:`VideoCaptioner.caption` (``top_p``, ``temperature``, ``max_new_tokens``, ``generator``)."""
        return self.model.caption(video, **sampling)

    def chat(
        self,
        video: torch.Tensor | VideoBatch,
        question: str,
        history: list[tuple[str, str]] | None = None,
        **sampling: Any,
    ) -> str:
        """:meth:`VideoCaptioner.chat`: answer ``question`` about one clip after ``history``."""
        return self.model.chat(video, question, history=history, **sampling)
