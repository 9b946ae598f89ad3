"""Stage 2 of the curriculum: the Lightning shell around :class:`~iv2_lightning.models.aligner.VideoTextAligner`.

InternVideo2 (arXiv 2403.15377, Sec. 3.2) aligns the video encoder with text, audio and speech; the
math is the torch model's (anomalib keeps ``torch_model.py`` apart from ``lightning_model.py``). This
shell builds it, logs its terms and evaluates as the official zero-shot retrieval
(:class:`~iv2_lightning.metrics.RetrievalMetric`: cosine, ``_dsl``, with ``rerank_k`` ``_match``) and
zero-shot classification (:class:`~iv2_lightning.metrics.ZeroShotAccuracy`) from class prompts: its
own, else the DataModule's ``class_prompts()``, else none. Pictures: the
:class:`~iv2_lightning.callbacks.pictures.ContrastivePictures` callback it adds (``visual_clips``).

A DDP rank whose batch lacks a modality entirely leaves that encoder unused for the step, so a DDP
run over data with missing modalities needs ``strategy: ddp_find_unused_parameters_true``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from iv2_lightning.callbacks.pictures import ContrastivePictures
from iv2_lightning.data.batch import VideoBatch
from iv2_lightning.metrics import RetrievalMetric, ZeroShotAccuracy, class_prompts_from
from iv2_lightning.models.aligner import (
    AUDIO_TERMS,
    TERM_FIELDS,
    VideoTextAligner,
    fusion_kind,
    resolve_loss_weights,
)
from iv2_lightning.stages.base import BaseStage

#: evaluation settings of ContrastiveStage, kept out of its saved hyperparameters (class docstring)
EVAL_ARGUMENTS = ("zeroshot_classes", "prompt_templates", "rerank_k", "visual_clips")
#: logged keys whose presence is decided the same way on every rank (see _eval_step)
_SYNCED_KEYS = ("loss", "temperature", "vtc", "atc", "avtc", "vac", "vsc")
_EPOCH = {"on_step": False, "on_epoch": True}


def aligner_inputs(batch: VideoBatch) -> dict[str, Any]:
    return {name: getattr(batch, name) for name in VideoTextAligner.INPUTS}  # forward's arguments


class ContrastiveStage(BaseStage):
    """Stage 2: video-text(-audio-speech) contrastive alignment, matching and optional MLM.

    ``text``: :class:`~iv2_lightning.models.text.TextEncoder` overrides (e.g. ``{"dim": 256,
    "depth": 4}``) or, with ``text_model`` a local Hugging Face folder, ``HFTextEncoder`` options.
    ``text_pooling``: ``"cls"`` (the encoder's own sentence feature, as the official model with its
    pretrained BERT) or ``"mean"`` (masked mean of the token states); ``"auto"`` picks ``"mean"`` for a
    text encoder trained from scratch (its first token starts out identical for every caption: on the
    synthetic data VTC stayed at chance for 120 steps with ``"cls"``) and ``"cls"`` for a pretrained one.
    ``text_model: bert`` builds a :class:`~iv2_lightning.models.bert.BertTextEncoder` from scratch
    (``text``: ``preset`` bert-tiny/base/large, ``fusion_layer``, BERT config fields).
    ``audio``: ``AudioEncoder`` arguments. ``fusion``: ``cmfm`` (default; or a dict of
    ``CrossModalFusion`` arguments) or ``bert``: the official fusion in BERT's upper layers from
    ``text.fusion_layer`` on (``text_model`` must then be ``bert`` or a local BERT folder, e.g.
    ``bert-large-uncased`` with ``text: {fusion_layer: 19}``); see the aligner.
    ``temporal``: :class:`~iv2_lightning.models.temporal.HierarchicalTemporalEncoder` arguments (e.g.
    ``{aggregate: transformer, depth: 2, tokens_per_window: 4}``): clips longer than the trunk's frames
    are embedded by the HTE over their windows, trained here by the contrastive terms, and
    ``iv2 embed`` uses it (``configs/stage2/tiny_hte.yaml``); None: the mean of the windows.
    ``vtc, atc, vac, vsc, avtc, vtm, mlm``: loss weights (0 switches a term and its modules off).
    None (the default, except ``mlm``): on at its default weight (vtc 1, the others 0.5) when the
    data provides the term's fields (``data_fields``; ``TERM_FIELDS``), off otherwise, on when
    ``data_fields`` is unknown.
    ``zeroshot_prompts``: class name → prompts for zero-shot classification (class index = position
    in ``label_names``, default the dict order); None = the DataModule's ``class_prompts()`` (in the
    order of ``label_names`` when given), if it has one.

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
        fusion: dict[str, Any] | str | None = None,
        embed_dim: int = 128,
        temperature: float = 0.07,
        vtc: float | None = None,
        atc: float | None = None,
        vac: float | None = None,
        vsc: float | None = None,
        avtc: float | None = None,
        vtm: float | None = None,
        mlm: float = 0.0,
        video_mask_ratio: float = 0.5,
        gather_distributed: bool = True,
        zeroshot_prompts: dict[str, list[str]] | None = None,
        label_names: list[str] | None = None,
        zeroshot_classes: list[str] | None = None,
        prompt_templates: list[str] | None = None,
        rerank_k: int = 0,
        visual_clips: int = 16,
        temporal: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if text_pooling not in ("auto", "cls", "mean"):
            raise ValueError(f"text_pooling must be 'auto', 'cls' or 'mean'; got {text_pooling!r}")
        if rerank_k < 0 or visual_clips < 0:
            raise ValueError(f"rerank_k and visual_clips must be >= 0; got {rerank_k}, {visual_clips}")
        # plain values, set before BaseStage builds the model and the metrics from them
        self.rerank_k, self.visual_clips = rerank_k, visual_clips
        self.zeroshot_prompts = class_prompts_from(
            zeroshot_prompts, label_names, zeroshot_classes, prompt_templates
        )
        self.label_names = list(self.zeroshot_prompts) if self.zeroshot_prompts is not None else label_names
        self._class_emb: torch.Tensor | None = None
        super().__init__(**kwargs)
        for key in EVAL_ARGUMENTS:  # see the class docstring
            self.hparams.pop(key, None)
            getattr(self, "_hparams_initial", {}).pop(key, None)
        if rerank_k > 0 and self.model.loss_weights["vtm"] <= 0:
            raise ValueError("rerank_k > 0 re-ranks with the matching head, which needs vtm > 0")

    def build_model(self) -> VideoTextAligner:
        hp = self.hparams
        weights = resolve_loss_weights({k: hp[k] for k in TERM_FIELDS}, self.data_fields)
        pooling = hp.text_pooling
        if pooling == "auto":
            pooling = "mean" if hp.text_model in ("scratch", "bert") else "cls"
        use_audio = any(weights[k] > 0 for k in AUDIO_TERMS)
        video_encoder = self.build_video_encoder()
        bert_fusion = fusion_kind(hp.fusion)[0] == "bert"
        text_encoder = self.build_text_encoder(
            hp.text,
            hp.text_model,
            fusion_width=video_encoder.embed_dim if bert_fusion else None,
            mlm_head=bert_fusion and weights["mlm"] > 0,
        )
        return VideoTextAligner(
            video_encoder=video_encoder,
            text_encoder=text_encoder,
            audio_encoder=self.build_audio_encoder(hp.audio) if use_audio else None,
            tokenizer=self.tokenizer,
            fusion=hp.fusion,
            embed_dim=hp.embed_dim,
            temperature=hp.temperature,
            text_pooling=pooling,
            video_mask_ratio=hp.video_mask_ratio,
            gather_distributed=hp.gather_distributed,
            temporal=hp.temporal,
            **weights,
        )

    def configure_metrics(self) -> None:
        match = self.model.match_scores if self.rerank_k > 0 and self.model.itm_head is not None else None
        self.retrieval = RetrievalMetric(self.rerank_k if match is not None else 0, match)
        # caption -> clip retrieval with the sound too: the AVTC embedding (logged as av_t2v_r1, ...)
        self.retrieval_av = RetrievalMetric()
        self.zero_shot = ZeroShotAccuracy()

    def configure_callbacks(self) -> list[ContrastivePictures]:
        return [ContrastivePictures(self.visual_clips)] if self.visual_clips > 0 else []

    def batch_contract(self) -> dict[str, tuple[str, ...]]:
        return {term: TERM_FIELDS[term] for term, w in self.model.loss_weights.items() if w > 0}

    def compute_loss(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        """Weighted sum of the stage-2 terms; a term is absent from the dict when it was skipped
        (weight 0, or fewer than two rows with its modalities)."""
        return self.model(**aligner_inputs(batch)).scalars()

    # -- evaluation ----------------------------------------------------------------------------

    def class_prompts(self) -> dict[str, list[str]] | None:
        """Class name → prompts in label order: the stage's own, else the DataModule's ``class_prompts()``."""
        if self.zeroshot_prompts is not None:
            return self.zeroshot_prompts
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        from_data = getattr(datamodule, "class_prompts", None)
        prompts = from_data() if callable(from_data) else None
        return class_prompts_from(prompts, self.label_names) if prompts else None

    def on_validation_epoch_start(self) -> None:
        prompts = self.class_prompts()  # once per epoch: the text encoder does not change in evaluation
        self._class_emb = self.model.encode_prompts(prompts) if prompts is not None else None

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def validation_step(self, batch: VideoBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "val")

    def test_step(self, batch: VideoBatch, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._eval_step(batch, "test")

    def _eval_step(self, batch: VideoBatch, prefix: str) -> dict[str, torch.Tensor]:
        out = self.model(**aligner_inputs(batch))
        scalars = {k: v.detach() for k, v in out.scalars().items()}
        for k, v in scalars.items():
            # only keys that every rank logs at every step may be synced (a sync is a collective);
            # VTM, MLM and the gates depend on the rank's own rows, so they stay rank-local
            self.log(f"{prefix}/{k}", v, batch_size=len(batch), sync_dist=k in _SYNCED_KEYS, **_EPOCH)
        f = out.features
        video = F.normalize(f.video.emb.detach().float(), dim=-1)
        if f.caption is not None:
            text, present = F.normalize(f.caption.emb.detach().float(), dim=-1), f.caption.present
        else:
            text, present = torch.zeros_like(video), batch.present("caption")
        tokens, masks = self.model.match_inputs(f) if self.retrieval.rerank_k > 0 else (None, None)
        self.retrieval.update(video, text, batch.sample_id, present, tokens, masks)
        av = self.model.audio_video_embedding(f)
        if av is not None:
            self.retrieval_av.update(F.normalize(av.detach().float(), dim=-1), text, batch.sample_id, present)
        if self._class_emb is not None:
            labels = batch.label if batch.label is not None else torch.full_like(batch.sample_id, -100)
            self.zero_shot.update(video, self._class_emb, labels)
        return scalars  # what the pictures callback reads the gates from

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_epoch_end(self, prefix: str) -> None:
        metrics = dict(self.retrieval.compute()) if self.retrieval.update_count else {}
        if self.retrieval_av.update_count:
            metrics |= {f"av_{k}": v for k, v in self.retrieval_av.compute().items()}
        self.retrieval_av.reset()
        if self.zero_shot.update_count:
            zs = self.zero_shot.compute()
            if not bool(torch.isnan(zs)):
                metrics["zs_acc"] = zs
        self.retrieval.reset()
        self.zero_shot.reset()
        for k, v in metrics.items():
            # identical on every rank (computed from the gathered states): syncing is a no-op
            self.log(f"{prefix}/{k}", float(v), sync_dist=True, **_EPOCH)

    def predict_step(self, batch: VideoBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Normalised video (and caption, where present) embeddings of a batch, with ids and labels."""
        out: dict[str, Any] = dict(video_emb=self.model.encode_video(batch.video), sample_id=batch.sample_id)
        present = batch.present("caption")
        if bool(present.any()):
            out["text_emb"] = self.model.encode_text(batch.caption_ids[present], batch.caption_mask[present])
            out["text_present"] = present
        if batch.label is not None:
            out["label"] = batch.label
        return out

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the video encoder at its checkpoint's frame count: the CLI links the data's
        ``num_frames`` (``iv2 test --ckpt_path ... --data.init_args.num_frames 32``) into the stage,
        whose position table would no longer fit; longer clips then go through windows of it."""
        super().on_load_checkpoint(checkpoint)
        saved = (checkpoint.get("state_dict") or {}).get("model.video_encoder.pos_embed")
        enc = self.model.video_encoder
        if saved is None or saved.shape == enc.pos_embed.shape or saved.dim() != 3:
            return
        per_frame = enc.grid_size[1] * enc.grid_size[2]
        tokens = saved.shape[1] - enc.num_prefix
        if tokens <= 0 or tokens % per_frame or saved.shape[2] != enc.embed_dim:
            return
        self.encoder_config = {**self.encoder_config, "num_frames": tokens // per_frame * enc.tubelet_size}
        self.model.set_video_encoder(self.build_video_encoder().to(enc.pos_embed.device))
        if self.freeze_names:
            self.freeze_parameters(self.freeze_names)


__all__ = ["EVAL_ARGUMENTS", "ContrastiveStage", "aligner_inputs"]
