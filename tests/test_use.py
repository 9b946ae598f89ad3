"""Using a trained model: `iv2 embed | search | caption | chat`, `iv2 test --config configs/eval/*.yaml`,
the evaluation pictures.

One module fixture trains tiny stage-2, stage-3 and action checkpoints (the tiny configs' models for
two steps on 32 x 32 synthetic clips, saved as the curriculum saves them) and writes six synthetic
clips as mp4 files with `iv2 synth`; every test runs the commands on those.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

from iv2_lightning.cli import main as iv2_main
from iv2_lightning.data.batch import VideoCollate, VideoSample
from iv2_lightning.data.datamodules import VideoDataModuleBase
from iv2_lightning.data.synthetic import synth_main
from iv2_lightning.data.video_io import read_clip
from iv2_lightning.lightning_cli import IV2CLI, make_cli
from iv2_lightning.models.weights import architecture_of, export_shared_weights
from iv2_lightning.stages.base import BaseStage
from iv2_lightning.stages.contrastive import ContrastiveStage
from iv2_lightning.stages.next_token import NextTokenStage
from iv2_lightning.use import (
    EmbeddingIndex,
    caption_main,
    chat_main,
    embed_main,
    list_videos,
    load_model,
    load_video,
    search_main,
)
from iv2_lightning.visualize import attention_over_frames, heatmap, retrieval_strips

ROOT = Path(__file__).resolve().parents[1]
EVAL_CONFIGS = sorted((ROOT / "configs" / "eval").glob("*.yaml"))
SHORT = [
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=0",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.logger=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.init_args.image_size=32",
    "--data.init_args.num_frames=8",
    "--data.init_args.batch_size=4",
    "--data.init_args.train_size=8",
    "--data.init_args.val_size=4",
    "--data.init_args.test_size=0",
    "--data.init_args.num_workers=0",
]


def _train(config: str, stage_dir: Path, *extra: str) -> Path:
    """Two steps of `iv2 fit --config <config>`; the checkpoint where the curriculum puts it."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = make_cli(
            ["--config", str(ROOT / config), f"--trainer.default_root_dir={stage_dir}", *SHORT, *extra],
            run=False,
        )
    finally:
        sys.argv = argv
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = stage_dir / "checkpoints" / "last.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("use")
    torch.manual_seed(0)
    out = {
        "stage2": _train("configs/stage2/tiny.yaml", root / "stage2"),
        "stage3": _train("configs/stage3/tiny.yaml", root / "stage3", "--model.init_args.max_new_tokens=8"),
        "action": _train("configs/action/tiny.yaml", root / "action"),
    }
    assert (
        synth_main(
            ["--out", str(root / "clips"), "--num-clips", "6", "--split", "test", "--image-size", "32"]
        )
        == 0
    )
    out["clips"] = root / "clips"
    out["root"] = root
    yield out
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stage2(trained):
    return load_model(trained["stage2"], ContrastiveStage).model  # the VideoTextAligner


@pytest.fixture(scope="module")
def stage3(trained):
    return load_model(trained["stage3"], NextTokenStage).model  # the VideoCaptioner


def _videos(trained) -> list[Path]:
    return sorted((trained["clips"] / "videos").glob("*.mp4"))


# ----------------------------------------------------------------------------- embed + search


def test_embed_resume_corrupt_and_search(trained, stage2, tmp_path, capsys):
    folder = tmp_path / "videos"
    shutil.copytree(trained["clips"] / "videos", folder)
    (folder / "broken.mp4").write_bytes(b"\x00garbage, not a video" * 50)
    out = tmp_path / "index.safetensors"
    args = ["--ckpt", str(trained["stage2"].parents[1]), "--videos", str(folder), "--out", str(out)]
    args += ["--batch-size", "4"]

    assert embed_main(args) == 0
    captured = capsys.readouterr()
    assert "broken.mp4" in captured.err and "cannot open as a media file" in captured.err
    assert "embedded 6 new clip(s)" in captured.out and "1 unreadable" in captured.out
    index = EmbeddingIndex.load(out)
    good = [str(p) for p in sorted(folder.glob("test_*.mp4"))]
    assert index.keys == good and index.embeddings.shape == (6, stage2.embed_dim)
    assert torch.allclose(index.embeddings.norm(dim=1), torch.ones(6), atol=1e-5)
    assert index.meta["ckpt"] == str(trained["stage2"].resolve()) and index.meta["num_frames"] == 8
    # the index holds exactly what the stage computes for the decoded clip
    with torch.no_grad():
        direct = stage2.encode_video(load_video(good[2], 8, 32)[None])[0]
    assert torch.allclose(index.embeddings[2], direct, atol=1e-5)

    # a rerun skips what the file holds (and reports the broken file again)
    before = index.embeddings.clone()
    assert embed_main(args) == 0
    captured = capsys.readouterr()
    assert "embedded 0 new clip(s)" in captured.out and "skipped 6 already in the index" in captured.out
    assert "broken.mp4" in captured.err
    assert torch.equal(EmbeddingIndex.load(out).embeddings, before)
    # a new file is the only one embedded
    shutil.copy(folder / "test_000001.mp4", folder / "zz_new.mp4")
    assert embed_main(args) == 0
    assert "embedded 1 new clip(s)" in capsys.readouterr().out
    index = EmbeddingIndex.load(out)
    assert len(index) == 7 and index.keys[-1].endswith("zz_new.mp4")
    assert torch.allclose(index.embeddings[-1], index.embeddings[1], atol=1e-5)  # same bytes, same embedding

    # text search: the scores are the cosine similarities to the stage's text embedding, best first
    query = "a red circle moving to the left"
    assert search_main(["--index", str(out), query, "--k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        scores = index.embeddings @ stage2.encode_text([query])[0]
    best = scores.topk(3)
    assert [h["path"] for h in hits] == [index.keys[i] for i in best.indices.tolist()]
    assert [h["score"] for h in hits] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    # the table form names the query and every hit
    assert search_main(["--index", str(out), query, "--k", "2"]) == 0
    table = capsys.readouterr().out
    assert query in table and index.keys[best.indices[0]] in table

    # video search: a clip of the index finds itself first, with cosine 1
    assert search_main(["--index", str(out), "--video", good[4], "--k", "2", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"] == good[4] and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # errors: neither or both queries; an unreadable query video
    with pytest.raises(SystemExit):
        search_main(["--index", str(out)])
    assert search_main(["--index", str(out), "--video", str(folder / "broken.mp4")]) == 2
    assert "broken.mp4" in capsys.readouterr().err


def test_embed_interrupted_run_resumes(trained, tmp_path, monkeypatch, capsys):
    import iv2_lightning.use.embed as use

    out = tmp_path / "index.safetensors"
    args = ["--ckpt", str(trained["stage2"]), "--videos", str(trained["clips"] / "videos"), "--out", str(out)]
    args += ["--batch-size", "2", "--save-every", "1"]
    real, calls = use.embed_clips, []

    def interrupted_at_the_third_batch(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(use, "embed_clips", interrupted_at_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        embed_main(args)
    assert len(EmbeddingIndex.load(out)) == 4  # the two finished batches were saved
    monkeypatch.setattr(use, "embed_clips", real)
    capsys.readouterr()
    assert embed_main(args) == 0
    assert "embedded 2 new clip(s)" in capsys.readouterr().out
    assert EmbeddingIndex.load(out).keys == [str(p) for p in _videos(trained)]


def test_embed_long_clips_through_windows_as_npy(trained, stage2, tmp_path, capsys):
    out = tmp_path / "long.npy"
    ann = trained["clips"] / "annotations.jsonl"
    args = ["--ckpt", str(trained["stage2"]), "--videos", str(ann), "--out", str(out), "--num-frames", "12"]
    assert embed_main(args) == 0
    index = EmbeddingIndex.load(out)
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["paths"] == [it.key for it in list_videos(ann)] and len(side["paths"]) == 6
    assert side["num_frames"] == 12 and side["window"] == 8  # longer than the 8 training frames: windows
    assert index.windows.shape == (6, 2, stage2.embed_dim)  # 12 frames = a window of 8 + 4 padded
    # the clip embedding is the normalised mean of the window embeddings...
    pooled = torch.nn.functional.normalize(index.windows.mean(dim=1), dim=-1)
    assert torch.allclose(index.embeddings, pooled, atol=1e-5)
    # ...and window 0 is the embedding of the first 8 frames on their own; the last window repeats
    # the last frame (the HierarchicalTemporalEncoder's split)
    video = load_video(side["paths"][0], 12, 32)[None]
    with torch.no_grad():
        first = stage2.encode_video(video[:, :, :8])[0]
        tail = torch.cat([video[:, :, 8:], video[:, :, -1:].expand(-1, -1, 4, -1, -1)], dim=2)
        last = stage2.encode_video(tail)[0]
        assert torch.allclose(stage2.encode_video(video)[0], index.embeddings[0], atol=1e-5)
    assert torch.allclose(index.windows[0, 0], first, atol=1e-5)
    assert torch.allclose(index.windows[0, 1], last, atol=1e-5)
    # a rerun without the clip settings continues with the file's; other settings are refused
    capsys.readouterr()
    assert embed_main(args[:-2]) == 0
    assert "embedded 0 new clip(s)" in capsys.readouterr().out
    assert embed_main([*args[:-2], "--num-frames", "8"]) == 2
    assert "other settings" in capsys.readouterr().err
    # search reports the best window of each hit
    assert search_main(["--index", str(out), "the blue square moving up", "--k", "6", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert len(hits) == 6 and all(h["window"] in (0, 1) for h in hits)


def test_checkpoint_forms_and_wrong_stage(trained, tmp_path, capsys):
    stage_dir = trained["stage2"].parents[1]
    # an export folder beside the checkpoints resolves to the checkpoint; a lone export is refused
    model = load_model(trained["stage2"], ContrastiveStage).model
    export_shared_weights(
        model, stage_dir / "export", {"stage": "stage2", "architecture": architecture_of(model)}
    )
    assert load_model(stage_dir / "export", ContrastiveStage).path == trained["stage2"]
    lone = tmp_path / "lone"
    shutil.copytree(stage_dir / "export", lone / "export")
    videos = str(_videos(trained)[0])
    out = str(tmp_path / "x.safetensors")
    assert embed_main(["--ckpt", str(lone / "export"), "--videos", videos, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "StageTransition export" in err and "video_encoder" in err
    # a stage-3 checkpoint cannot embed, a stage-2 one cannot caption
    assert embed_main(["--ckpt", str(trained["stage3"]), "--videos", videos, "--out", out]) == 2
    assert "needs a ContrastiveStage" in capsys.readouterr().err
    assert caption_main(["--ckpt", str(trained["stage2"]), videos]) == 2
    assert "needs a NextTokenStage" in capsys.readouterr().err
    assert embed_main(["--ckpt", str(tmp_path / "missing.ckpt"), "--videos", videos, "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err


# ----------------------------------------------------------------------------- caption + chat


def _with_audio(path: str) -> VideoSample:
    """The clip as the tiny stage 3 reads it: the frames and the file's sound track as fbank."""
    audio = read_clip(path, num_frames=8, sampling="middle", size=32, audio=True).audio
    assert audio is not None and audio.shape[-1] == 128  # `iv2 synth` writes the sound track
    return VideoSample(video=load_video(path, 8, 32), sample_id=0, audio=audio)


def test_caption(trained, stage3, tmp_path, capsys):
    videos = [str(p) for p in _videos(trained)[:2]]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 40)
    assert caption_main(["--ckpt", str(trained["stage3"]), *videos]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # the tiny stage 3 fuses the sound: the command reads each file's audio track too
    assert stage3.use_audio
    batch = VideoCollate()([_with_audio(v) for v in videos])
    with torch.no_grad():
        assert not torch.allclose(stage3.prefix_of(batch), stage3.visual_prefix(batch.video))
    expected = stage3.caption(batch)  # greedy
    assert lines == [f"{v}: {c}" for v, c in zip(videos, expected)]
    # an unreadable file is reported and skipped, the others are still captioned
    assert caption_main(["--ckpt", str(trained["stage3"]), str(broken), videos[0]]) == 1
    captured = capsys.readouterr()
    assert "broken.mp4" in captured.err and captured.out.strip() == f"{videos[0]}: {expected[0]}"
    # nucleus sampling is reproducible with its seed
    sampled = ["--ckpt", str(trained["stage3"]), videos[0], "--top-p", "0.9", "--seed", "3"]
    assert caption_main(sampled) == 0 and caption_main(sampled) == 0
    first, second = capsys.readouterr().out.strip().splitlines()
    assert first == second


def test_chat_questions_and_stdin(trained, stage3, monkeypatch, capsys):
    video_path = str(_videos(trained)[0])
    video = VideoCollate()([_with_audio(video_path)])
    q1, q2 = "what color is it?", "which way does it move?"
    assert chat_main(["--ckpt", str(trained["stage3"]), video_path, "--question", q1, "--question", q2]) == 0
    out = [line.rstrip() for line in capsys.readouterr().out.strip().splitlines()]
    a1 = stage3.chat(video, q1)
    a2 = stage3.chat(video, q2, history=[(q1, a1)])  # the second turn sees the first
    assert out == [f"Q: {q1}", f"A: {a1}".rstrip(), f"Q: {q2}", f"A: {a2}".rstrip()]  # an answer may be empty

    # stdin, one question per line; /reset forgets the conversation, /quit ends it
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{q1}\n\n{q2}\n/reset\n{q2}\n/quit\n{q1}\n"))
    assert chat_main(["--ckpt", str(trained["stage3"]), video_path]) == 0
    out = [line.rstrip() for line in capsys.readouterr().out.strip().splitlines()]
    fresh = stage3.chat(video, q2)
    assert out == [
        f"Q: {q1}",
        f"A: {a1}".rstrip(),
        f"Q: {q2}",
        f"A: {a2}".rstrip(),
        "(conversation reset)",
        f"Q: {q2}",
        f"A: {fresh}".rstrip(),
    ]


# ----------------------------------------------------------------------------- iv2 test --config configs/eval


class _ParseOnly(IV2CLI):
    def instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


@pytest.mark.parametrize("config", EVAL_CONFIGS, ids=lambda p: p.name)
def test_eval_configs_parse(config, tmp_path):
    # ckpt_path to a file that does not exist: LightningCLI then reads no hyperparameters from it
    argv, sys.argv = sys.argv, sys.argv[:1]  # the arguments are the ones below, not pytest's
    try:
        cli = _ParseOnly(
            BaseStage,
            VideoDataModuleBase,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=["test", "--config", str(config), f"--ckpt_path={tmp_path / 'none.ckpt'}"],
            seed_everything_default=0,
            auto_configure_optimizers=False,
            parser_kwargs={"allow_abbrev": False},
        )
    finally:
        sys.argv = argv
    cfg = cli.config["test"]
    assert cfg["model"]["class_path"].startswith("iv2_lightning.stages.")
    assert cfg["data"]["init_args"]["num_frames"] == cfg["model"]["init_args"]["num_frames"]  # linked
    assert [c["class_path"] for c in cfg["trainer"]["callbacks"]] == ["iv2_lightning.evaluate.EvalResults"]
    # the default checkpoint is the tiny curriculum's (README: `iv2 curriculum --config configs/curriculum/tiny.yaml`)
    assert yaml.safe_load(config.read_text())["ckpt_path"].startswith("runs/curriculum_tiny/")


def _iv2_test(config: str, ckpt: Path, root: Path, *extra: str) -> dict:
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        rc = iv2_main(
            [
                "test",
                "--config",
                str(ROOT / "configs" / "eval" / config),
                f"--ckpt_path={ckpt}",
                f"--trainer.default_root_dir={root}",
                "--trainer.enable_progress_bar=false",
                "--data.init_args.image_size=32",
                "--data.init_args.test_size=16",
                "--data.init_args.batch_size=8",
                *extra,
            ]
        )
    finally:
        sys.argv = argv
    assert rc == 0
    return json.loads((root / "results.json").read_text())


RETRIEVAL_KEYS = [
    f"{d}_{m}{s}"
    for d in ("t2v", "v2t")
    for m in ("r1", "r5", "r10", "medr", "meanr")
    for s in ("", "_dsl", "_match")
]


def test_iv2_test_retrieval_writes_json_and_pictures(trained, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    results = _iv2_test("retrieval.yaml", trained["stage2"], tmp_path)
    assert results["split"] == "test" and results["stage"] == "stage2"
    assert results["ckpt_path"] == str(trained["stage2"])
    metrics = results["metrics"]
    assert set(RETRIEVAL_KEYS) <= set(metrics) and "zs_acc" in metrics
    for key in RETRIEVAL_KEYS:
        value = metrics[key]
        assert 0 <= value <= 100 if "_r" in key else 1 <= value <= 16, (key, value)
    assert metrics["t2v_r10_match"] >= metrics["t2v_r5_match"] >= metrics["t2v_r1_match"]
    # rerank_k 16 >= the 16 clips: every candidate is re-ranked, so _match ranks differ from cosine
    (events,) = list(tmp_path.glob("lightning_logs/version_*/events.*"))
    acc = EventAccumulator(str(events), size_guidance={"images": 0})
    acc.Reload()
    images = set(acc.Tags()["images"])
    assert {"test/similarity", "test/retrieval_topk", "test/pool_attention", "test/fusion_gates"} <= images
    assert "test/t2v_r1" in acc.Tags()["scalars"]


def test_iv2_test_zeroshot_on_long_clips_and_probe(trained, tmp_path):
    # 16 frames for an 8-frame model: the clips go through windows of 8
    results = _iv2_test("zeroshot.yaml", trained["stage2"], tmp_path / "zs", "--data.init_args.num_frames=16")
    assert 0 <= results["metrics"]["zs_acc"] <= 100 and "t2v_r1" in results["metrics"]
    results = _iv2_test("probe.yaml", trained["action"], tmp_path / "probe")
    assert set(results["metrics"]) >= {"acc", "acc_top5", "loss"} and results["stage"] == "action"
    assert 0 <= results["metrics"]["acc"] <= 1


def test_embed_uses_the_trained_hte_of_a_checkpoint(trained, tmp_path):
    """A stage-2 checkpoint trained with ``temporal`` (configs/stage2/tiny_hte.yaml): ``iv2 embed``
    embeds a long clip through its HTE, not as the mean of its windows."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ckpt = _train("configs/stage2/tiny_hte.yaml", tmp_path / "hte", "--data.init_args.val_size=0")
    finally:
        torch.set_num_threads(threads)
    model = load_model(ckpt, ContrastiveStage).model
    assert model.temporal_encoder is not None and model.temporal_encoder.window == 8
    out = tmp_path / "hte.safetensors"
    ann = trained["clips"] / "annotations.jsonl"
    assert (
        embed_main(["--ckpt", str(ckpt), "--videos", str(ann), "--out", str(out), "--num-frames", "16"]) == 0
    )
    index = EmbeddingIndex.load(out)
    path = next(it.key for it in list_videos(ann))
    video = load_video(path, 16, 32)[None]
    with torch.no_grad():
        hte = model.temporal_encoder(video)
        feature = hte.window_embeddings.mean(dim=1) + hte.embedding  # the window mean + what the order adds
    through_hte = torch.nn.functional.normalize(model.video_proj(feature), dim=-1)[0]
    window_mean = torch.nn.functional.normalize(index.windows[0].mean(dim=0), dim=-1)
    assert torch.allclose(index.embeddings[0], through_hte, atol=1e-5)
    assert (index.embeddings[0] - window_mean).abs().max() > 1e-3


def test_long_clips_are_evaluated_in_windows_of_the_checkpoint_frames(trained, stage2):
    """What `iv2 test --data.init_args.num_frames 16` builds from an 8-frame checkpoint: the CLI links
    16 frames into the stage, loading the checkpoint puts the encoder back to 8, and the
    evaluation features of a 16-frame clip are the pooled embeddings of its two 8-frame windows."""
    ckpt = torch.load(trained["stage2"], weights_only=True)
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    model = ContrastiveStage(**{**hparams, "num_frames": 16})
    assert model.model.video_encoder.num_frames == 16
    model.on_load_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    assert model.model.video_encoder.num_frames == 8
    video = load_video(_videos(trained)[0], 16, 32)
    batch = VideoCollate()([VideoSample(video=video, sample_id=0, caption="a red circle moving left")])
    with torch.no_grad():
        features = model.model.features(batch.video, batch.caption_ids, batch.caption_mask)
        clip, windows, mask = model.model.encode_video_windows(video[None])
        halves = [
            stage2.encode_video(video[None, :, :8]),
            stage2.encode_video(video[None, :, 8:]),
        ]
    assert mask.tolist() == [[True, True]]
    assert torch.allclose(torch.cat(halves), windows[0], atol=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(features.video.emb, dim=-1), clip, atol=1e-5)
    assert features.video.tokens.shape[1] == 2 * (1 + 4 * 2 * 2)  # both windows' tokens, for matching


def test_eval_settings_are_not_saved_in_checkpoints(trained):
    hparams = torch.load(trained["stage2"], weights_only=True)["hyper_parameters"]
    assert not {"rerank_k", "visual_clips", "zeroshot_classes", "prompt_templates"} & set(hparams)
    assert "embed_dim" in hparams


# ----------------------------------------------------------------------------- pictures


def test_pictures():
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.5]])
    img = heatmap(sim, cell=4, marks=torch.tensor([[True, False], [False, False]]))
    assert img.shape == (3, 8, 8) and float(img.min()) >= 0 and float(img.max()) <= 1
    assert torch.equal(img[:, 0, 0], torch.ones(3)) and not torch.equal(
        img[:, 1, 1], torch.ones(3)
    )  # outline
    assert float(img[:, 1, 5].sum()) < float(img[:, 1, 1].sum())  # low scores dark, high bright (viridis)

    videos = torch.randn(3, 3, 4, 8, 8)
    strips = retrieval_strips(
        videos, torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([[False, True, False]]), k=2
    )
    assert strips.shape == (3, 12, 2 * (4 * 8 + 4) + 4)
    assert strips[:, 0, 0].tolist() == pytest.approx([0.1, 0.8, 0.2])  # best (a hit): green frame
    assert strips[:, 0, 40].tolist() == pytest.approx([0.9, 0.15, 0.15])  # second (a miss): red frame

    attention = torch.zeros(2, 2, 2)
    attention[1] = 1.0  # everything on the second token frame (frames 2 and 3 with tubelet 2)
    img = attention_over_frames(torch.randn(3, 4, 8, 8), attention, tubelet=2, bar_height=10)
    bars = img[:, 8:].sum(dim=0).sum(dim=0)  # filled bar pixels per column
    assert img.shape == (3, 18, 32) and float(bars[:16].sum()) == 0 and float(bars[16:].sum()) > 0
