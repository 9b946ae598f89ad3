"""VideoEncoder: shapes, divided attention semantics, masked encoding, presets, bad input."""

import math

import pytest
import torch

from iv2_lightning.models import (
    OFFICIAL_PARAM_COUNTS,
    PRESETS,
    VideoEncoder,
    build_video_encoder,
    count_parameters,
    tube_mask,
)


def small(attention="joint", **kw):
    torch.manual_seed(0)
    args = dict(image_size=32, num_frames=4, depth=2, layerscale_init=1.0)
    args.update(kw)
    return build_video_encoder("tiny", attention=attention, **args).eval()


def video(b=2, t=4, s=32, seed=1):
    return torch.randn(b, 3, t, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attention", ["joint", "divided"])
@pytest.mark.parametrize("use_cls_token", [True, False])
def test_output_shapes(attention, use_cls_token):
    enc = small(attention, use_cls_token=use_cls_token)
    out = enc(video())
    n = 4 * 4 * 4
    assert out.tokens.shape == (2, int(use_cls_token) + n, 128)
    assert out.patch_tokens.shape == (2, n, 128)
    assert out.pooled.shape == (2, 128)
    assert out.grid == (4, 4, 4)
    assert torch.isfinite(out.tokens).all()


def test_mean_pool_and_tubelet():
    enc = small(pool="mean", tubelet_size=2)
    out = enc(video())
    assert out.tokens.shape == (2, 1 + 2 * 16, 128)
    torch.testing.assert_close(out.pooled, out.tokens[:, 1:].mean(1))


def test_api_of_the_issue_on_a_real_preset_shape():
    enc = build_video_encoder("s14", attention="joint", num_frames=2, image_size=56, depth=1)
    out = enc(torch.randn(1, 3, 2, 56, 56), mask=None)
    assert out.tokens.shape == (1, 1 + 2 * 16, 384)
    assert out.pooled.shape == (1, 768)


def _set_branch(enc, name, value):
    for blk in enc.blocks:
        getattr(blk, name).gamma.data.fill_(value)


def test_divided_attention_mixes_frames_through_time_only():
    enc = small("divided", depth=1, use_cls_token=False, pool="mean")
    v = video(b=1)
    v2 = v.clone()
    v2[:, :, 0, :8, :8] += 3.0  # change the patch at (t=0, h=0, w=0)
    tok = lambda x: enc(x).tokens.reshape(1, 4, 16, -1)  # noqa: E731  [B, T, S, D]

    # full divided block: the change reaches later frames (a spatial-only model would fail here)
    diff = (tok(v2) - tok(v)).abs().amax(-1)
    assert diff[0, 1:].max() > 1e-3

    # temporal branch off: spatial attention must keep the change inside frame 0
    _set_branch(enc, "ls_t", 0.0)
    diff = (tok(v2) - tok(v)).abs().amax(-1)
    assert diff[0, 0].max() > 1e-3
    assert diff[0, 1:].max() == 0.0

    # spatial branch off: temporal attention must keep the change at spatial position 0
    _set_branch(enc, "ls_t", 1.0)
    _set_branch(enc, "ls1", 0.0)
    diff = (tok(v2) - tok(v)).abs().amax(-1)
    assert diff[0, 1:, 0].min() > 1e-4
    assert diff[0, :, 1:].max() == 0.0


def test_divided_cls_sees_every_frame_and_is_left_out_of_temporal_attention():
    enc = small("divided", depth=1)
    v = video(b=1)
    for t in range(4):
        v2 = v.clone()
        v2[:, :, t] += 1.0
        assert (enc(v2).tokens[:, 0] - enc(v).tokens[:, 0]).abs().max() > 1e-4
    # the temporal branch never changes the cls token
    x = torch.randn(1, 1 + 64, 128)
    from iv2_lightning.models.backbone import _Layout

    out = _Layout(1, 4, 16, True, None).temporal(enc.blocks[0].attn_t, x)
    assert torch.equal(out[:, 0], torch.zeros(1, 128))


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_mask_that_drops_nothing_equals_no_mask(attention):
    # for divided attention this compares the masked (attention-mask) path with the reshape path
    enc = small(attention)
    v = video()
    full = enc(v).tokens
    none_dropped = enc(v, mask=torch.zeros(2, 64, dtype=torch.bool)).tokens
    torch.testing.assert_close(none_dropped, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_masked_tokens_do_not_influence_visible_outputs(attention):
    enc = small(attention)
    v = video()
    mask = tube_mask(2, 4, 16, 0.75, generator=torch.Generator().manual_seed(0))
    out = enc(v, mask=mask)
    assert out.tokens.shape == (2, 1 + 16, 128)
    # overwrite every masked patch's pixels: visible outputs must not move
    v2 = v.clone()
    patch_mask = mask.reshape(2, 4, 4, 4)[:, None, :, :, None, :, None]
    v2 = torch.where(
        patch_mask.expand(2, 3, 4, 4, 8, 4, 8).reshape(2, 3, 4, 32, 32), torch.randn_like(v) * 5, v
    )
    torch.testing.assert_close(enc(v2, mask=mask).tokens, out.tokens)


def test_joint_masked_encoding_equals_a_run_on_the_visible_subset():
    enc = small("joint")
    v = video()
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, ::2] = True
    mask[1, 1::2] = True
    out = enc(v, mask=mask)
    # reference: embed, add positions, keep the visible tokens by hand, run the blocks
    x = enc.patch_embed(v) + enc.pos_embed[:, 1:]
    keep = [torch.nonzero(~m).squeeze(1) for m in mask]
    x = torch.stack([x[i, keep[i]] for i in range(2)])
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(2, -1, -1), x], dim=1)
    for blk in enc.blocks:
        x = blk(x)
    torch.testing.assert_close(out.tokens, x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, enc.clip_projector(x), atol=1e-5, rtol=1e-5)


def test_divided_masked_path_runs_and_has_gradients():
    enc = small("divided").train()
    mask = tube_mask(2, 4, 16, 0.9)
    out = enc(video(), mask=mask)
    assert out.tokens.shape == (2, 1 + 64 - round(0.9 * 64), 128)
    out.pooled.sum().backward()
    assert all(p.grad is not None for p in enc.parameters() if p.requires_grad)


def test_pos_embed_interpolation_runs_other_frame_counts_and_sizes():
    enc = build_video_encoder("tiny", num_frames=8, image_size=64).eval()
    out = enc(torch.randn(1, 3, 16, 48, 48))
    assert out.grid == (16, 6, 6)
    assert out.tokens.shape == (1, 1 + 16 * 36, 128)
    # on the built grid the table is used as stored (no resampling)
    assert enc._pos_embed_for((8, 8, 8)) is enc.pos_embed


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_attention_backends_agree_inside_the_encoder(attention):
    enc = small(attention)
    v = video()
    mask = tube_mask(2, 4, 16, 0.5, generator=torch.Generator().manual_seed(3))
    outs = []
    for backend in ("math", "sdpa"):
        for m in enc.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        outs.append(enc(v, mask=mask).tokens)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("attention", "ckpt"), [("joint", True), ("divided", True), ("joint", 1)])
def test_activation_checkpointing_gives_identical_gradients(attention, ckpt):
    grads = []
    for setting in (False, ckpt):
        enc = small(attention, grad_checkpointing=setting).train()
        out = enc(video(), mask=tube_mask(2, 4, 16, 0.5, generator=torch.Generator().manual_seed(0)))
        (out.pooled.square().sum() + out.tokens.mean()).backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_return_hidden_gives_the_last_block_outputs():
    enc = small(depth=3)
    out = enc(video(), return_hidden=2)
    assert len(out.hidden_states) == 2
    assert torch.equal(out.hidden_states[-1], out.tokens)


@pytest.mark.parametrize("name", ["s14", "b14", "l14", "1b", "6b"])
def test_joint_preset_parameter_counts_match_official_within_one_percent(name):
    n = count_parameters(name)
    assert abs(n / OFFICIAL_PARAM_COUNTS[name] - 1) < 0.01, (name, n)


def test_official_parameter_names_are_used():
    names = {
        n
        for n, _ in build_video_encoder("tiny", attention="joint", depth=1, norm="rmsnorm").named_parameters()
    }
    for key in [
        "cls_token",
        "pos_embed",
        "patch_embed.proj.weight",
        "blocks.0.norm1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.q_norm.weight",
        "blocks.0.attn.k_norm.weight",
        "blocks.0.attn.proj.bias",
        "blocks.0.ls1.gamma",
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.bias",
        "blocks.0.ls2.gamma",
        "clip_projector.norm1_q.weight",
        "clip_projector.cross_attn.q.weight",
        "clip_projector.cross_attn.q_bias",
        "clip_projector.cross_attn.proj.weight",
    ]:
        assert key in names, key
    assert "blocks.0.attn.qkv.bias" not in names


def test_presets_are_the_documented_sizes():
    assert set(PRESETS) == {"tiny", "s14", "b14", "l14", "1b", "6b"}
    assert (PRESETS["l14"]["embed_dim"], PRESETS["l14"]["depth"], PRESETS["l14"]["num_heads"]) == (
        1024,
        24,
        16,
    )
    assert PRESETS["6b"]["mlp_dim"] == 12800


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((3, 4, 32, 32), r"rank 5 \[B, 3, T, H, W\]; got shape \(3, 4, 32, 32\)"),
        ((1, 1, 4, 32, 32), r"with 3 channels; got shape \(1, 1, 4, 32, 32\)"),
        ((1, 3, 4, 30, 32), r"H x W = 30 x 32 is not divisible by the patch size 8"),
    ],
)
def test_bad_video_shapes_are_refused(shape, match):
    with pytest.raises(ValueError, match=match):
        small()(torch.randn(*shape))


def test_frames_not_divisible_by_tubelet():
    with pytest.raises(ValueError, match=r"frame count T=3 is not divisible by the tubelet size 2"):
        small(tubelet_size=2)(torch.randn(1, 3, 3, 32, 32))


def test_bad_masks_are_refused():
    enc = small()
    v = video()
    with pytest.raises(
        ValueError, match=r"mask must be \[B, N\] = \(2, 64\) for a token grid \(4, 4, 4\); got \(2, 63\)"
    ):
        enc(v, mask=torch.zeros(2, 63, dtype=torch.bool))
    uneven = torch.zeros(2, 64, dtype=torch.bool)
    uneven[0, :10] = True
    uneven[1, :11] = True
    with pytest.raises(ValueError, match=r"same number of tokens in every sample; got counts \[10, 11\]"):
        enc(v, mask=uneven)
    with pytest.raises(ValueError, match="bool tensor"):
        enc(v, mask=torch.zeros(2, 64))
    with pytest.raises(ValueError, match="drops all 64 tokens"):
        enc(v, mask=torch.ones(2, 64, dtype=torch.bool))


def test_unknown_preset_or_override_names_the_key():
    with pytest.raises(ValueError, match=r"unknown video encoder preset 'xl'"):
        build_video_encoder("xl")
    with pytest.raises(ValueError, match=r"unknown VideoEncoder argument\(s\) \['width'\]"):
        build_video_encoder("tiny", width=3)
    with pytest.raises(ValueError, match="attention must be 'joint' or 'divided'"):
        VideoEncoder(attention="axial")


def test_divided_tiny_model_learns_motion_direction():
    """A square moving left or right: a single frame cannot tell the two apart; the clip can."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def clips(n):
        labels = torch.randint(0, 2, (n,), generator=g)
        v = torch.zeros(n, 3, 4, 16, 16)
        start = torch.randint(4, 8, (n,), generator=g)
        rows = torch.randint(0, 12, (n,), generator=g)
        for i in range(n):
            step = 2 if labels[i] else -2
            for t in range(4):
                c = int(start[i]) + step * t
                v[i, :, t, rows[i] : rows[i] + 4, c : c + 4] = 1.0
        return v, labels

    enc = build_video_encoder(
        "tiny",
        image_size=16,
        num_frames=4,
        patch_size=4,
        depth=2,
        embed_dim=64,
        num_heads=4,
        mlp_dim=128,
        clip_embed_dim=64,
        attn_pool_heads=4,
    )
    head = torch.nn.Linear(64, 2)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=2e-3)
    for _ in range(60):
        v, y = clips(32)
        loss = torch.nn.functional.cross_entropy(head(enc(v).pooled), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()
    v, y = clips(128)
    with torch.no_grad():
        acc = (head(enc(v).pooled).argmax(1) == y).float().mean().item()
    assert acc > 0.9, acc


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_frame_wise_encoder_is_blind_to_frame_order(attention):
    enc = small(attention, frame_wise=True)
    v = video()
    perm = torch.tensor([2, 0, 3, 1])
    out, shuffled = enc(v), enc(v[:, :, perm])
    torch.testing.assert_close(shuffled.pooled, out.pooled, atol=1e-5, rtol=1e-5)
    patches = out.patch_tokens.reshape(2, 4, 16, -1)
    torch.testing.assert_close(
        shuffled.patch_tokens.reshape(2, 4, 16, -1), patches[:, perm], atol=1e-5, rtol=1e-5
    )
    # the normal encoder does care about the order
    enc.frame_wise = False
    assert (enc(v).pooled - enc(v[:, :, perm]).pooled).abs().max() > 1e-4


def test_frame_wise_needs_single_frame_tubelets():
    with pytest.raises(ValueError, match="frame_wise=True needs tubelet_size=1 \\(got 2\\)"):
        small("divided", frame_wise=True, tubelet_size=2)


def test_adapt_state_dict_to_another_tubelet_and_frame_count():
    src = small("divided", tubelet_size=2)  # grid (2, 4, 4)
    dst = small("divided", frame_wise=True)  # tubelet 1, grid (4, 4, 4)
    state = {f"enc.{k}": v.clone() for k, v in src.state_dict().items()}
    notes = dst.adapt_state_dict(state, prefix="enc.")
    assert notes == ["enc.patch_embed.proj.weight: tubelet 2 -> 1", "enc.pos_embed: 2 -> 4 token frames"]
    dst.load_state_dict({k[4:]: v for k, v in state.items()})
    # a static clip looks the same through the summed kernel as through the tubelet kernel
    frame = torch.randn(1, 3, 1, 32, 32)
    a = src.patch_embed(frame.expand(1, 3, 2, 32, 32))
    b = dst.patch_embed(frame)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and back: 1 -> 2 repeats the kernel over time divided by 2 (I3D inflation), same response
    back = {k: v.clone() for k, v in dst.state_dict().items()}
    assert src.adapt_state_dict(back) == [
        "patch_embed.proj.weight: tubelet 1 -> 2",
        "pos_embed: 4 -> 2 token frames",
    ]
    src.load_state_dict(back)
    torch.testing.assert_close(src.patch_embed(frame.expand(1, 3, 2, 32, 32)), b, atol=1e-5, rtol=1e-5)
    # another width or patch size is not adapted: the caller reports it
    other = small(
        "divided", embed_dim=64, num_heads=4, mlp_dim=128, clip_embed_dim=64, patch_size=4
    ).state_dict()
    assert dst.adapt_state_dict(dict(other)) == []


def test_frame_wise_masked_and_checkpointed_paths_agree():
    enc = small("joint", frame_wise=True)
    v = video()
    full = enc(v).tokens
    torch.testing.assert_close(
        enc(v, mask=torch.zeros(2, 64, dtype=torch.bool)).tokens, full, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("attention", ["joint", "divided"])
def test_depth_scaled_init_divides_each_blocks_residual_outputs(attention):
    """The official ``fix_init_weight``: block i's attention and MLP output weights / sqrt(2 i)."""
    kw = dict(num_frames=4, image_size=32, patch_size=16, tubelet_size=2, attention=attention)
    torch.manual_seed(0)
    plain = build_video_encoder("tiny", **kw)
    torch.manual_seed(0)
    scaled = build_video_encoder("tiny", depth_scaled_init=True, **kw)
    names = ("attn.proj.weight", "attn_t.proj.weight", "mlp.fc2.weight")
    seen = 0
    for i, (a, b) in enumerate(zip(plain.blocks, scaled.blocks), start=1):
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        for name in pa:
            if name in names:
                torch.testing.assert_close(pb[name], pa[name] / math.sqrt(2.0 * i))
                seen += 1
            else:
                assert torch.equal(pa[name], pb[name]), name
    assert seen == len(plain.blocks) * (3 if attention == "divided" else 2)
