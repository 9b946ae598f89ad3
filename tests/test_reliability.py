"""Reliability guarantees (docs/reliability.md): kills and resumes, atomic files, bad data at scale,
numerical faults, untrusted files, config errors.

The kill tests run ``iv2`` in subprocesses (one thread each) and SIGKILL them from outside at a
random training step; :class:`StepMarker` (imported by the children from this file) tells the parent
which step a child has reached.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import types
import typing
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

torch.set_num_threads(1)  # tiny models: one thread is faster, and the kill tests run two processes at once

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

CHILD = "import sys, torch; torch.set_num_threads(1); from iv2_lightning.cli import main; sys.exit(main(sys.argv[1:]))"


class StepMarker(L.Callback):
    """Appends ``<run folder> <global step>`` to ``$IV2_STEP_LOG`` after every training step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        path = os.environ.get("IV2_STEP_LOG")
        if path:
            with open(path, "a") as f:
                f.write(f"{Path(trainer.default_root_dir).name} {trainer.global_step}\n")


def child_env(step_log: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        **extra,
    )
    if step_log is not None:
        env["IV2_STEP_LOG"] = str(step_log)
    return env


def start_iv2(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("ab")
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], env=env, stdout=out, stderr=out, cwd=ROOT)


def steps_in(step_log: Path, run: str | None = None) -> list[int]:
    if not step_log.is_file():
        return []
    rows = [line.split() for line in step_log.read_text().splitlines() if line.strip()]
    return [int(s) for name, s in rows if run is None or name == run]


def kill_at_step(proc: subprocess.Popen, step_log: Path, run: str, step: int, timeout: float = 240) -> None:
    """SIGKILL ``proc`` from outside as soon as ``run`` has logged ``step`` (the child keeps running
    while we look, so it dies somewhere in the next step: computing, or writing a checkpoint)."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        done = steps_in(step_log, run)
        if done and done[-1] >= step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    rc = proc.wait(timeout=30)
    assert rc == -signal.SIGKILL, f"the child ended on its own (rc {rc}) before step {step}"


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, f"rc {rc}; output:\n{log.read_text()[-4000:]}"


def assert_same_training_state(a: Path, b: Path) -> float:
    """Weights, optimizer moments, schedule and step of two checkpoints are identical; returns the
    largest absolute weight difference (0.0)."""
    ca = torch.load(a, map_location="cpu", weights_only=True)
    cb = torch.load(b, map_location="cpu", weights_only=True)
    assert ca["global_step"] == cb["global_step"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    diff = max((ca["state_dict"][k] - cb["state_dict"][k]).abs().max().item() for k in ca["state_dict"])
    for k, v in ca["state_dict"].items():
        assert torch.equal(v, cb["state_dict"][k]), f"{k} differs ({diff})"
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[i][name], sb[i][name]), f"optimizer {name} of param {i} differs"
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    return diff


# -- kill and resume ---------------------------------------------------------------------------------

FIT_ARGS = [
    "fit",
    "--config",
    str(ROOT / "configs" / "stage1" / "tiny.yaml"),
    "--trainer.max_epochs=3",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
    "--trainer.deterministic=true",
    "--data.init_args.batch_size=4",
    "--data.init_args.train_size=16",
    "--data.init_args.image_size=32",
    "--data.init_args.num_workers=0",
    "--trainer.callbacks+=test_reliability.StepMarker",
    "--ckpt_path=last",
]


@pytest.mark.slow
def test_iv2_fit_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """`iv2 fit ... --ckpt_path last`, SIGKILLed at a random step and rerun unchanged, continues from
    the last epoch-end checkpoint (weights, AdamW moments, schedule, step, random generators) and
    ends bit-identical to a run that was never stopped."""
    kill_step = random.randint(5, 11)  # 4 steps per epoch: past the first checkpoint, not the last step
    log = tmp_path / "steps.log"
    runs = {
        name: [*FIT_ARGS, f"--trainer.default_root_dir={tmp_path / name}"] for name in ("whole", "killed")
    }
    whole = start_iv2(runs["whole"], child_env(log), tmp_path / "whole.out")  # runs beside the victim
    victim = start_iv2(runs["killed"], child_env(log), tmp_path / "killed.out")
    kill_at_step(victim, log, "killed", kill_step)
    before = steps_in(log, "killed")
    assert (tmp_path / "killed" / "checkpoints" / "last.ckpt").is_file()
    again = start_iv2(runs["killed"], child_env(log), tmp_path / "killed.out")  # the same command
    finish(again, tmp_path / "killed.out")
    finish(whole, tmp_path / "whole.out")
    resumed = steps_in(log, "killed")[len(before) :]
    # resumed from an epoch boundary at or before the kill, and went on to the end
    assert resumed[0] in (5, 9) and resumed[0] <= before[-1] + 1, (kill_step, before, resumed)
    assert resumed[-1] == 12
    diff = assert_same_training_state(
        tmp_path / "whole" / "checkpoints" / "last.ckpt", tmp_path / "killed" / "checkpoints" / "last.ckpt"
    )
    assert diff == 0.0


def _annotation_config(tmp_path: Path) -> Path:
    """configs/stage1/tiny.yaml over 16 distinct real mp4 clips listed in an annotation file."""
    from iv2_lightning.data import write_annotations, write_video

    media = tmp_path / "media"
    media.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        write_video(media / f"clip{i:02d}.mp4", rng.integers(0, 255, (12, 40, 40, 3), dtype=np.uint8), fps=8)
        rows.append({"video": f"clip{i:02d}.mp4", "caption": f"clip {i}"})
    cfg = yaml.safe_load((ROOT / "configs" / "stage1" / "tiny.yaml").read_text())
    cfg["data"] = {
        "class_path": "iv2_lightning.data.VideoTextDataModule",
        "init_args": {
            "train_annotations": str(write_annotations(media / "train.jsonl", rows)),
            "root": str(media),
            "num_frames": 8,
            "image_size": 32,
            "batch_size": 4,
            "num_workers": 2,
            "modalities": [],
        },
    }
    path = tmp_path / "annotations.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("data", ["synthetic", "annotations"])
def test_map_style_data_resumes_mid_epoch_with_workers_to_the_weights_of_an_uninterrupted_run(tmp_path, data):
    """A checkpoint every step (--checkpoint_every_n_steps 1), SIGKILL in the middle of an epoch, the
    same command again: it continues at the next batch of that epoch (2 loader workers) and ends
    bit-identical to a run that was never stopped."""
    # 4 steps per epoch, a checkpoint after every step; the kill lands within a step of kill_step, so
    # the newest checkpoint is one of steps kill_step - 1 .. kill_step + 1: all inside an epoch
    kill_step = random.choice([2, 6, 10])
    args = [a for a in FIT_ARGS if not a.startswith("--data.init_args.num_workers")]
    args += ["--checkpoint_every_n_steps=1"]
    if data == "synthetic":
        args += ["--data.init_args.num_workers=2"]
    else:
        config = _annotation_config(tmp_path)
        args = [str(config) if a.endswith("stage1/tiny.yaml") else a for a in args]
        args = [
            a
            for a in args
            if not a.startswith(("--data.init_args.train_size", "--data.init_args.batch_size"))
        ]
        args = [a for a in args if not a.startswith("--data.init_args.image_size")]
    log = tmp_path / "steps.log"
    runs = {name: [*args, f"--trainer.default_root_dir={tmp_path / name}"] for name in ("whole", "killed")}
    whole = start_iv2(runs["whole"], child_env(log), tmp_path / "whole.out")
    victim = start_iv2(runs["killed"], child_env(log), tmp_path / "killed.out")
    kill_at_step(victim, log, "killed", kill_step)
    before = steps_in(log, "killed")
    again = start_iv2(runs["killed"], child_env(log), tmp_path / "killed.out")
    finish(again, tmp_path / "killed.out")
    finish(whole, tmp_path / "whole.out")
    resumed = steps_in(log, "killed")[len(before) :]
    # resumed inside the epoch it was killed in, from a step checkpoint, and went on to the end
    assert resumed[0] % 4 != 1 and before[-1] - 1 <= resumed[0] <= before[-1] + 2, (
        kill_step,
        before,
        resumed,
    )
    assert resumed[-1] == 12
    diff = assert_same_training_state(
        tmp_path / "whole" / "checkpoints" / "last.ckpt", tmp_path / "killed" / "checkpoints" / "last.ckpt"
    )
    assert diff == 0.0


SHORT = [
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.deterministic=true",
    "--trainer.limit_val_batches=1",
    "--data.init_args.batch_size=4",
    "--data.init_args.train_size=16",
    "--data.init_args.val_size=4",
    "--data.init_args.test_size=4",
    "--data.init_args.num_workers=0",
    "--data.init_args.image_size=32",
    "--trainer.callbacks+=test_reliability.StepMarker",
]


def write_curriculum(path: Path) -> Path:
    cfg = {
        "seed": 0,
        "stages": [
            {
                "name": "stage1",
                "configs": [str(ROOT / "configs" / "stage1" / "tiny.yaml")],
                "args": [*SHORT, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2"],
            },
            {
                "name": "probe",
                "configs": [str(ROOT / "configs" / "action" / "tiny.yaml")],
                "args": [*SHORT, "--trainer.max_epochs=3", "--trainer.limit_train_batches=3"],
                "init_from": "stage1",
                "report": {"acc": "val/acc"},
            },
        ],
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_iv2_curriculum_killed_in_a_stage_skips_finished_stages_and_resumes_exactly(tmp_path):
    """`iv2 curriculum` SIGKILLed in its second stage: the rerun skips the first stage, passes over a
    damaged newer checkpoint with a warning, resumes the second from its last epoch-end checkpoint and
    ends with the training state of an uninterrupted curriculum."""
    config = write_curriculum(tmp_path / "curriculum.yaml")
    kill_step = random.randint(4, 8)  # 3 steps per epoch, 3 epochs
    log = tmp_path / "steps.log"

    def command(out: Path) -> list[str]:
        return ["curriculum", "--config", str(config), "--output-dir", str(out)]

    whole = start_iv2(command(tmp_path / "whole"), child_env(tmp_path / "whole.log"), tmp_path / "whole.out")
    victim = start_iv2(command(tmp_path / "run"), child_env(log), tmp_path / "run.out")
    kill_at_step(victim, log, "probe", kill_step)
    stage1_manifest = tmp_path / "run" / "stage1" / "export" / "manifest.json"
    stamp = stage1_manifest.stat().st_mtime_ns
    before = len(steps_in(log))
    # a half-written checkpoint, newer than last.ckpt, as a crash of another writer would leave it
    ckpts = tmp_path / "run" / "probe" / "checkpoints"
    data = (ckpts / "last.ckpt").read_bytes()
    (ckpts / "last-v1.ckpt").write_bytes(data[: len(data) // 3])
    again = start_iv2(command(tmp_path / "run"), child_env(log), tmp_path / "rerun.out")
    finish(again, tmp_path / "rerun.out")
    finish(whole, tmp_path / "whole.out")
    out = (tmp_path / "rerun.out").read_text()
    assert "stage1: finished earlier" in out and stage1_manifest.stat().st_mtime_ns == stamp
    assert "passing over a damaged checkpoint" in out and "last-v1.ckpt" in out
    rerun_steps = [line.split() for line in log.read_text().splitlines()[before:] if line.strip()]
    assert {name for name, _ in rerun_steps} == {"probe"}  # stage 1 did not train again
    assert int(rerun_steps[0][1]) in (4, 7) and int(rerun_steps[-1][1]) == 9, (kill_step, rerun_steps)
    diff = assert_same_training_state(
        tmp_path / "whole" / "probe" / "checkpoints" / "last.ckpt", ckpts / "last.ckpt"
    )
    assert diff == 0.0
    assert (tmp_path / "run" / "summary.json").is_file()


def test_streaming_data_resumes_mid_epoch_at_the_same_sample_and_weights(tmp_path):
    """Streaming shards (a stateful loader): a checkpoint written mid-epoch resumes at the next batch,
    with the same random generators, and ends with the weights of an uninterrupted run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from iv2_lightning.data import StreamingVideoDataModule
    from iv2_lightning.data.synthetic import synth_main
    from iv2_lightning.data.tools import prepare_main
    from iv2_lightning.io import AtomicCheckpointIO, ResumeCheckpoint, RngState, install_atomic_checkpoint_io
    from iv2_lightning.stages.masked import MaskedVideoStage

    torch.set_num_threads(1)
    synth = tmp_path / "synth"
    assert (
        synth_main(["--out", str(synth), "--num-clips", "8", "--num-frames", "8", "--image-size", "32"]) == 0
    )
    shards = tmp_path / "shards"
    ann = str(synth / "annotations.jsonl")
    method = multiprocessing.get_start_method(allow_none=True)
    try:
        assert prepare_main(["--annotations", ann, "--out", str(shards), "--chunk-bytes", "100KB"]) == 0
    finally:  # litdata's optimize() sets "spawn" for the whole process: later loader workers would start slowly
        multiprocessing.set_start_method(method, force=True)

    class Batches(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append((trainer.global_step, [m["index"] for m in batch.meta]))

    def run(root: Path, ckpt: str | None = None):
        L.seed_everything(0)
        dm = StreamingVideoDataModule(
            train_dir=str(shards), num_frames=8, image_size=32, batch_size=2, modalities=[], seed=0
        )
        model = MaskedVideoStage(
            num_frames=8,
            image_size=32,
            encoder={"patch_size": 16, "tubelet_size": 2, "depth": 1},
            mask_ratio=0.5,
            decoder_depth=1,
            decoder_dim=32,
            decoder_heads=2,
        )
        seen = Batches()
        every_step = ModelCheckpoint(
            dirpath=root / "steps", every_n_train_steps=1, save_top_k=-1, filename="{step}"
        )
        trainer = L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=[
                RngState(),
                ResumeCheckpoint(str(root / "ck"), every_n_train_steps=3),
                every_step,
                seen,
            ],
            limit_val_batches=0,
            num_sanity_val_steps=0,
            deterministic=True,
        )
        assert install_atomic_checkpoint_io(trainer)
        assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
        trainer.fit(model, dm, ckpt_path=ckpt)
        return model, seen.seen

    whole, seen_whole = run(tmp_path / "whole")
    assert len(seen_whole) == 8  # 4 batches per epoch, 2 epochs
    last = torch.load(tmp_path / "whole" / "ck" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and not last["callbacks"]["iv2_rng_state"]["mid_epoch"]
    resumed, seen_resumed = run(tmp_path / "resumed", ckpt=str(tmp_path / "whole" / "steps" / "step=5.ckpt"))
    assert seen_resumed == seen_whole[5:]  # the 2nd batch of epoch 2 onwards, the same clips
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- atomic writes -------------------------------------------------------------------------------------

SAVER = textwrap.dedent(
    """
    import sys, torch
    torch.set_num_threads(1)
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from iv2_lightning.io import AtomicCheckpointIO
    io = AtomicCheckpointIO() if sys.argv[2] == "atomic" else TorchCheckpointIO()
    state = {"state_dict": {"w": torch.randn(6_000_000)}, "step": torch.zeros(1)}
    while True:
        io.save_checkpoint(state, sys.argv[1])
        state["step"] += 1
        print(int(state["step"]), flush=True)
    """
)


def other_filesystem_tmpdir(tmp_path: Path) -> Path | None:
    """A temp folder on another filesystem than ``tmp_path`` (where fsspec's transaction stages files)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        d = shm / f"iv2-test-{os.getpid()}"
        d.mkdir(exist_ok=True)
        return d
    return None


def test_a_kill_while_a_checkpoint_is_written_never_leaves_a_partial_file(tmp_path):
    """A process rewriting a 24 MB checkpoint in a loop is watched and SIGKILLed the moment the file
    under its real name looks incomplete (or after a few complete rewrites): the file is always a
    complete checkpoint and resuming picks it. (Lightning's own TorchCheckpointIO fails this when
    the temp folder is on another filesystem: its transaction ends in a copy.)"""
    from iv2_lightning.io import checkpoints_in, newest_readable_checkpoint

    folder = tmp_path / "ckpts"
    folder.mkdir()
    target = folder / "last.ckpt"
    other = other_filesystem_tmpdir(tmp_path)
    env = child_env(**({"TMPDIR": str(other)} if other else {}))
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(target), os.environ.get("IV2_TEST_SAVER", "atomic")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout.readline().strip() == b"1"  # one complete checkpoint written
        full = target.stat().st_size
        partial_seen, deadline = None, time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                size = target.stat().st_size
            except FileNotFoundError:
                size = -1
            if size != full:
                proc.send_signal(signal.SIGKILL)
                partial_seen = size
                break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        if other:
            shutil.rmtree(other, ignore_errors=True)
    assert partial_seen is None, f"{target} was seen at {partial_seen} of {full} bytes while being written"
    assert torch.load(target, weights_only=True)["state_dict"]["w"].numel() == 6_000_000
    assert newest_readable_checkpoint(checkpoints_in(folder)) == target


def test_damaged_checkpoints_are_passed_over_with_a_warning(tmp_path, caplog):
    from iv2_lightning.io import checkpoint_problem, checkpoints_in, newest_readable_checkpoint

    good = tmp_path / "epoch=1.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}, "global_step": 10}, good)
    data = good.read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # cut short
    (tmp_path / "last-v1.ckpt").write_bytes(b"")  # zero bytes
    (tmp_path / ".last.ckpt.partial").write_bytes(data[:100])  # a save that was killed
    for age, name in enumerate(("last-v1.ckpt", "last.ckpt", "epoch=1.ckpt")):
        os.utime(tmp_path / name, ns=(10**18 - age * 10**9, 10**18 - age * 10**9))  # newest first
    with caplog.at_level("WARNING", logger="iv2_lightning.io"):
        assert newest_readable_checkpoint(checkpoints_in(tmp_path)) == good
    warned = [r.getMessage() for r in caplog.records if "passing over" in r.getMessage()]
    assert len(warned) == 2 and "last-v1.ckpt" in warned[0] and "last.ckpt" in warned[1]
    assert "cut short by a crash" in checkpoint_problem(tmp_path / "last.ckpt")
    assert newest_readable_checkpoint([tmp_path / "last.ckpt"]) is None


def test_an_export_that_does_not_match_its_manifest_is_refused_or_redone(tmp_path, caplog):
    import json

    from safetensors.torch import load_file, save_file

    from iv2_lightning.curriculum import read_manifest
    from iv2_lightning.models.weights import WEIGHTS_FILE, export_shared_weights, read_state_dict
    from iv2_lightning.stages.masked import MaskedVideoStage

    stage_dir = tmp_path / "stage1"
    folder = export_shared_weights(
        MaskedVideoStage(encoder={"image_size": 32, "num_frames": 4, "depth": 1, "patch_size": 8}).model,
        stage_dir / "export",
        {"stage": "stage1", "complete": True},
    )
    manifest = json.loads((folder / "manifest.json").read_text())
    weights = folder / WEIGHTS_FILE
    assert manifest["weights_bytes"] == weights.stat().st_size and len(manifest["weights_sha256"]) == 64
    assert read_manifest(stage_dir) is not None
    assert not list(folder.glob(".*"))  # no temporary file left behind

    # replaced by other weights of the same size (loads fine, but is not what was exported)
    tensors = load_file(str(weights))
    save_file({k: v + 1 for k, v in tensors.items()}, str(weights), metadata={"format": "iv2_lightning"})
    assert weights.stat().st_size == manifest["weights_bytes"]
    with pytest.raises(ValueError, match=r"weights\.safetensors does not match the sha256 in its manifest"):
        read_state_dict(folder)
    # cut short: the curriculum runs the stage again instead of skipping it
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"weights\.safetensors is 1000 bytes but its manifest records"):
        read_state_dict(folder)
    with caplog.at_level("WARNING", logger="iv2_lightning.curriculum"):
        assert read_manifest(stage_dir) is None
    assert "the stage will run again" in caplog.text


# -- bad data at scale --------------------------------------------------------------------------------


def make_media(folder: Path, good: int, broken: bool = True) -> Path:
    """``good`` copies of a real mp4 plus (when ``broken``) a truncated mp4, garbage bytes, a
    zero-length file and a missing one; returns the annotation file."""
    from iv2_lightning.data import write_annotations, write_video

    folder.mkdir(parents=True, exist_ok=True)
    frames = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    src = write_video(folder / "good.mp4", frames, fps=8)
    rows = []
    for i in range(good):
        shutil.copyfile(src, folder / f"clip{i:03d}.mp4")
        rows.append({"video": f"clip{i:03d}.mp4", "label": i % 2})
    if broken:
        data = src.read_bytes()
        (folder / "truncated.mp4").write_bytes(data[: len(data) // 2])
        (folder / "garbage.mp4").write_bytes(bytes(random.Random(0).randrange(256) for _ in range(4096)))
        (folder / "empty.mp4").write_bytes(b"")
        rows += [
            {"video": n, "label": 0} for n in ("truncated.mp4", "garbage.mp4", "empty.mp4", "missing.mp4")
        ]
    return write_annotations(folder / "train.jsonl", rows)


def tiny_trainer(tmp_path: Path, **kw) -> L.Trainer:
    from iv2_lightning.callbacks import DataErrorReport

    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[DataErrorReport(reset_each_epoch=False), *kw.pop("callbacks", [])],
        **kw,
    )


def probe(**kw):
    from iv2_lightning.stages.action import ActionStage

    torch.manual_seed(0)
    return ActionStage(
        num_classes=2, num_frames=4, image_size=32, encoder={"depth": 1, "patch_size": 16}, warmup=0, **kw
    )


def test_five_percent_corrupt_files_train_to_the_end_and_are_counted(tmp_path, caplog):
    from iv2_lightning.data import VideoTextDataModule

    ann = make_media(tmp_path / "media", good=76)  # + 4 broken = 80 rows, 5%
    dm = VideoTextDataModule(
        train_annotations=str(ann), num_frames=4, image_size=32, batch_size=8, modalities=["label"]
    )
    trainer = tiny_trainer(tmp_path, max_epochs=1)
    with caplog.at_level("WARNING", logger="iv2_lightning.callbacks.data_report"):
        trainer.fit(probe(), dm)
    assert trainer.state.finished and trainer.global_step == 10
    skipped = dm.skip_logs["train"]
    assert trainer.callback_metrics["data/skipped_train"] == skipped.count >= 4
    reasons = {Path(p).name: r for p, r in skipped.first}
    assert set(reasons) == {"truncated.mp4", "garbage.mp4", "empty.mp4", "missing.mp4"}
    assert reasons["missing.mp4"] == "file not found" and reasons["empty.mp4"] == "file is empty (0 bytes)"
    assert f"{skipped.count} sample(s) skipped" in caplog.text


def test_a_data_set_where_every_file_is_corrupt_stops_with_a_clear_error(tmp_path):
    from iv2_lightning.data import VideoTextDataModule, write_annotations

    media = tmp_path / "media"
    media.mkdir()
    rows = []
    for i in range(20):
        (media / f"bad{i}.mp4").write_bytes(os.urandom(2048))
        rows.append({"video": f"bad{i}.mp4", "label": 0})
    ann = write_annotations(media / "train.jsonl", rows)
    dm = VideoTextDataModule(
        train_annotations=str(ann),
        num_frames=4,
        image_size=32,
        batch_size=4,
        modalities=["label"],
        num_workers=1,
    )
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"50 clips in a row could not be read \(is every file broken\?\)"):
        tiny_trainer(tmp_path, max_epochs=1).fit(probe(), dm)
    assert time.monotonic() - started < 60


# -- numerical faults ---------------------------------------------------------------------------------


def nan_gradient_probe(nan_steps, **kw):
    """A probe whose loss stays finite while its gradients are NaN at ``nan_steps`` (sqrt at 0)."""
    stage = probe(**kw)
    plain = stage.compute_loss

    def compute_loss(batch):
        out = plain(batch)
        if stage.global_step in nan_steps:
            w = stage.model.head.head.weight
            out["loss"] = out["loss"] + torch.sqrt(0.0 * w.sum())  # value 0, gradient 0 * inf = NaN
        return out

    stage.compute_loss = compute_loss
    return stage


def clips(n: int = 32):
    from torch.utils.data import DataLoader

    from iv2_lightning.data.batch import VideoCollate, VideoSample

    g = torch.Generator().manual_seed(0)
    samples = [
        VideoSample(video=torch.randn(3, 4, 32, 32, generator=g), sample_id=i, label=i % 2) for i in range(n)
    ]
    return DataLoader(samples, batch_size=4, collate_fn=VideoCollate())


class WeightWatch(L.Callback):
    def __init__(self):
        self.changed = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = dict(pl_module.named_parameters())
        self.changed[batch_idx] = any(not torch.equal(now[k], v) for k, v in self.before.items())


def test_nan_gradients_skip_the_update_are_counted_and_grad_norm_is_logged(tmp_path):
    stage = nan_gradient_probe({2, 3}, max_bad_steps=3)
    watch = WeightWatch()
    trainer = tiny_trainer(
        tmp_path, max_epochs=1, gradient_clip_val=1.0, callbacks=[watch], log_every_n_steps=1
    )
    trainer.fit(stage, clips())
    assert trainer.state.finished and stage.bad_steps_total == 2
    assert watch.changed == {0: True, 1: True, 2: False, 3: False, 4: True, 5: True, 6: True, 7: True}
    assert all(torch.isfinite(p).all() for p in stage.parameters())
    assert torch.isfinite(trainer.callback_metrics["train/grad_norm"])
    assert trainer.callback_metrics["train/bad_steps"] == 2


def test_nan_gradients_in_a_row_stop_the_run(tmp_path):
    stage = nan_gradient_probe(set(range(1, 100)), max_bad_steps=3)
    with pytest.raises(FloatingPointError, match="3 training steps in a row had a non-finite gradient norm"):
        tiny_trainer(tmp_path, max_epochs=1).fit(stage, clips())
    assert all(torch.isfinite(p).all() for p in stage.parameters())


def test_non_finite_audio_input_is_a_bad_step():
    from iv2_lightning.data.batch import VideoCollate, VideoSample

    stage = probe(max_bad_steps=2)
    stage.log = lambda *a, **k: None
    audio = torch.zeros(50, 128)
    audio[3, 4] = float("inf")
    batch = VideoCollate()(
        [VideoSample(video=torch.randn(3, 4, 32, 32), sample_id=i, label=0, audio=audio) for i in range(2)]
    )
    assert stage.training_step(batch, 0) is None
    assert (
        stage.bad_steps_total == 1 and stage.non_finite_input(batch) == "non-finite values in the input audio"
    )


# -- untrusted files ------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates the marker file: stands for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {"video_encoder.cls_token": torch.zeros(1, 1, 8)}, "payload": Payload(marker)}, path
    )
    # the payload is live: a full unpickle runs it
    probe_marker = tmp_path / "probe-marker"
    torch.save({"payload": Payload(probe_marker)}, tmp_path / "probe.ckpt")
    torch.load(tmp_path / "probe.ckpt", weights_only=False)
    assert probe_marker.exists()
    yield path
    assert not marker.exists(), "a pickle ran code"


def test_init_from_refuses_a_pickle_that_runs_code(evil):
    from iv2_lightning.models.weights import read_state_dict

    with pytest.raises(ValueError, match="could not be loaded as a weights-only checkpoint"):
        read_state_dict(evil)


def test_iv2_export_and_convert_refuse_a_pickle_that_runs_code(evil, tmp_path, capsys):
    from iv2_lightning.convert import convert_main
    from iv2_lightning.export import export_main

    assert export_main([str(evil), str(tmp_path / "out.safetensors")]) == 2
    assert "could not be loaded as a weights-only checkpoint" in capsys.readouterr().err
    pth = shutil.copyfile(evil, tmp_path / "evil.pth")
    assert convert_main([str(pth), str(tmp_path / "conv.safetensors")]) == 2
    assert "weights_only=True" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "conv.safetensors").exists()


def test_curriculum_resume_refuses_a_pickle_that_runs_code(evil, tmp_path, capsys):
    from iv2_lightning.curriculum import curriculum_main

    config = write_curriculum(tmp_path / "curriculum.yaml")
    planted = tmp_path / "run" / "stage1" / "checkpoints" / "last.ckpt"
    planted.parent.mkdir(parents=True)
    shutil.copyfile(evil, planted)
    assert curriculum_main(["--config", str(config), "--output-dir", str(tmp_path / "run")]) == 1
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "refusing to load this checkpoint" in out and "last.ckpt" in out and "io.open" in out


def test_iv2_fit_resume_refuses_a_pickle_that_runs_code(evil, tmp_path):
    from iv2_lightning.io import UnsafeCheckpointError
    from iv2_lightning.lightning_cli import make_cli

    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    shutil.copyfile(evil, root / "checkpoints" / "last.ckpt")
    args = [a for a in FIT_ARGS if "StepMarker" not in a and "ckpt_path" not in a]
    with pytest.raises(UnsafeCheckpointError, match=r"last\.ckpt: refusing to load"):
        make_cli([*args, f"--trainer.default_root_dir={root}", "--ckpt_path=last"])
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt: refusing to load"):
        make_cli([*args, f"--trainer.default_root_dir={root}", f"--ckpt_path={evil}"])


# -- config errors ---------------------------------------------------------------------------------------

SHIPPED = sorted(
    p for d in ("stage1", "stage2", "stage3", "action") for p in (ROOT / "configs" / d).glob("*.yaml")
)
STRATEGIES = sorted((ROOT / "configs" / "strategy").glob("*.yaml"))


def _init_params(cls) -> dict[str, inspect.Parameter]:
    """The constructor parameters of ``cls``, following ``**kwargs`` to the base classes (as jsonargparse does)."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__)
        for name, p in sig.parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                params.setdefault(name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    return params


def _resolve(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def _hints(cls) -> dict[str, typing.Any]:
    out = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass):
            with contextlib.suppress(Exception):  # unresolvable annotations: the key counts as Any
                out.update(typing.get_type_hints(klass.__init__))
    return out


def _admits_mapping(tp) -> bool:
    """Whether a dict could be a valid value of ``tp`` (then a dict is no type error)."""
    if tp is typing.Any or tp is None:
        return True
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_admits_mapping(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return False
    if origin in (list, tuple, set):
        return False
    if origin is not None:  # dict, Mapping, Callable, ...
        return True
    return not (isinstance(tp, type) and tp in (int, float, bool, str, type(None)))


def _literal_choices(tp) -> list | None:
    """The allowed values of a ``Literal`` (also inside ``Optional`` or ``list``), else None."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return list(typing.get_args(tp))
    if origin in (typing.Union, types.UnionType, list):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _literal_choices(args[0])
    return None


def candidates(cfg: dict) -> list[tuple[tuple[str, ...], str, typing.Any]]:
    """(path to the mapping, key, annotation) of every key a mutation may hit: the init_args of model
    and data, the trainer's own keys (not its nested class specs)."""
    from lightning import Trainer

    out = []
    for section in ("model", "data"):
        node = cfg.get(section)
        if isinstance(node, dict) and "init_args" in node:
            cls = _resolve(node["class_path"])
            hints, params = _hints(cls), _init_params(cls)
            for key in node["init_args"]:
                if key in params:
                    out.append(((section, "init_args"), key, hints.get(key, typing.Any)))
    hints, params = _hints(Trainer), _init_params(Trainer)
    for key in cfg.get("trainer") or {}:
        if key in params and key != "callbacks":
            out.append((("trainer",), key, hints.get(key, typing.Any)))
    return out


def _node(cfg: dict, path: tuple[str, ...]) -> dict:
    for k in path:
        cfg = cfg[k]
    return cfg


def _mutable(kind: str, tp) -> bool:
    return (
        kind == "rename"
        or (kind == "type" and not _admits_mapping(tp))
        or (kind == "value" and bool(_literal_choices(tp)))
    )


@pytest.mark.parametrize("kind", ["rename", "type", "value"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_shipped_config_fails_at_parse_time_naming_the_key(kind, data, tmp_path_factory, capsys):
    """Rename a key, give it a value of another type, or a value outside its choices, anywhere in a
    shipped stage or strategy config: parsing (nothing is built) fails and the message names the key."""
    sys.path.insert(0, str(TESTS))
    from test_configs import parse

    stage = data.draw(st.sampled_from(SHIPPED), label="config")
    fragment = data.draw(st.one_of(st.none(), st.sampled_from(STRATEGIES)), label="strategy")
    target = fragment or stage
    cfg = yaml.safe_load(target.read_text())
    keys = [c for c in candidates(cfg) if _mutable(kind, c[2])]
    assume(keys)
    section = data.draw(st.sampled_from(sorted({w[0] for w, _, _ in keys})), label="section")
    where, key, tp = data.draw(st.sampled_from([c for c in keys if c[0][0] == section]), label="key")
    choices = _literal_choices(tp)
    event(f"{kind} {section}.{key}")
    mutated = copy.deepcopy(cfg)
    node = _node(mutated, where)
    named = key
    if kind == "rename":
        named = f"{key}_{data.draw(st.from_regex(r'[a-z]{1,4}', fullmatch=True), label='suffix')}"
        node[named] = node.pop(key)
    elif kind == "type":
        node[key] = data.draw(st.sampled_from([{"not": "a value"}, [{"nested": [1]}]]), label="value")
    else:
        bad = "x" + data.draw(st.from_regex(r"[a-z]{2,6}", fullmatch=True), label="choice")
        assert bad not in choices
        node[key] = [bad] if typing.get_origin(tp) is list or isinstance(node[key], list) else bad
    folder = tmp_path_factory.mktemp("mutated")
    path = folder / target.name
    path.write_text(yaml.safe_dump(mutated))
    args = ["--config", str(path if fragment is None else stage)]
    if fragment is not None:
        args += ["--config", str(path)]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        parse(args)
    err = capsys.readouterr().err
    assert named in err, (
        f"{kind} of {'.'.join(where)}.{key} in {target.name}: the error does not name it:\n{err[-1500:]}"
    )


# -- verified reads ------------------------------------------------------------------------------------


def _stage2_checkpoint(path: Path) -> Path:
    """A ContrastiveStage checkpoint written as every checkpoint of ours is (AtomicCheckpointIO)."""
    from iv2_lightning.io import AtomicCheckpointIO
    from iv2_lightning.stages import ContrastiveStage

    torch.manual_seed(0)
    stage = ContrastiveStage(
        preset="tiny",
        num_frames=4,
        image_size=32,
        encoder={"patch_size": 16, "tubelet_size": 2},
        text={"dim": 64, "depth": 1, "num_heads": 4},
        vtm=0,
        atc=0,
        vac=0,
        avtc=0,
        vsc=0,
    )
    hparams = {**dict(stage.hparams), "_class_path": "iv2_lightning.stages.contrastive.ContrastiveStage"}
    AtomicCheckpointIO().save_checkpoint(
        {"state_dict": stage.state_dict(), "hyper_parameters": hparams}, path
    )
    return path


def _flip_middle(path: Path, n: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def test_a_checkpoint_damaged_in_the_middle_is_refused_by_every_reader(tmp_path, capsys):
    from iv2_lightning.export import export_main
    from iv2_lightning.files import RECORD_SUFFIX, DamagedCheckpointError, verify_file
    from iv2_lightning.io import AtomicCheckpointIO, checkpoint_problem
    from iv2_lightning.models.weights import read_state_dict
    from iv2_lightning.stages import ContrastiveStage
    from iv2_lightning.use.checkpoints import load_model
    from iv2_lightning.use.common import UseError
    from iv2_lightning.use.embed import embed_main

    ckpt = _stage2_checkpoint(tmp_path / "stage2" / "checkpoints" / "last.ckpt")
    record = ckpt.with_name(ckpt.name + RECORD_SUFFIX)
    assert record.is_file() and verify_file(ckpt)[0] == "verified"
    load_model(ckpt, ContrastiveStage)
    assert "could not be verified" not in capsys.readouterr().err

    _flip_middle(ckpt)  # same size, 4 KiB changed: torch.load alone would not notice
    status, message = verify_file(ckpt)
    assert status == "damaged" and "sha256" in message and "last.ckpt" in message
    with pytest.raises(UseError, match="is damaged"):
        load_model(ckpt, ContrastiveStage)
    videos = make_media(tmp_path / "media", 1, broken=False)
    assert (
        embed_main(["--ckpt", str(ckpt), "--videos", str(videos), "--out", str(tmp_path / "i.safetensors")])
        == 2
    )
    assert "is damaged" in capsys.readouterr().err
    assert export_main([str(ckpt), str(tmp_path / "export")]) == 2
    assert "is damaged" in capsys.readouterr().err
    from iv2_lightning.cli import main as iv2_main

    assert (
        iv2_main(["test", "--config", str(ROOT / "configs/eval/retrieval.yaml"), f"--ckpt_path={ckpt}"]) == 2
    )
    assert "is damaged" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"init_from: .*is damaged"):
        read_state_dict(ckpt)
    with pytest.raises(DamagedCheckpointError):
        AtomicCheckpointIO().load_checkpoint(ckpt)
    assert "is damaged" in checkpoint_problem(ckpt)

    ckpt.write_bytes(ckpt.read_bytes()[:-10])  # cut short: caught by the size before any hashing
    assert "records" in verify_file(ckpt)[1] and verify_file(ckpt)[0] == "damaged"

    other = _stage2_checkpoint(tmp_path / "other.ckpt")  # a file without a record still loads, noted
    other.with_name(other.name + RECORD_SUFFIX).unlink()
    load_model(other, ContrastiveStage)
    assert "could not be verified" in capsys.readouterr().err


def test_resume_passes_over_a_damaged_checkpoint_to_the_newest_intact_one(tmp_path, caplog):
    from iv2_lightning.files import save_checkpoint_file
    from iv2_lightning.io import checkpoints_in, newest_readable_checkpoint

    old = save_checkpoint_file(
        {"state_dict": {"w": torch.ones(4000)}, "global_step": 1}, tmp_path / "epoch=0.ckpt"
    )
    new = save_checkpoint_file(
        {"state_dict": {"w": torch.zeros(4000)}, "global_step": 2}, tmp_path / "last.ckpt"
    )
    os.utime(old, ns=(10**18 - 10**9, 10**18 - 10**9))
    os.utime(new, ns=(10**18, 10**18))
    _flip_middle(new, 64)
    with caplog.at_level("WARNING", logger="iv2_lightning.io"):
        assert newest_readable_checkpoint(checkpoints_in(tmp_path)) == old
    assert any("last.ckpt is damaged" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("killed", ["before the rename", "after the rename"])
def test_a_kill_while_a_checkpoint_replaces_another_leaves_a_pair_that_verifies(
    tmp_path, monkeypatch, killed
):
    """The record accepts the old file and the new one until the new one is in place."""
    import iv2_lightning.files as files

    path = tmp_path / "last.ckpt"
    files.save_checkpoint_file({"step": torch.tensor(1)}, path)

    class Killed(Exception):
        pass

    if killed == "before the rename":  # the new record is in place, the checkpoint's rename never happens
        real_replace = os.replace

        def replace(src, dst):
            if Path(dst) == path:
                raise Killed()
            return real_replace(src, dst)

        monkeypatch.setattr(files.os, "replace", replace)
    else:
        real = files.write_file_record
        calls = []

        def record_then_die(p, digest, previous=None):
            calls.append(previous)
            if len(calls) == 2:  # the final record, after the rename
                raise Killed()
            return real(p, digest, previous)

        monkeypatch.setattr(files, "write_file_record", record_then_die)
    with pytest.raises(Killed):
        files.save_checkpoint_file({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert files.verify_file(path)[0] == "verified"
    record = json.loads(files.record_path(path).read_text())
    assert "previous" in record  # the kill did fall between the two record writes
    step = int(files.load_checkpoint_file(path)["step"])
    assert step == (1 if killed == "before the rename" else 2)


# -- a full disk -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def files_limited_to(max_bytes: int):
    """Writes past ``max_bytes`` into any file fail part-way (``RLIMIT_FSIZE``: the write returns EFBIG
    once SIGXFSZ is ignored), as on a full disk; for every writer (torch's C++ zip writer, safetensors'
    Rust one, Python files) in this process, until the block ends."""
    import resource

    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_write_that_fails_part_way_leaves_the_previous_checkpoint_and_export_intact(tmp_path):
    from iv2_lightning.files import save_checkpoint_file, verify_file
    from iv2_lightning.models.weights import export_problem, export_shared_weights, read_state_dict

    ckpt = save_checkpoint_file(
        {"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, tmp_path / "last.ckpt"
    )
    model = torch.nn.Module()
    model.video_encoder = torch.nn.Linear(10, 10)
    export = tmp_path / "export"
    export_shared_weights(model, export, {"stage": "test"})
    before = {p.name: p.read_bytes() for p in [ckpt, *export.iterdir()]}
    bigger = {"state_dict": {"w": torch.ones(200_000)}, "global_step": 2}  # 800 kB, past the limit
    model.video_encoder = torch.nn.Linear(300, 300)  # 360 kB of weights
    with files_limited_to(64 * 1024):
        with pytest.raises(OSError, match=r"could not write .*last\.ckpt .*untouched"):
            save_checkpoint_file(bigger, ckpt)
        with pytest.raises(Exception) as err:
            export_shared_weights(model, export, {"stage": "test"})
    assert "weights.safetensors" in str(err.value) + " ".join(getattr(err.value, "__notes__", []))
    # the previous files, byte for byte, still verified and loadable; no partial file left behind
    assert {p.name: p.read_bytes() for p in [ckpt, *export.iterdir()]} == before
    assert verify_file(ckpt)[0] == "verified" and int(torch.load(ckpt, weights_only=True)["global_step"]) == 1
    assert export_problem(export, json.loads((export / "manifest.json").read_text())) is None
    assert read_state_dict(export)[0]["video_encoder.weight"].shape == (10, 10)
    assert not [p for p in tmp_path.rglob(".*.partial")]


# -- a lost rank ---------------------------------------------------------------------------------------

DDP_ARGS = [a for a in FIT_ARGS if not a.startswith("--data.init_args.batch_size")] + [
    "--trainer.accelerator=cpu",
    "--trainer.devices=2",
    "--trainer.strategy=ddp",
    "--data.init_args.batch_size=2",  # 16 clips over 2 ranks: 4 steps per epoch, as FIT_ARGS
]


def start_ddp(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``python -m iv2_lightning`` (Lightning starts rank 1 by running the same command again)."""
    out = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "iv2_lightning", *args], env=env, stdout=out, stderr=out, cwd=ROOT
    )


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["rank 1", "rank 0"])
def test_a_lost_rank_stops_the_survivor_and_the_rerun_ends_as_an_uninterrupted_run(tmp_path, lost):
    """2 gloo processes; one is SIGKILLed in the middle of epoch 2: the other stops within seconds
    with a message saying what happened (no hang), and the same command again resumes from the last
    epoch-end checkpoint to the weights of an uninterrupted 2-process run."""
    import psutil

    log = tmp_path / "steps.log"
    whole = start_ddp(
        [*DDP_ARGS, f"--trainer.default_root_dir={tmp_path / 'whole'}"],
        child_env(log),
        tmp_path / "whole.out",
    )
    finish(whole, tmp_path / "whole.out")
    args = [*DDP_ARGS, f"--trainer.default_root_dir={tmp_path / 'killed'}"]
    parent = start_ddp(args, child_env(log), tmp_path / "killed.out")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not [s for s in steps_in(log, "killed") if s >= 6]:
        time.sleep(0.01)
    ranks = {"rank 0": psutil.Process(parent.pid), "rank 1": psutil.Process(parent.pid).children()[0]}
    ranks[lost].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    if lost == "rank 1":  # the survivor is our own child: its exit code is ours to read
        assert parent.wait(timeout=120) == 3  # a hang would fail here
    else:
        ranks["rank 1"].wait(timeout=120)
    stopped_after = time.monotonic() - t0
    out = (tmp_path / "killed.out").read_text()
    assert "lost contact with another process of this run" in out and "--ckpt_path last" in out
    assert stopped_after < 60, stopped_after
    again = start_ddp(args, child_env(log), tmp_path / "again.out")
    finish(again, tmp_path / "again.out")
    diff = assert_same_training_state(
        tmp_path / "whole" / "checkpoints" / "last.ckpt", tmp_path / "killed" / "checkpoints" / "last.ckpt"
    )
    assert diff == 0.0
