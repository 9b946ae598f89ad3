"""Fuzzing the readers (docs/reliability.md): hypothesis-generated annotation rows and byte-mutated
media never raise anything but a clear error naming the row or the file, and whatever they let
through collates into a batch; a data loader worker never dies on them."""

from __future__ import annotations

import csv
import io
import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from iv2_lightning.data import write_annotations, write_video
from iv2_lightning.data.annotations import AnnotationError, load_annotations
from iv2_lightning.data.batch import VideoCollate, VideoSample
from iv2_lightning.data.datasets import VideoTextDataset
from iv2_lightning.data.transforms import VideoTransform
from iv2_lightning.data.video_io import SAMPLINGS, VideoDecodeError, read_clip

torch.set_num_threads(1)

FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# any text; the odd characters (a lone surrogate, which JSON escapes as "\ud800" and which cannot be
# encoded later, a NUL, a non-BMP emoji) drawn often, not once in a million
TEXT = st.text(
    st.sampled_from(["a", " ", "\ud800", "\x00", "\u00e9", "\U0001f600"]) | st.characters(codec=None),
    max_size=8,
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
KEYS = ["video", "caption", "asr", "speech", "audio_caption", "label", "start", "end", "qa", "text", "x"]
SECONDS = (
    st.floats(-2, 30) | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(["1.5", "nan", "-1"])
)
VALID = st.fixed_dictionaries(
    {"video": st.from_regex(r"[a-z]{1,6}\.mp4", fullmatch=True)},
    optional={
        "caption": st.text(max_size=10) | st.lists(st.text(max_size=10), max_size=2),
        "asr": st.text(max_size=10),
        "label": st.integers(0, 9),
        "start": st.floats(0, 5),
        "end": st.floats(6, 10),
        "qa": st.lists(st.tuples(st.text(max_size=6), st.text(max_size=6)), max_size=2),
    },
)
# the value a row may carry in one field: of the right kind but out of range, or of any kind
WILD = {
    "video": TEXT | JSON,
    "caption": TEXT | st.lists(TEXT, max_size=3) | JSON,
    "asr": TEXT | JSON,
    "audio_caption": TEXT | JSON,
    "label": st.sampled_from([2**63, -(2**63) - 1, 2**70, -1, "7", "٣", "1.5"]) | st.integers() | JSON,
    "start": SECONDS | JSON,
    "end": SECONDS | JSON,
    "qa": st.lists(st.tuples(TEXT, TEXT), max_size=2) | st.lists(JSON, max_size=2) | TEXT | JSON,
}


@st.composite
def rows(draw) -> dict:
    """A valid row with one field made wild, or a row of anything."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), JSON, max_size=5))
    row = draw(VALID)
    key = draw(st.sampled_from(sorted(WILD)))
    row[key] = draw(WILD[key])
    return row


LINE = st.one_of(
    rows().map(json.dumps),
    rows().map(json.dumps),
    rows().map(json.dumps),
    JSON.map(json.dumps),
    st.binary(max_size=30),
    TEXT,
    st.integers(1, 5000).map(lambda depth: "[" * depth + "]" * depth),  # nested too deeply for json
)


def check_rows(path, rows, errors) -> None:
    """Every error names the file and the line; every row that got through is what the rest of
    the pipeline expects, and collates."""
    for err in errors:
        assert isinstance(err, AnnotationError) and err.path == str(path) and err.line >= 0 and err.reason
        assert str(err).startswith(f"{path}:{err.line}: ")
    for row in rows:
        assert isinstance(row.video, str) and row.video
        assert all(isinstance(c, str) for c in row.caption)
        assert row.label is None or (isinstance(row.label, int) and -(2**63) <= row.label < 2**63)
        for t in (row.start, row.end):
            assert t is None or (math.isfinite(t) and t >= 0)
        if row.start is not None and row.end is not None:
            assert row.end > row.start
        assert all(isinstance(q, str) and isinstance(a, str) for q, a in row.qa)
    samples = [
        VideoSample(
            video=torch.zeros(3, 2, 8, 8),
            sample_id=i,
            caption=row.caption[0] if row.caption else None,
            speech=row.asr,
            label=row.label,
            qa=list(row.qa),
        )
        for i, row in enumerate(rows)
    ]
    if samples:
        assert len(VideoCollate()(samples)) == len(samples)


@FUZZ
@given(lines=st.lists(LINE, max_size=6))
# the kinds of row that once got through, or crashed the reader (found by this test)
@example(lines=[json.dumps({"video": "a.mp4", "label": 2**63})])  # overflowed the int64 label tensor
@example(lines=[json.dumps({"video": "a.mp4", "start": float("nan")})])  # NaN seek time
@example(lines=[json.dumps({"video": "a.mp4", "start": -1.0})])
@example(lines=[json.dumps({"video": "a.mp4", "caption": "\ud800"})])  # failed in the tokenizer
@example(lines=["[" * 5000 + "]" * 5000])  # RecursionError in json
def test_fuzzed_jsonl_rows_load_or_are_reported_by_line(lines, tmp_path_factory):
    path = tmp_path_factory.mktemp("ann") / "ann.jsonl"
    path.write_bytes(
        b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8", "surrogatepass") for x in lines)
    )
    rows, errors = load_annotations(path, on_error="skip")
    check_rows(path, rows, errors)
    if errors:
        with pytest.raises(AnnotationError) as raised:
            load_annotations(path, on_error="raise")
        assert raised.value.line == errors[0].line
    else:
        assert len(load_annotations(path, on_error="raise")[0]) == len(rows)


@FUZZ
@given(
    header=st.lists(st.sampled_from(KEYS) | st.text(max_size=5), min_size=1, max_size=5),
    cells=st.lists(st.lists(st.text(max_size=10) | st.binary(max_size=6), max_size=6), max_size=5),
)
def test_fuzzed_csv_rows_load_or_are_reported_by_line(header, cells, tmp_path_factory):
    path = tmp_path_factory.mktemp("ann") / "ann.csv"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    for row in cells:
        writer.writerow([c.decode("latin-1") if isinstance(c, bytes) else c for c in row])
    path.write_bytes(buf.getvalue().encode("utf-8", "surrogatepass"))
    rows, errors = load_annotations(path, on_error="skip")
    check_rows(path, rows, errors)


# -- media ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A real mp4 (H.264 + AAC, 2 s, 32 x 32) and an annotation row for it."""
    folder = tmp_path_factory.mktemp("media")
    frames = np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    wave = (0.3 * np.sin(np.linspace(0, 2000, 32000))).astype(np.float32)
    return write_video(folder / "good.mp4", frames, fps=8, audio=wave)  # a path: short in hypothesis reports


def mutate(data: bytes, how) -> bytes:
    kind, *args = how
    b = bytearray(data)
    if kind == "truncate":
        return bytes(b[: args[0] % (len(b) + 1)])
    if kind == "flip":
        for pos, value in args[0]:
            b[pos % len(b)] = value
        return bytes(b)
    if kind == "zero":
        start = args[0] % len(b)
        b[start : start + args[1]] = bytes(len(b[start : start + args[1]]))
        return bytes(b)
    if kind == "insert":
        pos = args[0] % (len(b) + 1)
        return bytes(b[:pos] + args[1] + b[pos:])
    src, dst, n = (a % len(b) for a in args)  # "copy": a run of the file's own bytes elsewhere
    return bytes(b[:dst] + b[src : src + n] + b[dst:])


POSITION = st.integers(0, 1 << 20) | st.integers(0, 200)  # anywhere, and often in the headers
MUTATION = st.one_of(
    st.tuples(st.just("truncate"), POSITION),
    st.tuples(st.just("flip"), st.lists(st.tuples(POSITION, st.integers(0, 255)), min_size=1, max_size=24)),
    st.tuples(st.just("zero"), POSITION, st.integers(1, 4000)),
    st.tuples(st.just("insert"), POSITION, st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("copy"), POSITION, POSITION, st.integers(1, 400)),
)


@FUZZ
@given(how=MUTATION, sampling=st.sampled_from(SAMPLINGS), audio=st.booleans(), seed=st.integers(0, 9))
def test_mutated_media_decodes_or_is_skipped_with_a_reason(
    media, how, sampling, audio, seed, tmp_path_factory
):
    folder = tmp_path_factory.mktemp("mutated")
    original = media.read_bytes()
    data = mutate(original, how)
    (folder / "bad.mp4").write_bytes(data)
    (folder / "good.mp4").write_bytes(original)
    # the streaming path decodes bytes in memory: a clip, or a VideoDecodeError with a reason
    try:
        clip = read_clip(
            io.BytesIO(data), num_frames=4, size=32, audio=audio, sampling=sampling, rng=random.Random(seed)
        )
    except VideoDecodeError as err:
        assert err.reason and "<BytesIO>" in str(err)
    else:
        assert (
            clip.video.dtype == torch.uint8
            and clip.video.shape[:2] == (3, 4)
            and min(clip.video.shape[2:]) == 32
        )
        assert len(clip.frame_times) == 4 and all(math.isfinite(t) for t in clip.frame_times)
        assert clip.audio is None or (clip.audio.ndim == 2 and bool(torch.isfinite(clip.audio).all()))
    # the file path: the dataset returns a sample, the broken file named in its skip record
    ann = write_annotations(
        folder / "ann.jsonl", [{"video": "bad.mp4", "caption": "x"}, {"video": "good.mp4"}]
    )
    modalities = ["caption", "audio"] if audio else ["caption"]
    ds = VideoTextDataset(
        ann, num_frames=4, train=True, transform=VideoTransform(32, train=True), modalities=modalities
    )
    sample = ds[0]
    assert sample.video.shape == (3, 4, 32, 32) and bool(torch.isfinite(sample.video).all())
    for path, reason in sample.meta["skipped"]:
        assert path == str(folder / "bad.mp4") and reason
    assert len(VideoCollate()([sample, sample])) == 2
