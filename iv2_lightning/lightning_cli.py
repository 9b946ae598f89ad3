"""The LightningCLI behind ``iv2 fit | validate | test | predict``.

Subclass mode for model (any :class:`~iv2_lightning.stages.BaseStage`) and data (any
:class:`~iv2_lightning.data.datamodules.VideoDataModuleBase`). What the data decides is set once, on
the data, and linked into the model when the config is parsed: the clip geometry (``num_frames``,
``image_size``), the ``tokenizer``, the audio length (``max_audio_frames``: the stage's audio encoder
accepts what the data yields) and the batch fields (``data.modalities`` → the stage's
``data_fields``, which its batch contract is checked against and its loss terms default to).
Parse-time links (rather than links from the instantiated data) keep the values in the saved
``config.yaml`` and in what ``iv2 estimate`` and ``iv2 curriculum`` parse. With ``--ckpt_path``
(``iv2 test --config configs/eval/...``) the checkpoint's ``data_fields`` stand, since they decide
which modules the stage has. A wrong key or type fails at parse time and jsonargparse
names the key.

Every trainer it builds writes checkpoints atomically (:class:`~iv2_lightning.io.AtomicCheckpointIO`),
stores the random generators in them (:class:`~iv2_lightning.io.RngState`) and reports skipped
samples (:class:`~iv2_lightning.callbacks.DataErrorReport`). ``iv2 fit ... --ckpt_path last`` makes a
run resumable by rerunning the same command: it keeps ``<default_root_dir>/checkpoints/last.ckpt``
(rewritten at the end of every epoch) and starts from the newest checkpoint there, or in the folder of
any ``ModelCheckpoint`` with a ``dirpath``, that loads (damaged ones are passed over with a warning;
none: a fresh start).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from iv2_lightning.callbacks import DataErrorReport
from iv2_lightning.data.datamodules import VideoDataModuleBase, batch_fields_for
from iv2_lightning.io import (
    ResumeCheckpoint,
    RngState,
    checkpoints_in,
    install_atomic_checkpoint_io,
    load_checkpoint_file,
    newest_readable_checkpoint,
)
from iv2_lightning.stages.base import BaseStage

#: data arguments the model takes as they are (the data's ``modalities`` become ``data_fields``)
DATA_TO_MODEL = ("num_frames", "image_size", "tokenizer", "max_audio_frames")


class IV2CLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key in DATA_TO_MODEL:
            parser.link_arguments(f"data.init_args.{key}", f"model.init_args.{key}")
        parser.link_arguments("data.init_args.modalities", "model.init_args.data_fields", batch_fields_for)
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int | None,
            default=None,
            help="with --ckpt_path last: also write last.ckpt every N optimizer steps (resumable mid-epoch)",
        )

    def instantiate_trainer(self, **kwargs: Any):
        # the callbacks of the config, copied before the Trainer adds its defaults to the same list
        configured = (self._get(self.config_init, "trainer", default=None) or {}).get("callbacks") or []
        configured = list(configured) if isinstance(configured, list | tuple) else [configured]
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, DataErrorReport) for c in trainer.callbacks):
            trainer.callbacks.append(DataErrorReport())
        if not any(isinstance(c, RngState) for c in trainer.callbacks):
            trainer.callbacks.append(RngState())
        install_atomic_checkpoint_io(trainer)
        if self._resume_last():
            if not any(isinstance(c, ModelCheckpoint) for c in configured):
                # Lightning added its default ModelCheckpoint: ours takes its place
                trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
            folder = self.resume_dir(trainer)
            if not any(isinstance(c, ResumeCheckpoint) or self._dirpath(c) == folder for c in configured):
                every = self._get(self.config_init, "checkpoint_every_n_steps", default=None)
                trainer.callbacks.append(ResumeCheckpoint(str(folder), every_n_train_steps=every))
        return trainer

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads a --ckpt_path file (weights_only=True) for its hyperparameters before
        # anything else; check it first so an unsafe or damaged file fails with a message naming it
        hparams: dict[str, Any] = {}
        if self.config.get("subcommand"):
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            if ckpt_path and Path(ckpt_path).is_file():
                hparams = load_checkpoint_file(ckpt_path, mmap=True).get("hyper_parameters") or {}
        super()._parse_ckpt_path()
        if "data_fields" in hparams:
            # the checkpoint's hyperparameters replaced the config's model arguments, but the links
            # then set data_fields from this run's data; a stage decides which loss terms (and so
            # which modules) exist from data_fields, so the checkpoint's value must stand, or its
            # weights would not fit (an evaluation usually reads fewer modalities than training)
            self.config[self.config.subcommand]["model"]["init_args"]["data_fields"] = hparams["data_fields"]

    def _resume_last(self) -> bool:
        return self.subcommand == "fit" and self.config.get(self.subcommand, {}).get("ckpt_path") == "last"

    @staticmethod
    def resume_dir(trainer) -> Path:
        return (Path(trainer.default_root_dir) / "checkpoints").resolve()

    @staticmethod
    def _dirpath(callback) -> Path | None:
        dirpath = getattr(callback, "dirpath", None) if isinstance(callback, ModelCheckpoint) else None
        return Path(dirpath).resolve() if dirpath else None

    def before_fit(self) -> None:
        """``--ckpt_path last``: the newest readable checkpoint of this run's checkpoint folders."""
        if not self._resume_last():
            return
        folders = {self.resume_dir(self.trainer)}
        folders |= {d for d in map(self._dirpath, self.trainer.checkpoint_callbacks) if d is not None}
        found = newest_readable_checkpoint(p for d in sorted(folders) for p in checkpoints_in(d))
        if found is None:
            where = ", ".join(sorted(map(str, folders)))
            rank_zero_info(f"--ckpt_path last: no checkpoint in {where} yet; starting from scratch")
        else:
            rank_zero_info(f"--ckpt_path last: resuming from {found}")
        self.config_init[self.subcommand]["ckpt_path"] = None if found is None else str(found)


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
