"""Every YAML under configs/ and callbacks/ parses with the `iv2` LightningCLI; every tiny stage
config fits with fast_dev_run; a wrong key or type is refused at parse time, naming the key."""

from pathlib import Path

import pytest

from iv2_lightning.data.datamodules import VideoDataModuleBase
from iv2_lightning.lightning_cli import IV2CLI, make_cli
from iv2_lightning.stages.base import BaseStage

ROOT = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = sorted(
    p for d in ("stage1", "stage2", "stage3", "action") for p in (ROOT / "configs" / d).glob("*.yaml")
)
CALLBACKS = sorted((ROOT / "callbacks").glob("*.yaml"))
TINY = [p for p in STAGE_CONFIGS if p.stem == "tiny"]


class ParseOnly(IV2CLI):
    """Parse and validate, build nothing (the 1B configs would allocate gigabytes)."""

    def instantiate_classes(self) -> None:
        pass


def parse(args):
    return ParseOnly(
        BaseStage,
        VideoDataModuleBase,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=False,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        parser_kwargs={"allow_abbrev": False},
    )


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_stage_configs_parse_with_every_callback_fragment(config):
    args = ["--config", str(config)]
    for fragment in CALLBACKS:
        args += ["--config", str(fragment)]
    cli = parse(args)
    assert cli.config["model"]["class_path"].startswith("iv2_lightning.stages.")
    assert (
        cli.config["data"]["init_args"]["num_frames"] == cli.config["model"]["init_args"]["num_frames"]
    )  # linked
    callbacks = [c["class_path"] for c in cli.config["trainer"]["callbacks"]]
    assert "iv2_lightning.callbacks.StageTransition" in callbacks and len(callbacks) == len(CALLBACKS)


def test_curriculum_configs_load():
    from iv2_lightning.curriculum import load_curriculum

    for path in (ROOT / "configs" / "curriculum").glob("*.yaml"):
        cfg = load_curriculum(path)
        assert cfg["stages"] and all(Path(c).is_file() for s in cfg["stages"] for c in s["configs"])


@pytest.mark.parametrize("config", TINY, ids=lambda p: p.parent.name)
def test_tiny_configs_fit_with_fast_dev_run(config, tmp_path):
    cli = make_cli(
        [
            "--config",
            str(config),
            "--trainer.fast_dev_run=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            "--data.init_args.image_size=32",
            "--data.init_args.num_frames=8",
        ],
        run=False,
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.state.finished and cli.trainer.global_step == 1


@pytest.mark.parametrize(
    ("arg", "match"),
    [
        ("--model.init_args.mask_ratoi=0.5", "mask_ratoi"),
        ("--model.init_args.mask_ratio=high", "mask_ratio"),
        ("--data.init_args.batch_sise=3", "batch_sise"),
        ("--trainer.max_epoch=3", "max_epoch"),
    ],
)
def test_wrong_key_or_type_fails_at_parse_time_naming_the_key(arg, match, capsys):
    with pytest.raises(SystemExit):
        parse(["--config", str(ROOT / "configs" / "stage1" / "tiny.yaml"), arg])
    assert match in capsys.readouterr().err


def test_bert_fusion_fragment_composes_with_the_tiny_stage2_config():
    cli = parse(
        [
            "--config",
            str(ROOT / "configs/stage2/tiny.yaml"),
            "--config",
            str(ROOT / "configs/stage2/fusion/bert_tiny.yaml"),
        ]
    )
    args = cli.config["model"]["init_args"]
    assert args["fusion"] == "bert" and args["text_model"] == "bert" and args["text"]["fusion_layer"] == 2
    assert cli.config["data"]["init_args"]["train_size"] == 4096  # the rest is tiny.yaml's
