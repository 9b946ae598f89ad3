"""Action classification: fine-tuning or an attentive probe, the Lightning shell around
:class:`~iv2_lightning.models.classifier.VideoClassifier` (attention pool, ``fc_norm``, Linear).

``freeze_backbone=True`` freezes ``video_encoder``: an attentive probe, where only the head trains.
``encoder: {frame_wise: true}`` gives the order-free control (see the model's docstring);
``temporal: {aggregate: transformer | mean, ...}`` classifies long clips window by window through the
hierarchical temporal encoder (or the order-free mean of the windows, its baseline). The shell
adds the labelled-clip handling (clips with label -1 are left out), top-1 / top-5 accuracy as
torchmetrics, and ``predict_step``'s class probabilities.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torchmetrics.classification import MulticlassAccuracy

from iv2_lightning.data.batch import VideoBatch
from iv2_lightning.models.classifier import VideoClassifier
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
        temporal: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if label_names is not None and len(label_names) != num_classes:
            raise ValueError(f"label_names has {len(label_names)} names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.label_names = label_names
        super().__init__(**kwargs)

    def build_model(self) -> VideoClassifier:
        hp = self.hparams
        if hp.freeze_backbone:
            self.freeze_names.append("video_encoder")  # BaseStage freezes these once the model is built
        return VideoClassifier(
            self.build_video_encoder(),
            hp.num_classes,
            head_heads=hp.head_heads,
            pool=hp.pool,
            head_dropout=hp.head_dropout,
            label_smoothing=hp.label_smoothing,
            temporal=hp.temporal,
        )

    def configure_metrics(self) -> None:
        top_k = min(5, self.num_classes)
        self.metrics = torch.nn.ModuleDict(
            {
                f"{split}_{name}": MulticlassAccuracy(self.num_classes, top_k=k, average="micro")
                for split in ("val", "test")
                for name, k in (("acc", 1), ("acc_top5", top_k))
            }
        )

    def batch_contract(self) -> Mapping[str, Iterable[str]]:
        return {"classification": ["video", "label"]}

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.model(video)

    def _labelled(self, batch: VideoBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if batch.label is None:
            raise ValueError(
                "ActionStage needs labelled clips: the batch has no `label` (check the data's modalities)"
            )
        keep = batch.label >= 0
        return keep, batch.label[keep]

    def compute_loss(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        keep, labels = self._labelled(batch)
        logits = self.model(batch.video[keep])
        loss = self.model.loss(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    def _eval_step(self, batch: VideoBatch, split: str) -> None:
        keep, labels = self._labelled(batch)
        if not bool(keep.any()):
            return
        logits = self.model(batch.video[keep])
        n = int(keep.sum())
        loss = self.model.loss(logits, labels, label_smoothing=0.0)  # the plain cross-entropy
        self.log(f"{split}/loss", loss, on_epoch=True, sync_dist=True, batch_size=n)
        for name in ("acc", "acc_top5"):
            metric = self.metrics[f"{split}_{name}"]
            metric(logits, labels)
            self.log(f"{split}/{name}", metric, on_epoch=True, batch_size=n)

    def validation_step(self, batch: VideoBatch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: VideoBatch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: VideoBatch, batch_idx: int) -> dict[str, Any]:
        probs = self.model(batch.video).softmax(dim=1)
        return {"probs": probs, "pred": probs.argmax(dim=1), "meta": batch.meta}


__all__ = ["ActionStage"]
