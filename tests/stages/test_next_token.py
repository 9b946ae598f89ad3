"""NextTokenStage (stage 3), the Lightning shell around VideoCaptioner: it builds the model from its
arguments (tests/models/test_captioner.py tests the model itself), gives the same losses as the model,
declares its batch contract, loads init_from, passes caption/chat through, and a Lightning run logs
the generation metrics and writes caption samples."""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from iv2_lightning.data.batch import VideoBatch, VideoCollate, VideoSample
from iv2_lightning.data.datamodules import SyntheticVideoDataModule
from iv2_lightning.data.synthetic import SyntheticVideoDataset
from iv2_lightning.models.audio import AudioEncoder
from iv2_lightning.models.backbone import VideoEncoder, preset_config
from iv2_lightning.models.captioner import VideoCaptioner
from iv2_lightning.models.text import TextEncoder
from iv2_lightning.models.weights import export_shared_weights
from iv2_lightning.stages import dialogue_prompt_ids as reexported
from iv2_lightning.stages.next_token import NextTokenStage, dialogue_prompt_ids

ENCODER = {"image_size": 32, "patch_size": 8, "depth": 1, "num_frames": 4}
LM = {"dim": 64, "depth": 1, "num_heads": 2, "max_length": 160}
SMALL = {"dim": 32, "depth": 1, "num_heads": 2}
FUSED = {
    "use_audio": True,
    "use_speech": True,
    "audio": SMALL,
    "text": SMALL,
    "fusion": {"dim": 64, "num_heads": 2},
}


def make_stage(**kw) -> NextTokenStage:
    torch.manual_seed(0)
    args = {"encoder": ENCODER, "num_queries": 8, "max_new_tokens": 12}
    if kw.get("lm", "builtin") == "builtin":
        args["lm_config"] = LM
    return NextTokenStage(**{**args, **kw})


def clips(n: int, with_audio: bool = False) -> list[VideoSample]:
    ds = SyntheticVideoDataset(size=n, num_frames=8, image_size=32, with_audio=with_audio)
    return [ds[i] for i in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these models are tiny: intra-op threads only add overhead on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch() -> VideoBatch:
    return VideoCollate(max_text_length=48)(clips(4, with_audio=True))


@pytest.fixture(scope="module")
def stage() -> NextTokenStage:
    return make_stage().eval()


def without(batch: VideoBatch, *what: str) -> VideoBatch:
    fields = {
        "caption": ("caption_ids", "caption_mask"),
        "dialogue": ("dialogue_ids", "dialogue_mask", "dialogue_target_mask"),
    }
    return dataclasses.replace(batch, **{f: None for w in what for f in fields[w]})


# -- the model the stage builds ---------------------------------------------------------------------


def test_stage_builds_a_video_captioner(stage, batch):
    assert isinstance(stage.model, VideoCaptioner) and stage.stage_name == "stage3"
    assert stage(batch.video).shape == (4, 8, 64)  # the stage's forward is the prefix
    assert set(stage.shared_modules()) == {"video_encoder"}
    assert stage.model.max_new_tokens == 12 and stage.model.lm_dim == 64 and not stage.model.use_audio
    assert reexported is dialogue_prompt_ids  # still importable from iv2_lightning.stages


def test_stage_and_model_give_identical_losses(batch):
    """The stage's loss is the torch model's: a model built the same way from the same seed gives
    the same numbers, bit for bit."""
    stage = make_stage(pooled_token=True, **FUSED)
    torch.manual_seed(0)
    tok = stage.tokenizer
    model = VideoCaptioner(
        VideoEncoder(**preset_config("tiny", **ENCODER)),
        tok,
        lm_config=LM,
        num_queries=8,
        max_new_tokens=12,
        audio_encoder=AudioEncoder(**SMALL),
        text_encoder=TextEncoder(vocab_size=tok.vocab_size, pad_id=tok.pad_id, **SMALL),
        fusion=FUSED["fusion"],
        pooled_token=True,
    )
    out = stage.compute_loss(batch)
    ref = model(**NextTokenStage.model_inputs(batch))
    assert torch.equal(out["loss"], ref.loss)
    assert torch.equal(out["caption_loss"], ref.caption_loss) and torch.equal(
        out["dialogue_loss"], ref.dialogue_loss
    )
    assert set(stage.shared_modules()) == {"video_encoder", "audio_encoder", "text_encoder", "fusion"}


@pytest.mark.parametrize("parts", [("caption",), ("dialogue",), ("caption", "dialogue")])
def test_compute_loss_finite(stage, batch, parts):
    missing = {"caption", "dialogue"} - set(parts)
    out = stage.compute_loss(without(batch, *missing))
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert ("caption_loss" in out) == ("caption" in parts)
    assert ("dialogue_loss" in out) == ("dialogue" in parts)
    assert 0.0 <= float(out["token_acc"]) <= 1.0
    expected = sum(out[f"{p}_loss"].item() for p in parts)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_batch_without_text_fails_clearly(stage, batch):
    with pytest.raises(ValueError, match="neither captions nor dialogue"):
        stage.compute_loss(without(batch, "caption", "dialogue"))


def test_batch_contract():
    assert make_stage().batch_contract() == {"caption": ["video", "caption"], "dialogue": ["video", "qa"]}
    fused = make_stage(dialogue_weight=0.0, **FUSED).batch_contract()
    assert fused == {
        "caption": ["video", "caption"],
        "use_audio": ["video", "audio"],
        "use_speech": ["video", "speech"],
    }
    with pytest.raises(ValueError, match="term 'dialogue' needs qa"):
        make_stage().check_batch_contract({"video", "caption"}, "the data")


def test_lm_errors():
    with pytest.raises(ValueError, match="not CausalDecoder overrides"):
        NextTokenStage(encoder=ENCODER, lm_config={"dimension": 64})
    with pytest.raises(FileNotFoundError, match="never downloads"):
        NextTokenStage(encoder=ENCODER, lm="/nonexistent/llm-folder")
    with pytest.raises(ValueError, match="max_new_tokens"):
        NextTokenStage(encoder=ENCODER, lm_config={**LM, "max_length": 16}, max_new_tokens=40)
    with pytest.raises(ValueError, match="val_generate_batches"):
        NextTokenStage(encoder=ENCODER, lm_config=LM, val_generate_batches=-1)


def test_caption_and_chat_pass_through_to_the_model(stage, batch):
    assert stage.caption(batch.video) == stage.model.caption(batch.video)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert stage.caption(batch, top_p=0.5, generator=g1) == stage.model.caption(
        batch, top_p=0.5, generator=g2
    )
    history = [("what shape is it?", "circle")]
    assert stage.chat(batch.video[0], "what color is it?", history=history) == stage.model.chat(
        batch.video[0], "what color is it?", history=history
    )
    rows = stage.predict_step(batch, 0)
    assert [r["caption"] for r in rows] == stage.model.caption(batch)
    assert [r["clip"] for r in rows] == [f"train:{i}" for i in range(4)]


# -- init_from --------------------------------------------------------------------------------------


def test_init_from_loads_shared_weights(tmp_path, batch):
    source = make_stage()
    with torch.no_grad():
        for p in source.model.video_encoder.parameters():
            p.add_(0.5)
    export_shared_weights(source.model, tmp_path / "export", {"stage": "stage2"})
    torch.manual_seed(1)
    target = NextTokenStage(encoder=ENCODER, lm_config=LM, num_queries=8, init_from=str(tmp_path / "export"))
    for (name, p), q in zip(
        target.model.video_encoder.state_dict().items(), source.model.video_encoder.state_dict().values()
    ):
        torch.testing.assert_close(p, q, msg=name)
    assert target.hparams["init_from"] == str(tmp_path / "export")


# -- Lightning --------------------------------------------------------------------------------------


def datamodule(**kw) -> SyntheticVideoDataModule:
    args = dict(
        num_frames=8,
        image_size=32,
        batch_size=4,
        train_size=8,
        val_size=8,
        test_size=4,
        modalities=["caption", "qa"],
    )
    return SyntheticVideoDataModule(**{**args, **kw})


def test_lightning_fast_dev_run_logs_metrics():
    stage = make_stage(max_new_tokens=8, val_generate_batches=1)
    trainer = L.Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dm = datamodule()
    trainer.fit(stage, dm)
    assert "train/loss" in trainer.callback_metrics
    trainer.validate(stage, dm)
    metrics = trainer.callback_metrics
    for key in (
        "loss",
        "caption_loss",
        "dialogue_loss",
        "token_acc",
        "answer_acc",
        "bleu",
        "bleu1",
        "rouge_l",
    ):
        assert f"val/{key}" in metrics, key
    for key in ("caption_attr_acc", "caption_color_acc", "caption_shape_acc", "caption_direction_acc"):
        assert 0.0 <= float(metrics[f"val/{key}"]) <= 1.0
    assert torch.isfinite(metrics["val/loss"])


class TextLogger(Logger):
    """A logger whose experiment has TensorBoard's ``add_text``."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[tuple[str, str]] = []

    @property
    def name(self) -> str:
        return "text"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> TextLogger:
        return self

    def add_text(self, tag: str, text: str, global_step: int | None = None) -> None:
        self.texts.append((tag, text))

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_validate_and_test_write_caption_samples():
    stage = make_stage(max_new_tokens=4, val_generate_batches=1)
    logger = TextLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=logger,
        limit_val_batches=1,
        limit_test_batches=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dm = datamodule()
    trainer.validate(stage, dm)
    trainer.test(stage, dm)
    assert "test/bleu" in trainer.callback_metrics and "test/caption_attr_acc" in trainer.callback_metrics
    tags = [t for t, _ in logger.texts]
    assert tags == ["val/captions", "test/captions"]
    assert "| clip | generated | reference |" in logger.texts[0][1] and "val:0" in logger.texts[0][1]


def test_a_stage_with_audio_is_also_scored_on_the_video_alone():
    stage = make_stage(
        max_new_tokens=6,
        val_generate_batches=1,
        use_audio=True,
        audio={"dim": 32, "depth": 1, "num_heads": 2},
        fusion={"dim": 64, "num_heads": 2},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        limit_val_batches=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dm = datamodule(modalities=["caption", "qa", "audio"])
    trainer.validate(stage, dm)
    metrics = trainer.callback_metrics
    for key in ("caption_attr_acc", "caption_shape_acc"):
        assert 0.0 <= float(metrics[f"val/{key}"]) <= 1.0
        assert 0.0 <= float(metrics[f"val/{key}_video_only"]) <= 1.0
    # the video-only score decodes from the video prefix alone: it matches caption(video)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    stage.eval()
    with torch.no_grad():
        alone = stage.model.caption(batch.video, max_new_tokens=6)
        with_audio = stage.model.caption(batch, max_new_tokens=6)
        assert not torch.allclose(
            stage.model.prefix_of(batch), stage.model.visual_prefix(batch.video)
        )  # audio counts
    from iv2_lightning.data.synthetic import attributes_from_text

    hits = [
        attributes_from_text(c).get("shape") == m["attributes"]["shape"] for c, m in zip(alone, batch.meta)
    ]
    hits_audio = [
        attributes_from_text(c).get("shape") == m["attributes"]["shape"]
        for c, m in zip(with_audio, batch.meta)
    ]
    assert float(metrics["val/caption_shape_acc_video_only"]) == pytest.approx(sum(hits) / len(hits))
    assert float(metrics["val/caption_shape_acc"]) == pytest.approx(sum(hits_audio) / len(hits_audio))
    # a video-only stage logs no such keys
    plain = make_stage(max_new_tokens=4, val_generate_batches=1)
    trainer.validate(plain, datamodule())
    assert not any(k.endswith("_video_only") for k in trainer.callback_metrics)
