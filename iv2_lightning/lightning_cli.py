"""The LightningCLI behind ``iv2 fit | validate | test | predict``.

Subclass mode for model (any :class:`~iv2_lightning.stages.BaseStage`) and data (any
:class:`~iv2_lightning.data.datamodules.VideoDataModuleBase`); the clip geometry and the tokenizer
are set once, on the data, and linked into the model. A wrong key or type fails at parse time and
jsonargparse names the key.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from iv2_lightning.callbacks import DataErrorReport
from iv2_lightning.data.datamodules import VideoDataModuleBase
from iv2_lightning.stages.base import BaseStage


class IV2CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in ("num_frames", "image_size", "tokenizer"):
            parser.link_arguments(f"data.init_args.{key}", f"model.init_args.{key}")

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, DataErrorReport) for c in trainer.callbacks):
            trainer.callbacks.append(DataErrorReport())
        return trainer


def make_cli(args: list[str], run: bool = True) -> IV2CLI:
    return IV2CLI(
        BaseStage,
        VideoDataModuleBase,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        # no abbreviations: a misspelt option must fail, not silently expand to a real one
        parser_kwargs={"allow_abbrev": False},
    )


def run_lightning_cli(argv: list[str]) -> IV2CLI:
    return make_cli(argv, run=True)
