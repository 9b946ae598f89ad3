"""Loading official InternVideo2 checkpoints (``iv2_lightning.models.official``, ``iv2 convert``).

The fake checkpoints carry exactly the official tensor names and shapes (small width, random values);
``reference`` below is the official vision encoder written out from its equations, independently of
VideoEncoder and of the reference in ``models/official/reference.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from iv2_lightning.convert import convert_main
from iv2_lightning.models.backbone import VideoEncoder
from iv2_lightning.models.heads import DistillHead
from iv2_lightning.models.layers import Mlp
from iv2_lightning.models.official import (
    KNOWN_LAYOUTS,
    OfficialCheckpointError,
    PosEmbedInterpolationWarning,
    UnsafeCheckpointError,
    load_official,
    verify_official,
)

WIDTH, DEPTH, HEADS, MLP, CLIP, POOL_HEADS, PATCH = 64, 2, 4, 256, 32, 4, 14
SMALL = dict(num_heads=HEADS, attn_pool_heads=POOL_HEADS)


def make_official(
    frames: int = 4, side: int = 4, patch: int = PATCH, seed: int = 0, dtype=torch.float32
) -> dict[str, torch.Tensor]:
    """A state dict with the official vision-encoder names and shapes, random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.05, mean=0.0):
        return (torch.randn(*shape, generator=g) * std + mean).to(dtype)

    c = WIDTH
    sd = {
        "cls_token": r(1, 1, c, std=0.5),
        "pos_embed": r(1, 1 + frames * side * side, c, std=0.5),
        "patch_embed.proj.weight": r(c, 3, 1, patch, patch, std=0.02),
        "patch_embed.proj.bias": r(c, std=0.1),
    }
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": r(c, std=0.2, mean=1.0),
                p + "attn.qkv.weight": r(3 * c, c, std=0.15),
                p + "attn.proj.weight": r(c, c, std=0.1),
                p + "attn.proj.bias": r(c, std=0.1),
                p + "attn.q_norm.weight": r(c, std=0.2, mean=1.0),
                p + "attn.k_norm.weight": r(c, std=0.2, mean=1.0),
                p + "ls1.gamma": r(c, std=0.3, mean=0.5),
                p + "norm2.weight": r(c, std=0.2, mean=1.0),
                p + "mlp.fc1.weight": r(MLP, c, std=0.1),
                p + "mlp.fc1.bias": r(MLP, std=0.1),
                p + "mlp.fc2.weight": r(c, MLP, std=0.1),
                p + "mlp.fc2.bias": r(c, std=0.1),
                p + "ls2.gamma": r(c, std=0.3, mean=0.5),
            }
        )
    cp = "clip_projector."
    for n in ("q", "k", "v"):
        sd[f"{cp}norm1_{n}.weight"] = r(c, std=0.2, mean=1.0)
        sd[f"{cp}norm1_{n}.bias"] = r(c, std=0.1)
        sd[f"{cp}cross_attn.{n}.weight"] = r(c, c, std=0.2)
        sd[f"{cp}cross_attn.{n}_bias"] = r(c, std=0.1)
    sd[f"{cp}cross_attn.proj.weight"] = r(CLIP, c, std=0.2)
    sd[f"{cp}cross_attn.proj.bias"] = r(CLIP, std=0.1)
    return sd


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mha(q, k, v, heads):
    b, nq, c = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).permute(0, 2, 1, 3)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.permute(0, 2, 1, 3).reshape(b, nq, c)


def reference(sd, video, pos=None, heads=HEADS, pool_heads=POOL_HEADS, approximate="none"):
    """The official equations: (tokens [B, 1+N, C], pooled [B, CLIP])."""
    sd = {k: v.float() for k, v in sd.items()}
    x = F.conv3d(video, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=(1, PATCH, PATCH))
    b, c = x.shape[0], x.shape[1]
    x = x.reshape(b, c, -1).transpose(1, 2)  # tokens in (t, h, w) order
    x = torch.cat([sd["cls_token"].expand(b, 1, c), x], dim=1)
    x = x + (sd["pos_embed"] if pos is None else pos)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = (h @ sd[p + "attn.qkv.weight"].T).split(c, dim=-1)  # fused, bias-free
        q, k = rms(q, sd[p + "attn.q_norm.weight"]), rms(k, sd[p + "attn.k_norm.weight"])  # full width
        a = mha(q, k, v, heads) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        x = x + sd[p + "ls1.gamma"] * a
        h = rms(x, sd[p + "norm2.weight"]) @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
        h = F.gelu(h, approximate=approximate) @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
        x = x + sd[p + "ls2.gamma"] * h
    cp = "clip_projector."

    def ln(t, n):
        return F.layer_norm(t, (c,), sd[f"{cp}norm1_{n}.weight"], sd[f"{cp}norm1_{n}.bias"], eps=1e-5)

    def proj(t, n):
        return t @ sd[f"{cp}cross_attn.{n}.weight"].T + sd[f"{cp}cross_attn.{n}_bias"]

    query = x.mean(dim=1, keepdim=True)  # all tokens, cls included
    o = mha(proj(ln(query, "q"), "q"), proj(ln(x, "k"), "k"), proj(ln(x, "v"), "v"), pool_heads)
    pooled = o @ sd[f"{cp}cross_attn.proj.weight"].T + sd[f"{cp}cross_attn.proj.bias"]
    return x, pooled[:, 0]


def interp_reference(pos, src, dst):
    """Resample a [1, 1+T*H*W, C] table: linear in time, then bicubic in space (torch interpolate)."""
    (t, h, w), (t2, h2, w2) = src, dst
    c = pos.shape[-1]
    grid = pos[0, 1:].reshape(t, h, w, c).permute(3, 1, 2, 0).reshape(1, c * h * w, t)
    grid = F.interpolate(grid, size=t2, mode="linear", align_corners=False)
    grid = grid.reshape(c, h, w, t2).permute(3, 0, 1, 2)  # [T2, C, H, W]
    grid = F.interpolate(grid, size=(h2, w2), mode="bicubic", align_corners=False)
    return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, t2 * h2 * w2, c)], dim=1)


def clip(frames=4, size=56, seed=1):
    return torch.randn(2, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


def stage1_extras(seed=2):
    g = torch.Generator().manual_seed(seed)
    extra = {}
    for i in range(2):
        extra[f"clip_decoder.{i}.head.weight"] = torch.randn(96, WIDTH, generator=g)
        extra[f"clip_decoder.{i}.head.bias"] = torch.randn(96, generator=g)
        extra[f"clip_decoder.{i}.norm.weight"] = torch.randn(96, generator=g)
        extra[f"clip_decoder.{i}.norm.bias"] = torch.randn(96, generator=g)
    extra["final_clip_decoder.head.weight"] = torch.randn(48, CLIP, generator=g)
    extra["final_clip_decoder.head.bias"] = torch.randn(48, generator=g)
    extra["final_clip_decoder.norm.weight"] = torch.randn(48, generator=g)
    extra["final_clip_decoder.norm.bias"] = torch.randn(48, generator=g)
    extra["clip_pos_embed"] = torch.randn(1, 1 + 4 * 16, WIDTH, generator=g)
    extra["mae_pos_embed"] = torch.randn(1, 1 + 4 * 16, WIDTH, generator=g)
    extra["mae_decoder.0.head.weight"] = torch.randn(80, WIDTH, generator=g)
    return extra


# -- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mlp_act", ["gelu", "gelu_tanh"])
def test_parity_with_reference_equations(mlp_act):
    sd = make_official()
    enc, report = load_official(sd, num_frames=4, image_size=56, mlp_act=mlp_act, **SMALL)
    assert isinstance(enc, VideoEncoder) and not enc.training
    assert report.missing == [] and report.unmapped == {} and report.interpolated == []
    assert len(report.mapped) == len(sd)
    video = clip()
    with torch.no_grad():
        out = enc(video)
    tokens, pooled = reference(sd, video, approximate="tanh" if mlp_act == "gelu_tanh" else "none")
    assert out.pooled.shape == (2, CLIP)
    torch.testing.assert_close(out.tokens, tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=0)
    # the activation matters at this scale, so the test would notice the wrong one
    other, _ = reference(sd, video, approximate="none" if mlp_act == "gelu_tanh" else "tanh")
    assert (other - tokens).abs().max() > 1e-4


def test_half_precision_checkpoint_loads_as_fp32():
    sd = make_official(dtype=torch.bfloat16)
    enc, _ = load_official(sd, num_frames=4, image_size=56, **SMALL)
    assert all(p.dtype == torch.float32 for p in enc.parameters())
    with torch.no_grad():
        out = enc(clip())
    torch.testing.assert_close(out.pooled, reference(sd, clip())[1], atol=1e-5, rtol=0)


def test_mlp_activation_option():
    mlp = Mlp(8, 16, act="gelu_tanh")
    x = torch.randn(3, 8)
    torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh")))
    with pytest.raises(ValueError, match="gelu_tanh"):
        Mlp(8, 16, act="relu")


# -- position tables ---------------------------------------------------------------------------


def test_interpolates_frames_and_size_with_warning():
    sd = make_official(frames=4, side=16)  # the official 224 px grid, stage-2's 4 frames
    with pytest.warns(PosEmbedInterpolationWarning, match=r"\(4, 16, 16\) -> \(8, 12, 12\)"):
        enc, report = load_official(sd, num_frames=8, image_size=168, **SMALL)
    assert report.source_grid == (4, 16, 16) and report.grid == (8, 12, 12)
    assert len(report.interpolated) == 1
    expected = interp_reference(sd["pos_embed"], (4, 16, 16), (8, 12, 12))
    torch.testing.assert_close(enc.pos_embed.detach(), expected, atol=1e-5, rtol=1e-5)
    video = clip(frames=8, size=168)
    with torch.no_grad():
        out = enc(video)
    tokens, pooled = reference(sd, video, pos=expected)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.tokens, tokens, atol=1e-5, rtol=0)


def test_interpolates_frames_only():
    sd = make_official(frames=4, side=4)
    with pytest.warns(PosEmbedInterpolationWarning):
        enc, report = load_official(sd, num_frames=8, image_size=56, **SMALL)
    assert report.source_grid == (4, 4, 4)
    torch.testing.assert_close(
        enc.pos_embed.detach(), interp_reference(sd["pos_embed"], (4, 4, 4), (8, 4, 4)), atol=1e-6, rtol=0
    )


def test_ambiguous_stored_grid_needs_source_frames():
    sd = make_official(frames=4, side=16)  # 1024 rows: 4 x 16 x 16 or 16 x 8 x 8
    with pytest.raises(OfficialCheckpointError, match="source_frames"):
        load_official(sd, num_frames=16, image_size=112, **SMALL)
    with pytest.warns(PosEmbedInterpolationWarning):
        _, report = load_official(sd, num_frames=16, image_size=112, source_frames=4, **SMALL)
    assert report.source_grid == (4, 16, 16)


def test_separable_position_tables_are_composed():
    sd = make_official(frames=4, side=4)
    joint = sd.pop("pos_embed")
    g = torch.Generator().manual_seed(5)
    spatial, temporal = torch.randn(1, 16, WIDTH, generator=g), torch.randn(1, 4, WIDTH, generator=g)
    sd.update(pos_embed_cls=joint[:, :1], pos_embed_spatial=spatial, pos_embed_temporal=temporal)
    enc, report = load_official(sd, num_frames=4, image_size=56, **SMALL)
    composed = torch.cat([joint[:, :1], (temporal[0, :, None] + spatial[0, None]).reshape(1, 64, WIDTH)], 1)
    torch.testing.assert_close(enc.pos_embed.detach(), composed)
    assert report.mapped["pos_embed_spatial"].startswith("pos_embed")
    assert verify_official(sd, num_frames=4, image_size=56, **SMALL).ok


# -- layouts -----------------------------------------------------------------------------------


def _layouts():
    sd = make_official()
    extras = stage1_extras()
    g = torch.Generator().manual_seed(3)
    clf = {
        "fc_norm.weight": torch.randn(CLIP, generator=g),
        "fc_norm.bias": torch.randn(CLIP, generator=g),
        "head.weight": torch.randn(5, CLIP, generator=g),
        "head.bias": torch.randn(5, generator=g),
    }
    stage2 = {f"vision_encoder.{k}": v for k, v in sd.items()}
    stage2.update(
        {"text_encoder.embeddings.weight": torch.randn(10, 8), "vision_proj.weight": torch.randn(4, CLIP)}
    )
    return sd, {
        "module-wrapped": ({"module": {**sd, **extras}, "epoch": 3}, set(extras)),
        "vision_encoder-prefixed": (
            {"module": stage2},
            {"text_encoder.embeddings.weight", "vision_proj.weight"},
        ),
        "bare": (dict(sd), set()),
        "classifier": ({"model": {**sd, **clf}, "epoch": 1}, set(clf)),
    }


@pytest.mark.parametrize("layout", list(KNOWN_LAYOUTS)[:4])
def test_each_official_layout_loads(layout, tmp_path):
    sd, layouts = _layouts()
    ckpt, extra_keys = layouts[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    enc, report = load_official(path, num_frames=4, image_size=56, **SMALL)
    assert report.layout == layout
    assert report.missing == []
    video = clip()
    with torch.no_grad():
        out = enc(video)
    tokens, pooled = reference(sd, video)
    torch.testing.assert_close(out.tokens, tokens, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooled, pooled, atol=1e-5, rtol=0)
    # every extra tensor is either mapped (heads) or reported with a reason
    assert extra_keys <= set(report.mapped) | set(report.unmapped)
    if layout == "vision_encoder-prefixed":
        assert report.prefix == "vision_encoder."
        assert "outside the vision encoder" in report.unmapped["vision_proj.weight"]
    if layout == "module-wrapped":
        assert report.wrappers == ["module"]
        assert set(report.unmapped) == {"clip_pos_embed", "mae_pos_embed", "mae_decoder.0.head.weight"}
        assert report.mapped["clip_decoder.1.head.weight"] == "token_heads.1.proj.weight"
        assert report.mapped["final_clip_decoder.norm.bias"] == "pool_head.norm.bias"
        head = DistillHead(WIDTH, 96)
        head.load_state_dict(
            {
                k[len("token_heads.1.") :]: v
                for k, v in report.head_state.items()
                if k.startswith("token_heads.1.")
            }
        )
        x = torch.randn(3, WIDTH)
        e = ckpt["module"]
        want = F.layer_norm(
            x @ e["clip_decoder.1.head.weight"].T + e["clip_decoder.1.head.bias"],
            (96,),
            e["clip_decoder.1.norm.weight"],
            e["clip_decoder.1.norm.bias"],
            eps=1e-5,
        )
        torch.testing.assert_close(head(x), want)
    if layout == "classifier":
        clf = ckpt["model"]
        logits = report.classifier(out.pooled)
        want = F.layer_norm(pooled, (CLIP,), clf["fc_norm.weight"], clf["fc_norm.bias"], eps=1e-5)
        want = want @ clf["head.weight"].T + clf["head.bias"]
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)
    else:
        assert report.classifier is None


def test_unknown_layout_lists_keys_and_known_layouts():
    bogus = {"encoder.layer.0.weight": torch.zeros(2), "visual.conv1.weight": torch.zeros(4, 3, 14, 14)}
    with pytest.raises(OfficialCheckpointError, match="unknown checkpoint layout") as err:
        load_official({"module": bogus}, **SMALL)
    msg = str(err.value)
    assert "encoder.layer.0.weight" in msg and "visual.conv1.weight" in msg
    assert all(name in msg for name in KNOWN_LAYOUTS)


def test_a_file_that_is_not_a_checkpoint_errors(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(OfficialCheckpointError, match="not a readable torch checkpoint"):
        load_official(path, **SMALL)


def test_missing_encoder_tensors_error_unless_not_strict():
    sd = make_official()
    del sd["blocks.1.mlp.fc2.weight"]
    sd["blocks.1.mlp.fc2_weight_renamed"] = torch.zeros(1)
    with pytest.raises(OfficialCheckpointError, match=r"blocks\.1\.mlp\.fc2\.weight") as err:
        load_official(sd, num_frames=4, image_size=56, **SMALL)
    assert "fc2_weight_renamed" in str(err.value)
    _, report = load_official(sd, num_frames=4, image_size=56, strict=False, **SMALL)
    assert report.missing == ["blocks.1.mlp.fc2.weight"]
    assert "unrecognised" in report.unmapped["blocks.1.mlp.fc2_weight_renamed"]
    result = verify_official(sd, num_frames=4, image_size=56, **SMALL)
    assert not result.ok and any("missing" in p for p in result.problems)


def test_other_patch_size_errors():
    sd = make_official(patch=16)
    with pytest.raises(OfficialCheckpointError, match="patch size is 16"):
        load_official(sd, num_frames=4, image_size=64, **SMALL)


def test_preset_must_match_checkpoint():
    sd = make_official()
    with pytest.raises(OfficialCheckpointError, match="embed_dim: checkpoint 64"):
        load_official(sd, preset="l14", num_frames=4, image_size=56)
    with pytest.raises(OfficialCheckpointError, match="match no official preset"):
        load_official(sd, num_frames=4, image_size=56)


class _Marker:
    called = False


def _mark():
    _Marker.called = True
    return {}


class PickledConfig:
    """Stands for the EasyDict of the 6B stage-2 file: unpickling it would call ``_mark``."""

    def __reduce__(self):
        return (_mark, ())


def test_pickled_python_object_is_refused_with_resave_recipe(tmp_path):
    path = tmp_path / "stage2_6b.pt"
    torch.save({"module": make_official(), "config": PickledConfig()}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_official(path, num_frames=4, image_size=56, **SMALL)
    msg = str(err.value)
    assert "weights_only=False" in msg and "torch.save" in msg and "EasyDict" in msg
    assert "_mark" in msg  # names the object it refused
    assert not _Marker.called  # nothing from the pickle ran
    assert convert_main([str(path), str(tmp_path / "out.safetensors"), "--num-heads", "4"]) == 2


# -- command line --------------------------------------------------------------------------------

CLI_SMALL = ["--num-heads", "4", "--attn-pool-heads", "4", "--num-frames", "4", "--image-size", "56"]


def test_convert_main_round_trip_through_init_from(tmp_path):
    from iv2_lightning.models.weights import load_shared_weights, read_state_dict

    src = tmp_path / "pretrain.pth"
    torch.save({"module": {**make_official(), **stage1_extras()}}, src)
    dst = tmp_path / "iv2.safetensors"
    assert convert_main([str(src), str(dst), *CLI_SMALL]) == 0
    state, _ = read_state_dict(dst)
    assert "video_encoder.blocks.1.attn.qkv.weight" in state
    assert "token_heads.0.proj.weight" in state  # stage-1 heads ride along under their stage names

    expected, report = load_official(src, num_frames=4, image_size=56, **SMALL)
    holder = nn.Module()
    holder.video_encoder = VideoEncoder(**report.config).eval()
    info = load_shared_weights(holder, dst, strict=True)
    assert info["missing"] == [] and info["loaded"] == len(holder.video_encoder.state_dict())
    video = clip()
    with torch.no_grad():
        a, b = holder.video_encoder(video), expected(video)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled)

    # a folder destination carries a manifest, and the stored grid is read back without guessing
    folder = tmp_path / "export"
    assert convert_main([str(dst), str(folder), *CLI_SMALL]) == 0
    state2, manifest = read_state_dict(folder)
    assert manifest["stage"] == "official"
    assert manifest["architecture"]["video_encoder_config"]["embed_dim"] == WIDTH
    assert all(torch.equal(state2[k], v) for k, v in state.items() if k.startswith("video_encoder."))


def test_convert_verify_passes_and_fails(tmp_path, capsys):
    src = tmp_path / "ckpt.pth"
    sd = make_official()
    torch.save(sd, src)
    good = tmp_path / "good.safetensors"
    assert convert_main([str(src), str(good), *CLI_SMALL, "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    assert good.is_file() and "video_encoder.cls_token" in load_file(str(good))

    bad_values = dict(sd)
    bad_values["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"].clone()
    bad_values["blocks.0.attn.qkv.weight"][3, 5] = math.nan
    torch.save(bad_values, tmp_path / "nan.pth")
    out = tmp_path / "nan.safetensors"
    assert convert_main([str(tmp_path / "nan.pth"), str(out), *CLI_SMALL, "--verify"]) == 1
    assert "NaN" in capsys.readouterr().out and not out.exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging file left behind

    bad_shape = dict(sd)
    bad_shape["blocks.1.mlp.fc1.weight"] = sd["blocks.1.mlp.fc1.weight"][:-1]
    torch.save(bad_shape, tmp_path / "shape.pth")
    assert convert_main([str(tmp_path / "shape.pth"), str(out), *CLI_SMALL, "--verify"]) != 0
    assert "blocks.1.mlp.fc1.weight" in capsys.readouterr().err and not out.exists()
