"""VideoTextAligner alone, in a plain PyTorch loop: output types, learning, windows, prompts, weights
resolved from the data's fields, errors, and the same losses as the Lightning stage that wraps it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from iv2_lightning.data.batch import VideoCollate, VideoSample
from iv2_lightning.models.aligner import (
    TERM_FIELDS,
    AlignerFeatures,
    AlignerOutput,
    Side,
    VideoTextAligner,
    resolve_loss_weights,
)
from iv2_lightning.models.audio import AudioEncoder
from iv2_lightning.models.backbone import build_video_encoder
from iv2_lightning.models.text import ByteTokenizer, TextEncoder

TINY = {"image_size": 32, "num_frames": 4, "depth": 1, "patch_size": 8}
TEXT = {"dim": 32, "depth": 1, "num_heads": 2}
AUDIO = {"dim": 32, "depth": 1, "num_heads": 2}


def aligner(seed: int = 0, audio: bool = True, **kw) -> VideoTextAligner:
    """Built in the order ContrastiveStage builds it (video, text, audio encoder, then the heads)."""
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    video = build_video_encoder("tiny", **TINY)
    text = TextEncoder(vocab_size=tok.vocab_size, pad_id=tok.pad_id, **TEXT)
    if not audio:
        kw = {"atc": 0.0, "vac": 0.0, "avtc": 0.0, **kw}
    return VideoTextAligner(
        video,
        text,
        tok,
        audio_encoder=AudioEncoder(**AUDIO) if audio else None,
        fusion={"dim": 32, "num_heads": 2},
        embed_dim=16,
        **kw,
    )


def batch(n: int = 6, frames: int = 4, seed: int = 0):
    """Clips whose caption, transcript and sound all name their (paired) sample id."""
    g = torch.Generator().manual_seed(seed)
    samples = [
        VideoSample(
            video=torch.randn(3, frames, 32, 32, generator=g) + (i % 3),
            sample_id=i % 3 if i < 4 else i,
            caption=f"clip {i % 3 if i < 4 else i} moves",
            speech=f"number {i}",
            audio=torch.randn(20, 128, generator=g) + i,
        )
        for i in range(n)
    ]
    return VideoCollate(max_text_length=24)(samples)


def inputs(b) -> dict[str, torch.Tensor | None]:
    return {name: getattr(b, name) for name in VideoTextAligner.INPUTS}


def _only_tuples_dicts_and_tensors(x) -> bool:
    """What DeepSpeed ZeRO-3 can see into: tensors in (named) tuples, lists and dicts, or None."""
    if x is None or isinstance(x, torch.Tensor):
        return True
    if isinstance(x, tuple | list):
        return all(_only_tuples_dicts_and_tensors(v) for v in x)
    if isinstance(x, dict):
        return all(_only_tuples_dicts_and_tensors(v) for v in x.values())
    return False


def test_output_types_are_named_tuples_and_dicts_of_tensors():
    model = aligner(mlm=0.5).train()
    out = model(**inputs(batch()))
    assert isinstance(out, AlignerOutput) and isinstance(out.features, AlignerFeatures)
    assert isinstance(out.features.video, Side) and isinstance(out.features.audio, Side)
    assert set(out.terms) == set(TERM_FIELDS) and all(t.dim() == 0 for t in out.terms.values())
    assert _only_tuples_dicts_and_tensors(out)
    assert torch.allclose(out.loss, sum(model.loss_weights[k] * v for k, v in out.terms.items()))
    assert set(out.scalars()) == {"loss", "temperature", *out.terms, *out.gates}
    assert out.features.video.emb.shape == (6, 16) and out.features.caption.present.all()


def test_a_plain_pytorch_loop_lowers_the_loss():
    model = aligner(video_mask_ratio=0.0).train()
    b = inputs(batch())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss() -> float:
        torch.manual_seed(7)  # the same hard negatives every time
        with torch.no_grad():
            return float(model(**b).loss)

    before = loss()
    for _ in range(8):
        out = model(**b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert loss() < before - 0.2  # (every contrastive term leaves its start above ln 6 for ln 6)


def test_the_stage_gives_the_same_losses_as_the_model():
    from iv2_lightning.stages.contrastive import ContrastiveStage, aligner_inputs

    torch.manual_seed(0)
    stage = ContrastiveStage(
        encoder=dict(TINY), text=TEXT, audio=AUDIO, fusion={"dim": 32, "num_heads": 2}, embed_dim=16, mlm=0.5
    )
    model = aligner(mlm=0.5)
    assert stage.model.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stage.model.state_dict().items())
    b = batch()
    stage.train(), model.train()
    torch.manual_seed(1)
    from_stage = stage.compute_loss(b)
    torch.manual_seed(1)
    from_model = model(**aligner_inputs(b)).scalars()
    assert from_stage.keys() == from_model.keys()
    for k, v in from_model.items():
        assert torch.equal(from_stage[k], v), k


def test_long_clips_go_through_windows_of_the_training_frames():
    model = aligner(audio=False).eval()
    video = batch(2, frames=6).video  # 6 frames, windows of 4: the tail padded with the last frame
    with torch.no_grad():
        clip, windows, mask = model.encode_video_windows(video)
        first = model.encode_video(video[:, :, :4])
        tail = model.encode_video(torch.cat([video[:, :, 4:], video[:, :, -1:].expand(-1, -1, 2, -1, -1)], 2))
        direct = model.encode_video(video)
        features = model.features(video)
    assert windows.shape == (2, 2, 16) and mask.all()
    assert torch.allclose(windows[:, 0], first, atol=1e-5) and torch.allclose(windows[:, 1], tail, atol=1e-5)
    assert torch.allclose(clip, F.normalize(first + tail, dim=-1), atol=1e-5)
    assert torch.allclose(direct, clip, atol=1e-6)
    assert torch.allclose(F.normalize(features.video.emb, dim=-1), clip, atol=1e-5)
    enc = model.video_encoder
    assert features.video.tokens.shape[1] == 2 * (enc.num_prefix + enc.num_patches)  # both windows' tokens


def test_encoders_and_prompt_ensembling():
    model = aligner().eval()
    b = batch(4)
    prompts = {"up": ["going up", "moving up"], "left": ["to the left"]}
    with torch.no_grad():
        for emb in (
            model.encode_video(b.video),
            model.encode_text(b.captions),
            model.encode_audio(b.audio, b.audio_frame_mask),
        ):
            assert emb.shape == (4, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(4), atol=1e-5)
        classes = model.encode_prompts(prompts)
        up = F.normalize(model.encode_text(prompts["up"]).mean(0), dim=0)
    assert classes.shape == (2, 16) and torch.allclose(classes[0], up, atol=1e-5)


def test_match_scores_read_the_kept_tokens():
    model = aligner().eval()
    with torch.no_grad():
        out = model(**inputs(batch(4)))
        tokens, masks = model.match_inputs(out.features)
        scores = model.match_scores(tokens, masks)
    assert set(tokens) == {"video", "text", "audio"} and scores.shape == (4,)
    assert all(not t.requires_grad for t in tokens.values())
    with pytest.raises(RuntimeError, match="vtm > 0"):
        aligner(vtm=0.0).match_scores(tokens, masks)


def test_loss_weights_follow_the_data_fields():
    weights = dict.fromkeys(TERM_FIELDS)
    assert resolve_loss_weights(weights) == {
        "vtc": 1.0, "atc": 0.5, "vac": 0.5, "vsc": 0.5, "avtc": 0.5, "vtm": 0.5, "mlm": 0.0
    }  # fmt: skip
    only_captions = resolve_loss_weights(weights, ["video", "caption"])
    assert {k for k, w in only_captions.items() if w > 0} == {"vtc", "vtm"}
    explicit = resolve_loss_weights({**weights, "atc": 0.2, "vtm": 0.0}, ["video", "caption", "speech"])
    assert explicit["atc"] == 0.2 and explicit["vtm"] == 0.0 and explicit["vsc"] == 0.5
    with pytest.raises(ValueError, match="unknown loss terms"):
        resolve_loss_weights({"itc": 1.0})


def test_bad_arguments():
    with pytest.raises(ValueError, match="needs an audio_encoder"):
        aligner(audio=False, vac=0.5)
    with pytest.raises(ValueError, match="at least one"):
        aligner(audio=False, vtc=0.0, vsc=0.0, vtm=0.0)
    with pytest.raises(ValueError, match="loss weights must be >= 0"):
        aligner(vtc=-1.0)

    class NoMask(ByteTokenizer):
        mask_id = None

    torch.manual_seed(0)
    video, text = build_video_encoder("tiny", **TINY), TextEncoder(vocab_size=260, **TEXT)
    with pytest.raises(ValueError, match="mlm > 0 needs a tokenizer with a mask token"):
        VideoTextAligner(video, text, NoMask(), atc=0, vac=0, avtc=0, mlm=0.5)


# -- the HTE over long clips (temporal=...) ---------------------------------------------------------


def hte_aligner(aggregate: str = "transformer", seed: int = 0) -> VideoTextAligner:
    return aligner(seed, audio=False, temporal={"aggregate": aggregate, "depth": 1, "tokens_per_window": 2})


def test_long_clips_go_through_the_trained_hte_in_order():
    """With ``temporal``, a long clip's embedding is video_proj of the HTE: swapping its two windows
    changes it (the mean of the windows cannot tell), and it is what encode_video gives."""
    g = torch.Generator().manual_seed(3)
    video = torch.randn(2, 3, 8, 32, 32, generator=g)  # 2 windows of the trunk's 4 frames
    swapped = torch.cat([video[:, :, 4:], video[:, :, :4]], dim=2)
    for aggregate, order_matters in (("transformer", True), ("mean", False)):
        model = hte_aligner(aggregate).eval()
        hte_module = model.temporal_encoder
        with torch.no_grad():
            # the HTE's head starts at zero: a long clip starts as video_proj of its windows' mean
            mean_pooled = hte_module(video).window_embeddings.mean(dim=1)
            start = F.normalize(model.video_proj(mean_pooled), dim=-1)
            assert torch.allclose(model.encode_video(video), start, atol=1e-5)
            torch.nn.init.normal_(hte_module.head.weight, std=0.5)  # as training moves it
            clip, windows, mask = model.encode_video_windows(video)
            clip_swapped = model.encode_video_windows(swapped)[0]
            assert torch.allclose(model.encode_video(video), clip)
            assert windows.shape == (2, 2, 16) and mask.all()
            hte = hte_module(video)  # the HTE on its own, windows encoded inside it
            expected = model.video_proj(hte.window_embeddings.mean(dim=1) + hte.embedding)
            assert torch.allclose(clip, F.normalize(expected, dim=-1), atol=1e-5)
        moved = (clip - clip_swapped).abs().max()
        assert (moved > 1e-3) if order_matters else (moved < 1e-5), (aggregate, float(moved))
    plain = aligner(audio=False).eval()
    with torch.no_grad():  # without temporal: the normalised mean of the window embeddings
        clip, windows, mask = plain.encode_video_windows(video)
        assert torch.allclose(clip, torch.nn.functional.normalize(windows.mean(1), dim=-1), atol=1e-6)


def test_the_contrastive_terms_train_the_hte_and_its_parameters_are_saved():
    model = hte_aligner()
    b = batch(n=4, frames=8)
    out = model(**inputs(b))
    out.loss.backward()
    head = model.temporal_encoder.head
    assert head.weight.grad.abs().sum() > 0  # the zero-started head learns first...
    torch.nn.init.normal_(head.weight, std=0.1)
    model.zero_grad()
    model(**inputs(b)).loss.backward()  # ...and through it the temporal transformer
    assert model.temporal_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    keys = model.state_dict().keys()
    assert "temporal_encoder.blocks.0.attn.qkv.weight" in keys
    assert not any(k.startswith("temporal_encoder.encoder.") for k in keys)  # the trunk is saved once
    with pytest.raises(ValueError, match=r"temporal\.out_dim must be the encoder's pooled width"):
        aligner(audio=False, temporal={"out_dim": 7})
