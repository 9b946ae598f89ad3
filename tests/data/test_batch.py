"""VideoBatch and VideoCollate: padding, missing modalities, dialogue targets, device moves."""

import pytest
import torch

from iv2_lightning.data.batch import SkippedSample, VideoBatch, VideoCollate, VideoSample
from iv2_lightning.models.text import ByteTokenizer


def sample(i, **kw):
    return VideoSample(video=torch.full((3, 2, 4, 4), float(i)), sample_id=i, **kw)


def test_collate_pads_text_and_audio_and_marks_missing_modalities():
    batch = VideoCollate()(
        [
            sample(0, caption="a red circle", audio=torch.ones(30, 128), speech="hello there", label=1),
            sample(1, caption="blue", audio=None, speech=None, label=None),
        ]
    )
    assert batch.video.shape == (2, 3, 2, 4, 4)
    assert batch.sample_id.tolist() == [0, 1]
    tok = ByteTokenizer()
    assert batch.caption_ids.shape == (2, len("a red circle") + 2)  # padded to the longest (+BOS/EOS)
    assert batch.caption_mask.sum(1).tolist() == [14, 6]
    assert tok.decode(batch.caption_ids[1]) == "blue"
    assert batch.audio.shape == (2, 30, 128)
    assert batch.audio_mask.tolist() == [True, False]
    assert batch.audio_frame_mask.sum(1).tolist() == [30, 0]
    assert torch.equal(batch.audio[1], torch.zeros(30, 128))
    assert batch.speech_mask[1].any().item() is False and batch.speech_mask[0].all().item()
    assert batch.label.tolist() == [1, -100]
    assert batch.present("label").tolist() == [True, False]
    assert batch.present("speech").tolist() == [True, False]
    assert batch.present("audio").tolist() == [True, False]
    assert batch.captions == ["a red circle", "blue"]
    assert batch.dialogue_ids is None and batch.present("dialogue").tolist() == [False, False]


def test_batch_without_a_modality_has_none():
    batch = VideoCollate()([sample(0), sample(1)])
    assert (
        batch.audio is None and batch.caption_ids is None and batch.label is None and batch.speech_ids is None
    )
    assert batch.present("caption").tolist() == [False, False]
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        batch.present("smell")


def test_audio_longer_than_the_limit_is_cut():
    batch = VideoCollate(max_audio_frames=10)([sample(0, audio=torch.randn(25, 128))])
    assert batch.audio.shape == (1, 10, 128)


def test_dialogue_targets_cover_exactly_the_answers():
    tok = ByteTokenizer()
    batch = VideoCollate(tokenizer=tok)(
        [sample(0, qa=[("what color?", "red"), ("shape?", "circle")]), sample(1)]
    )
    ids, target = batch.dialogue_ids[0], batch.dialogue_target_mask[0]
    answers = tok.decode(ids[target])
    assert answers == " red\n circle\n"  # the answers (and the final EOS, a special token)
    assert ids[target][-1].item() == tok.eos_id
    assert "what color?" in tok.decode(ids[batch.dialogue_mask[0]])
    assert batch.dialogue_mask[1].sum().item() == 2 and not batch.dialogue_target_mask[1].any()


def test_to_moves_every_tensor_and_keeps_the_rest():
    batch = VideoCollate()([sample(0, caption="x", meta={"path": "a.mp4"})])
    moved = batch.to("cpu")
    assert isinstance(moved, VideoBatch) and moved.meta == [{"path": "a.mp4"}]
    assert moved.video.data_ptr() == batch.video.data_ptr()  # same device: no copy
    meta_batch = batch.to("meta")
    assert meta_batch.video.device.type == "meta" and meta_batch.caption_ids.device.type == "meta"
    assert meta_batch.captions == ["x"]


def test_skipped_samples_are_dropped_and_reported():
    batch = VideoCollate()([sample(0), SkippedSample("bad.mp4", "truncated"), sample(2)])
    assert batch.sample_id.tolist() == [0, 2]
    assert batch.meta[0]["skipped"] == [("bad.mp4", "truncated")]
    with pytest.raises(
        RuntimeError, match=r"every sample of a batch failed to load \(1\); first: bad.mp4: truncated"
    ):
        VideoCollate()([SkippedSample("bad.mp4", "truncated")])


def test_bad_samples_are_named():
    with pytest.raises(ValueError, match=r"one shape \[3, T, H, W\]"):
        VideoCollate()([sample(0), VideoSample(video=torch.zeros(3, 4, 4, 4), sample_id=1)])
    with pytest.raises(
        ValueError, match=r"audio of sample 1 \(x.mp4\) must be fbank \[F, 128\]; got \(5, 64\)"
    ):
        VideoCollate()(
            [
                sample(0, audio=torch.zeros(5, 128)),
                sample(1, audio=torch.zeros(5, 64), meta={"path": "x.mp4"}),
            ]
        )
    with pytest.raises(ValueError, match="empty list"):
        VideoCollate()([])
