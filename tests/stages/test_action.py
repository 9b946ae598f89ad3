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


def test_cache_frozen_probe_trains_as_without_it_and_reads_the_cache():
    """A frozen-trunk probe over 3 epochs of fixed synthetic clips: the cached run ends with the same
    head weights as the uncached one, and from epoch 2 every trunk row comes from the cache."""
    import lightning as L

    from iv2_lightning.data import SyntheticVideoDataModule

    heads = {}
    for cached in (False, True):
        L.seed_everything(0, verbose=False)
        data = SyntheticVideoDataModule(
            num_frames=8,
            image_size=32,
            batch_size=8,
            train_size=16,
            val_size=8,
            test_size=0,
            num_workers=0,
            cache=True,
            modalities=["label"],
        )
        stage = ActionStage(
            num_classes=4, encoder={**TINY, "num_frames": 8}, freeze_backbone=True, cache_frozen=cached
        )
        L.Trainer(
            max_epochs=3,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(stage, data)
        heads[cached] = {k: v.clone() for k, v in stage.model.head.state_dict().items()}
        if cached:
            cache = stage.feature_cache
            # sanity validation (8) + epoch 1 (16) + its validation (8, the same val clips) miss or hit once
            assert cache.misses == 24 and cache.passed == 0
            assert cache.hits == 3 * 8 + 2 * 16  # every later validation and epoch: all rows cached
    for k in heads[False]:
        torch.testing.assert_close(heads[True][k], heads[False][k], rtol=1e-4, atol=1e-5)
