"""Pretrained stage-1 teachers from local Hugging Face folders (never downloaded).

InternVideo2's stage 1 (arXiv 2403.15377 Sec. 3.1; OpenGVLab/InternVideo
``InternVideo2/single_modality/models/internvideo2_pretrain.py``) distils two frozen teachers:

* an **image teacher** (InternVL-C, a CLIP-style vision transformer) run on every frame: its last
  layers' token states, with the class token averaged over the frames as one extra target token, and
  its final (attention-pooled, projected) output; the attention of its pooling query over the patches
  chooses which tokens the student sees (attention-guided masking, per frame);
* a **video teacher** (VideoMAEv2-g) that sees twice the student's frames (the student gets every
  other frame; ``MaskedVideoModel(frame_stride=2)``): its last layers' token states.

:class:`HFImageTeacher` wraps a CLIP vision model (``CLIPVisionModel`` / ``...WithProjection``, or any
vision model ``AutoModel`` loads that returns ``hidden_states`` and ``pooler_output``);
:class:`HFVideoTeacher` wraps ``VideoMAEModel``. Both re-normalise our ImageNet-normalised clips to
the teacher's own pixel statistics (``preprocessor_config.json`` when the folder has one), resize frames
to the teacher's resolution, and return :class:`~iv2_lightning.models.teachers.TeacherOutput` with the
teacher's own token ``grid``: :class:`~iv2_lightning.models.masked_video.MaskedVideoModel` resamples
the targets onto the student's grid when they differ. The image teacher's attention comes from the
class token's row of its last self-attention (heads averaged): a CLIP has no attention-pool query, and
that row is its closest analogue.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.features.tokenizers import _check_local_folder, _import_transformers
from iv2_lightning.models.teachers import TeacherOutput

__all__ = ["HFImageTeacher", "HFVideoTeacher"]

# our clips are normalised with ImageNet's statistics (data.transforms; not imported: models/ stays
# below data/, which would also pull in Lightning)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel statistics (its processor's)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pixel_stats(folder: str, default_mean, default_std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = Path(folder) / "preprocessor_config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        if "image_mean" in data and "image_std" in data:
            return tuple(data["image_mean"]), tuple(data["image_std"])
    return tuple(default_mean), tuple(default_std)


class _Renormalise(nn.Module):
    """ImageNet-normalised pixels (our data) → the teacher's normalisation, as one affine map."""

    def __init__(self, mean, std, data_mean=IMAGENET_MEAN, data_std=IMAGENET_STD) -> None:
        super().__init__()
        scale = torch.tensor(data_std) / torch.tensor(std)
        shift = (torch.tensor(data_mean) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.reshape(1, 3, 1, 1), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return frames * self.scale.to(frames.dtype) + self.shift.to(frames.dtype)


def _resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    if frames.shape[-1] == size and frames.shape[-2] == size:
        return frames
    # the official stage 1 resizes for its CLIP teacher with bicubic interpolation
    return F.interpolate(frames, size=(size, size), mode="bicubic", align_corners=False)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class _FrameInput(nn.Module):
    """What both teachers do with a clip first: ``[B, C, T, H, W]`` → frames ``[B*T, C, S, S]`` in the
    teacher's own pixel statistics and resolution ``S``."""

    image_size: int
    renorm: _Renormalise

    def frames(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 5:
            raise ValueError(f"video must be [B, C, T, H, W]; got shape {tuple(video.shape)}")
        b, c, t = video.shape[:3]
        frames = video.transpose(1, 2).reshape(b * t, c, *video.shape[3:])
        return _resize(self.renorm(frames), self.image_size)


class HFImageTeacher(_FrameInput):
    """A CLIP-style image model from a local folder, run on every frame of a clip.

    ``tokens``: ``[B, 1 + T * h * w, D]`` (the class token averaged over the frames first, then each
    frame's patch tokens), ``hidden_states``: the same for the last ``return_hidden`` layers,
    ``pooled``: the frame average of the projected image embedding (``image_embeds``) or of
    ``pooler_output``, ``attention``: ``[B, T * h * w]`` the class token's attention over the patches in
    the last layer (averaged over heads), ``grid``: ``(T, h, w)``.
    """

    def __init__(self, path: str, data_mean=IMAGENET_MEAN, data_std=IMAGENET_STD) -> None:
        super().__init__()
        transformers = _import_transformers()
        self.path = _check_local_folder(path, "image teacher", ("config.json",))
        config = transformers.AutoConfig.from_pretrained(self.path, local_files_only=True)
        kind = getattr(config, "model_type", "")
        try:
            if kind in ("clip", "clip_vision_model"):
                model = transformers.CLIPVisionModelWithProjection.from_pretrained(
                    self.path, local_files_only=True, attn_implementation="eager"
                )
            else:
                model = transformers.AutoModel.from_pretrained(
                    self.path, local_files_only=True, attn_implementation="eager"
                )
        except (OSError, ValueError) as err:
            raise ValueError(f"could not load an image teacher from {self.path!r}: {err}") from err
        self.model = _frozen(model)
        vision = getattr(model.config, "vision_config", model.config)
        self.image_size = int(vision.image_size)
        self.patch_size = int(vision.patch_size)
        self.embed_dim = int(vision.hidden_size)
        mean, std = _pixel_stats(self.path, CLIP_MEAN, CLIP_STD)
        self.renorm = _Renormalise(mean, std, data_mean, data_std)

    def forward(self, video: torch.Tensor, return_hidden: int = 0) -> TeacherOutput:
        frames = self.frames(video)
        b, t = video.shape[0], video.shape[2]
        out = self.model(pixel_values=frames, output_hidden_states=True, output_attentions=True)
        side = self.image_size // self.patch_size

        def per_clip(h: torch.Tensor) -> torch.Tensor:  # [B*T, 1 + hw, D] -> [B, 1 + T*hw, D]
            h = h.reshape(b, t, h.shape[1], h.shape[2])
            return torch.cat(
                [h[:, :, 0].mean(dim=1, keepdim=True), h[:, :, 1:].reshape(b, -1, h.shape[-1])], dim=1
            )

        hidden = [per_clip(h) for h in out.hidden_states[-return_hidden:]] if return_hidden > 0 else []
        tokens = hidden[-1] if hidden else per_clip(out.hidden_states[-1])
        image = getattr(out, "image_embeds", None)
        if image is None:
            image = out.pooler_output
        pooled = image.reshape(b, t, -1).mean(dim=1)
        attention = out.attentions[-1][:, :, 0, 1:].mean(dim=1).reshape(b, -1)  # [B, T*hw]
        return TeacherOutput(
            tokens=tokens,
            pooled=pooled,
            hidden_states=hidden,
            num_prefix=1,
            grid=(t, side, side),
            attention=attention,
        )


class HFVideoTeacher(_FrameInput):
    """``VideoMAEModel`` from a local folder: ``tokens`` / ``hidden_states`` ``[B, N, D]`` (no class
    token; ``num_prefix`` 0), ``pooled`` their mean, ``grid`` ``(T / tubelet, h, w)``. It takes the
    clip as given: with ``MaskedVideoModel(frame_stride=2)`` that is twice the student's frames."""

    def __init__(self, path: str, data_mean=IMAGENET_MEAN, data_std=IMAGENET_STD) -> None:
        super().__init__()
        transformers = _import_transformers()
        self.path = _check_local_folder(path, "video teacher", ("config.json",))
        try:
            model = transformers.VideoMAEModel.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"could not load a VideoMAE teacher from {self.path!r}: {err}") from err
        self.model = _frozen(model)
        cfg: Any = model.config
        self.image_size, self.patch_size = int(cfg.image_size), int(cfg.patch_size)
        self.tubelet_size, self.num_frames = int(cfg.tubelet_size), int(cfg.num_frames)
        self.embed_dim = int(cfg.hidden_size)
        mean, std = _pixel_stats(self.path, IMAGENET_MEAN, IMAGENET_STD)
        self.renorm = _Renormalise(mean, std, data_mean, data_std)

    def forward(self, video: torch.Tensor, return_hidden: int = 0) -> TeacherOutput:
        frames = self.frames(video)
        b, c, t = video.shape[:3]
        if t != self.num_frames:
            raise ValueError(
                f"the video teacher at {self.path!r} was built for {self.num_frames} frames (its position "
                f"table); the clip has {t}: give the data {self.num_frames} frames (with frame_stride=2 the "
                "student sees every other one)"
            )
        out = self.model(
            pixel_values=frames.reshape(b, t, c, self.image_size, self.image_size), output_hidden_states=True
        )
        hidden = list(out.hidden_states[-return_hidden:]) if return_hidden > 0 else []
        tokens = hidden[-1] if hidden else out.last_hidden_state
        side = self.image_size // self.patch_size
        grid = (t // self.tubelet_size, side, side)
        if tokens.shape[1] != math.prod(grid):
            raise ValueError(
                f"VideoMAE returned {tokens.shape[1]} tokens, expected {math.prod(grid)} for {grid}"
            )
        return TeacherOutput(
            tokens=tokens, pooled=tokens.mean(dim=1), hidden_states=hidden, num_prefix=0, grid=grid
        )
