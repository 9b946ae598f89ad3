"""BEATsEncoder: InternVideo2-6B's audio encoder in the released BEATs layout (``models/beats.py``).

Parity is checked against ``models/official/reference_beats.py`` (the released equations written out,
sequence-first, with the logit-scaling trick and ``torch._weight_norm``) on random tensors in the
released checkpoint layout, built here from the released names and shapes, not from our module.
"""

from __future__ import annotations

import math

import pytest
import torch

from iv2_lightning.features.fbank import compute_fbank
from iv2_lightning.models.beats import BEATsConfig, BEATsEncoder, relative_position_buckets
from iv2_lightning.models.official import reference_beats as ref

# a released-style cfg at test size (the released BEATsConfig's names)
CFG = {
    "input_patch_size": 16, "embed_dim": 24, "conv_bias": False, "encoder_layers": 3, "encoder_embed_dim": 32,
    "encoder_ffn_embed_dim": 48, "encoder_attention_heads": 4, "activation_fn": "gelu", "layer_norm_first": False,
    "deep_norm": True, "conv_pos": 16, "conv_pos_groups": 4, "relative_position_embedding": True,
    "num_buckets": 32, "max_distance": 40, "gru_rel_pos": True, "dropout": 0.1, "finetuned_model": False,
}  # fmt: skip


def official_state(cfg: dict, seed: int = 0, mel: int = 64) -> dict[str, torch.Tensor]:
    """Random tensors under the released BEATs names and shapes. The shared relative-position table
    is stored under every layer, as ``state_dict()`` of the released model (one module, many owners)
    writes it; norms and biases are random too so that every tensor matters."""
    g = torch.Generator().manual_seed(seed)
    d, e, f = cfg["encoder_embed_dim"], cfg["embed_dim"], cfg["encoder_ffn_embed_dim"]
    h, p, k = cfg["encoder_attention_heads"], cfg["input_patch_size"], cfg["conv_pos"]

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "patch_embedding.weight": r(e, 1, p, p, scale=0.05),
        "layer_norm.weight": 1 + r(e, scale=0.1), "layer_norm.bias": r(e, scale=0.1),
        "encoder.pos_conv.0.weight_g": 1 + r(1, 1, k, scale=0.3).abs(),
        "encoder.pos_conv.0.weight_v": r(d, d // cfg["conv_pos_groups"], k),
        "encoder.pos_conv.0.bias": r(d, scale=0.1),
        "encoder.layer_norm.weight": 1 + r(d, scale=0.1), "encoder.layer_norm.bias": r(d, scale=0.1),
    }  # fmt: skip
    if e != d:
        sd |= {"post_extract_proj.weight": r(d, e), "post_extract_proj.bias": r(d, scale=0.1)}
    table = r(cfg["num_buckets"], h, scale=1.0)
    for i in range(cfg["encoder_layers"]):
        n = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[n + f"self_attn.{proj}.weight"] = r(d, d)
            sd[n + f"self_attn.{proj}.bias"] = r(d, scale=0.1)
        if cfg["relative_position_embedding"]:
            sd[n + "self_attn.relative_attention_bias.weight"] = table
        if cfg["gru_rel_pos"]:
            sd[n + "self_attn.grep_linear.weight"] = r(8, d // h, scale=0.5)
            sd[n + "self_attn.grep_linear.bias"] = r(8, scale=0.1)
            sd[n + "self_attn.grep_a"] = 1 + r(1, h, 1, 1, scale=0.3)
        for ln in ("self_attn_layer_norm", "final_layer_norm"):
            sd[n + f"{ln}.weight"] = 1 + r(d, scale=0.1)
            sd[n + f"{ln}.bias"] = r(d, scale=0.1)
        sd |= {
            n + "fc1.weight": r(f, d),
            n + "fc1.bias": r(f, scale=0.1),
            n + "fc2.weight": r(d, f),
            n + "fc2.bias": r(d, scale=0.1),
        }
    return sd


def waves(batch: int = 2, seconds: float = 0.9, seed: int = 1) -> torch.Tensor:
    """Tones with noise, [-1, 1] at 16 kHz (what compute_fbank and BEATs.preprocess take)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16000 * seconds)) / 16000
    rows = [
        0.5 * torch.sin(2 * math.pi * (220 + 180 * i) * t) + 0.05 * torch.randn(t.shape, generator=g)
        for i in range(batch)
    ]
    return torch.stack(rows)


VARIANTS = {
    "released (deep norm, gated relative bias)": {},
    "pre-norm, plain relative bias, no projection": {
        "layer_norm_first": True, "deep_norm": False, "gru_rel_pos": False, "embed_dim": 32,
    },
    "no relative bias, odd kernel": {"relative_position_embedding": False, "gru_rel_pos": False, "conv_pos": 15},
}  # fmt: skip


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tokens_and_pooled_match_the_released_equations(variant):
    cfg = {**CFG, **VARIANTS[variant]}
    sd = official_state(cfg)
    model = BEATsEncoder(BEATsConfig.from_official(cfg, num_mel_bins=64))
    report = model.load_beats_state(sd)
    assert report.missing == [] and report.unused == []
    wave = waves()
    bank = torch.stack([compute_fbank(w, 16000, num_mel_bins=64) for w in wave])  # [B, 88, 64]
    expected = ref.beats_tokens(sd, cfg, ref.preprocess(wave, num_mel_bins=64)[:, : bank.shape[1] // 16 * 16])
    out = model(bank)
    assert out.tokens.shape == expected.shape == (2, 5 * 4, 32)  # 88 frames -> 5 time x 4 frequency patches
    err = (out.tokens - expected).abs().max() / expected.abs().max()
    assert err < 1e-5, f"tokens differ from the released equations by {err:.2e} (relative)"
    pooled = ref.beats_pooled(sd, cfg, ref.preprocess(wave, num_mel_bins=64)[:, :80])
    assert torch.allclose(out.cls, pooled, atol=1e-5, rtol=1e-5)
    assert torch.equal(out.mask, torch.ones(2, 20, dtype=torch.bool))


def test_every_released_tensor_matters():
    """Perturbing any one tensor family moves the output: the parity above cannot pass by ignoring one."""
    sd = official_state(CFG)
    bank = torch.stack([compute_fbank(w, 16000, num_mel_bins=64) for w in waves()])
    model = BEATsEncoder(BEATsConfig.from_official(CFG, num_mel_bins=64))
    model.load_beats_state(sd)
    base = model(bank).tokens
    for key in ("encoder.layers.0.self_attn.relative_attention_bias.weight", "encoder.layers.2.self_attn.grep_a",
                "encoder.pos_conv.0.weight_g", "encoder.layers.1.self_attn.grep_linear.weight"):  # fmt: skip
        moved = dict(sd)
        moved[key] = sd[key] * 1.5
        if key.endswith("relative_attention_bias.weight"):  # one shared table: move every copy
            moved = {
                k: (v * 1.5 if k.endswith("relative_attention_bias.weight") else v) for k, v in sd.items()
            }
        model.load_beats_state(moved)
        assert (model(bank).tokens - base).abs().max() > 1e-3, key


def test_buckets_follow_the_released_function():
    ours = relative_position_buckets(300, 300, num_buckets=320, max_distance=800)
    pos = torch.arange(300)
    theirs = ref._bucket(pos[None, :] - pos[:, None], 320, 800)
    assert torch.equal(ours, theirs)
    assert ours.min() == 0 and ours.max() < 320
    assert ours[0, 1] != ours[1, 0]  # the two directions have their own buckets


def test_checkpoint_file_loads_and_reports(tmp_path):
    sd = official_state(CFG)
    file = tmp_path / "BEATs_tiny.pt"
    torch.save({"cfg": CFG, "model": sd}, file)
    model, report = BEATsEncoder.from_checkpoint(file, num_mel_bins=64)
    assert model.config.depth == 3 and model.config.max_distance == 40 and model.frozen
    assert not any(p.requires_grad for p in model.parameters())
    assert report.missing == [] and report.unused == []
    assert report.shared == [f"encoder.layers.{i}.self_attn.relative_attention_bias.weight" for i in (1, 2)]
    # torch's newer weight-norm names and a prefixed state (a BEATs inside a bigger model) load too
    renamed = {
        "audio_encoder."
        + k.replace("weight_g", "parametrizations.weight.original0").replace(
            "weight_v", "parametrizations.weight.original1"
        ): v
        for k, v in sd.items()
    }
    other = BEATsEncoder(BEATsConfig.from_official(CFG, num_mel_bins=64))
    assert other.load_beats_state(renamed).missing == []
    bank = torch.randn(1, 40, 64) * 3 + 10
    assert torch.equal(model(bank).tokens, other(bank).tokens)


def test_bad_files_and_configs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        BEATsEncoder.from_checkpoint(tmp_path / "missing.pt")
    torch.save({"model": {}}, tmp_path / "nocfg.pt")
    with pytest.raises(ValueError, match=r"nocfg.pt: not a BEATs checkpoint .*'cfg' and 'model'"):
        BEATsEncoder.from_checkpoint(tmp_path / "nocfg.pt")
    with pytest.raises(ValueError, match=r"unknown BEATs config key 'encoder_depth'"):
        BEATsConfig.from_official({**CFG, "encoder_depth": 3})
    with pytest.raises(ValueError, match="activation_fn 'relu' is not supported"):
        BEATsConfig.from_official({**CFG, "activation_fn": "relu"})
    sd = official_state(CFG)
    model = BEATsEncoder(BEATsConfig.from_official(CFG, num_mel_bins=64))
    bad = dict(sd)
    bad["encoder.layers.1.fc1.weight"] = torch.zeros(5, 5)
    with pytest.raises(
        ValueError, match=r"encoder.layers.1.fc1.weight has shape \(5, 5\), the model expects \(48, 32\)"
    ):
        model.load_beats_state(bad, source="f.pt")
    del bad["encoder.layers.1.fc1.weight"]
    with pytest.raises(
        ValueError, match=r"f.pt: BEATs tensors missing from the file: \['encoder.layers.1.fc1.weight'\]"
    ):
        model.load_beats_state(bad, source="f.pt")
    odd = dict(sd)
    odd["encoder.layers.2.self_attn.relative_attention_bias.weight"] = torch.zeros_like(
        sd["encoder.layers.0.self_attn.relative_attention_bias.weight"]
    )
    with pytest.raises(ValueError, match="shares one relative-position table"):
        model.load_beats_state(odd)
    with pytest.raises(ValueError, match=r"expects fbank \[B, F, 64\]; got shape \(1, 40, 128\)"):
        model(torch.zeros(1, 40, 128))
    with pytest.raises(ValueError, match="shorter than one 16-frame patch"):
        model(torch.zeros(1, 10, 64))


def test_padding_does_not_reach_real_tokens():
    """Clips of different lengths in one padded batch give each clip's own tokens and mean."""
    torch.manual_seed(0)
    model = BEATsEncoder("tiny")
    a, b = torch.randn(1, 64, 128) * 3 + 12, torch.randn(1, 35, 128) * 3 + 12
    batch = torch.cat([a, torch.cat([b, torch.full((1, 29, 128), 99.0)], 1)])
    mask = torch.ones(2, 64, dtype=torch.bool)
    mask[1, 35:] = False
    out = model(batch, mask)
    alone = model(b)  # 35 frames: 2 whole time patches (the last 3 frames are dropped, as BEATs does)
    n = alone.tokens.shape[1]
    assert out.mask[1].sum() == 3 * 8  # the third patch holds 3 real frames: real, with zeros after them
    assert torch.allclose(model(a).tokens, out.tokens[0], atol=1e-5)
    padded_b = torch.cat([b[:, :32], torch.zeros(1, 32, 128)], 1)
    mask_b = torch.zeros(1, 64, dtype=torch.bool)
    mask_b[:, :32] = True
    trimmed = model(padded_b, mask_b)
    assert torch.allclose(trimmed.tokens[0, :n], alone.tokens[0], atol=1e-5)
    assert torch.allclose(trimmed.cls, alone.cls, atol=1e-5)


def test_frozen_encoder_stays_fixed_inside_the_aligner():
    """A stage-2 step with a frozen BEATs: the audio projection learns, BEATs does not move."""
    from test_aligner import TEXT, TINY, batch, inputs

    from iv2_lightning.models.aligner import VideoTextAligner
    from iv2_lightning.models.backbone import build_video_encoder
    from iv2_lightning.models.text import ByteTokenizer, TextEncoder
    from iv2_lightning.stages import ContrastiveStage

    stage = ContrastiveStage(
        preset="tiny", num_frames=4, image_size=32, audio={"encoder": "beats", "preset": "tiny"}, atc=0.5
    )
    assert isinstance(stage.model.audio_encoder, BEATsEncoder) and stage.model.audio_encoder.frozen
    stage.train()
    assert not stage.model.audio_encoder.training  # a frozen encoder stays in eval mode
    torch.manual_seed(0)
    tok = ByteTokenizer()
    beats = BEATsEncoder("tiny")
    model = VideoTextAligner(
        build_video_encoder("tiny", **TINY), TextEncoder(vocab_size=tok.vocab_size, pad_id=tok.pad_id, **TEXT), tok,
        audio_encoder=beats, fusion={"dim": 32, "num_heads": 2}, embed_dim=16, atc=0.5, vac=0.5,
    )  # fmt: skip
    before = {k: v.clone() for k, v in beats.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    out = model(**inputs(batch()))
    out.loss.backward()
    assert all(p.grad is None for p in beats.parameters())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in beats.state_dict().items())
    moved = [
        n for n, p in model.audio_proj.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    ]
    assert moved, "the audio projection gets no gradient"
    with pytest.raises(ValueError, match=r"audio\.encoder must be 'patch' or 'beats'"):
        ContrastiveStage(preset="tiny", audio={"encoder": "wav2vec"}, atc=0.5)
    with pytest.raises(ValueError, match=r"unknown BEATs field\(s\) \['layers'\]"):
        ContrastiveStage(preset="tiny", audio={"encoder": "beats", "preset": "tiny", "layers": 2}, atc=0.5)
