"""ReconstructionImages: stage 1's pictures, the first evaluation clip masked, reconstructed and whole.

A callback rather than code in the stage, like anomalib's visualizer (``configure_callbacks`` adds it
when ``MaskedVideoStage(log_images=True)`` trains on pixels): it reads what the evaluation step
returns (a :class:`~iv2_lightning.models.masked_video.MaskedVideoOutput`, whose ``pred`` and ``mask``
are the predictions and masks the loss was computed on) and draws them with the model's
``reconstruct`` (VideoMAE's figures: predicted patches un-normalised with the true patch statistics).
One image per evaluation loop, written to a logger that has ``add_image`` (TensorBoard); rows: masked
input, reconstruction, target; the frames side by side.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from iv2_lightning.models.heads import patchify, unpatchify


def reconstruction_image(
    model: Any, video: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """``[3, 3 * H, T * W]`` in [0, 1] for the first clip of ``video``: masked input (hidden patches at
    the clip's minimum), ``model.reconstruct``, the clip; all scaled by the clip's own range."""
    video = video[:1].float()
    mask = mask[:1]
    recon = model.reconstruct(video, pred[:1].float(), mask)
    grid = model.video_encoder.patch_embed.grid(tuple(video.shape))
    masked = patchify(video, model.tubelet, model.patch)
    masked[mask] = masked.min()
    masked = unpatchify(masked, model.tubelet, model.patch, grid)
    lo, hi = video.amin(), video.amax()
    rows = []
    for v in (masked, recon, video):
        v = v[0]  # [3, T, H, W]
        rows.append(((v - lo) / (hi - lo + 1e-6)).clamp(0, 1).permute(0, 2, 1, 3).reshape(3, v.shape[2], -1))
    return torch.cat(rows, dim=1)


class ReconstructionImages(L.Callback):
    """Log ``<val|test>/masked_recon_target`` for the first batch of each evaluation loop (not during
    the sanity check)."""

    def _draw(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, prefix: str
    ) -> None:
        if trainer.sanity_checking or getattr(outputs, "pred", None) is None:
            return
        writer = getattr(pl_module.logger, "experiment", None)
        if writer is None or not hasattr(writer, "add_image"):
            return
        with torch.no_grad():
            image = reconstruction_image(pl_module.model, batch.video, outputs.pred, outputs.mask)
        writer.add_image(f"{prefix}/masked_recon_target", image.cpu(), trainer.global_step)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if batch_idx == 0:
            self._draw(trainer, pl_module, outputs, batch, "val")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self._draw(trainer, pl_module, outputs, batch, "test")


__all__ = ["ReconstructionImages", "reconstruction_image"]
