"""VideoCaptioner (the torch model of stage 3) without Lightning: shapes, losses that count only what
they should, causal text, decoding (greedy = the argmax loop, seeded sampling reproducible), the chat
prompt format, the Hugging Face LM path, fusion of audio/speech, and learning in a plain PyTorch loop."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from iv2_lightning.data.batch import VideoBatch, VideoCollate, VideoSample
from iv2_lightning.data.synthetic import SyntheticVideoDataset
from iv2_lightning.models.audio import AudioEncoder
from iv2_lightning.models.backbone import VideoEncoder, preset_config
from iv2_lightning.models.captioner import (
    INPUT_FIELDS,
    CaptionerOutput,
    VideoCaptioner,
    build_language_model,
    dialogue_prompt_ids,
)
from iv2_lightning.models.resampler import QueryResampler
from iv2_lightning.models.text import TextEncoder, build_tokenizer

ENCODER = {"image_size": 32, "patch_size": 8, "depth": 1, "num_frames": 4}
LM = {"dim": 64, "depth": 1, "num_heads": 2, "max_length": 160}
SMALL = {"dim": 32, "depth": 1, "num_heads": 2}
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
LM_KINDS = [
    "builtin",
    pytest.param("gpt2-tiny", marks=pytest.mark.skipif(not HAS_TRANSFORMERS, reason="no transformers")),
]


def make_captioner(
    lm: str = "builtin", encoder: dict | None = None, audio: bool = False, speech: bool = False, **kw
) -> VideoCaptioner:
    """A tiny captioner, built in the order NextTokenStage builds it (so a seed gives the same weights)."""
    torch.manual_seed(0)
    tok = build_tokenizer("byte")
    video = VideoEncoder(**preset_config("tiny", **(encoder or ENCODER)))
    audio_encoder = AudioEncoder(**SMALL) if audio else None
    text_encoder = TextEncoder(vocab_size=tok.vocab_size, pad_id=tok.pad_id, **SMALL) if speech else None
    args = {"num_queries": 8, "max_new_tokens": 12, "lm_config": LM if lm == "builtin" else None}
    if audio or speech:
        args["fusion"] = {"dim": 64, "num_heads": 2}
    return VideoCaptioner(
        video, tok, lm=lm, audio_encoder=audio_encoder, text_encoder=text_encoder, **{**args, **kw}
    )


def inputs(batch: VideoBatch) -> dict:
    return {f: getattr(batch, f) for f in INPUT_FIELDS}


def clips(n: int, with_audio: bool = False) -> list[VideoSample]:
    ds = SyntheticVideoDataset(size=n, num_frames=8, image_size=32, with_audio=with_audio)
    return [ds[i] for i in range(n)]


def without(batch: VideoBatch, *what: str) -> VideoBatch:
    fields = {
        "caption": ("caption_ids", "caption_mask"),
        "dialogue": ("dialogue_ids", "dialogue_mask", "dialogue_target_mask"),
    }
    return dataclasses.replace(batch, **{f: None for w in what for f in fields[w]})


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
def model() -> VideoCaptioner:
    return make_captioner().eval()


# -- shapes and output types ----------------------------------------------------------------------


def test_prefix_and_logit_shapes(model, batch):
    prefix = model.visual_prefix(batch.video)
    assert prefix.shape == (4, 8, 64)
    logits = model.lm_logits(prefix, batch.caption_ids, batch.caption_mask)
    assert logits.shape == (*batch.caption_ids.shape, model.tokenizer.vocab_size)
    torch.testing.assert_close(model.prefix_of(batch), prefix)  # no audio encoder: the audio is not read
    with pytest.raises(ValueError, match="video must be"):
        model.prefix_of(batch.video[0])


def test_pooled_token_leads_the_prefix(batch):
    m = make_captioner(pooled_token=True).eval()
    with torch.no_grad():
        prefix = m.prefix_of(batch)
        out = m.video_encoder(batch.video)
    assert prefix.shape == (4, 9, m.lm_dim) and m.prefix_length == 9
    torch.testing.assert_close(prefix[:, 0], m.pooled_proj(out.pooled))
    torch.testing.assert_close(prefix[:, 1:], m.resampler(out.tokens))
    # the LM is trained through it: the pooled projection gets gradients from the caption loss
    m.train()
    m(**inputs(batch)).loss.backward()
    assert m.pooled_proj.weight.grad.abs().sum() > 0
    assert make_captioner().pooled_proj is None and make_captioner().prefix_length == 8


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


@pytest.mark.parametrize("parts", [("caption",), ("dialogue",), ("caption", "dialogue")])
def test_forward_returns_the_terms_as_tensors(model, batch, parts):
    out = model(**inputs(without(batch, *({"caption", "dialogue"} - set(parts)))))
    assert isinstance(out, CaptionerOutput)
    present = {k: v for k, v in out._asdict().items() if v is not None}
    assert all(isinstance(v, torch.Tensor) for v in present.values())
    assert ("caption_loss" in present) == ("caption" in parts)
    assert ("dialogue_loss" in present) == ("dialogue" in parts)
    assert torch.isfinite(out.loss) and out.loss > 0
    expected = sum(getattr(out, f"{p}_loss").item() for p in parts)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    for name in ("caption", "answer"):
        if getattr(out, f"{name}_total") is not None:
            assert 0 <= int(getattr(out, f"{name}_correct")) <= int(getattr(out, f"{name}_total"))


def test_batch_without_text_fails_clearly(model, batch):
    with pytest.raises(ValueError, match="neither captions nor dialogue"):
        model(**inputs(without(batch, "caption", "dialogue")))


def test_weights_and_lengths_are_checked():
    with pytest.raises(ValueError, match="not both 0"):
        make_captioner(caption_weight=0.0, dialogue_weight=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        make_captioner(label_smoothing=1.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_captioner(lm_config={**LM, "max_length": 16}, max_new_tokens=40)


# -- losses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("lm", LM_KINDS)
def test_loss_ignores_padding(batch, lm):
    model = make_captioner(lm=lm).eval()
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
    a, b = model(**inputs(batch)), model(**inputs(noisy))
    # the losses and the teacher-forced accuracies (correct / total) are the same
    for key in ("caption_loss", "dialogue_loss", "caption_correct", "caption_total", "answer_correct"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key))


def test_dialogue_loss_counts_only_answers(model, batch):
    b = without(batch, "caption")
    with torch.no_grad():
        out = model(**inputs(b))
        logits = model.lm_logits(model.visual_prefix(b.video), b.dialogue_ids, b.dialogue_mask)
    answers = b.dialogue_target_mask[:, 1:]
    assert 0 < int(answers.sum()) < int(b.dialogue_mask[:, 1:].sum())  # questions are not targets
    manual = torch.nn.functional.cross_entropy(logits[:, :-1][answers], b.dialogue_ids[:, 1:][answers])
    torch.testing.assert_close(out.dialogue_loss, manual)


@pytest.mark.parametrize("lm", LM_KINDS)
def test_language_model_is_causal_over_text(batch, lm):
    model = make_captioner(lm=lm).eval()
    with torch.no_grad():
        prefix = model.visual_prefix(batch.video[:2])
        ids = batch.caption_ids[:2, :12].clone()
        before = model.lm_logits(prefix, ids)
        j = 7
        ids[:, j] = (ids[:, j] - 4 + 1) % 256 + 4
        after = model.lm_logits(prefix, ids)
    torch.testing.assert_close(after[:, :j], before[:, :j])
    assert not torch.allclose(after[:, j:], before[:, j:])


def test_caption_prompt_is_context_not_target(batch):
    model = make_captioner(prompt="Describe:").eval()
    ids, mask, target = model.caption_sequences(batch.caption_ids, batch.caption_mask)
    n = len(model.tokenizer.encode("Describe:"))
    assert bool((ids[:, 1 : 1 + n] == torch.tensor(model.tokenizer.encode("Describe:"))).all())
    assert not bool(target[:, : 1 + n].any())
    # the targets are exactly the caption bytes and EOS
    for i, caption in enumerate(batch.captions):
        assert model.tokenizer.decode(ids[i][target[i]]) == caption
        assert int(ids[i][target[i]][-1]) == model.eos_id
        assert int(mask[i].sum()) == 1 + n + len(caption.encode()) + 1  # BOS, prompt, caption, EOS
    assert torch.isfinite(model(**inputs(batch)).loss)


# -- decoding -------------------------------------------------------------------------------------


def test_caption_greedy_deterministic_and_sampling_reproducible(model, batch):
    greedy = model.caption(batch.video)
    assert isinstance(greedy, list) and len(greedy) == 4 and all(isinstance(c, str) for c in greedy)
    assert model.caption(batch.video) == greedy
    torch.manual_seed(3)
    sampled = model.caption(batch.video, top_p=0.9, temperature=1.5)
    torch.manual_seed(3)
    assert model.caption(batch.video, top_p=0.9, temperature=1.5) == sampled
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert model.caption(batch.video, top_p=0.5, generator=g1) == model.caption(
        batch.video, top_p=0.5, generator=g2
    )
    assert model.caption(batch) == greedy  # a VideoBatch works too
    with pytest.raises(ValueError, match="top_p"):
        model.caption(batch.video, top_p=0.0)


@pytest.mark.parametrize("lm", LM_KINDS)
def test_greedy_is_the_argmax_loop(batch, lm):
    """Greedy decoding equals the plain loop: argmax of the full forward pass, one token at a time,
    until EOS (the loop the stage ran before decoding moved to models.generation)."""
    model = make_captioner(lm=lm).eval()
    vocab, pad = model.tokenizer.vocab_size, model.tokenizer.pad_id
    with torch.no_grad():
        prefix = model.visual_prefix(batch.video)
        rows = model.generate(prefix, [model.bos_id], 10)
        ids = torch.full((4, 1), model.bos_id)
        done = torch.zeros(4, dtype=torch.bool)
        expected: list[list[int]] = [[] for _ in range(4)]
        for _ in range(10):
            token = model.lm_logits(prefix, ids)[:, -1, :vocab].argmax(dim=-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            for i, t in enumerate(token.tolist()):
                if not done[i] and t != model.eos_id:
                    expected[i].append(t)
            done |= token == model.eos_id
            ids = torch.cat([ids, token[:, None]], dim=1)
    assert rows == expected


def test_same_generator_seed_same_tokens(model, batch):
    with torch.no_grad():
        prefix = model.visual_prefix(batch.video)

    def sample(seed: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return model.generate(prefix, [model.bos_id], 10, top_p=0.95, temperature=2.0, generator=gen)

    assert sample(11) == sample(11)
    assert len({str(sample(s)) for s in range(4)}) > 1  # sampling, not argmax
    # a top_p that keeps only the most likely token is greedy decoding
    tiny = model.generate(prefix, [model.bos_id], 10, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert tiny == model.generate(prefix, [model.bos_id], 10)


def test_caption_restores_training_mode(batch):
    model = make_captioner()
    model.train()
    model.video_encoder.eval()  # e.g. frozen by BaseStage
    model.caption(batch.video[:1], max_new_tokens=2)
    assert model.training and model.lm.training and not model.video_encoder.training


def test_chat_prompt_matches_training_format():
    tok = build_tokenizer("byte")
    qa = [("what color is it?", "red"), ("which way does it move?", "left")]
    sample = clips(1)[0]
    sample.qa = qa
    row = VideoCollate()([sample]).dialogue_ids[0].tolist()
    ids = dialogue_prompt_ids(tok, qa[1][0], qa[:1])
    assert row == [*ids, *tok.encode(f" {qa[1][1]}\n"), tok.eos_id]


def test_chat_with_history(model, batch, monkeypatch):
    answer = model.chat(batch.video[0], "what color is it?", history=[("what shape is it?", "circle")])
    assert isinstance(answer, str) and "\n" not in answer
    assert model.chat(batch.video[:1], "what shape is it?") == model.chat(batch.video[0], "what shape is it?")
    seen = {}
    real = model.generate

    def spy(prefix, prompt_ids, *args, **kwargs):
        seen["prompt"] = list(prompt_ids)
        return real(prefix, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    history = [("what shape is it?", "circle")]
    model.chat(batch.video[0], "what color is it?", history=history)
    assert seen["prompt"] == dialogue_prompt_ids(model.tokenizer, "what color is it?", history)
    # a history longer than the LM's positions drops the oldest turns instead of failing
    long = [(f"question number {i}?", "an answer") for i in range(20)]
    assert isinstance(model.chat(batch.video[0], "what color is it?", history=long), str)
    with pytest.raises(ValueError, match="one clip"):
        model.chat(batch.video[:2], "what color is it?")


# -- Hugging Face language model --------------------------------------------------------------------


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers is not installed")
def test_gpt2_tiny_path(batch):
    model = make_captioner(lm="gpt2-tiny").eval()
    assert type(model.lm).__name__ == "GPT2LMHeadModel" and model.lm_dim == 64
    out = model(**inputs(batch))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert (
        model.resampler.query.grad is not None
        and model.video_encoder.patch_embed.proj.weight.grad is not None
    )
    captions = model.caption(batch.video)
    assert len(captions) == 4 and all(isinstance(c, str) for c in captions)
    prefix = model.visual_prefix(batch.video).detach()
    prompt = [model.bos_id]
    step = model._step(prefix, use_cache=True)
    assert step(torch.tensor([prompt] * 4), None)[1] is not None  # the cache is real
    assert model.generate(prefix, prompt, 10, use_cache=True) == model.generate(
        prefix, prompt, 10, use_cache=False
    )
    assert isinstance(model.chat(batch.video[0], "what color is it?"), str)


def test_lm_errors():
    tok = build_tokenizer("byte")
    with pytest.raises(ValueError, match="not CausalDecoder overrides"):
        build_language_model("builtin", {"dimension": 64}, tok, tok.bos_id, tok.eos_id)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build_language_model("/nonexistent/llm-folder", None, tok, tok.bos_id, tok.eos_id)


# -- audio / speech fusion --------------------------------------------------------------------------


def test_audio_and_speech_inform_the_prefix(batch):
    model = make_captioner(audio=True, speech=True)
    assert model.use_audio and model.use_speech
    out = model(**inputs(batch))
    out.loss.backward()
    for name in ("audio_encoder", "text_encoder", "fusion", "resampler", "lm"):
        assert any(
            p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters()
        ), name
    model.eval()
    with torch.no_grad():
        a = model.prefix_of(batch)
        other_speech = dataclasses.replace(
            batch, speech_ids=batch.speech_ids.roll(1, dims=0), speech_mask=batch.speech_mask.roll(1, dims=0)
        )
        assert not torch.allclose(model.prefix_of(other_speech), a)
        assert not torch.allclose(model.prefix_of(dataclasses.replace(batch, audio=batch.audio.flip(0))), a)
        # a plain video tensor still works: the absent modalities are gated off
        assert model.caption(batch.video[:1], max_new_tokens=3)


# -- learning in a plain PyTorch loop ---------------------------------------------------------------


def test_a_few_steps_lower_the_loss(batch):
    model = make_captioner()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(8):
        loss = model(**inputs(batch)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_overfits_eight_clips_to_exact_captions():
    small = {
        **ENCODER,
        "embed_dim": 64,
        "num_heads": 2,
        "mlp_dim": 128,
        "clip_embed_dim": 64,
        "attn_pool_heads": 2,
    }
    model = make_captioner(encoder=small, lm_config={**LM, "max_length": 64}, max_new_tokens=48)
    batch = without(VideoCollate(max_text_length=48)(clips(8)), "dialogue")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    captions: list[str] = []
    for step in range(1, 301):
        loss = model(**inputs(batch)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step >= 125 and step % 25 == 0:
            captions = model.caption(batch.video)
            if captions == batch.captions:
                break
    assert captions == batch.captions, f"after {step} steps: {captions} vs {batch.captions}"
