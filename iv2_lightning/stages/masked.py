"""Stage 1: masked video modelling, the Lightning shell around
:class:`~iv2_lightning.models.masked_video.MaskedVideoModel` (VideoMAE pixel targets or UMT /
InternVideo2 teacher distillation, arXiv 2403.15377 Sec. 3.1; the model's docstring has the method).

What the shell adds: it builds the student and the frozen teachers from a config, logs the loss
terms, and evaluates on fixed masks. ``teacher="random"`` builds a frozen, randomly initialised
``VideoEncoder`` (the student's architecture unless ``teacher_kwargs`` says otherwise; weights drawn
from ``teacher_seed``, so a resumed run rebuilds the same teacher). With no pretrained video teacher
available offline, this is the tiny curriculum's stand-in for InternVideo2's teachers: Sarnthein et
al. (ICML 2023, "Random Teachers are Good Teachers") report that students distilled from a random
teacher learn features that probe better than the teacher's own.

Validation masks are drawn from a fixed seed per batch, so the held-out loss of different epochs is
comparable; ``val/recon_loss_ratio`` is the current held-out loss over the first one measured: the
sanity-check pass before training when the trainer runs one (the untrained model; set
``num_sanity_val_steps`` to the number of validation batches for the same clips), else the first
validation epoch. So validating only every N epochs (``check_val_every_n_epoch``) keeps its meaning.
With ``log_images`` (pixel target), :class:`~iv2_lightning.callbacks.reconstruction.ReconstructionImages`
draws the first validation clip masked, reconstructed and whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback

from iv2_lightning.callbacks.reconstruction import ReconstructionImages
from iv2_lightning.data.batch import VideoBatch
from iv2_lightning.models.masked_video import MaskedVideoModel, MaskedVideoOutput
from iv2_lightning.models.teachers import build_teacher, pair_teacher_args
from iv2_lightning.stages.base import BaseStage

#: the terms the validation loop logs (when the objective has them) and keeps for the ratios
_RATIO_TERMS = ("recon_loss", "recon_loss_norm", "recon_loss_raw")


class MaskedVideoStage(BaseStage):
    stage_name = "stage1"

    def __init__(
        self,
        target: Literal["pixels", "teacher"] = "pixels",
        mask_type: Literal["tube", "random", "attention"] = "tube",
        mask_ratio: float = 0.9,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix: bool = True,
        raw_pix_weight: float = 0.0,
        teacher: str | list[str] | None = None,
        teacher_kwargs: dict[str, Any] | list[dict[str, Any] | None] | None = None,
        teacher_weights: list[float] | None = None,
        teacher_layers: int | list[int] = 1,
        teacher_seed: int = 0,
        distill_head: Literal["linear", "mlp"] | list[Literal["linear", "mlp"]] = "linear",
        teacher_autocast: bool = True,
        cls_target: bool | list[bool] = False,
        pool_target: bool | list[bool] = True,
        target_pos_embed: bool = False,
        frame_stride: int = 1,
        teacher_frames: list[Literal["student", "all"]] | None = None,
        log_images: bool = True,
        **kwargs: Any,
    ) -> None:
        if target == "teacher":
            if not teacher:
                raise ValueError("target='teacher' needs `teacher`: 'random', a weights path or a class path")
            # fail on misaligned lists before building anything
            pair_teacher_args(teacher, teacher_kwargs, teacher_weights)
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1; got {frame_stride}")
        self.first_val_loss: float | None = None
        self._first_parts: list[float] | None = None
        self._val_losses: list[torch.Tensor] = []
        super().__init__(**kwargs)

    def build_model(self) -> MaskedVideoModel:
        hp = self.hparams
        if hp.frame_stride > 1:  # the data's clip holds frame_stride x the student's frames
            frames = self.encoder_config["num_frames"]
            if frames % hp.frame_stride:
                raise ValueError(f"frame_stride {hp.frame_stride} does not divide the clip's {frames} frames")
            self.encoder_config = {**self.encoder_config, "num_frames": frames // hp.frame_stride}
        video_encoder = self.build_video_encoder()  # first: the student's weights follow the seed
        teachers, weights = [], None
        if hp.target == "teacher":
            specs, kwargs_list, weights = pair_teacher_args(hp.teacher, hp.teacher_kwargs, hp.teacher_weights)
            teachers = [
                build_teacher(spec, kw, default_config=self.encoder_config, seed=hp.teacher_seed + i)
                for i, (spec, kw) in enumerate(zip(specs, kwargs_list))
            ]
        return MaskedVideoModel(
            **self.hparams_for(
                MaskedVideoModel, video_encoder=video_encoder, teachers=teachers, teacher_weights=weights
            )
        )

    def configure_callbacks(self) -> list[Callback]:
        if self.hparams.log_images and self.hparams.target == "pixels":
            return [ReconstructionImages()]
        return []

    def batch_contract(self) -> Mapping[str, Iterable[str]]:
        return {"reconstruction" if self.hparams.target == "pixels" else "distillation": ["video"]}

    def compute_loss(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        out = self.model(batch.video)
        return {"loss": out.loss, **out.terms}

    # -- validation ----------------------------------------------------------------------------

    def _eval_step(self, batch: VideoBatch, batch_idx: int, prefix: str) -> MaskedVideoOutput:
        gen = torch.Generator().manual_seed(10_000 + batch_idx)  # the same masks every epoch
        out = self.model(batch.video, generator=gen)
        terms = out.terms
        for key in (*_RATIO_TERMS, *sorted(k for k in terms if k.startswith("teacher"))):
            if key in terms:
                self.log(f"{prefix}/{key}", terms[key], on_epoch=True, sync_dist=True, batch_size=len(batch))
        if prefix == "val":
            # without the raw-pixel term its two parts are the total itself
            self._val_losses.append(torch.stack([terms.get(k, terms["recon_loss"]) for k in _RATIO_TERMS]))
        return out

    def validation_step(self, batch: VideoBatch, batch_idx: int) -> MaskedVideoOutput:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: VideoBatch, batch_idx: int) -> MaskedVideoOutput:
        return self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        if not self._val_losses:
            return
        means = self.trainer.strategy.reduce(torch.stack(self._val_losses).mean(dim=0), reduce_op="mean")
        current = [float(x) for x in means]  # total, norm-pixel term, raw-pixel term
        self._val_losses.clear()
        if self.first_val_loss is None:  # the reference: the sanity check (untrained) when there is one
            self.first_val_loss = current[0]
            self._first_parts = current[1:]
        if self.trainer.sanity_checking:
            return
        self.log("val/recon_loss_ratio", current[0] / max(self.first_val_loss, 1e-12), sync_dist=False)
        if self.hparams.raw_pix_weight > 0 and self._first_parts:
            # the two terms' own ratios, so a reader sees which one fell
            for name, now, first in zip(("norm", "raw"), current[1:], self._first_parts):
                self.log(f"val/recon_loss_{name}_ratio", now / max(first, 1e-12), sync_dist=False)

    # -- checkpoints ---------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["first_val_loss"] = self.first_val_loss
        checkpoint["first_val_parts"] = self._first_parts

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.first_val_loss = checkpoint.get("first_val_loss")
        self._first_parts = checkpoint.get("first_val_parts")


__all__ = ["MaskedVideoStage", "build_teacher"]
