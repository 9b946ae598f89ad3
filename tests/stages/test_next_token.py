"""NextTokenStage (stage 3): shapes, losses that count only what they should, causal text, decoding,
the chat prompt format, the Hugging Face LM path, fusion of audio/speech, init_from, learning, and
a Lightning run that logs the generation metrics."""

from __future__ import annotations

import dataclasses
import importlib.util

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger

from iv2_lightning.data.batch import VideoBatch, VideoCollate, VideoSample
from iv2_lightning.data.datamodules import SyntheticVideoDataModule
from iv2_lightning.data.synthetic import SyntheticVideoDataset
from iv2_lightning.models.resampler import QueryResampler
from iv2_lightning.stages.next_token import NextTokenStage, dialogue_prompt_ids
from iv2_lightning.stages.weights import export_shared_weights

ENCODER = {"image_size": 32, "patch_size": 8, "depth": 1, "num_frames": 4}
LM = {"dim": 64, "depth": 1, "num_heads": 2, "max_length": 160}
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
LM_KINDS = [
    "builtin",
    pytest.param("gpt2-tiny", marks=pytest.mark.skipif(not HAS_TRANSFORMERS, reason="no transformers")),
]


def make_stage(**kw) -> NextTokenStage:
    torch.manual_seed(0)
    args = {"encoder": ENCODER, "num_queries": 8, "max_new_tokens": 12}
    if kw.get("lm", "builtin") == "builtin":
        args["lm_config"] = LM
    return NextTokenStage(**{**args, **kw})


def clips(n: int, with_audio: bool = False) -> list[VideoSample]:
    ds = SyntheticVideoDataset(size=n, num_frames=8, image_size=32, with_audio=with_audio)
    return [ds[i] for i in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these models are tiny: intra-op threads only add overhead, and on a busy 2-core machine
    # they make every step wait for the slowest core (a 300-step loop goes from ~5 s to minutes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch() -> VideoBatch:
    return VideoCollate(max_text_length=48)(clips(4, with_audio=True))


@pytest.fixture(scope="module")
def stage() -> NextTokenStage:
    return make_stage().eval()


def without(batch: VideoBatch, *what: str) -> VideoBatch:
    fields = {
        "caption": ("caption_ids", "caption_mask"),
        "dialogue": ("dialogue_ids", "dialogue_mask", "dialogue_target_mask"),
    }
    return dataclasses.replace(batch, **{f: None for w in what for f in fields[w]})


# -- shapes ---------------------------------------------------------------------------------------


def test_prefix_and_logit_shapes(stage, batch):
    prefix = stage(batch.video)
    assert prefix.shape == (4, 8, 64)
    logits = stage.lm_logits(prefix, batch.caption_ids, batch.caption_mask)
    assert logits.shape == (*batch.caption_ids.shape, stage.tokenizer.vocab_size)
    assert stage.stage_name == "stage3"


def test_pooled_token_leads_the_prefix(batch):
    s = make_stage(pooled_token=True).eval()
    with torch.no_grad():
        prefix = s.batch_prefix(batch)
        out = s.video_encoder(batch.video)
    assert prefix.shape == (4, 9, s.lm_dim) and s.prefix_length == 9
    torch.testing.assert_close(prefix[:, 0], s.pooled_proj(out.pooled))
    torch.testing.assert_close(prefix[:, 1:], s.resampler(out.tokens))
    # the LM is trained through it: the pooled projection gets gradients from the caption loss
    s.train()
    s.compute_loss(batch)["loss"].backward()
    assert s.pooled_proj.weight.grad.abs().sum() > 0
    assert make_stage().pooled_proj is None and make_stage().prefix_length == 8


def test_resampler_shape_and_padding_invariance():
    torch.manual_seed(0)
    r = QueryResampler(context_dim=48, out_dim=32, num_queries=5, depth=2)
    ctx = torch.randn(2, 10, 48)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False
    out = r(ctx, mask)
    assert out.shape == (2, 5, 32)
    ctx2 = ctx.clone()
    ctx2[0, 6:] = 100.0 * torch.randn(4, 48)
    torch.testing.assert_close(r(ctx2, mask), out)
    with pytest.raises(ValueError, match="context must be"):
        r(torch.randn(2, 10, 47))


# -- losses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", [("caption",), ("dialogue",), ("caption", "dialogue")])
def test_compute_loss_finite(stage, batch, parts):
    missing = {"caption", "dialogue"} - set(parts)
    out = stage.compute_loss(without(batch, *missing))
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    assert ("caption_loss" in out) == ("caption" in parts)
    assert ("dialogue_loss" in out) == ("dialogue" in parts)
    assert 0.0 <= float(out["token_acc"]) <= 1.0
    expected = sum(out[f"{p}_loss"].item() for p in parts)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_batch_without_text_fails_clearly(stage, batch):
    with pytest.raises(ValueError, match="neither captions nor dialogue"):
        stage.compute_loss(without(batch, "caption", "dialogue"))


@pytest.mark.parametrize("lm", LM_KINDS)
def test_loss_ignores_padding(batch, lm):
    stage = make_stage(lm=lm).eval()
    assert not bool(batch.caption_mask.all()) and not bool(batch.dialogue_mask.all())  # there is padding
    g = torch.Generator().manual_seed(1)
    noisy = dataclasses.replace(
        batch,
        caption_ids=torch.where(
            batch.caption_mask, batch.caption_ids, torch.randint(4, 260, batch.caption_ids.shape, generator=g)
        ),
        dialogue_ids=torch.where(
            batch.dialogue_mask,
            batch.dialogue_ids,
            torch.randint(4, 260, batch.dialogue_ids.shape, generator=g),
        ),
    )
    a, b = stage.compute_loss(batch), stage.compute_loss(noisy)
    for key in ("caption_loss", "dialogue_loss", "token_acc"):
        torch.testing.assert_close(a[key], b[key])


def test_dialogue_loss_counts_only_answers(stage, batch):
    b = without(batch, "caption")
    with torch.no_grad():
        out = stage.compute_loss(b)
        logits = stage.lm_logits(stage(b.video), b.dialogue_ids, b.dialogue_mask)
    answers = b.dialogue_target_mask[:, 1:]
    assert 0 < int(answers.sum()) < int(b.dialogue_mask[:, 1:].sum())  # questions are not targets
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][answers], b.dialogue_ids[:, 1:][answers])
    torch.testing.assert_close(out["dialogue_loss"], manual)


@pytest.mark.parametrize("lm", LM_KINDS)
def test_language_model_is_causal_over_text(batch, lm):
    stage = make_stage(lm=lm).eval()
    with torch.no_grad():
        prefix = stage(batch.video[:2])
        ids = batch.caption_ids[:2, :12].clone()
        before = stage.lm_logits(prefix, ids)
        j = 7
        ids[:, j] = (ids[:, j] - 4 + 1) % 256 + 4
        after = stage.lm_logits(prefix, ids)
    torch.testing.assert_close(after[:, :j], before[:, :j])
    assert not torch.allclose(after[:, j:], before[:, j:])


def test_caption_prompt_is_context_not_target(batch):
    stage = make_stage(prompt="Describe:").eval()
    ids, mask, target = stage.caption_sequences(batch)
    n = len(stage.tokenizer.encode("Describe:"))
    assert bool((ids[:, 1 : 1 + n] == torch.tensor(stage.tokenizer.encode("Describe:"))).all())
    assert not bool(target[:, : 1 + n].any())
    # the targets are exactly the caption bytes and EOS
    for i, caption in enumerate(batch.captions):
        assert stage.tokenizer.decode(ids[i][target[i]]) == caption
        assert int(ids[i][target[i]][-1]) == stage.eos_id
        assert int(mask[i].sum()) == 1 + n + len(caption.encode()) + 1  # BOS, prompt, caption, EOS
    assert torch.isfinite(stage.compute_loss(batch)["loss"])


# -- decoding -------------------------------------------------------------------------------------


def test_caption_greedy_deterministic_and_sampling_reproducible(stage, batch):
    greedy = stage.caption(batch.video)
    assert isinstance(greedy, list) and len(greedy) == 4 and all(isinstance(c, str) for c in greedy)
    assert stage.caption(batch.video) == greedy
    torch.manual_seed(3)
    sampled = stage.caption(batch.video, top_p=0.9, temperature=1.5)
    torch.manual_seed(3)
    assert stage.caption(batch.video, top_p=0.9, temperature=1.5) == sampled
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert stage.caption(batch.video, top_p=0.5, generator=g1) == stage.caption(
        batch.video, top_p=0.5, generator=g2
    )
    assert stage.caption(batch) == greedy  # a VideoBatch works too
    with pytest.raises(ValueError, match="top_p"):
        stage.caption(batch.video, top_p=0.0)


def test_caption_restores_training_mode(batch):
    stage = make_stage()
    stage.train()
    stage.video_encoder.eval()  # e.g. frozen by BaseStage
    stage.caption(batch.video[:1], max_new_tokens=2)
    assert stage.training and stage.lm.training and not stage.video_encoder.training


def test_chat_prompt_matches_training_format(batch):
    tok = make_stage().tokenizer
    qa = [("what color is it?", "red"), ("which way does it move?", "left")]
    sample = clips(1)[0]
    sample.qa = qa
    row = VideoCollate()([sample]).dialogue_ids[0].tolist()
    ids = dialogue_prompt_ids(tok, qa[1][0], qa[:1])
    assert row == [*ids, *tok.encode(f" {qa[1][1]}\n"), tok.eos_id]


def test_chat_with_history(stage, batch, monkeypatch):
    answer = stage.chat(batch.video[0], "what color is it?", history=[("what shape is it?", "circle")])
    assert isinstance(answer, str) and "\n" not in answer
    assert stage.chat(batch.video[:1], "what shape is it?") == stage.chat(batch.video[0], "what shape is it?")
    seen = {}
    real = stage.decode

    def spy(prefix, prompt_ids, *args, **kwargs):
        seen["prompt"] = list(prompt_ids)
        return real(prefix, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(stage, "decode", spy)
    history = [("what shape is it?", "circle")]
    stage.chat(batch.video[0], "what color is it?", history=history)
    assert seen["prompt"] == dialogue_prompt_ids(stage.tokenizer, "what color is it?", history)
    # a history longer than the LM's positions drops the oldest turns instead of failing
    long = [(f"question number {i}?", "an answer") for i in range(20)]
    assert isinstance(stage.chat(batch.video[0], "what color is it?", history=long), str)
    with pytest.raises(ValueError, match="one clip"):
        stage.chat(batch.video[:2], "what color is it?")


# -- Hugging Face language model --------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_gpt2_tiny_path(batch):
    stage = make_stage(lm="gpt2-tiny").eval()
    assert type(stage.lm).__name__ == "GPT2LMHeadModel" and stage.lm_dim == 64
    out = stage.compute_loss(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert (
        stage.resampler.query.grad is not None
        and stage.video_encoder.patch_embed.proj.weight.grad is not None
    )
    captions = stage.caption(batch.video)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    prefix = stage(batch.video).detach()
    prompt = [stage.bos_id]
    assert stage._hf_step(prefix, torch.tensor([prompt] * 4), None)[1] is not None  # the cache is real
    assert stage.decode(prefix, prompt, 10, use_cache=True) == stage.decode(
        prefix, prompt, 10, use_cache=False
    )
    assert isinstance(stage.chat(batch.video[0], "what color is it?"), str)


def test_lm_errors():
    with pytest.raises(ValueError, match="not CausalDecoder overrides"):
        NextTokenStage(encoder=ENCODER, lm_config={"dimension": 64})
    with pytest.raises(FileNotFoundError, match="never downloads"):
        NextTokenStage(encoder=ENCODER, lm="/nonexistent/llm-folder")
    with pytest.raises(ValueError, match="max_new_tokens"):
        NextTokenStage(encoder=ENCODER, lm_config={**LM, "max_length": 16}, max_new_tokens=40)


# -- audio / speech fusion, init_from -------------------------------------------------------------


def test_audio_and_speech_inform_the_prefix(batch):
    stage = make_stage(
        use_audio=True,
        use_speech=True,
        audio={"dim": 32, "depth": 1, "num_heads": 2},
        text={"dim": 32, "depth": 1, "num_heads": 2},
        fusion={"dim": 64, "num_heads": 2},
    )
    assert set(stage.shared_modules()) == {"video_encoder", "audio_encoder", "text_encoder", "fusion"}
    out = stage.compute_loss(batch)
    out["loss"].backward()
    for name in ("audio_encoder", "text_encoder", "fusion", "resampler", "lm"):
        assert any(
            p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(stage, name).parameters()
        ), name
    stage.eval()
    with torch.no_grad():
        a = stage.batch_prefix(batch)
        other_speech = dataclasses.replace(
            batch, speech_ids=batch.speech_ids.roll(1, dims=0), speech_mask=batch.speech_mask.roll(1, dims=0)
        )
        assert not torch.allclose(stage.batch_prefix(other_speech), a)
        assert not torch.allclose(
            stage.batch_prefix(dataclasses.replace(batch, audio=batch.audio.flip(0))), a
        )
        # a plain video tensor still works: the absent modalities are gated off
        assert stage.caption(batch.video[:1], max_new_tokens=3)


def test_init_from_loads_shared_weights(tmp_path, batch):
    source = make_stage()
    with torch.no_grad():
        for p in source.video_encoder.parameters():
            p.add_(0.5)
    export_shared_weights(source, tmp_path / "export", {"stage": "stage2"})
    torch.manual_seed(1)
    target = NextTokenStage(encoder=ENCODER, lm_config=LM, num_queries=8, init_from=str(tmp_path / "export"))
    for (name, p), q in zip(
        target.video_encoder.state_dict().items(), source.video_encoder.state_dict().values()
    ):
        torch.testing.assert_close(p, q, msg=name)
    assert target.hparams["init_from"] == str(tmp_path / "export")


# -- learning ---------------------------------------------------------------------------------------


def test_overfits_eight_clips_to_exact_captions():
    small = {
        **ENCODER,
        "embed_dim": 64,
        "num_heads": 2,
        "mlp_dim": 128,
        "clip_embed_dim": 64,
        "attn_pool_heads": 2,
    }
    stage = make_stage(encoder=small, lm_config={**LM, "max_length": 64}, max_new_tokens=48)
    batch = without(VideoCollate(max_text_length=48)(clips(8)), "dialogue")
    opt = torch.optim.AdamW(stage.parameters(), lr=2e-3, weight_decay=0.0)
    captions: list[str] = []
    for step in range(1, 301):
        loss = stage.compute_loss(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 125 and step % 25 == 0:
            captions = stage.caption(batch.video)
            if captions == batch.captions:
                break
    assert captions == batch.captions, f"after {step} steps: {captions} vs {batch.captions}"


# -- Lightning --------------------------------------------------------------------------------------


def datamodule(**kw) -> SyntheticVideoDataModule:
    args = dict(
        num_frames=8,
        image_size=32,
        batch_size=4,
        train_size=8,
        val_size=8,
        test_size=4,
        modalities=["caption", "qa"],
    )
    return SyntheticVideoDataModule(**{**args, **kw})


def test_lightning_fast_dev_run_logs_metrics():
    stage = make_stage(max_new_tokens=8, val_generate_batches=1)
    trainer = L.Trainer(
        fast_dev_run=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dm = datamodule()
    trainer.fit(stage, dm)
    assert "train/loss" in trainer.callback_metrics
    trainer.validate(stage, dm)
    metrics = trainer.callback_metrics
    for key in (
        "loss",
        "caption_loss",
        "dialogue_loss",
        "token_acc",
        "answer_acc",
        "bleu",
        "bleu1",
        "rouge_l",
    ):
        assert f"val/{key}" in metrics, key
    for key in ("caption_attr_acc", "caption_color_acc", "caption_shape_acc", "caption_direction_acc"):
        assert 0.0 <= float(metrics[f"val/{key}"]) <= 1.0
    assert torch.isfinite(metrics["val/loss"])


class TextLogger(Logger):
    """A logger whose experiment has TensorBoard's ``add_text``."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: list[tuple[str, str]] = []

    @property
    def name(self) -> str:
        return "text"

    @property
    def version(self) -> int:
        return 0

    @property
    def experiment(self) -> TextLogger:
        return self

    def add_text(self, tag: str, text: str, global_step: int | None = None) -> None:
        self.texts.append((tag, text))

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


def test_validate_and_test_write_caption_samples():
    stage = make_stage(max_new_tokens=4, val_generate_batches=1)
    logger = TextLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        logger=logger,
        limit_val_batches=1,
        limit_test_batches=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dm = datamodule()
    trainer.validate(stage, dm)
    trainer.test(stage, dm)
    assert "test/bleu" in trainer.callback_metrics and "test/caption_attr_acc" in trainer.callback_metrics
    tags = [t for t, _ in logger.texts]
    assert tags == ["val/captions", "test/captions"]
    assert "| clip | generated | reference |" in logger.texts[0][1] and "val:0" in logger.texts[0][1]


def test_a_stage_with_audio_is_also_scored_on_the_video_alone():
    stage = make_stage(
        max_new_tokens=6,
        val_generate_batches=1,
        use_audio=True,
        audio={"dim": 32, "depth": 1, "num_heads": 2},
        fusion={"dim": 64, "num_heads": 2},
    )
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        limit_val_batches=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    dm = datamodule(modalities=["caption", "qa", "audio"])
    trainer.validate(stage, dm)
    metrics = trainer.callback_metrics
    for key in ("caption_attr_acc", "caption_shape_acc"):
        assert 0.0 <= float(metrics[f"val/{key}"]) <= 1.0
        assert 0.0 <= float(metrics[f"val/{key}_video_only"]) <= 1.0
    # the video-only score decodes from the video prefix alone: it matches caption(video)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    stage.eval()
    with torch.no_grad():
        alone = stage.caption(batch.video, max_new_tokens=6)
        with_audio = stage.caption(batch, max_new_tokens=6)
        assert not torch.allclose(stage.batch_prefix(batch), stage.visual_prefix(batch.video))  # audio counts
    from iv2_lightning.data.synthetic import attributes_from_text

    hits = [
        attributes_from_text(c).get("shape") == m["attributes"]["shape"] for c, m in zip(alone, batch.meta)
    ]
    hits_audio = [
        attributes_from_text(c).get("shape") == m["attributes"]["shape"]
        for c, m in zip(with_audio, batch.meta)
    ]
    assert float(metrics["val/caption_shape_acc_video_only"]) == pytest.approx(sum(hits) / len(hits))
    assert float(metrics["val/caption_shape_acc"]) == pytest.approx(sum(hits_audio) / len(hits_audio))
    # a video-only stage logs no such keys
    plain = make_stage(max_new_tokens=4, val_generate_batches=1)
    trainer.validate(plain, datamodule())
    assert not any(k.endswith("_video_only") for k in trainer.callback_metrics)
