"""`iv2 embed | caption | chat --ckpt X`: which checkpoint X names (use.resolve_checkpoint).

X may be a .ckpt file, a curriculum stage folder (checkpoints/last.ckpt), the default_root_dir of a
plain `iv2 fit` (lightning_logs/version_*/checkpoints/*.ckpt, or checkpoints/*.ckpt without a
logger) or a StageTransition export; the layouts below are the ones Lightning writes. The end-to-end
test fits stage 2 for one step and embeds with `--ckpt <default_root_dir>`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from iv2_lightning.models.weights import MANIFEST_FILE
from iv2_lightning.use import EmbeddingIndex, UseError, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _ckpt(path: Path, mtime: int) -> Path:
    """A stand-in checkpoint file (resolution never reads it), last written at ``mtime``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not read by resolve_checkpoint")
    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))
    return path


def _export(folder: Path) -> Path:
    folder.mkdir(parents=True)
    architecture = {"video_encoder": "VideoEncoder", "video_encoder_config": {}}
    (folder / MANIFEST_FILE).write_text(json.dumps({"stage": "stage2", "architecture": architecture}))
    (folder / "shared.safetensors").write_bytes(b"")
    return folder


def test_a_plain_fit_folder_means_its_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    _ckpt(run / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=4.ckpt", 100)
    newest = _ckpt(run / "lightning_logs" / "version_1" / "checkpoints" / "epoch=1-step=8.ckpt", 300)
    _ckpt(run / "lightning_logs" / "version_1" / "checkpoints" / "epoch=0-step=4.ckpt", 200)
    _ckpt(run / "lightning_logs" / "version_1" / "checkpoints" / ".epoch=2-step=12.ckpt", 400)  # a write
    (run / "lightning_logs" / "version_2").mkdir()  # a run that saved nothing yet
    assert resolve_checkpoint(run) == newest
    # without a logger Lightning writes to <default_root_dir>/checkpoints/; the newer file wins
    later = _ckpt(run / "checkpoints" / "epoch=0-step=1.ckpt", 500)
    assert resolve_checkpoint(run) == later
    # a logger with its own name, e.g. TensorBoardLogger(name="exp")
    other = _ckpt(tmp_path / "named" / "exp" / "version_0" / "checkpoints" / "epoch=0-step=1.ckpt", 100)
    assert resolve_checkpoint(tmp_path / "named") == other


def test_a_stage_folder_means_last_ckpt_even_beside_newer_files(tmp_path):
    stage = tmp_path / "stage2"
    last = _ckpt(stage / "checkpoints" / "last.ckpt", 100)
    _ckpt(stage / "checkpoints" / "epoch=3-step=40.ckpt", 200)
    assert resolve_checkpoint(stage) == last
    assert resolve_checkpoint(last) == last  # a file is itself
    # an export folder (or its weights file) means the checkpoint of the run it sits in
    export = _export(stage / "export")
    assert resolve_checkpoint(export) == last
    assert resolve_checkpoint(export / "shared.safetensors") == last
    fit = tmp_path / "fit"
    found = _ckpt(fit / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=1.ckpt", 100)
    assert resolve_checkpoint(_export(fit / "export")) == found


def test_the_error_says_where_it_looked(tmp_path):
    empty = tmp_path / "empty"
    (empty / "lightning_logs" / "version_0").mkdir(parents=True)
    with pytest.raises(UseError) as err:
        resolve_checkpoint(empty)
    message = str(err.value)
    assert f"{empty}/checkpoints/*.ckpt" in message and f"{empty}/*/version_*/checkpoints/*.ckpt" in message
    lone = _export(tmp_path / "lone" / "export")
    with pytest.raises(UseError, match="StageTransition export") as err:
        resolve_checkpoint(lone)
    assert f"{lone.parent}/*/version_*/checkpoints/*.ckpt" in str(err.value)
    with pytest.raises(UseError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing.ckpt")


def test_iv2_embed_takes_the_folder_of_a_plain_fit(tmp_path):
    from iv2_lightning.cli import main as iv2_main
    from iv2_lightning.data.synthetic import synth_main

    run = tmp_path / "run"
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:  # `iv2 fit` with Lightning's own logger and checkpointing: lightning_logs/version_0/checkpoints
        rc = iv2_main(
            [
                "fit",
                "--config",
                str(ROOT / "configs/stage2/tiny.yaml"),
                f"--trainer.default_root_dir={run}",
                "--trainer.max_steps=1",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                "--data.init_args.image_size=32",
                "--data.init_args.batch_size=4",
                "--data.init_args.train_size=4",
                "--data.init_args.val_size=0",
                "--data.init_args.test_size=0",
                "--data.init_args.num_workers=0",
            ]
        )
    finally:
        sys.argv = argv
    assert rc == 0
    [ckpt] = (run / "lightning_logs").glob("version_*/checkpoints/*.ckpt")
    assert synth_main(["--out", str(tmp_path / "clips"), "--num-clips", "2", "--image-size", "32"]) == 0
    out = tmp_path / "index.safetensors"
    assert (
        iv2_main(["embed", "--ckpt", str(run), "--videos", str(tmp_path / "clips"), "--out", str(out)]) == 0
    )
    assert EmbeddingIndex.load(out).meta["ckpt"] == str(ckpt.resolve())  # the index names its checkpoint
