"""Teachers for stage 1 that need no download.

InternVideo2's stage 1 (arXiv 2403.15377, Sec. 3.1) distils two frozen teachers into the masked
student: an image model (InternVL-6B, applied frame by frame: what things look like) and a video
model (VideoMAEv2-g: how they move). Neither can be fetched here; frozen *random* networks can
stand in for both roles:

* the video role: a randomly initialised :class:`~iv2_lightning.models.backbone.VideoEncoder`
  (``MaskedVideoStage(teacher="random")``);
* the image role: :class:`ConvFrameTeacher`, a small random convolutional network run on every
  frame, whose features are average-pooled onto the student's token grid.

Why random networks can teach. Sarnthein et al. (ICML 2023, "Random Teachers are Good Teachers")
distil randomly initialised teachers and find that the students' features probe better than the
teachers'. Random convolutional features are also known to be decent shape descriptors (Saxe et al.,
ICML 2011, "On Random Weights and Unsupervised Feature Learning"): the architecture (local filters,
rectification, pooling) already makes them translation tolerant, the inductive bias a ViT lacks.

What we measured on the synthetic clips (384 stage-1 steps, then 200-step attentive probes on the
frozen student, 256 held-out clips; ``configs/stage1/tiny.yaml`` has the table):

* the random video teacher (``teacher="random"``) gives a student that reads motion direction at
  99.6% and shape at 44%; it is the tiny curriculum's stage-1 teacher;
* :class:`ConvFrameTeacher` alone: a linear probe on its own pooled tokens reads shape at 60%, but
  its student reads shape at only 28% (direction 98.8%), so the tiny configs do not use it. It stays
  as the image-teacher role for experiments with two teachers (``teacher: [random, ...]``).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.models.backbone import VideoEncoder, preset_config
from iv2_lightning.models.weights import load_shared_weights


class TeacherOutput(NamedTuple):
    """The part of :class:`~iv2_lightning.models.backbone.VideoEncoderOutput` a stage-1 teacher
    provides: ``tokens [B, num_prefix + N, D]``, ``pooled [B, D']``, ``hidden_states`` (the token
    states of the last ``return_hidden`` layers), ``num_prefix``; optionally the teacher's own token
    ``grid`` ``(T, h, w)`` when it may differ from the student's (the targets are then resampled onto
    the student's grid) and ``attention [B, N]`` over its patch tokens for attention-guided masking."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    hidden_states: Sequence[torch.Tensor] = ()
    num_prefix: int = 1
    grid: tuple[int, int, int] | None = None
    attention: torch.Tensor | None = None


class ConvFrameTeacher(nn.Module):
    """A frozen random convolutional network applied to every frame; its feature map is average-pooled
    onto the ``patch_size`` grid and the frames of a tubelet are concatenated, so token ``(t, h, w)``
    describes the same pixels as the student's token ``(t, h, w)``.

    Three 3x3 convolutions with ReLU (the first with stride 2, each later one followed by max-pooling
    by 2: receptive field 21 px, about one synthetic object, stride 8), ``channels`` then
    ``2 * channels`` filters, Kaiming-normal weights drawn from ``seed``.
    Token features are layer-normalised (no affine), as distillation targets usually are, so the
    cosine loss compares their pattern rather than the offset all rectified features share.
    """

    def __init__(
        self,
        num_frames: int = 8,
        image_size: int = 64,
        patch_size: int = 16,
        tubelet_size: int = 2,
        channels: int = 32,
        seed: int = 0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch_size or patch_size % 8:
            raise ValueError(
                f"ConvFrameTeacher needs patch_size to be a multiple of 8 (its stride) dividing image_size; "
                f"got patch_size={patch_size}, image_size={image_size}"
            )
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames={num_frames} is not divisible by tubelet_size={tubelet_size}")
        self.num_frames, self.image_size = num_frames, image_size
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        c = channels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(in_chans, c, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(c, 2 * c, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(2 * c, 2 * c, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
            for m in self.net:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        self.embed_dim = 2 * c * tubelet_size
        self.requires_grad_(False)

    def forward(self, video: torch.Tensor, return_hidden: int = 0) -> TeacherOutput:
        if video.ndim != 5:
            raise ValueError(f"video must be [B, C, T, H, W]; got shape {tuple(video.shape)}")
        b, c, t, h, w = video.shape
        if t % self.tubelet_size or h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"video of shape {tuple(video.shape)} does not tile into tubelets of {self.tubelet_size} "
                f"frames and {self.patch_size}-pixel patches"
            )
        frames = video.transpose(1, 2).reshape(b * t, c, h, w)
        feats = F.adaptive_avg_pool2d(self.net(frames), (h // self.patch_size, w // self.patch_size))
        gh, gw = feats.shape[-2:]
        # [B*T, D, gh, gw] -> [B, T/k, gh*gw, k*D] with the tubelet's frames side by side
        feats = feats.reshape(b, t // self.tubelet_size, self.tubelet_size, -1, gh * gw)
        tokens = feats.permute(0, 1, 4, 2, 3).reshape(b, -1, self.embed_dim)
        tokens = F.layer_norm(tokens, (self.embed_dim,))
        pooled = tokens.mean(dim=1)
        tokens = torch.cat([pooled[:, None], tokens], dim=1)
        return TeacherOutput(tokens=tokens, pooled=pooled, hidden_states=[tokens] * max(return_hidden, 0))


class SelectedLayers(nn.Module):
    """A :class:`VideoEncoder` teacher whose layer targets are chosen blocks instead of the last ones.

    The official distillation of InternVideo2-S/B/L from the stage-2 1B encoder
    (``single_modality/scripts/distillation/*_dist_1B_stage2.sh``: ``--clip_return_layer 6
    --clip_teacher_return_interval 3.34``) aligns the student's last 6 blocks with teacher blocks spaced
    3.34 apart from the top: 23, 26, 29, 33, 36 and 39 of 40 (0-based). ``layers`` are those indices;
    ``forward(video, return_hidden=k)`` returns the outputs of the last ``k`` of them, oldest first."""

    def __init__(self, encoder: VideoEncoder, layers: Sequence[int]) -> None:
        super().__init__()
        picked = sorted(int(i) for i in layers)
        if not picked or picked[0] < 0 or picked[-1] >= encoder.depth or len(set(picked)) != len(picked):
            raise ValueError(
                f"teacher layers must be distinct block indices in [0, {encoder.depth}); got {list(layers)}"
            )
        self.encoder = encoder
        self.layers = picked

    @property
    def clip_projector(self) -> nn.Module:  # attention-guided masking reads the teacher's pool
        return self.encoder.clip_projector

    def forward(self, video: torch.Tensor, return_hidden: int = 0):
        if return_hidden > len(self.layers):
            raise ValueError(
                f"return_hidden={return_hidden} but only {len(self.layers)} teacher layers are chosen"
            )
        first = self.layers[0]
        out = self.encoder(video, return_hidden=self.encoder.depth - first)
        picked = [out.hidden_states[i - first] for i in self.layers]
        return out._replace(
            hidden_states=tuple(picked[len(picked) - return_hidden :]) if return_hidden else ()
        )


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
    like :class:`VideoEncoder`. ``kwargs["layers"]`` (block indices) wraps a ``VideoEncoder`` teacher in
    :class:`SelectedLayers`."""
    kwargs = dict(kwargs or {})
    layers = kwargs.pop("layers", None)
    if spec == "random":
        if kwargs or default_config is None:
            config = preset_config(kwargs.pop("preset", "tiny"), **kwargs)
        else:
            config = dict(default_config)
        # its own generator state: the same seed gives the same teacher whatever ran before (resumed runs)
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
    if layers is not None:
        if not isinstance(teacher, VideoEncoder):
            raise ValueError(
                f"teacher_kwargs 'layers' needs a VideoEncoder teacher; {spec!r} is a {type(teacher).__name__}"
            )
        teacher = SelectedLayers(teacher, layers)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def pair_teacher_args(
    teacher: str | Sequence[str],
    teacher_kwargs: dict[str, Any] | Sequence[dict[str, Any] | None] | None = None,
    teacher_weights: Sequence[float] | None = None,
) -> tuple[list[str], list[dict[str, Any] | None], list[float]]:
    """One spec, one kwargs dict (or None) and one weight per teacher, from a config's ``teacher``,
    ``teacher_kwargs`` and ``teacher_weights``; a single dict of kwargs serves a single teacher."""
    specs = [teacher] if isinstance(teacher, str) else list(teacher)
    if isinstance(teacher_kwargs, (list, tuple)):
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
    return specs, kwargs_list, weights


__all__ = ["ConvFrameTeacher", "SelectedLayers", "TeacherOutput", "build_teacher", "pair_teacher_args"]
