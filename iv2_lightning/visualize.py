"""Pictures of what a model does, as plain ``[3, H, W]`` float tensors in [0, 1] (no matplotlib).

Made for TensorBoard's ``add_image`` (CHW), where a person would rather look than read:

* :func:`heatmap`: a matrix through a viridis colour map, cells scaled up, optional marked cells
  (e.g. the text-video similarity matrix with the true pairs outlined);
* :func:`frame_strip`: the frames of a clip side by side;
* :func:`retrieval_strips`: for a few queries, their top-k candidates as frame strips framed in
  green (a correct candidate) or red;
* :func:`attention_over_frames`: the frames with the attention pool's weights laid over them and,
  under each frame, a bar as tall as the share of attention its tokens got;
* :func:`gate_matrix`: the cross-modal fusion gates (query modality x source modality);
* :func:`contrastive_pictures`: all of the above from the record the
  :class:`~iv2_lightning.callbacks.pictures.ContrastivePictures` callback takes of the first
  evaluation batch of the contrastive stage.

Videos come normalised (mean/std) from the data, so every clip is shown min-max scaled to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

# viridis at 0, 1/4, 1/2, 3/4, 1 (perceptually even, readable in grey, colour-blind safe)
_VIRIDIS = (
    torch.tensor(
        [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32
    )
    / 255.0
)
GREEN = (0.1, 0.8, 0.2)
RED = (0.9, 0.15, 0.15)
WHITE = (1.0, 1.0, 1.0)


def colormap(values: torch.Tensor) -> torch.Tensor:
    """``[H, W]`` values in [0, 1] → ``[3, H, W]`` viridis colours (values outside are clamped)."""
    x = values.float().clamp(0, 1) * (len(_VIRIDIS) - 1)
    lo = x.floor().long().clamp(max=len(_VIRIDIS) - 2)
    frac = (x - lo.float())[..., None]
    lut = _VIRIDIS.to(values.device)
    rgb = lut[lo] * (1 - frac) + lut[lo + 1] * frac  # [H, W, 3]
    return rgb.permute(2, 0, 1).contiguous()


def _to_unit(x: torch.Tensor, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    x = x.float()
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    return ((x - lo) / max(hi - lo, 1e-8)).clamp(0, 1)


def heatmap(
    matrix: torch.Tensor,
    cell: int = 8,
    vmin: float | None = None,
    vmax: float | None = None,
    marks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[R, C]`` → ``[3, R * cell, C * cell]``; ``marks [R, C]`` bool cells get a white outline."""
    if matrix.dim() != 2:
        raise ValueError(f"heatmap needs a [R, C] matrix; got shape {tuple(matrix.shape)}")
    if cell < 1:
        raise ValueError(f"cell must be >= 1; got {cell}")
    img = colormap(_to_unit(matrix.detach().cpu(), vmin, vmax))
    img = img.repeat_interleave(cell, dim=1).repeat_interleave(cell, dim=2)
    if marks is not None:
        if marks.shape != matrix.shape:
            raise ValueError(f"marks must be {tuple(matrix.shape)}; got {tuple(marks.shape)}")
        if cell >= 3:
            edge = torch.zeros(cell, cell, dtype=torch.bool)
            edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
            outline = torch.kron(marks.cpu().to(torch.uint8), edge.to(torch.uint8)).bool()
        else:
            outline = marks.cpu().repeat_interleave(cell, 0).repeat_interleave(cell, 1)
        img = torch.where(outline[None], torch.tensor(WHITE)[:, None, None], img)
    return img


def pad(image: torch.Tensor, width: int = 2, color: Sequence[float] = WHITE) -> torch.Tensor:
    """A frame of ``width`` pixels of ``color`` around ``image [3, H, W]``."""
    _, h, w = image.shape
    out = torch.tensor(color, dtype=image.dtype).view(3, 1, 1).repeat(1, h + 2 * width, w + 2 * width)
    out[:, width : width + h, width : width + w] = image
    return out


def frame_strip(video: torch.Tensor, max_frames: int = 8) -> torch.Tensor:
    """``[3, T, H, W]`` → ``[3, H, n * W]``: ``n = min(T, max_frames)`` evenly spaced frames, the clip
    min-max scaled to [0, 1]."""
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video must be [3, T, H, W]; got shape {tuple(video.shape)}")
    t = video.shape[1]
    n = max(1, min(t, max_frames))
    index = torch.linspace(0, t - 1, n).round().long()
    frames = _to_unit(video.detach().cpu())[:, index]  # [3, n, H, W]
    return frames.permute(0, 2, 1, 3).reshape(3, video.shape[2], -1)


def stack(images: Sequence[torch.Tensor], dim: int = 1, gap: int = 2) -> torch.Tensor:
    """Images ``[3, H, W]`` one under the other (``dim=1``) or side by side (``dim=2``), separated
    by ``gap`` black pixels; the smaller side is padded with black."""
    if not images:
        raise ValueError("stack needs at least one image")
    other = 2 if dim == 1 else 1
    size = max(im.shape[other] for im in images)
    parts = []
    for i, im in enumerate(images):
        short = size - im.shape[other]
        if short:
            im = F.pad(im, (0, short) if other == 2 else (0, 0, 0, short))
        parts.append(im)
        if gap and i < len(images) - 1:
            shape = [3, size, gap] if dim == 2 else [3, gap, size]
            parts.append(im.new_zeros(shape))
    return torch.cat(parts, dim=dim)


def retrieval_strips(
    videos: torch.Tensor,
    scores: torch.Tensor,
    positive: torch.Tensor,
    k: int = 3,
    queries: int = 4,
    frames: int = 4,
) -> torch.Tensor:
    """Top-``k`` candidates of the first ``queries`` rows of ``scores [Q, N]`` over ``videos
    [N, 3, T, H, W]``: one row per query, each candidate a frame strip framed green when
    ``positive[q, j]`` and red otherwise."""
    if scores.dim() != 2 or scores.shape[1] != videos.shape[0] or positive.shape != scores.shape:
        raise ValueError(
            f"scores and positive must be [Q, N] with N = {videos.shape[0]} videos; got "
            f"{tuple(scores.shape)} and {tuple(positive.shape)}"
        )
    k = min(k, videos.shape[0])
    rows = []
    for q in range(min(queries, scores.shape[0])):
        top = scores[q].topk(k).indices.tolist()
        rows.append(
            stack(
                [pad(frame_strip(videos[j], frames), 2, GREEN if bool(positive[q, j]) else RED) for j in top],
                dim=2,
                gap=4,
            )
        )
    return stack(rows, dim=1, gap=4)


def attention_over_frames(
    video: torch.Tensor, attention: torch.Tensor, tubelet: int = 1, bar_height: int = 24
) -> torch.Tensor:
    """``video [3, T, H, W]`` with ``attention [t, h, w]`` (the pool's weight on every token,
    ``t = T / tubelet``) laid over its frames, and under each frame a bar whose height is the
    attention its tokens got, relative to the most attended frame (equal bars: the pool attends to
    every moment alike)."""
    if video.dim() != 4 or attention.dim() != 3:
        raise ValueError(
            f"video must be [3, T, H, W] and attention [t, h, w]; got {tuple(video.shape)}, {tuple(attention.shape)}"
        )
    _, t, h, w = video.shape
    if attention.shape[0] * tubelet != t:
        raise ValueError(
            f"attention has {attention.shape[0]} token frames; {t} frames / tubelet {tubelet} expected"
        )
    attn = attention.detach().float().cpu().repeat_interleave(tubelet, dim=0)  # [T, h', w']
    share = attn.sum(dim=(1, 2))  # per frame
    share = share / max(float(share.max()), 1e-12)  # the most attended frame fills its bar
    up = F.interpolate(attn[:, None], size=(h, w), mode="nearest")[:, 0]  # [T, H, W]
    heat = torch.stack([colormap(_to_unit(u, 0.0, float(up.max()))) for u in up], dim=1)  # [3, T, H, W]
    frames = _to_unit(video.detach().cpu())
    blend = 0.55 * frames + 0.45 * heat
    top = blend.permute(0, 2, 1, 3).reshape(3, h, t * w)
    bars = torch.zeros(3, bar_height, t * w)
    for i in range(t):
        filled = round(float(share[i].clamp(0, 1)) * bar_height)
        if filled:
            bars[:, bar_height - filled :, i * w + 1 : (i + 1) * w - 1] = _VIRIDIS[-1][:, None, None]
    return torch.cat([top, bars], dim=1)


def gate_matrix(gates: dict[str, float], cell: int = 24) -> tuple[torch.Tensor, list[str]]:
    """Gates keyed ``"<query>_<source>"`` (``ContrastiveStage`` logs them as ``gate_video_text``...)
    → a heat map (rows: query modality, columns: source modality, 0 black to 1 yellow, absent pairs
    0) and the modality order."""
    pairs = [key.split("_", 1) for key in gates]
    names = list(dict.fromkeys(m for pair in pairs for m in pair))
    matrix = torch.zeros(len(names), len(names))
    for (q, s), value in zip(pairs, gates.values()):
        matrix[names.index(q), names.index(s)] = float(value)
    return heatmap(matrix, cell=cell, vmin=0.0, vmax=1.0), names


def contrastive_pictures(
    record: dict[str, Any], k: int = 3, queries: int = 4
) -> tuple[dict[str, torch.Tensor], str]:
    """Images (tag → ``[3, H, W]``) and a markdown note for one evaluation batch of
    the contrastive stage (see ``ContrastivePictures.record``): ``similarity`` (texts x videos, true pairs
    outlined), ``retrieval_topk`` (text → video strips), ``pool_attention`` (first clips),
    ``fusion_gates``."""
    images: dict[str, torch.Tensor] = {}
    lines: list[str] = []
    present = record["text_present"]
    ids = record["sample_id"]
    if bool(present.any()):
        rows = present.nonzero().squeeze(1)
        sim = record["text_emb"][rows] @ record["video_emb"].T
        positive = ids[rows][:, None] == ids[None, :]
        images["similarity"] = heatmap(sim, cell=8, marks=positive)
        images["retrieval_topk"] = retrieval_strips(record["video"], sim, positive, k=k, queries=queries)
        lines = ["| row | query caption |", "|---|---|"]
        lines += [f"| {i} | {record['captions'][int(r)]} |" for i, r in enumerate(rows[:queries].tolist())]
    if record.get("attention") is not None:
        clips = min(2, record["video"].shape[0])
        images["pool_attention"] = stack(
            [
                attention_over_frames(record["video"][i], record["attention"][i], record["tubelet"])
                for i in range(clips)
            ]
        )
    if record.get("gates"):
        images["fusion_gates"], names = gate_matrix(record["gates"])
        lines += ["", f"fusion_gates: rows = query modality, columns = source modality, order {names}"]
    return images, "\n".join(lines)


__all__ = [
    "attention_over_frames",
    "colormap",
    "contrastive_pictures",
    "frame_strip",
    "gate_matrix",
    "heatmap",
    "pad",
    "retrieval_strips",
    "stack",
]
