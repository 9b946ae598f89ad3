"""What the data decides reaches the model through the `iv2` LightningCLI links: the clip geometry, the
tokenizer, the audio length (data max_audio_frames -> the stage's audio encoder) and the batch fields
(data modalities -> the stage's data_fields); and `iv2 fit` of the tiny stage-2 config trains on real
mp4 clips with sound (longer than the tiny audio encoder's 256 frames) with the config's defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from iv2_lightning.data import SyntheticVideoDataModule, write_annotations
from iv2_lightning.data.datamodules import VideoDataModuleBase
from iv2_lightning.data.video_io import probe_video
from iv2_lightning.estimate import parse_config
from iv2_lightning.lightning_cli import IV2CLI, make_cli
from iv2_lightning.stages.base import BaseStage

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("stage*/*.yaml"))


def test_the_data_sets_audio_length_and_batch_fields_of_the_model():
    cfg = parse_config(
        [ROOT / "configs/stage1/tiny.yaml"],
        ["--data.init_args.modalities=[caption, label]", "--data.init_args.max_audio_frames=300"],
    )
    model, data = cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert model["max_audio_frames"] == data["max_audio_frames"] == 300
    assert model["data_fields"] == ["video", "caption", "label"]
    assert model["num_frames"] == data["num_frames"] and model["tokenizer"] == data["tokenizer"]
    # modalities null: every modality, as the DataModules read it
    every = parse_config([ROOT / "configs/stage1/tiny.yaml"], ["--data.init_args.modalities=null"])
    every = every["model"]["init_args"]
    assert every["data_fields"] == ["video", "audio", "caption", "speech", "label", "qa"]
    assert every["max_audio_frames"] == 1024
    # the data's value wins over one given to the model: they cannot disagree
    given = parse_config([ROOT / "configs/stage1/tiny.yaml"], ["--model.init_args.max_audio_frames=64"])
    assert given["model"]["init_args"]["max_audio_frames"] == given["data"]["init_args"]["max_audio_frames"]


class _ParseOnly(IV2CLI):
    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def test_iv2_test_keeps_the_data_fields_the_checkpoint_was_trained_with(tmp_path):
    # a stage builds its loss terms' modules from data_fields; the zero-shot config reads captions
    # and labels only, and must not take the audio modules away from a checkpoint that has them
    trained_on = ["video", "audio", "caption", "speech", "label"]
    hparams = {"_class_path": "iv2_lightning.stages.ContrastiveStage", "data_fields": trained_on}
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, tmp_path / "stage2.ckpt")
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = _ParseOnly(
            BaseStage,
            VideoDataModuleBase,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=[
                "test",
                "--config",
                str(ROOT / "configs/eval/zeroshot.yaml"),
                f"--ckpt_path={tmp_path / 'stage2.ckpt'}",
            ],
            seed_everything_default=0,
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = argv
    config = cli.config["test"]
    assert config["data"]["init_args"]["modalities"] == ["caption", "label"]
    assert config["model"]["init_args"]["data_fields"] == trained_on


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_configs_leave_the_audio_length_to_the_data(config):
    model = yaml.safe_load(config.read_text())["model"]["init_args"]
    assert "max_frames" not in (model.get("audio") or {}), "set data.init_args.max_audio_frames instead"


@pytest.mark.parametrize("stage", ["stage2", "stage3"])
def test_tiny_synthetic_sound_fits_whole_in_the_tiny_audio_length(stage):
    # the tiny configs' max_audio_frames crops no synthetic clip, so the curriculum's numbers stay
    data = yaml.safe_load((ROOT / f"configs/{stage}/tiny.yaml").read_text())["data"]["init_args"]
    assert data["max_audio_frames"] == 256  # what the audio encoder's max_frames was
    dm = SyntheticVideoDataModule(
        num_frames=data["num_frames"], image_size=32, train_size=1, val_size=0, test_size=0
    )
    dm.setup("fit")
    frames = dm.datasets["train"][0].audio.shape[0]
    assert frames == 98 and frames <= data["max_audio_frames"]


def test_iv2_fit_of_the_tiny_stage2_config_on_real_clips_with_sound(sound_clips, tmp_path):
    rows = [{"video": str(path), "caption": f"a clip of {name}"} for name, path in sound_clips.items()]
    assert all(probe_video(r["video"])["has_audio"] and probe_video(r["video"])["duration"] > 3 for r in rows)
    ann = write_annotations(tmp_path / "ann.jsonl", rows)
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:  # `iv2 fit --config configs/stage2/tiny.yaml --data VideoTextDataModule ...`
        cli = make_cli(
            [
                "fit",
                "--config",
                str(ROOT / "configs/stage2/tiny.yaml"),
                "--data=iv2_lightning.data.VideoTextDataModule",
                f"--data.init_args.train_annotations={ann}",
                "--data.init_args.batch_size=4",
                "--data.init_args.num_workers=0",
                "--trainer.max_steps=2",
                f"--trainer.default_root_dir={tmp_path}",
                "--trainer.logger=false",
                "--trainer.enable_checkpointing=false",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
            ]
        )
    finally:
        sys.argv = argv
    assert cli.trainer.global_step == 2
    # the data's audio length reached the audio encoder, and the longer tracks were cropped to it
    assert cli.model.hparams.max_audio_frames == cli.datamodule.max_audio_frames == 256
    assert cli.model.model.audio_encoder.max_frames == 256
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert batch.audio.shape[1] == 256 and batch.audio_mask.all()
    logged = cli.trainer.callback_metrics
    assert {"train/vtc", "train/atc", "train/vac"} <= set(logged)  # the audio terms ran
    assert torch.isfinite(logged["train/loss"])
