"""ActionStage: the shell gives its torch model's loss, freeze_backbone freezes the encoder without
touching the `freeze` list, and label_names must match the classes."""

import pytest
import torch
from stage_helpers import TINY, make_batch

from iv2_lightning.models.backbone import VideoEncoder
from iv2_lightning.models.classifier import VideoClassifier
from iv2_lightning.stages.action import ActionStage


def test_the_stage_gives_the_loss_of_its_torch_model():
    torch.manual_seed(0)
    stage = ActionStage(num_classes=4, encoder=dict(TINY), label_smoothing=0.1)
    model = VideoClassifier(VideoEncoder(**stage.encoder_config), num_classes=4, label_smoothing=0.1)
    model.load_state_dict(stage.model.state_dict())
    batch = make_batch(4)
    batch.label[1] = -1  # an unlabelled clip is left out
    out = stage.compute_loss(batch)
    keep = batch.label >= 0
    torch.testing.assert_close(
        out["loss"], model.loss(model(batch.video[keep]), batch.label[keep]), rtol=0, atol=0
    )
    torch.testing.assert_close(stage(batch.video), model(batch.video), rtol=0, atol=0)
    assert stage.batch_contract() == {"classification": ["video", "label"]}


def test_freeze_backbone_freezes_the_encoder_and_keeps_the_freeze_argument():
    stage = ActionStage(num_classes=4, encoder=dict(TINY), freeze_backbone=True, freeze=["head.pool"])
    assert stage.hparams.freeze == ["head.pool"] and stage.hparams.freeze_backbone
    assert not any(p.requires_grad for p in stage.model.video_encoder.parameters())
    assert not any(p.requires_grad for p in stage.model.head.pool.parameters())
    assert stage.model.head.head.weight.requires_grad


def test_label_names_must_match_the_classes():
    with pytest.raises(ValueError, match="label_names has 2 names for num_classes=4"):
        ActionStage(num_classes=4, encoder=dict(TINY), label_names=["left", "right"])
