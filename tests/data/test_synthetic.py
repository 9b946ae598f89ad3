"""The synthetic multimodal dataset: determinism, the order-only direction (symmetry of the frame
set under the four directions, pixel-exact reversal, a hand-written tracker that needs the order),
consistency of captions / speech / QA / audio with the attributes, collation, and ``iv2 synth``."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace

import av
import pytest
import torch

from iv2_lightning.data.batch import VideoBatch, VideoCollate, VideoSample
from iv2_lightning.data.synthetic import (
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLORS,
    DIRECTION_ADVERBS,
    DIRECTIONS,
    SAMPLE_RATE,
    SHAPES,
    SyntheticClip,
    SyntheticVideoDataset,
    attributes_from_text,
    direction_prompts,
    generate_clip,
    lattice_shear,
    render_clip,
    sample_params,
    synth_main,
    with_direction,
)
from iv2_lightning.data.synthetic.render import _background
from iv2_lightning.data.transforms import VideoTransform

CAPTION_KEYS = ("color", "shape", "direction")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # the checks run many tiny tensor ops; intra-op threads only add waiting when the CPU is shared
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clip_digest(clip: SyntheticClip) -> str:
    h = hashlib.sha256(clip.frames.numpy().tobytes())
    if clip.waveform is not None:
        h.update(clip.waveform.numpy().tobytes())
    h.update(json.dumps([clip.caption, clip.speech, clip.audio_caption, clip.qa, clip.attributes]).encode())
    return h.hexdigest()


def chi2_homogeneity_pvalue(table: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test that the rows of a count table share one distribution."""
    table = table.double()
    keep = table.sum(0) > 0
    table = table[:, keep]
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    stat = ((table - expected) ** 2 / expected).sum()
    df = (table.shape[0] - 1) * (table.shape[1] - 1)
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))


# --------------------------------------------------------------------------- basics


@pytest.mark.parametrize(("num_frames", "image_size"), [(8, 64), (16, 128), (8, 224), (5, 100)])
def test_clip_shapes_dtypes_and_fields(num_frames, image_size):
    clip = generate_clip(1, num_frames=num_frames, image_size=image_size, fps=8.0)
    assert clip.frames.shape == (num_frames, image_size, image_size, 3)
    assert clip.frames.dtype == torch.uint8
    assert clip.waveform.dtype == torch.float32
    assert clip.waveform.shape == (round(num_frames / 8.0 * SAMPLE_RATE),)
    assert clip.waveform.abs().max() <= 1.0
    assert clip.sample_rate == SAMPLE_RATE
    assert all(isinstance(s, str) and s for s in (clip.caption, clip.speech, clip.audio_caption))
    assert 2 <= len(clip.qa) <= 3
    assert clip.label == DIRECTIONS.index(clip.attributes["direction"])
    attrs = clip.attributes
    assert attrs["color"] in COLORS and attrs["shape"] in SHAPES and attrs["background"] in BACKGROUNDS
    assert attrs["num_objects"] == len(attrs["objects"]) == 1
    json.dumps(attrs)  # annotation rows need JSON-serialisable attributes


def test_audio_length_follows_fps():
    assert generate_clip(0, num_frames=8, fps=4.0).waveform.shape == (2 * SAMPLE_RATE,)
    assert generate_clip(0, with_audio=False).waveform is None


def test_lattice_shear_and_spacing():
    assert [lattice_shear(t) for t in (5, 7, 8, 16)] == [2, 2, 3, 3]
    for t in (5, 7, 8, 9, 10, 12, 16, 32):
        a = lattice_shear(t)
        assert math.gcd(a, t) == 1 and a % t not in (1, t - 1)
    for t in (2, 3, 4, 6):
        with pytest.raises(ValueError, match=f"num_frames={t} is not supported"):
            lattice_shear(t)


@pytest.mark.parametrize(("num_frames", "image_size"), [(8, 64), (16, 128), (5, 40), (8, 32)])
def test_wallpaper_copies_are_spread_and_never_touch(num_frames, image_size):
    for i in range(20):
        p = sample_params(i, num_frames=num_frames, image_size=image_size, max_objects=2)
        for obj in p.objects:
            pts = torch.tensor(obj.copies(0))
            assert len(pts) == num_frames
            # torus distance between every pair of copies: at least sqrt(5) steps, > 2 radii + a gap
            d = (pts[:, None] - pts[None]).abs()
            d = torch.minimum(d, image_size - d).norm(dim=-1) + torch.eye(num_frames) * 1e9
            assert d.min() >= math.sqrt(5) * obj.step - 1e-4
            assert d.min() > 2 * 1.16 * obj.radius  # a square's corner reaches 1.16 x radius


def test_invalid_geometry_is_rejected():
    with pytest.raises(ValueError, match="num_frames=4"):
        generate_clip(0, num_frames=4, image_size=64)
    with pytest.raises(ValueError, match="divisible by num_frames 8"):
        generate_clip(0, num_frames=8, image_size=100)
    with pytest.raises(ValueError, match="too small"):
        generate_clip(0, num_frames=16, image_size=16)
    with pytest.raises(ValueError, match="max_objects"):
        SyntheticVideoDataset(max_objects=3)
    with pytest.raises(ValueError, match="fps"):
        generate_clip(0, fps=0)


# --------------------------------------------------------------------------- determinism


def test_same_seed_split_index_gives_identical_bytes():
    for i in (0, 7, 1234):
        assert clip_digest(generate_clip(i, "val", 3)) == clip_digest(generate_clip(i, "val", 3))
    assert clip_digest(generate_clip(0, seed=0)) != clip_digest(generate_clip(0, seed=1))


def test_identical_bytes_in_another_process():
    # a fresh interpreter with another hash salt: seeds must not come from Python's salted hash()
    code = (
        "import hashlib, json; from iv2_lightning.data.synthetic import generate_clip;"
        "c = generate_clip(5, 'test', 2, max_objects=2);"
        "h = hashlib.sha256(c.frames.numpy().tobytes()); h.update(c.waveform.numpy().tobytes());"
        "h.update(json.dumps([c.caption, c.speech, c.audio_caption, c.qa, c.attributes]).encode());"
        "print(h.hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == clip_digest(generate_clip(5, "test", 2, max_objects=2))


def test_splits_are_disjoint_streams():
    digests = {
        split: {
            hashlib.sha256(generate_clip(i, split, with_audio=False).frames.numpy()).hexdigest()
            for i in range(60)
        }
        for split in ("train", "val", "test")
    }
    assert all(len(d) == 60 for d in digests.values())
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]


# --------------------------------------------------------------------------- the direction is temporal


def test_every_direction_shows_every_coset_once():
    for i in range(40):
        for num_frames, size in ((8, 64), (16, 128), (5, 40)):
            obj = sample_params(i, num_frames=num_frames, image_size=size).objects[0]
            for d in DIRECTIONS:
                assert sorted(with_direction(obj, d).cosets()) == list(range(num_frames))


def test_one_step_of_the_motion_is_the_wallpaper_translated_by_the_step():
    # the coset arithmetic is the picture: frame t+1 is frame t rolled by `step` pixels along the
    # clip's direction (the torus wraps), for every direction, frame count and size
    for i in range(8):
        for num_frames, size in ((8, 64), (16, 128), (5, 40)):
            # on a plain background the frame minus the background is the (coloured) wallpaper alone
            params = replace(sample_params(i, num_frames=num_frames, image_size=size), background="plain")
            obj = params.objects[0]
            for d in DIRECTIONS:
                clip = replace(params, objects=(with_direction(obj, d),))
                f = render_clip(clip).int() - torch.from_numpy(_background(clip)).round().int()[..., None]
                dx, dy = with_direction(obj, d).velocity()
                moved = torch.roll(f[:-1], shifts=(dy * obj.step, dx * obj.step), dims=(1, 2))
                assert (moved - f[1:]).abs().max() <= 1, (i, num_frames, d)


def test_all_four_directions_have_the_same_set_of_frames():
    for i in range(10):
        params = sample_params(i)
        obj = params.objects[0]
        bags, clips = [], []
        for d in DIRECTIONS:
            frames = render_clip(replace(params, objects=(with_direction(obj, d),)))
            bags.append(sorted(f.numpy().tobytes() for f in frames))
            clips.append(frames)
        assert all(b == bags[0] for b in bags)  # pixel-exact: the same multiset of frames
        assert all(not torch.equal(a, b) for a, b in itertools.combinations(clips, 2))


@pytest.mark.parametrize(("backward", "forward"), [("left", "right"), ("up", "down")])
def test_reversed_clip_is_pixel_exactly_the_opposite_direction(backward, forward):
    for i in range(12):
        params = sample_params(i, max_objects=1)
        obj = with_direction(params.objects[0], backward)
        mirrored = with_direction(obj, forward, start=obj.cosets()[-1])
        assert torch.equal(
            render_clip(replace(params, objects=(obj,))).flip(0),
            render_clip(replace(params, objects=(mirrored,))),
        )


def test_clip_parameters_other_than_direction_are_independent_of_it():
    n = 4000
    start = torch.zeros(4, 8, dtype=torch.long)
    origin = torch.zeros(4, 16, dtype=torch.long)
    shape = torch.zeros(4, len(SHAPES), dtype=torch.long)
    dirs = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        params = sample_params(i, split="stats")
        obj = params.objects[0]
        d = DIRECTIONS.index(obj.direction)
        dirs[i] = d
        start[d, obj.start] += 1
        ox, oy = obj.origin
        origin[d, 4 * int(4 * oy // params.image_size) + int(4 * ox // params.image_size)] += 1
        shape[d, SHAPES.index(obj.shape)] += 1
    assert (torch.bincount(dirs, minlength=4) > 0.22 * n).all()
    for table in (start, origin, shape):
        assert chi2_homogeneity_pvalue(table) > 1e-3, table


def phase_shift(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """The shortest translation (dx, dy) on the torus that maps frame ``a`` onto ``b``: the circular
    cross-correlation of the saturation maps peaks at every translation that does (the wallpaper
    repeats along its lattice), and the eye picks the shortest of them."""
    sat = [f.float().max(-1).values - f.float().min(-1).values for f in (a, b)]
    fa, fb = (torch.fft.fft2(s - s.mean()) for s in sat)
    cross = fb * fa.conj()
    corr = torch.fft.ifft2(cross).real
    h, w = corr.shape
    dy, dx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dx, dy = torch.where(dx > w // 2, dx - w, dx), torch.where(dy > h // 2, dy - h, dy)
    peaks = corr >= 0.98 * corr.max()
    norm = torch.where(peaks, (dx * dx + dy * dy).float(), torch.inf)
    i = int(norm.argmin())
    return int(dx.flatten()[i]), int(dy.flatten()[i])


def tracker_direction(frames: torch.Tensor) -> str:
    """Sum of the consecutive frames' displacements: its dominant axis and sign are the direction."""
    sx = sy = 0
    for a, b in itertools.pairwise(frames):
        dx, dy = phase_shift(a, b)
        sx, sy = sx + dx, sy + dy
    if abs(sx) >= abs(sy):
        return "right" if sx > 0 else "left"
    return "down" if sy > 0 else "up"


def test_tracker_reads_direction_from_ordered_frames_but_not_from_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    hits = shuffled = 0
    n = 120
    for i in range(n):
        clip = generate_clip(i, "val", with_audio=False)
        truth = clip.attributes["direction"]
        hits += tracker_direction(clip.frames) == truth
        shuffled += tracker_direction(clip.frames[torch.randperm(len(clip.frames), generator=g)]) == truth
    assert hits == n
    assert shuffled / n <= 0.40
    big = generate_clip(0, image_size=224, num_frames=16, with_audio=False)
    assert tracker_direction(big.frames) == big.attributes["direction"]


# --------------------------------------------------------------------------- text and audio


def test_captions_parse_back_to_the_attributes():
    verbs = set()
    adverbs = set()
    for i in range(400):
        clip = generate_clip(i, with_audio=False)
        parsed = attributes_from_text(clip.caption)
        assert parsed == {k: clip.attributes[k] for k in CAPTION_KEYS}, clip.caption
        words = clip.caption.split()
        if words[1] == "motion":  # "{adj} motion of {a}"
            verbs.add("motion")
        else:  # "{a|the} <color> <shape> <verb> <adverb>"
            verbs.add(words[3])
            adverbs.add(" ".join(words[4:]))
    assert len(verbs) == len(CAPTION_TEMPLATES)  # every template is used
    assert adverbs == {a for ws in DIRECTION_ADVERBS.values() for a in ws}
    # every template with every colour, shape and direction (the attribute prompts cover them all)
    for d, prompts in direction_prompts().items():
        for p in prompts:
            parsed = attributes_from_text(p)
            assert parsed["direction"] == d, p
            assert set(parsed) in ({"direction"}, set(CAPTION_KEYS)), p


def test_attributes_from_text_examples():
    assert attributes_from_text("the blue square slides to the left") == {
        "color": "blue",
        "shape": "square",
        "direction": "left",
    }
    assert attributes_from_text("Rightward motion of a YELLOW cross.") == {
        "color": "yellow",
        "shape": "cross",
        "direction": "right",
    }
    assert attributes_from_text("a green thing") == {"color": "green"}
    assert attributes_from_text("") == {}
    assert attributes_from_text("a big circle on a striped background")["background"] == "stripes"


def test_direction_prompts():
    prompts = direction_prompts()
    assert tuple(prompts) == DIRECTIONS
    assert prompts["left"][0] == "an object moves left"
    assert "an object moves to the left" in prompts["left"]
    generic = direction_prompts(with_attributes=False)
    assert all(0 < len(generic[d]) < len(prompts[d]) for d in DIRECTIONS)


def test_speech_names_shape_and_background_but_never_the_direction():
    saw_color = saw_without_color = False
    for i in range(300):
        clip = generate_clip(i, with_audio=False, max_objects=2)
        parsed = attributes_from_text(clip.speech)
        assert "direction" not in parsed, clip.speech
        assert parsed["shape"] == clip.attributes["shape"]
        assert parsed["background"] == clip.attributes["background"]
        for key in ("color", "size"):
            if key in parsed:
                assert parsed[key] in [o[key] for o in clip.attributes["objects"]], clip.speech
        saw_color |= "color" in parsed
        saw_without_color |= "color" not in parsed
        for obj in clip.attributes["objects"]:
            assert obj["shape"] in clip.speech
    assert saw_color and saw_without_color


def test_qa_answers_match_the_attributes():
    keys = {
        "colo": "color",
        "shape": "shape",
        "way": "direction",
        "background": "background",
        "small or": "size",
    }
    seen = set()
    for i in range(200):
        clip = generate_clip(i, with_audio=False)
        questions = [q for q, _ in clip.qa]
        assert 2 <= len(clip.qa) <= 3 and len(set(questions)) == len(questions)
        for q, a in clip.qa:
            key = next(v for k, v in keys.items() if k in q) if "direction" not in q else "direction"
            assert clip.attributes[key] == a, (q, a)
            seen.add(key)
    assert seen == set(keys.values())


def test_single_object_text_fits_the_collate_without_truncation():
    # VideoCollate(max_text_length=64) keeps every caption and transcript whole (BOS + bytes + EOS),
    # and its default max_dialogue_length=128 every dialogue
    for i in range(500):
        clip = generate_clip(i, with_audio=False)
        assert len(clip.caption.encode()) <= 62 and len(clip.speech.encode()) <= 62
        assert 2 + sum(len(f"Q: {q} A: {a}\n".encode()) for q, a in clip.qa) <= 128
    samples = [SyntheticVideoDataset(size=8, with_audio=False)[i] for i in range(8)]
    batch = VideoCollate(max_text_length=64)(samples)
    assert batch.caption_mask.sum(1).tolist() == [len(x.caption.encode()) + 2 for x in samples]
    assert batch.speech_mask.sum(1).tolist() == [len(x.speech.encode()) + 2 for x in samples]
    assert batch.dialogue_target_mask.any(1).all()


def dominant_hz(x: torch.Tensor, sr: int) -> float:
    spec = torch.fft.rfft(x * torch.hann_window(len(x)), n=8 * len(x)).abs()
    return float(spec.argmax()) * sr / (8 * len(x))


def test_audio_pitch_names_the_shape_and_glides_with_the_direction():
    mids = defaultdict(list)
    for i in range(60):
        clip = generate_clip(i)
        w, sr = clip.waveform, clip.sample_rate
        q = len(w) // 4
        start, end = dominant_hz(w[:q], sr), dominant_hz(w[-q:], sr)
        rising = clip.attributes["direction"] in ("right", "up")
        assert (end > 1.1 * start) if rising else (end < start / 1.1), (clip.attributes, start, end)
        assert ("rising" in clip.audio_caption or "rises" in clip.audio_caption) == rising
        mids[clip.attributes["shape"]].append(dominant_hz(w[len(w) // 2 - q // 2 : len(w) // 2 + q // 2], sr))
    ranges = [(min(mids[s]), max(mids[s])) for s in SHAPES]
    assert all(hi_a < lo_b for (_, hi_a), (lo_b, _) in itertools.pairwise(ranges))  # pitch orders shapes


def test_two_objects():
    twos = 0
    counts = set()
    for i in range(100):
        clip = generate_clip(i, max_objects=2, with_audio=False)
        objs = clip.attributes["objects"]
        assert clip.label == DIRECTIONS.index(objs[0]["direction"])
        assert clip.attributes["direction"] == objs[0]["direction"]
        if len(objs) == 2:
            twos += 1
            assert objs[0]["color"] != objs[1]["color"] and objs[0]["shape"] != objs[1]["shape"]
            first, second = clip.caption.split(" while ")
            for text, obj in ((first, objs[0]), (second, objs[1])):
                assert attributes_from_text(text) == {k: obj[k] for k in CAPTION_KEYS}
            assert clip.audio_caption.startswith("two tones")
        for q, a in clip.qa:
            if q.startswith("how many"):
                assert a == ("one", "two")[len(objs) - 1]
                counts.add(a)
    assert 25 <= twos <= 75
    assert counts == {"one", "two"}
    assert all(len(generate_clip(i).attributes["objects"]) == 1 for i in range(20))


# --------------------------------------------------------------------------- dataset


def test_sample_id_is_one_integer_per_color_shape_direction():
    ids = defaultdict(set)
    ds = SyntheticVideoDataset(size=400, with_audio=False)
    for i in range(400):
        clip = ds.clip(i)
        ids[tuple(clip.attributes[k] for k in CAPTION_KEYS)].add(clip.sample_id)
    assert all(len(v) == 1 for v in ids.values())
    flat = [next(iter(v)) for v in ids.values()]
    assert len(set(flat)) == len(flat) and all(0 <= x < 64 for x in flat)


def test_dataset_items_and_cheap_attributes():
    ds = SyntheticVideoDataset(split="val", size=5, seed=1)
    sample = ds[2]
    assert isinstance(sample, VideoSample)
    assert sample.video.shape == (3, 8, 64, 64) and sample.video.dtype == torch.float32
    clip = generate_clip(2, "val", 1)
    assert torch.allclose(sample.video, VideoTransform(64)(clip.frames.permute(3, 0, 1, 2)))
    assert sample.audio.shape == (98, 128)
    assert sample.caption == clip.caption and sample.speech == clip.speech and sample.qa == clip.qa
    assert sample.label == clip.label and sample.sample_id == clip.sample_id
    assert sample.meta["index"] == 2 and sample.meta["split"] == "val"
    assert sample.meta["attributes"] == ds.attributes(2) == clip.attributes
    assert sample.meta["audio_caption"] == clip.audio_caption
    assert ds[-1].meta["index"] == 4
    with pytest.raises(IndexError):
        ds[5]
    bare = SyntheticVideoDataset(size=2, with_audio=False, with_speech=False)[0]
    assert bare.audio is None and bare.speech is None and bare.caption


def test_cached_dataset_renders_each_clip_once_and_returns_the_same_samples(monkeypatch):
    import iv2_lightning.data.synthetic.dataset as dataset_module

    plain = SyntheticVideoDataset(size=4, image_size=32)
    cached = SyntheticVideoDataset(size=4, image_size=32, cache=True)
    renders = []
    real = dataset_module.generate_clip
    monkeypatch.setattr(
        dataset_module, "generate_clip", lambda *a, **k: renders.append(a[0]) or real(*a, **k)
    )
    for _ in range(3):  # three epochs
        for i in range(4):
            a, b = plain[i], cached[i]
            assert torch.equal(a.video, b.video) and torch.equal(a.audio, b.audio)
            assert (a.caption, a.speech, a.qa, a.label, a.meta) == (
                b.caption,
                b.speech,
                b.qa,
                b.label,
                b.meta,
            )
    assert sorted(renders) == sorted([0, 1, 2, 3] * 3 + [0, 1, 2, 3])  # plain: every epoch; cached: once
    assert cached[-1].meta["index"] == 3 and len(cached._cache) == 4


def test_dataset_collates_into_a_video_batch_across_workers():
    ds = SyntheticVideoDataset(size=6, num_frames=8, image_size=32)
    collate = VideoCollate(max_text_length=64)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2 and all(isinstance(b, VideoBatch) for b in batches)
    b = batches[0]
    assert b.video.shape == (3, 3, 8, 32, 32)
    assert b.audio.shape[0] == 3 and b.audio.shape[-1] == 128 and b.audio_mask.all()
    assert b.label.tolist() == [ds[i].label for i in range(3)]
    assert b.present("caption").all() and b.present("speech").all() and b.present("dialogue").all()
    assert torch.equal(b.video, collate([ds[i] for i in range(3)]).video)  # workers render the same


# --------------------------------------------------------------------------- iv2 synth


def test_synth_main_writes_playable_media_and_annotations(tmp_path, capsys):
    out = tmp_path / "synth"
    args = [
        "--out",
        str(out),
        "--num-clips",
        "3",
        "--num-frames",
        "8",
        "--image-size",
        "64",
        "--split",
        "val",
    ]
    assert synth_main(args) == 0
    rows = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for i, row in enumerate(rows):
        assert row["video"] == f"videos/val_{i:06d}.mp4"
        path = out / row["video"]
        assert path.is_file()
        clip = generate_clip(i, "val", 0, num_frames=8, image_size=64, with_audio=False)
        assert row["caption"] == clip.caption and row["asr"] == clip.speech
        assert row["audio_caption"] == clip.audio_caption and row["label"] == clip.label
        assert [tuple(t) for t in row["qa"]] == clip.qa and row["attributes"] == clip.attributes
        assert row["split"] == "val" and row["index"] == i
        with av.open(str(path)) as container:
            assert container.streams.audio, "no audio stream"
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 8 and frames[0].shape == (64, 64, 3)
        assert abs(frames[3].astype(int) - clip.frames[3].numpy()).mean() < 8  # lossy but faithful
    assert "iv2 synth" in capsys.readouterr().out

    before = (out / "annotations.jsonl").read_text()
    assert synth_main([*args[:3], "1"]) == 1  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "annotations.jsonl").read_text() == before
    assert synth_main([*args[:3], "1", "--overwrite", "--format", "webm", "--num-frames", "16"]) == 0
    rows = [json.loads(line) for line in (out / "annotations.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["video"] == "videos/train_000000.webm"
    assert (out / rows[0]["video"]).is_file()


def test_synth_main_rejects_odd_image_size(tmp_path):
    with pytest.raises(SystemExit):
        synth_main(["--out", str(tmp_path), "--num-clips", "1", "--image-size", "63"])


@pytest.mark.parametrize("attribute", ["direction", "shape", "color"])
def test_label_names_the_chosen_attribute_and_its_prompts(attribute):
    from iv2_lightning.data import SyntheticVideoDataModule
    from iv2_lightning.data.synthetic import LABEL_ATTRIBUTES

    dm = SyntheticVideoDataModule(
        num_frames=8,
        image_size=32,
        train_size=12,
        val_size=0,
        test_size=0,
        modalities=["label"],
        label=attribute,
    )
    dm.setup("fit")
    ds = dm.datasets["train"]
    values = LABEL_ATTRIBUTES[attribute]
    assert [values[ds[i].label] for i in range(12)] == [
        ds.attributes(i)["objects"][0][attribute] for i in range(12)
    ]
    prompts = dm.class_prompts()
    assert list(prompts) == list(values)
    for value, rows in prompts.items():  # every prompt names its own value and no other of the attribute
        if attribute != "direction":
            assert all(value in r and not any(o in r.split() for o in values if o != value) for r in rows)


def test_bad_label_attribute_is_refused_by_name():
    from iv2_lightning.data import SyntheticVideoDataModule

    with pytest.raises(
        ValueError, match=r"label must be one of \['color', 'direction', 'sequence', 'shape'\]; got 'size'"
    ):
        SyntheticVideoDataModule(label="size")


def test_a_long_clip_turns_at_every_window_and_each_window_is_an_ordinary_clip():
    from iv2_lightning.data.synthetic import render_clip
    from iv2_lightning.data.synthetic.dataset import generate_clip
    from iv2_lightning.data.synthetic.scene import with_direction
    from iv2_lightning.data.synthetic.text import sequence_names, sequence_of

    one = generate_clip(5, num_frames=8, image_size=32)
    long = generate_clip(5, num_frames=8, image_size=32, windows=3)
    assert long.frames.shape == (24, 32, 32, 3) and one.directions == (one.params.objects[0].direction,)
    assert long.directions[0] == one.directions[0]  # the one-window clip is the long clip's start
    assert all(a != b for a, b in itertools.pairwise(long.directions))
    assert torch.equal(long.frames[:8], one.frames)
    first = long.params.objects[0]
    for w, d in enumerate(long.directions):
        window = replace(long.params, objects=(with_direction(first, d),))
        assert torch.equal(long.frames[8 * w : 8 * (w + 1)], render_clip(window))
    assert long.caption.startswith(one.caption) and long.caption.count(", then ") == 2
    assert sequence_names(3)[sequence_of(long.directions)] == " then ".join(long.directions)
    assert len(sequence_names(2)) == 12 and len(set(sequence_names(3))) == 36
    with pytest.raises(ValueError, match="consecutive windows move the same way"):
        sequence_of(("left", "left"))


def test_sequence_labels_cover_every_ordered_pair():
    from iv2_lightning.data import SyntheticVideoDataModule

    dm = SyntheticVideoDataModule(
        num_frames=8,
        image_size=16,
        train_size=240,
        val_size=0,
        test_size=0,
        modalities=["label"],
        label="sequence",
        windows=2,
    )
    dm.setup("fit")
    ds = dm.datasets["train"]
    labels = [ds[i].label for i in range(240)]
    assert set(labels) == set(range(12)) and ds[0].video.shape[1] == 16
    assert list(dm.class_prompts())[:2] == ["left then right", "left then up"]
