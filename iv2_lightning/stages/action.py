"""Action classification: fine-tuning or an attentive probe on the video backbone.

The classifier is an attention pool over the backbone's tokens, a LayerNorm and a Linear (the
official InternVideo2 fine-tuning head is ``fc_norm`` + ``head`` on top of the attention pool).
``freeze_backbone=True`` turns fine-tuning into an attentive probe (only the head trains), the
protocol used to measure what pretraining put into the frozen features.

``encoder: {frame_wise: true}`` gives the order-free control: the same probe on a backbone that
cannot compare frames (no temporal attention, one position table for every frame). On the
synthetic clips, where motion direction exists only in the order of the frames, that control must
stay near chance.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from iv2_lightning.data.batch import VideoBatch
from iv2_lightning.models.heads import ClassificationHead
from iv2_lightning.stages.base import BaseStage


class ActionStage(BaseStage):
    stage_name = "action"

    def __init__(
        self,
        num_classes: int = 4,
        label_smoothing: float = 0.1,
        head_heads: int = 4,
        head_dropout: float = 0.0,
        pool: Literal["attention", "mean"] = "attention",
        freeze_backbone: bool = False,
        label_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if freeze_backbone:
            kwargs["freeze"] = [*(kwargs.get("freeze") or []), "video_encoder"]
        super().__init__(**kwargs)
        if label_names is not None and len(label_names) != num_classes:
            raise ValueError(f"label_names has {len(label_names)} names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.label_names = label_names
        self.label_smoothing = label_smoothing
        self.video_encoder = self.build_video_encoder()
        self.head = ClassificationHead(
            self.video_encoder.embed_dim, num_classes, num_heads=head_heads, pool=pool, dropout=head_dropout
        )
        top_k = min(5, num_classes)
        self.metrics = torch.nn.ModuleDict(
            {
                f"{split}_{name}": MulticlassAccuracy(num_classes, top_k=k, average="micro")
                for split in ("val", "test")
                for name, k in (("acc", 1), ("acc_top5", top_k))
            }
        )
        self.finish_init()

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.video_encoder(video).tokens)

    def _labelled(self, batch: VideoBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.label is None:
            raise ValueError(
                "ActionStage needs labelled clips: the batch has no `label` (check the data's modalities)"
            )
        keep = batch.label >= 0
        return keep, batch.label[keep]

    def compute_loss(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        keep, labels = self._labelled(batch)
        logits = self(batch.video[keep])
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    def _eval_step(self, batch: VideoBatch, split: str) -> None:
        keep, labels = self._labelled(batch)
        if not bool(keep.any()):
            return
        logits = self(batch.video[keep])
        loss = F.cross_entropy(logits, labels)
        self.log(f"{split}/loss", loss, on_epoch=True, sync_dist=True, batch_size=int(keep.sum()))
        for name in ("acc", "acc_top5"):
            metric = self.metrics[f"{split}_{name}"]
            metric(logits, labels)
            self.log(f"{split}/{name}", metric, on_epoch=True, batch_size=int(keep.sum()))

    def validation_step(self, batch: VideoBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: VideoBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: VideoBatch, batch_idx: int) -> dict[str, Any]:
        probs = self(batch.video).softmax(dim=1)
        return {"probs": probs, "pred": probs.argmax(dim=1), "meta": batch.meta}
