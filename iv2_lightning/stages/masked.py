"""Stage 1: masked video modelling.

Two targets, as in the literature InternVideo2 builds on:

* ``target="pixels"``: VideoMAE (Tong et al. 2022): mask 80-90% of the tokens (tube masking), encode
  only the visible ones, and a light decoder predicts the per-patch normalised pixels of the masked
  ones (``norm_pix_loss``).
* ``target="teacher"``: UMT (Li et al. 2023) / InternVideo2 stage 1 (arXiv 2403.15377, Sec. 3.1):
  a frozen teacher sees the whole clip; the student sees the visible tokens, and small heads map its
  last ``teacher_layers`` block outputs onto the teacher's (and its pooled output onto the
  teacher's pooled output) with the loss mean(2 - 2 cos). The visible tokens can be drawn from the
  teacher's attention-pool weights (``mask_type="attention"``). The teacher runs under ``no_grad``
  and, on CUDA, under bf16 autocast (UMT: halves the cost of the teacher).
  ``teacher="random"`` builds a frozen, randomly initialised ``VideoEncoder`` (the student's
  architecture unless ``teacher_kwargs`` says otherwise; weights drawn from ``teacher_seed``, so a
  resumed run rebuilds the same teacher). With no pretrained video teacher available offline, this is
  the tiny curriculum's stand-in for InternVideo2's teachers: Sarnthein et al. (ICML 2023, "Random
  Teachers are Good Teachers") report that students distilled from a random teacher learn features
  that probe better than the teacher's own.

Validation masks are drawn from a fixed seed per batch, so the held-out loss of different epochs is
comparable; ``val/recon_loss_ratio`` is the current held-out loss over the one of the first epoch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from iv2_lightning.data.batch import VideoBatch
from iv2_lightning.models.backbone import VideoEncoder, preset_config
from iv2_lightning.models.heads import (
    DistillHead,
    PixelDecoder,
    patchify,
    pixel_reconstruction_loss,
    unpatchify,
)
from iv2_lightning.models.losses import CosineDistillLoss
from iv2_lightning.models.masking import make_mask
from iv2_lightning.stages.base import BaseStage
from iv2_lightning.stages.weights import load_shared_weights


def build_teacher(
    spec: str,
    kwargs: dict[str, Any] | None = None,
    default_config: dict[str, Any] | None = None,
    seed: int = 0,
) -> nn.Module:
    """A frozen teacher: ``"random"`` (a ``VideoEncoder`` with random weights drawn from ``seed``,
    built from ``kwargs`` (``preset`` plus overrides) or, without them, from ``default_config``), an
    export folder / .safetensors / .ckpt of a ``VideoEncoder`` (built from ``kwargs``), or a class
    path ``package.module.Class`` / ``package.module:Class`` instantiated with ``kwargs``. The teacher
    must accept ``(video, return_hidden=k)`` and return ``tokens``, ``pooled`` and ``hidden_states``
    like :class:`VideoEncoder`."""
    kwargs = dict(kwargs or {})
    if spec == "random":
        if kwargs or default_config is None:
            config = preset_config(kwargs.pop("preset", "tiny"), **kwargs)
        else:
            config = dict(default_config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            teacher = VideoEncoder(**config)
    elif Path(spec).exists():
        teacher = VideoEncoder(**preset_config(kwargs.pop("preset", "tiny"), **kwargs))
        holder = nn.Module()
        holder.video_encoder = teacher
        load_shared_weights(holder, spec, strict=True, modules=("video_encoder",))
    else:
        module_name, _, cls_name = spec.replace(":", ".").rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError, ValueError) as err:
            raise ValueError(
                f"teacher {spec!r} is neither an existing weights path nor an importable class"
            ) from err
        teacher = cls(**kwargs)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


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
        teacher_kwargs: dict[str, Any] | list[dict[str, Any]] | None = None,
        teacher_weights: list[float] | None = None,
        teacher_layers: int = 1,
        teacher_seed: int = 0,
        distill_head: Literal["linear", "mlp"] = "linear",
        teacher_autocast: bool = True,
        log_images: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1); got {mask_ratio}")
        if mask_type == "attention" and target != "teacher":
            raise ValueError(
                "mask_type='attention' needs target='teacher' (the mask follows the teacher's attention)"
            )
        if raw_pix_weight < 0 or (raw_pix_weight > 0 and not (target == "pixels" and norm_pix)):
            raise ValueError(
                f"raw_pix_weight must be >= 0 and needs target='pixels' with norm_pix=True; got "
                f"raw_pix_weight={raw_pix_weight}, target={target!r}, norm_pix={norm_pix}"
            )
        if target == "teacher" and not teacher:
            raise ValueError("target='teacher' needs `teacher`: 'random', a weights path or a class path")
        self.target = target
        self.mask_type = mask_type
        self.mask_ratio = mask_ratio
        self.norm_pix = norm_pix
        self.raw_pix_weight = raw_pix_weight
        self.teacher_layers = teacher_layers
        self.teacher_autocast = teacher_autocast
        self.log_images = log_images
        self.video_encoder = self.build_video_encoder()
        enc = self.video_encoder
        self.tubelet, self.patch = enc.tubelet_size, enc.patch_size
        if target == "pixels":
            self.decoder = PixelDecoder(
                enc.embed_dim,
                # with a raw-pixel term the decoder predicts both targets of each patch
                patch_dim=self.tubelet * self.patch * self.patch * 3 * (2 if raw_pix_weight > 0 else 1),
                grid=enc.grid_size,
                dim=decoder_dim,
                depth=decoder_depth,
                num_heads=decoder_heads,
                has_cls=enc.num_prefix > 0,
            )
        else:
            specs = [teacher] if isinstance(teacher, str) else list(teacher)
            if isinstance(teacher_kwargs, list):
                kwargs_list = list(teacher_kwargs)
            elif len(specs) == 1 or not teacher_kwargs:
                kwargs_list = [teacher_kwargs] * len(specs)
            else:
                raise ValueError(
                    f"teacher names {len(specs)} teachers: give teacher_kwargs as a list of "
                    f"{len(specs)} dicts (null for none)"
                )
            weights = [1.0] * len(specs) if teacher_weights is None else [float(w) for w in teacher_weights]
            if len(kwargs_list) != len(specs) or len(weights) != len(specs):
                raise ValueError(
                    f"teacher names {len(specs)} teachers but teacher_kwargs has {len(kwargs_list)} entries "
                    f"and teacher_weights {len(weights)}; give one per teacher"
                )
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError(f"teacher_weights must be >= 0 with a positive sum; got {weights}")
            self.teacher_weights = weights
            # not registered submodules: frozen, never exported, never in the optimizer
            self.__dict__["teachers"] = [
                build_teacher(spec, kw, default_config=self.encoder_config, seed=teacher_seed + i)
                for i, (spec, kw) in enumerate(zip(specs, kwargs_list))
            ]
            self.__dict__["teacher"] = self.teachers[0]
            heads = []
            for spec, t in zip(specs, self.teachers):
                with torch.no_grad():
                    probe = t(
                        torch.zeros(1, 3, enc.num_frames, enc.image_size, enc.image_size),
                        return_hidden=teacher_layers,
                    )
                t_dim, t_pool = probe.tokens.shape[-1], probe.pooled.shape[-1]
                if probe.tokens.shape[1] - getattr(probe, "num_prefix", 1) != enc.num_patches:
                    raise ValueError(
                        f"teacher {spec!r} has {probe.tokens.shape[1]} tokens per clip, the student "
                        f"{enc.num_patches} (+cls): use the same patch size, tubelet, frames and image size"
                    )
                heads.append(
                    (
                        nn.ModuleList(
                            DistillHead(enc.embed_dim, t_dim, distill_head) for _ in range(teacher_layers)
                        ),
                        DistillHead(enc.embed_out_dim, t_pool, distill_head),
                    )
                )
            # the first teacher's heads keep their single-teacher names (older checkpoints load)
            self.token_heads, self.pool_head = heads[0]
            self.extra_heads = nn.ModuleList(
                nn.ModuleDict({"tokens": tok, "pool": pool}) for tok, pool in heads[1:]
            )
            self.distill_loss = CosineDistillLoss()
        self.first_val_loss: float | None = None
        self._val_losses: list[torch.Tensor] = []
        self.finish_init()

    def on_fit_start(self) -> None:
        if self.target == "teacher":
            for t in self.teachers:
                t.to(self.device)

    # -- masks ---------------------------------------------------------------------------------

    def _mask(self, batch: VideoBatch, grid, teacher_out=None, generator=None) -> torch.Tensor:
        b = len(batch)
        attention = None
        if self.mask_type == "attention":
            t, h, w = grid
            weights = self.teacher.clip_projector.attention_weights(teacher_out.tokens)  # [B, 1 + N]
            attention = weights[:, getattr(teacher_out, "num_prefix", 1) :].reshape(b, t, h * w)
        mask = make_mask(self.mask_type, b, grid, self.mask_ratio, attention=attention, generator=generator)
        return mask.to(batch.video.device)

    def _teacher(self, video: torch.Tensor, teacher: nn.Module | None = None):
        device_type = video.device.type
        with (
            torch.no_grad(),
            torch.autocast(
                device_type, dtype=torch.bfloat16, enabled=self.teacher_autocast and device_type == "cuda"
            ),
        ):
            return (teacher or self.teacher)(video, return_hidden=self.teacher_layers)

    # -- losses --------------------------------------------------------------------------------

    def _losses(self, batch: VideoBatch, generator=None) -> dict[str, torch.Tensor]:
        video = batch.video
        grid = self.video_encoder.patch_embed.grid(tuple(video.shape))
        if self.target == "pixels":
            mask = self._mask(batch, grid, generator=generator)
            out = self.video_encoder(video, mask=mask)
            pred = self.decoder(out.tokens, mask)
            if self.raw_pix_weight > 0:
                pred, raw = pred.chunk(2, dim=-1)
            loss = pixel_reconstruction_loss(
                pred, video, mask, self.tubelet, self.patch, normalize=self.norm_pix
            )
            if self.raw_pix_weight <= 0:
                return {"loss": loss, "recon_loss": loss.detach(), "_pred": pred, "_mask": mask}
            raw_loss = pixel_reconstruction_loss(raw, video, mask, self.tubelet, self.patch, normalize=False)
            total = loss + self.raw_pix_weight * raw_loss
            return {
                "loss": total,
                "recon_loss": total.detach(),
                "recon_loss_norm": loss.detach(),
                "recon_loss_raw": raw_loss.detach(),
                "_pred": pred,
                "_mask": mask,
            }
        t_outs = [self._teacher(video, t) for t in self.teachers]
        mask = self._mask(batch, grid, t_outs[0], generator=generator)
        out = self.video_encoder(video, mask=mask, return_hidden=self.teacher_layers)
        keep = ~mask
        p = self.video_encoder.num_prefix
        heads = [(self.token_heads, self.pool_head)] + [(h["tokens"], h["pool"]) for h in self.extra_heads]
        token_total = pool_total = 0.0
        parts: dict[str, torch.Tensor] = {}
        for i, ((token_heads, pool_head), t_out, w) in enumerate(zip(heads, t_outs, self.teacher_weights)):
            tp = getattr(t_out, "num_prefix", 1)
            token_loss = 0.0
            for head, s_h, t_h in zip(token_heads, out.hidden_states, t_out.hidden_states):
                target = t_h[:, tp:][keep].reshape(len(batch), -1, t_h.shape[-1]).float()
                token_loss = token_loss + self.distill_loss(head(s_h[:, p:]), target)
            token_loss = token_loss / len(token_heads)
            pool_loss = self.distill_loss(pool_head(out.pooled)[:, None], t_out.pooled.float()[:, None])
            token_total = token_total + w * token_loss
            pool_total = pool_total + w * pool_loss
            if len(t_outs) > 1:
                parts[f"teacher{i}_loss"] = (token_loss + pool_loss).detach()
        loss = token_total + pool_total
        return {
            "loss": loss,
            "distill_loss": token_total.detach(),
            "pool_loss": pool_total.detach(),
            "recon_loss": loss.detach(),
            **parts,
        }

    def compute_loss(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self._losses(batch).items() if not k.startswith("_")}

    # -- validation ----------------------------------------------------------------------------

    def _eval_step(self, batch: VideoBatch, batch_idx: int, prefix: str) -> None:
        gen = torch.Generator().manual_seed(10_000 + batch_idx)  # the same masks every epoch
        out = self._losses(batch, generator=gen)
        for key in (
            "recon_loss",
            "recon_loss_norm",
            "recon_loss_raw",
            *sorted(k for k in out if k.startswith("teacher")),
        ):
            if key in out:
                self.log(f"{prefix}/{key}", out[key], on_epoch=True, sync_dist=True, batch_size=len(batch))
        if prefix == "val":
            self._val_losses.append(
                torch.stack(
                    [
                        out.get(k, out["recon_loss"])
                        for k in ("recon_loss", "recon_loss_norm", "recon_loss_raw")
                    ]
                )
            )
        if (
            batch_idx == 0
            and self.log_images
            and self.target == "pixels"
            and not self.trainer.sanity_checking
        ):
            self._log_reconstruction(batch, out["_pred"], out["_mask"], prefix)

    def validation_step(self, batch: VideoBatch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: VideoBatch, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._val_losses:
            self._val_losses.clear()
            return
        means = self.trainer.strategy.reduce(torch.stack(self._val_losses).mean(dim=0), reduce_op="mean")
        current = [float(x) for x in means]  # total, norm-pixel term, raw-pixel term
        self._val_losses.clear()
        if self.first_val_loss is None:
            self.first_val_loss = current[0]
            self._first_parts = current[1:]
        self.log("val/recon_loss_ratio", current[0] / max(self.first_val_loss, 1e-12), sync_dist=False)
        if self.raw_pix_weight > 0 and getattr(self, "_first_parts", None):
            # the two terms' own ratios, so a reader sees which one fell
            for name, now, first in zip(("norm", "raw"), current[1:], self._first_parts):
                self.log(f"val/recon_loss_{name}_ratio", now / max(first, 1e-12), sync_dist=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["first_val_loss"] = self.first_val_loss
        checkpoint["first_val_parts"] = getattr(self, "_first_parts", None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.first_val_loss = checkpoint.get("first_val_loss")
        self._first_parts = checkpoint.get("first_val_parts")

    # -- pictures --------------------------------------------------------------------------------

    def reconstruct(self, video: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Put predicted patches back into pixel space (using the true patch statistics when the
        target was normalised, as VideoMAE does for its figures); visible patches stay as input."""
        patches = patchify(video, self.tubelet, self.patch)  # [B, N, P]
        out = patches.clone()
        if self.norm_pix:
            b, n, _ = patches.shape
            per_channel = patches.reshape(b, n, -1, 3)
            mean = per_channel.mean(dim=2, keepdim=True)
            std = per_channel.var(dim=2, unbiased=True, keepdim=True).sqrt() + 1e-6
            restored = pred.reshape(b, -1, per_channel.shape[2], 3) * std[mask].reshape(b, -1, 1, 3) + mean[
                mask
            ].reshape(b, -1, 1, 3)
            out[mask] = restored.reshape(-1, patches.shape[-1])
        else:
            out[mask] = pred.reshape(-1, patches.shape[-1])
        grid = self.video_encoder.patch_embed.grid(tuple(video.shape))
        return unpatchify(out, self.tubelet, self.patch, grid)

    def _log_reconstruction(self, batch: VideoBatch, pred, mask, prefix: str) -> None:
        writer = getattr(self.logger, "experiment", None)
        if writer is None or not hasattr(writer, "add_image"):
            return
        video = batch.video[:1].float()
        recon = self.reconstruct(video, pred[:1], mask[:1])
        grid = self.video_encoder.patch_embed.grid(tuple(video.shape))
        masked = patchify(video, self.tubelet, self.patch)
        masked[mask[:1]] = masked.min()
        masked = unpatchify(masked, self.tubelet, self.patch, grid)
        rows = []
        for v in (masked, recon, video):  # rows: masked input, reconstruction, target
            v = v[0]  # [3, T, H, W]
            lo, hi = video.amin(), video.amax()
            rows.append(
                ((v - lo) / (hi - lo + 1e-6)).clamp(0, 1).permute(0, 2, 1, 3).reshape(3, v.shape[2], -1)
            )
        image = torch.cat(rows, dim=1)
        writer.add_image(f"{prefix}/masked_recon_target", image, self.global_step)


__all__ = ["MaskedVideoStage", "build_teacher"]
