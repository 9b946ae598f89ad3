"""BaseStage: optimizer groups, schedule, freeze, init_from / export, bad-step handling, and the template
(a stage defines its model and loss; the batch contract; checkpoints from before the `model` attribute)."""

import itertools
import logging
import math

import lightning as L
import pytest
import torch
from stage_helpers import TINY, make_batch
from torch import nn
from torch.utils.data import DataLoader

from iv2_lightning.models.weights import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    WeightsMismatchError,
    export_shared_weights,
    read_state_dict,
)
from iv2_lightning.stages.action import ActionStage
from iv2_lightning.stages.base import BaseStage
from iv2_lightning.stages.masked import MaskedVideoStage


def action(**kw):
    torch.manual_seed(0)
    return ActionStage(num_classes=4, encoder=dict(TINY), **kw)


def test_weight_decay_skips_norms_biases_positions_and_tokens():
    stage = action()
    decay, no_decay = stage.parameter_groups()
    names = {id(p): n for n, p in stage.model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "video_encoder.pos_embed" in no_decay_names and "video_encoder.cls_token" in no_decay_names
    assert "video_encoder.blocks.0.norm1.weight" in no_decay_names
    assert "video_encoder.blocks.0.mlp.fc1.bias" in no_decay_names
    assert "video_encoder.blocks.0.ls1.gamma" in no_decay_names
    assert "video_encoder.blocks.0.attn.qkv.weight" in decay_names
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay_names) + len(no_decay_names) == sum(1 for _ in stage.parameters())


def test_warmup_then_cosine_schedule():
    stage = action(lr=1e-2, warmup=10, min_lr_ratio=0.1)

    class FakeTrainer:
        estimated_stepping_batches = 100

    stage._trainer = FakeTrainer()
    cfg = stage.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert opt.defaults["betas"] == (0.9, 0.98)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[5] < lrs[10]  # warming up
    assert max(lrs) == pytest.approx(1e-2, rel=1e-6)
    assert lrs[99] == pytest.approx(1e-3 + (1e-2 - 1e-3) * (1 + math.cos(math.pi * 89 / 90)) / 2, rel=1e-3)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(lrs[10:]))  # then decaying


def test_lr_mult_scales_a_prefix_and_follows_the_schedule_in_proportion():
    stage = action(
        lr=1e-2, warmup=10, min_lr_ratio=0.1, lr_mult={"video_encoder.blocks": 0.1, "video_encoder": 0.5}
    )
    names = {id(p): n for n, p in stage.model.named_parameters()}
    by_name = {names[id(p)]: g for g in stage.parameter_groups() for p in g["params"]}
    assert by_name["video_encoder.blocks.0.attn.qkv.weight"]["lr"] == pytest.approx(
        1e-3
    )  # longest prefix wins
    assert by_name["video_encoder.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert by_name["video_encoder.patch_embed.proj.weight"]["lr"] == pytest.approx(5e-3)
    assert "lr" not in by_name["head.head.weight"]  # the stage's own lr
    assert len(by_name) == sum(1 for _ in stage.parameters())

    class FakeTrainer:
        estimated_stepping_batches = 100

    stage._trainer = FakeTrainer()
    cfg = stage.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    for _ in range(60):
        opt.step()
        sched.step()
    base = {g["initial_lr"]: g["lr"] for g in opt.param_groups}
    full = next(v for k, v in base.items() if k == pytest.approx(1e-2))
    for initial, now in base.items():
        assert now / initial == pytest.approx(full / 1e-2, rel=1e-9)


def test_lr_mult_errors_name_the_key():
    with pytest.raises(ValueError, match=r"lr_mult\['video_encoder'\] must be a positive number; got 0.0"):
        action(lr_mult={"video_encoder": 0.0})
    with pytest.raises(
        ValueError, match=r"lr_mult names \['video_encodr'\], which match no trainable parameter"
    ):
        action(lr_mult={"video_encodr": 0.5}).parameter_groups()
    with pytest.raises(ValueError, match=r"lr_mult names \['video_encoder'\]"):
        action(freeze_backbone=True, lr_mult={"video_encoder": 0.5}).parameter_groups()


def test_freeze_keeps_weights_and_reports_bad_names():
    stage = action(freeze_backbone=True)
    assert stage.frozen_modules() == ["video_encoder"]
    groups = stage.parameter_groups()
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in stage.model.head.parameters())
    with pytest.raises(ValueError, match=r"freeze: no parameter matches \['vidoe_encoder'\]"):
        action(freeze=["vidoe_encoder"])


def test_export_then_init_from_round_trip(tmp_path):
    src = MaskedVideoStage(encoder=dict(TINY), mask_ratio=0.5)
    folder = export_shared_weights(src.model, tmp_path / "export", {"stage": "stage1", "complete": True})
    assert (folder / WEIGHTS_FILE).is_file() and (folder / MANIFEST_FILE).is_file()
    state, manifest = read_state_dict(folder)
    assert all(k.startswith("video_encoder.") for k in state)  # the decoder is not shared
    assert manifest["stage"] == "stage1" and manifest["num_tensors"] == len(state)
    dst = action(init_from=str(folder))
    for k, v in src.model.video_encoder.state_dict().items():
        assert torch.equal(dst.model.video_encoder.state_dict()[k], v), k
    assert dst.init_report["loaded"] == len(state) and dst.init_report["from_stage"] == "stage1"


def test_init_from_a_lightning_checkpoint(tmp_path):
    src = action()
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, ckpt)
    dst = ActionStage(num_classes=4, encoder=dict(TINY), init_from=str(ckpt))
    assert torch.equal(dst.model.video_encoder.pos_embed, src.model.video_encoder.pos_embed)


def test_init_from_mismatched_architecture_names_the_tensors(tmp_path):
    src = MaskedVideoStage(
        encoder={**TINY, "embed_dim": 64, "num_heads": 4, "clip_embed_dim": 64, "mlp_dim": 128}
    )
    folder = export_shared_weights(src.model, tmp_path / "export", {"stage": "stage1", "preset": "tiny"})
    with pytest.raises(
        WeightsMismatchError,
        match=r"(?s)45 tensor.*video_encoder\.blocks\.0\.attn\.qkv\.weight: file \(192, 64\) vs model \(384, 128\)",
    ):
        action(init_from=str(folder))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        action(init_from=str(tmp_path / "missing"))


def test_init_from_adapts_the_tubelet_for_the_frame_wise_control(tmp_path, caplog):
    src = MaskedVideoStage(encoder={**TINY, "tubelet_size": 2})
    folder = export_shared_weights(src.model, tmp_path / "export", {"stage": "stage1"})
    with caplog.at_level(logging.INFO, logger="iv2_lightning.models.weights"):
        dst = ActionStage(num_classes=4, encoder={**TINY, "frame_wise": True}, init_from=str(folder))
    assert dst.init_report["adapted"] == [
        "video_encoder.patch_embed.proj.weight: tubelet 2 -> 1",
        "video_encoder.pos_embed: 2 -> 4 token frames",
    ]
    assert "adapted video_encoder.patch_embed.proj.weight: tubelet 2 -> 1" in caplog.text
    w = src.model.video_encoder.patch_embed.proj.weight.sum(dim=2, keepdim=True)
    torch.testing.assert_close(dst.model.video_encoder.patch_embed.proj.weight, w)


def test_init_from_strict_and_prefix_map(tmp_path):
    src = action()
    state = {f"student.{k}": v for k, v in src.model.video_encoder.state_dict().items() if "blocks" not in k}
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    with pytest.raises(WeightsMismatchError, match="no tensor of the shared modules"):
        action(init_from=str(tmp_path / "w.safetensors"))
    stage = action(init_from=str(tmp_path / "w.safetensors"), init_prefix_map={"student.": "video_encoder."})
    assert torch.equal(stage.model.video_encoder.pos_embed, src.model.video_encoder.pos_embed)
    assert any("blocks" in k for k in stage.init_report["missing"])
    with pytest.raises(
        WeightsMismatchError, match=r"\(strict\): .* missing from the file: video_encoder.blocks"
    ):
        action(
            init_from=str(tmp_path / "w.safetensors"),
            init_prefix_map={"student.": "video_encoder."},
            init_strict=True,
        )


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Evil()}, bad)
    with pytest.raises(ValueError, match="could not be loaded as a weights-only checkpoint"):
        read_state_dict(bad)


def test_nan_losses_are_skipped_then_stop_the_run():
    stage = action(max_bad_steps=3)
    stage.log = lambda *a, **k: None
    batch = make_batch()
    assert stage.training_step(batch, 0) is not None
    batch.video[0, 0, 0, 0, 0] = float("nan")
    assert stage.training_step(batch, 1) is None and stage.training_step(batch, 2) is None
    assert stage.bad_steps_total == 2
    with pytest.raises(
        FloatingPointError, match="3 training steps in a row had non-finite values in the input video"
    ):
        stage.training_step(batch, 3)


def test_nan_loss_from_the_model_is_skipped():
    stage = action(max_bad_steps=2)
    stage.log = lambda *a, **k: None
    with torch.no_grad():
        stage.model.head.head.weight.fill_(float("nan"))
    assert stage.training_step(make_batch(), 0) is None
    assert stage.bad_steps_in_a_row == 1


def test_action_stage_learns_in_a_trainer(tmp_path):
    """A tiny Trainer run end to end: which quadrant holds the bright square (4 classes)."""
    from torch.utils.data import DataLoader

    from iv2_lightning.data.batch import VideoCollate, VideoSample

    def clip(i):
        g = torch.Generator().manual_seed(i)
        label = i % 4
        v = torch.randn(3, 4, 32, 32, generator=g) * 0.1
        top, left = 16 * (label // 2), 16 * (label % 2)
        v[:, :, top + 4 : top + 12, left + 4 : left + 12] += 1.0
        return VideoSample(video=v, sample_id=i, label=label)

    train = [clip(i) for i in range(64)]
    val = [clip(1000 + i) for i in range(32)]
    loader = DataLoader(train, batch_size=16, shuffle=True, collate_fn=VideoCollate())
    stage = action(lr=2e-3, label_smoothing=0.0, warmup=0.1)
    trainer = L.Trainer(
        max_epochs=8,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(stage, loader, DataLoader(val, batch_size=32, collate_fn=VideoCollate()))
    assert trainer.callback_metrics["val/acc"] > 0.9
    assert trainer.callback_metrics["val/acc_top5"] == 1.0  # 4 classes: the top-4 always holds the label


# -- the template: what a new stage has to write ------------------------------------------------------


class PooledNorm(BaseStage):
    """The smallest stage: a torch model and its loss, nothing else (no finish_init, no optimizer)."""

    def build_model(self) -> nn.Module:
        model = nn.Module()
        model.video_encoder = self.build_video_encoder()
        model.head = nn.Linear(model.video_encoder.embed_out_dim, 1)
        return model

    def compute_loss(self, batch):
        pooled = self.model.video_encoder(batch.video).pooled
        return {"loss": (self.model.head(pooled) - 1).pow(2).mean(), "scale": pooled.detach().abs().mean()}


def one_batch_loader(**kw):
    return DataLoader([make_batch(4, **kw)], batch_size=None)


def quiet_trainer(tmp_path, **kw):
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def test_a_stage_that_defines_only_its_model_and_loss_trains(tmp_path):
    torch.manual_seed(0)
    stage = PooledNorm(encoder=dict(TINY), lr_mult={"head": 2.0})
    before = stage.model.head.weight.detach().clone()
    trainer = quiet_trainer(tmp_path, fast_dev_run=1)
    trainer.fit(stage, one_batch_loader())
    assert trainer.state.finished and trainer.global_step == 1
    assert not torch.equal(stage.model.head.weight, before)  # the optimizer the base built stepped
    assert {"train/loss", "train/scale"} <= set(trainer.callback_metrics)
    assert stage.hparams.lr_mult == {"head": 2.0} and stage.hparams.encoder == TINY


def test_fit_validate_and_test_never_build_the_model_again(tmp_path, monkeypatch):
    # Lightning's own `configure_model` hook runs at every fit/validate/test; the stage's torch model
    # is built once, in the constructor, so a fit trains the model that init_from filled
    stage = action()
    model, built = stage.model, []
    monkeypatch.setattr(type(stage), "build_model", lambda self: built.append(1) or nn.Linear(1, 1))
    trainer = quiet_trainer(tmp_path, fast_dev_run=1)
    trainer.fit(stage, one_batch_loader(), one_batch_loader())
    trainer.validate(stage, one_batch_loader())
    assert built == [] and stage.model is model


def test_a_stage_without_compute_loss_cannot_be_built():
    class NoLoss(BaseStage):
        def build_model(self):
            return nn.Linear(1, 1)

    with pytest.raises(TypeError, match="compute_loss"):
        NoLoss()


def test_a_term_needing_a_field_the_data_lacks_fails_at_fit_start_naming_both(tmp_path):
    with pytest.raises(
        ValueError, match=r"term 'classification' needs label, which the first training batch"
    ):
        quiet_trainer(tmp_path, fast_dev_run=1).fit(action(), one_batch_loader(labels=False))
    # declared by the data (the CLI links the DataModule's fields into data_fields): before any batch
    with pytest.raises(
        ValueError, match=r"term 'classification' needs label, which the data \(data_fields\)"
    ):
        quiet_trainer(tmp_path, fast_dev_run=1).fit(action(data_fields=["caption"]), one_batch_loader())


def test_a_checkpoint_from_before_the_model_attribute_still_loads(tmp_path):
    src = action()
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(src, one_batch_loader())
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=True)
    assert all(k.startswith("model.") for k in ckpt["state_dict"])
    # the keys of checkpoints written when the stage held its modules itself
    ckpt["state_dict"] = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, tmp_path / "old.ckpt")
    old = ActionStage.load_from_checkpoint(tmp_path / "old.ckpt", weights_only=True)
    for k, v in src.model.state_dict().items():
        assert torch.equal(old.model.state_dict()[k], v), k
