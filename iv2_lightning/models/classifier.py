"""Action classification as a plain torch model: the video backbone and a classification head.

The head is an attention pool over the backbone's tokens, a LayerNorm and a Linear (the official
InternVideo2 fine-tuning head is ``fc_norm`` + ``head`` on top of the attention pool, arXiv 2403.15377
Sec. 4). Freezing ``video_encoder`` turns fine-tuning into an attentive probe (only the head trains),
the protocol used to measure what pretraining put into the frozen features. With an encoder built
``frame_wise`` (no temporal attention, one position table for every frame) the same classifier is
the order-free control: on the synthetic clips, where motion direction exists only in the order of
the frames, it must stay near chance.

``temporal`` (keyword arguments of :class:`~iv2_lightning.models.temporal.HierarchicalTemporalEncoder`,
e.g. ``{window: 8, aggregate: transformer}``) classifies long clips: the trunk encodes each window,
the HTE's temporal transformer (or, with ``aggregate: mean``, the order-free mean) combines the
windows, and the head reads its clip embedding. The trunk stays ``video_encoder`` (same weights, same
keys); the HTE's own layers live under ``temporal_encoder`` (a shared module: exported with the trunk).

:class:`VideoClassifier` trains in a plain PyTorch loop; ``iv2_lightning.stages.action.ActionStage``
is the Lightning shell around it (anomalib's ``torch_model.py`` / ``lightning_model.py`` split).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.models.backbone import VideoEncoder
from iv2_lightning.models.heads import ClassificationHead
from iv2_lightning.models.temporal import HierarchicalTemporalEncoder


class VideoClassifier(nn.Module):
    """``video [B, 3, T, H, W]`` → class logits ``[B, num_classes]``; ``loss`` is the cross-entropy
    with ``label_smoothing`` (the training objective; evaluation passes ``label_smoothing=0``)."""

    def __init__(
        self,
        video_encoder: VideoEncoder,
        num_classes: int,
        head_heads: int = 4,
        pool: Literal["attention", "mean"] = "attention",
        head_dropout: float = 0.0,
        label_smoothing: float = 0.1,
        temporal: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.video_encoder = video_encoder
        self.temporal_encoder: HierarchicalTemporalEncoder | None = None
        if temporal is not None:
            self.temporal_encoder = HierarchicalTemporalEncoder(
                video_encoder, **{**temporal, "own_encoder": False}
            )
            # one clip token: the head's pool is then the identity, its norm + linear the classifier
            self.head = ClassificationHead(
                self.temporal_encoder.out_dim,
                num_classes,
                num_heads=head_heads,
                pool="mean",
                dropout=head_dropout,
            )
        else:
            self.head = ClassificationHead(
                video_encoder.embed_dim, num_classes, num_heads=head_heads, pool=pool, dropout=head_dropout
            )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if self.temporal_encoder is not None:
            return self.head(self.temporal_encoder(video).embedding[:, None])
        return self.head(self.video_encoder(video).tokens)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float | None = None
    ) -> torch.Tensor:
        """Cross-entropy of ``logits`` against ``labels``; ``label_smoothing`` defaults to the model's."""
        smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
        return F.cross_entropy(logits, labels, label_smoothing=smoothing)


__all__ = ["VideoClassifier"]
