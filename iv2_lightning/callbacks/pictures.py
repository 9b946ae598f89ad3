"""ContrastivePictures: TensorBoard pictures of what the stage-2 model does, once per evaluation epoch.

From the first batch of every validation and test epoch (rank 0, not during the sanity check), the
first ``clips`` clips: the text-video similarity heat map with the true pairs outlined, top-k
retrieval strips, the attention pool's weights over frames, and the cross-modal fusion gates
(:func:`iv2_lightning.visualize.contrastive_pictures`). A callback, not stage code, as anomalib keeps
its visualizer apart from the model; :class:`~iv2_lightning.stages.contrastive.ContrastiveStage` adds it
through ``configure_callbacks`` when its ``visual_clips > 0``.

It encodes the clips itself through the stage's torch model (``pl_module.model``: ``encode_video``,
``encode_text``, ``video_encoder``) and reads the gates from what the evaluation step returned.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from iv2_lightning.visualize import contrastive_pictures


class ContrastivePictures(L.Callback):
    """Pictures of ``clips`` clips of the first evaluation batch, to every logger that takes images."""

    def __init__(self, clips: int = 16) -> None:
        if clips < 1:
            raise ValueError(f"clips must be >= 1; got {clips}")
        self.clips = clips
        self._record: dict[str, Any] | None = None

    @staticmethod
    def _writers(trainer: L.Trainer) -> list[Any]:
        return [
            lg.experiment for lg in trainer.loggers if hasattr(getattr(lg, "experiment", None), "add_image")
        ]

    def _wanted(self, trainer: L.Trainer, batch_idx: int) -> bool:
        return (
            batch_idx == 0
            and not trainer.sanity_checking
            and trainer.is_global_zero
            and bool(self._writers(trainer))
        )

    @torch.no_grad()
    def record(self, model: torch.nn.Module, batch: Any, outputs: Any = None) -> dict[str, Any]:
        """What :func:`~iv2_lightning.visualize.contrastive_pictures` needs from ``batch`` (on the CPU)."""
        n = min(self.clips, len(batch))
        video = batch.video[:n]
        present = batch.present("caption")[:n]
        text_emb = torch.zeros(n, model.embed_dim, device=video.device)
        if bool(present.any()):
            ids, mask = batch.caption_ids[:n][present], batch.caption_mask[:n][present]
            text_emb[present] = model.encode_text(ids, mask)
        gates = outputs if isinstance(outputs, dict) else {}
        return {
            "video": video.detach().float().cpu(),
            "video_emb": model.encode_video(video).cpu(),
            "text_emb": text_emb.cpu(),
            "text_present": present.cpu(),
            "sample_id": batch.sample_id[:n].cpu(),
            "captions": list(batch.captions[:n]),
            "gates": {k[len("gate_") :]: float(v) for k, v in gates.items() if k.startswith("gate_")},
            "attention": self._attention(model.video_encoder, video),
            "tubelet": model.video_encoder.tubelet_size,
        }

    @staticmethod
    def _attention(enc: torch.nn.Module, video: torch.Tensor) -> torch.Tensor | None:
        """The attention pool's weights over the patch tokens ``[n, T', H', W']`` (clips no longer
        than the encoder's frames; None without an attention pool)."""
        if enc.clip_projector is None or video.shape[2] > enc.num_frames:
            return None
        grid = enc.patch_embed.grid(tuple(video.shape))
        tokens = enc(video).tokens
        if tokens.shape[1] != enc.num_prefix + grid[0] * grid[1] * grid[2]:
            return None
        weights = enc.clip_projector.attention_weights(tokens)[:, enc.num_prefix :]
        return weights.reshape(video.shape[0], *grid).float().cpu()

    def _batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._wanted(trainer, batch_idx):
            self._record = self.record(pl_module.model, batch, outputs)

    def _epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        record, self._record = self._record, None
        if record is None:
            return
        images, text = contrastive_pictures(record)
        for writer in self._writers(trainer):
            for tag, image in images.items():
                writer.add_image(f"{prefix}/{tag}", image, pl_module.global_step)
            if text and hasattr(writer, "add_text"):
                writer.add_text(f"{prefix}/retrieval_queries", text, pl_module.global_step)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self._batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._epoch_end(trainer, pl_module, "test")
