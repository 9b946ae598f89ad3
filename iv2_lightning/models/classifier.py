"""Action classification as a plain torch model: the video backbone and a classification head.

The head is an attention pool over the backbone's tokens, a LayerNorm and a Linear (the official
InternVideo2 fine-tuning head is ``fc_norm`` + ``head`` on top of the attention pool, arXiv 2403.15377
Sec. 4). Freezing ``video_encoder`` turns fine-tuning into an attentive probe (only the head trains),
the protocol used to measure what pretraining put into the frozen features. With an encoder built
``frame_wise`` (no temporal attention, one position table for every frame) the same classifier is
the order-free control: on the synthetic clips, where motion direction exists only in the order of
the frames, it must stay near chance.

:class:`VideoClassifier` trains in a plain PyTorch loop; ``iv2_lightning.stages.action.ActionStage``
is the Lightning shell around it (anomalib's ``torch_model.py`` / ``lightning_model.py`` split).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.models.backbone import VideoEncoder
from iv2_lightning.models.heads import ClassificationHead


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
    ) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1]; got {label_smoothing}")
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.video_encoder = video_encoder
        self.head = ClassificationHead(
            video_encoder.embed_dim, num_classes, num_heads=head_heads, pool=pool, dropout=head_dropout
        )

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.video_encoder(video).tokens)

    def loss(
        self, logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float | None = None
    ) -> torch.Tensor:
        """Cross-entropy of ``logits`` against ``labels``; ``label_smoothing`` defaults to the model's."""
        smoothing = self.label_smoothing if label_smoothing is None else label_smoothing
        return F.cross_entropy(logits, labels, label_smoothing=smoothing)


__all__ = ["VideoClassifier"]
