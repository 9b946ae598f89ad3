"""Stage 1 as a plain torch model: masked video modelling with a pixel or a teacher target.

Two targets, as in the literature InternVideo2 builds on:

* ``target="pixels"``: VideoMAE (Tong et al. 2022): mask 80-90% of the tokens (tube masking), encode
  only the visible ones, and a light decoder predicts the per-patch normalised pixels of the masked
  ones (``norm_pix``); ``raw_pix_weight > 0`` adds the unnormalised pixels as a second target.
* ``target="teacher"``: UMT (Li et al. 2023) / InternVideo2 stage 1 (arXiv 2403.15377, Sec. 3.1):
  frozen teachers see the whole clip; the student sees the visible tokens, and small heads map its
  last ``teacher_layers`` block outputs onto each teacher's (and its pooled output onto the teacher's
  pooled output) with the loss mean(2 - 2 cos). The visible tokens can be drawn from the first
  teacher's attention-pool weights (``mask_type="attention"``). The teachers run under ``no_grad``
  and, on CUDA, under bf16 autocast (UMT: halves the cost of the teacher).

:class:`MaskedVideoModel` trains in a plain PyTorch loop (``out = model(video); out.loss.backward()``)
and returns a :class:`MaskedVideoOutput` NamedTuple (anomalib's ``torch_model.py`` split; DeepSpeed
ZeRO-3 finds tensors inside NamedTuples and dicts). The teachers are NOT submodules: they are kept in a
plain tuple, so they are never in ``parameters()`` (the optimizer), ``state_dict()`` (checkpoints,
exports) nor partitioned by ZeRO-3; they follow the video's device on the first forward pass.
``iv2_lightning.stages.masked.MaskedVideoStage`` is the Lightning shell around it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.models.backbone import VideoEncoder
from iv2_lightning.models.heads import (
    DistillHead,
    HeadKind,
    PixelDecoder,
    patchify,
    pixel_reconstruction_loss,
    unpatchify,
)
from iv2_lightning.models.losses import CosineDistillLoss
from iv2_lightning.models.masking import make_mask


class MaskedVideoOutput(NamedTuple):
    """What :class:`MaskedVideoModel` returns for one batch of clips.

    ``loss``: the training objective (a scalar with its graph). ``terms``: detached scalars for the
    logs (``recon_loss`` always: the objective's value; ``recon_loss_norm`` / ``recon_loss_raw`` with
    the raw-pixel term; ``distill_loss``, ``pool_loss`` and, with several teachers, ``teacher<i>_loss``
    for the teacher target). ``mask``: ``[B, N]`` True where a token was hidden from the student.
    ``pred``: ``[B, N_masked, P]`` the predicted (normalised) pixels of the hidden patches (pixel
    target; None for the teacher target).
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    mask: torch.Tensor
    pred: torch.Tensor | None = None


class MaskedVideoModel(nn.Module):
    """The student ``video_encoder`` plus a :class:`PixelDecoder` (``target="pixels"``) or, per
    teacher, ``teacher_layers`` token heads and one pooled-output head (``target="teacher"``).

    ``teachers`` are frozen modules taking ``(video, return_hidden=k)`` and returning ``tokens``
    ``[B, prefix + N, D]``, ``pooled`` and ``hidden_states`` (a :class:`VideoEncoder` or
    :class:`~iv2_lightning.models.teachers.ConvFrameTeacher`; ``teachers.build_teacher`` builds them
    from a config). Their token grid must be the student's. ``teacher_weights`` weigh their losses.
    The first teacher's heads are ``token_heads`` / ``pool_head`` (the names of the official stage-1
    conversion), the others' ``extra_heads[i - 1]["tokens" | "pool"]``.
    """

    def __init__(
        self,
        video_encoder: VideoEncoder,
        target: Literal["pixels", "teacher"] = "pixels",
        mask_type: Literal["tube", "random", "attention"] = "tube",
        mask_ratio: float = 0.9,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        norm_pix: bool = True,
        raw_pix_weight: float = 0.0,
        teachers: Sequence[nn.Module] = (),
        teacher_weights: Sequence[float] | None = None,
        teacher_layers: int | Sequence[int] = 1,
        distill_head: HeadKind | Sequence[HeadKind] = "linear",
        teacher_autocast: bool = True,
        cls_target: bool | Sequence[bool] = False,
        pool_target: bool | Sequence[bool] = True,
        target_pos_embed: bool = False,
        frame_stride: int = 1,
        teacher_frames: Sequence[Literal["student", "all"]] | None = None,
    ) -> None:
        super().__init__()
        _check_arguments(target, mask_type, mask_ratio, norm_pix, raw_pix_weight, teachers)
        if frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1; got {frame_stride}")
        self.target, self.mask_type, self.mask_ratio = target, mask_type, mask_ratio
        self.norm_pix, self.raw_pix_weight = norm_pix, raw_pix_weight
        self.teacher_autocast = teacher_autocast
        self.frame_stride = frame_stride
        self.video_encoder = video_encoder
        enc = video_encoder
        self.tubelet, self.patch = enc.tubelet_size, enc.patch_size
        if target == "pixels":
            self.teachers: tuple[nn.Module, ...] = ()
            self.teacher_weights: list[float] = []
            self.teacher_layers = 1
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
            return
        weights = [1.0] * len(teachers) if teacher_weights is None else [float(w) for w in teacher_weights]
        if len(weights) != len(teachers):
            raise ValueError(
                f"{len(teachers)} teachers but {len(weights)} teacher_weights; give one per teacher"
            )
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"teacher_weights must be >= 0 with a positive sum; got {weights}")
        self.teacher_weights = weights
        n = len(teachers)
        self.layers_per_teacher = [int(k) for k in _per_teacher(teacher_layers, n, "teacher_layers")]
        if any(k < 1 for k in self.layers_per_teacher):
            raise ValueError(f"teacher_layers must be >= 1; got {self.layers_per_teacher}")
        self.teacher_layers = max(self.layers_per_teacher)  # the student returns this many hidden states
        kinds = _per_teacher(distill_head, n, "distill_head")
        self.cls_targets = [bool(c) for c in _per_teacher(cls_target, n, "cls_target")]
        self.pool_targets = [bool(c) for c in _per_teacher(pool_target, n, "pool_target")]
        self.teacher_frames = list(teacher_frames) if teacher_frames is not None else ["student"] * n
        if len(self.teacher_frames) != n or not set(self.teacher_frames) <= {"student", "all"}:
            raise ValueError(
                f"teacher_frames must name 'student' or 'all' for each of the {n} teachers; got {teacher_frames}"
            )
        # a tuple, not submodules: never exported, never in the optimizer (see the docstring); frozen
        # and in eval mode here, since ``model.train()`` does not reach them
        self.teachers = tuple(t.eval().requires_grad_(False) for t in teachers)
        heads = [self._heads_for(t, i, kinds[i]) for i, t in enumerate(self.teachers)]
        self.token_heads, self.pool_head = heads[0]
        # learned position tables added to the student's states before the token heads (official
        # clip_pos_embed / mae_pos_embed), one per teacher, started from the student's own table
        self.target_pos = nn.ParameterList(
            nn.Parameter(enc.pos_embed.detach().clone()) for _ in self.teachers if target_pos_embed
        )
        self.extra_heads = nn.ModuleList(
            nn.ModuleDict({"tokens": tok, "pool": pool}) for tok, pool in heads[1:]
        )
        self.distill_loss = CosineDistillLoss()

    @property
    def teacher(self) -> nn.Module:
        """The first teacher (the one whose attention guides ``mask_type="attention"``)."""
        return self.teachers[0]

    def _heads_for(self, teacher: nn.Module, index: int, kind: str) -> tuple[nn.ModuleList, DistillHead]:
        """Token and pooled-output heads sized by one probe pass of ``teacher`` on a blank clip."""
        enc = self.video_encoder
        frames = enc.num_frames * (self.frame_stride if self.teacher_frames[index] == "all" else 1)
        with torch.no_grad():
            probe = teacher(
                torch.zeros(1, 3, frames, enc.image_size, enc.image_size),
                return_hidden=self.layers_per_teacher[index],
            )
        t_dim, t_pool = probe.tokens.shape[-1], probe.pooled.shape[-1]
        grid = getattr(probe, "grid", None)
        if grid is None and probe.tokens.shape[1] - getattr(probe, "num_prefix", 1) != enc.num_patches:
            raise ValueError(
                f"teacher {index} ({type(teacher).__name__}) has {probe.tokens.shape[1]} tokens per clip, "
                f"the student {enc.num_patches} (+cls): use the same patch size, tubelet, frames and image "
                "size, or a teacher that reports its grid (it is then resampled)"
            )
        if self.cls_targets[index] and (getattr(probe, "num_prefix", 1) < 1 or enc.num_prefix < 1):
            raise ValueError(
                f"cls_target for teacher {index} needs a class token in the teacher and the student"
            )
        token_heads = nn.ModuleList(
            DistillHead(enc.embed_dim, t_dim, kind) for _ in range(self.layers_per_teacher[index])
        )
        return token_heads, DistillHead(enc.embed_out_dim, t_pool, kind)

    def _on_student_grid(self, tokens: torch.Tensor, prefix: int, grid) -> torch.Tensor:
        """A teacher's ``[B, prefix + N_t, D]`` states on the student's token grid (trilinear
        resampling of the patch tokens; the prefix kept) when its ``grid`` differs."""
        student = self.video_encoder.grid_size
        if grid is None or tuple(grid) == tuple(student):
            return tokens
        b, d = tokens.shape[0], tokens.shape[-1]
        x = tokens[:, prefix:].reshape(b, *grid, d).permute(0, 4, 1, 2, 3).float()
        x = F.interpolate(x, size=tuple(student), mode="trilinear", align_corners=False)
        x = x.flatten(2).transpose(1, 2).to(tokens.dtype)
        return torch.cat([tokens[:, :prefix], x], dim=1)

    # -- teachers and masks ---------------------------------------------------------------------

    def run_teacher(self, teacher: nn.Module, video: torch.Tensor, layers: int | None = None):
        """One teacher's outputs for ``video``: no gradients, bf16 autocast on CUDA (when enabled)."""
        weight = next(iter(teacher.parameters()), None)
        if weight is not None and weight.device != video.device:
            teacher.to(video.device)  # not a submodule, so ``model.to(device)`` did not move it
        device_type = video.device.type
        autocast = self.teacher_autocast and device_type == "cuda"
        with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
            return teacher(video, return_hidden=self.teacher_layers if layers is None else layers)

    def make_mask(
        self, video: torch.Tensor, teacher_out=None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``[B, N]`` True = hidden from the student; drawn from ``generator`` when one is given
        (on the CPU, then moved: the same generator gives the same masks on any device)."""
        b = video.shape[0]
        grid = self.video_encoder.patch_embed.grid(tuple(video.shape))
        attention = None
        if self.mask_type == "attention":
            given = getattr(teacher_out, "attention", None)
            if given is not None:  # the teacher's own attention over its patches, on its grid
                weights = self._on_student_grid(given[..., None], 0, getattr(teacher_out, "grid", None))[
                    ..., 0
                ]
                attention = weights.clamp_min(0).reshape(b, grid[0], -1)
            else:
                with torch.no_grad():
                    weights = self.teacher.clip_projector.attention_weights(teacher_out.tokens)  # [B, 1 + N]
                attention = weights[:, getattr(teacher_out, "num_prefix", 1) :].reshape(b, grid[0], -1)
        mask = make_mask(self.mask_type, b, grid, self.mask_ratio, attention=attention, generator=generator)
        return mask.to(video.device)

    # -- the objective --------------------------------------------------------------------------

    def forward(self, video: torch.Tensor, generator: torch.Generator | None = None) -> MaskedVideoOutput:
        """The loss of one batch of clips ``[B, 3, T, H, W]``; ``generator`` fixes the masks. With
        ``frame_stride`` > 1 the student (and the teachers on ``"student"`` frames) sees every
        ``frame_stride``-th frame, the teachers on ``"all"`` frames the whole clip."""
        if self.target == "pixels":
            return self._pixel_forward(video[:, :, :: self.frame_stride], generator)
        return self._distill_forward(video, generator)

    def _pixel_forward(self, video: torch.Tensor, generator: torch.Generator | None) -> MaskedVideoOutput:
        mask = self.make_mask(video, generator=generator)
        pred = self.decoder(self.video_encoder(video, mask=mask).tokens, mask)
        if self.raw_pix_weight > 0:
            pred, raw = pred.chunk(2, dim=-1)
        loss = pixel_reconstruction_loss(pred, video, mask, self.tubelet, self.patch, normalize=self.norm_pix)
        if self.raw_pix_weight <= 0:
            return MaskedVideoOutput(loss, {"recon_loss": loss.detach()}, mask, pred)
        raw_loss = pixel_reconstruction_loss(raw, video, mask, self.tubelet, self.patch, normalize=False)
        total = loss + self.raw_pix_weight * raw_loss
        terms = {
            "recon_loss": total.detach(),
            "recon_loss_norm": loss.detach(),
            "recon_loss_raw": raw_loss.detach(),
        }
        return MaskedVideoOutput(total, terms, mask, pred)

    def _distill_forward(self, video: torch.Tensor, generator: torch.Generator | None) -> MaskedVideoOutput:
        student_video = video[:, :, :: self.frame_stride]
        t_outs = [
            self.run_teacher(t, video if frames == "all" else student_video, k)
            for t, frames, k in zip(self.teachers, self.teacher_frames, self.layers_per_teacher)
        ]
        mask = self.make_mask(student_video, t_outs[0], generator=generator)
        out = self.video_encoder(student_video, mask=mask, return_hidden=self.teacher_layers)
        keep, b, p = ~mask, video.shape[0], self.video_encoder.num_prefix
        heads = [(self.token_heads, self.pool_head)] + [(h["tokens"], h["pool"]) for h in self.extra_heads]
        token_total = pool_total = 0.0
        parts: dict[str, torch.Tensor] = {}
        for i, ((token_heads, pool_head), t_out, w) in enumerate(zip(heads, t_outs, self.teacher_weights)):
            tp, grid = getattr(t_out, "num_prefix", 1), getattr(t_out, "grid", None)
            with_cls = self.cls_targets[i]
            token_loss = 0.0
            k = self.layers_per_teacher[i]
            for head, s_h, t_h in zip(token_heads, out.hidden_states[-k:], t_out.hidden_states[-k:]):
                # the teacher saw every token: score the student on the ones it saw
                t_h = self._on_student_grid(t_h, tp, grid)
                target = t_h[:, tp:][keep].reshape(b, -1, t_h.shape[-1])
                student = s_h
                if len(self.target_pos):  # the official clip_pos_embed / mae_pos_embed, visible rows
                    pos = self.target_pos[i].expand(b, -1, -1)
                    student = s_h + torch.cat([pos[:, :p], pos[:, p:][keep].reshape(b, -1, pos.shape[-1])], 1)
                s_tokens = student[:, p:]
                if with_cls:  # the official CLIP targets include the class token (frame-averaged)
                    target = torch.cat([t_h[:, :1], target], dim=1)
                    s_tokens = torch.cat([student[:, :1], s_tokens], dim=1)
                token_loss = token_loss + self.distill_loss(head(s_tokens), target.float())
            token_loss = token_loss / len(token_heads)
            # a teacher without a pooled target (the official VideoMAE one) keeps its head in the graph
            # at weight 0, so DDP sees every parameter used
            pool_loss = self.distill_loss(pool_head(out.pooled)[:, None], t_out.pooled.float()[:, None])
            pool_loss = pool_loss * (1.0 if self.pool_targets[i] else 0.0)
            token_total = token_total + w * token_loss
            pool_total = pool_total + w * pool_loss
            if len(t_outs) > 1:
                parts[f"teacher{i}_loss"] = (token_loss + pool_loss).detach()
        loss = token_total + pool_total
        terms = {
            "distill_loss": token_total.detach(),
            "pool_loss": pool_total.detach(),
            "recon_loss": loss.detach(),
            **parts,
        }
        return MaskedVideoOutput(loss, terms, mask)

    # -- pictures -------------------------------------------------------------------------------

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
            restored = pred.reshape(b, -1, per_channel.shape[2], 3) * std[mask].reshape(b, -1, 1, 3)
            out[mask] = (restored + mean[mask].reshape(b, -1, 1, 3)).reshape(-1, patches.shape[-1])
        else:
            out[mask] = pred.reshape(-1, patches.shape[-1])
        grid = self.video_encoder.patch_embed.grid(tuple(video.shape))
        return unpatchify(out, self.tubelet, self.patch, grid)


def _per_teacher(value, n: int, name: str) -> list:
    """One value per teacher from a single value or a list of ``n``."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} teachers; give one per teacher")
        return list(value)
    return [value] * n


def _check_arguments(
    target: str,
    mask_type: str,
    mask_ratio: float,
    norm_pix: bool,
    raw_pix_weight: float,
    teachers: Sequence[nn.Module],
) -> None:
    """Refuse combinations that cannot train, naming the argument."""
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
    if target == "teacher" and not teachers:
        raise ValueError("target='teacher' needs at least one teacher module (`teachers`)")
    if target not in ("pixels", "teacher"):
        raise ValueError(f"target must be 'pixels' or 'teacher'; got {target!r}")


__all__ = ["MaskedVideoModel", "MaskedVideoOutput"]
