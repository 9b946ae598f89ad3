"""Heads: pixel targets (HF VideoMAE parity), decoder learning, projection/matching, causal decoder, classifier."""

from __future__ import annotations

import pytest
import torch

from iv2_lightning.models.heads import (
    CausalDecoder,
    ClassificationHead,
    DistillHead,
    MatchingHead,
    NextTokenLoss,
    PixelDecoder,
    ProjectionHead,
    next_token_loss,
    norm_pixel_targets,
    patchify,
    pixel_reconstruction_loss,
    sample_hard_negatives,
    unpatchify,
)


def equal_count_mask(b: int, n: int, n_masked: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(n, generator=g) for _ in range(b)])
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_masked], True)
    return mask


# ---------------------------------------------------------------- patchify / targets


def test_patchify_layout_and_roundtrip():
    video = torch.randn(2, 3, 4, 8, 12)
    p = patchify(video, tubelet=2, patch=4)
    assert p.shape == (2, 2 * 2 * 3, 2 * 4 * 4 * 3)
    # token (t=1, h=0, w=2), value (tubelet=1, ph=3, pw=0, c=2)
    token = 1 * (2 * 3) + 0 * 3 + 2
    value = ((1 * 4 + 3) * 4 + 0) * 3 + 2
    assert p[1, token, value] == video[1, 2, 1 * 2 + 1, 0 * 4 + 3, 2 * 4 + 0]
    assert torch.equal(unpatchify(p, 2, 4, grid=(2, 2, 3)), video)


def test_norm_pixel_targets_per_patch_channel():
    video = torch.rand(1, 3, 2, 4, 4)
    t = norm_pixel_targets(video, tubelet=2, patch=4).reshape(1, 1, 2 * 4 * 4, 3)
    assert torch.allclose(t.mean(dim=2), torch.zeros(1, 1, 3), atol=1e-5)
    assert torch.allclose(t.std(dim=2, unbiased=True), torch.ones(1, 1, 3), atol=1e-4)
    assert torch.equal(norm_pixel_targets(video, 2, 4, normalize=False), patchify(video, 2, 4))


def test_patchify_errors():
    with pytest.raises(ValueError, match=r"not divisible into tubelets of 2 frames and patches of 4x4"):
        patchify(torch.randn(1, 3, 3, 8, 8), 2, 4)
    with pytest.raises(ValueError, match=r"video must be \[B, C, T, H, W\]"):
        patchify(torch.randn(3, 4, 8, 8), 2, 4)
    with pytest.raises(ValueError, match=r"patches must be \[B, 8, 96\]"):
        unpatchify(torch.randn(1, 7, 96), 2, 4, grid=(2, 2, 2))


def test_pixel_loss_matches_hf_videomae():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.VideoMAEConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        num_frames=4,
        tubelet_size=2,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=2,
        decoder_intermediate_size=64,
        norm_pix_loss=True,
    )
    torch.manual_seed(0)
    model = transformers.VideoMAEForPreTraining(cfg).eval()
    b, n = 2, (4 // 2) * (32 // 8) ** 2
    pixel_values = torch.randn(b, 4, 3, 32, 32)
    mask = equal_count_mask(b, n, 24, seed=3)
    with torch.no_grad():
        out = model(pixel_values=pixel_values, bool_masked_pos=mask)
    mean = torch.tensor([0.485, 0.456, 0.406])[None, None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, None, :, None, None]
    video = (pixel_values * std + mean).permute(0, 2, 1, 3, 4)  # [B, 3, T, H, W]
    ours = pixel_reconstruction_loss(out.logits, video, mask, tubelet=2, patch=8, normalize=True)
    assert out.logits.shape == (b, 24, 2 * 8 * 8 * 3)
    assert abs(ours.item() - out.loss.item()) < 1e-5
    # and a wrong layout would not match: the unnormalised loss is a different number
    raw = pixel_reconstruction_loss(out.logits, video, mask, tubelet=2, patch=8, normalize=False)
    assert abs(raw.item() - out.loss.item()) > 1e-3


def test_pixel_loss_errors():
    video = torch.randn(2, 3, 2, 8, 8)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, :1] = True
    with pytest.raises(ValueError, match=r"same number of tokens; got counts \[2, 1\]"):
        pixel_reconstruction_loss(torch.randn(2, 2, 96), video, mask, 2, 4)
    mask[1, :2] = True
    with pytest.raises(ValueError, match=r"pred must be \[B, N_masked, P\] = \(2, 2, 96\); got \(2, 3, 96\)"):
        pixel_reconstruction_loss(torch.randn(2, 3, 96), video, mask, 2, 4)


# ---------------------------------------------------------------- pixel decoder


def test_pixel_decoder_shapes_and_errors():
    dec = PixelDecoder(encoder_dim=24, patch_dim=96, grid=(2, 2, 2), dim=32, depth=1, num_heads=4)
    mask = equal_count_mask(3, 8, 6)
    pred = dec(torch.randn(3, 1 + 2, 24), mask)
    assert pred.shape == (3, 6, 96)
    no_cls = PixelDecoder(24, 96, (2, 2, 2), dim=32, depth=1, has_cls=False)
    assert no_cls(torch.randn(3, 2, 24), mask).shape == (3, 6, 96)
    with pytest.raises(ValueError, match=r"visible tokens must be \[B, 1 \+ 2, D\] for a mask hiding 6 of 8"):
        dec(torch.randn(3, 4, 24), mask)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor \[B, N\] = \(3, 8\)"):
        dec(torch.randn(3, 3, 24), mask[:, :7])


def test_pixel_decoder_uses_positions_of_masked_tokens():
    """Same visible tokens, different masked positions → different predictions (positions are used)."""
    torch.manual_seed(0)
    dec = PixelDecoder(16, 48, (1, 2, 2), dim=32, depth=1, has_cls=False).eval()
    vis = torch.randn(1, 2, 16)
    m1 = torch.tensor([[True, True, False, False]])
    m2 = torch.tensor([[False, False, True, True]])
    assert not torch.allclose(dec(vis, m1), dec(vis, m2), atol=1e-4)


def test_pixel_decoder_learns():
    torch.manual_seed(0)
    tubelet, patch, grid = 2, 4, (2, 2, 2)
    video = torch.rand(2, 3, 4, 8, 8)
    mask = equal_count_mask(2, 8, 5, seed=1)
    visible = torch.randn(2, 1 + 3, 16)
    dec = PixelDecoder(16, tubelet * patch * patch * 3, grid, dim=64, depth=1, num_heads=4)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        loss = pixel_reconstruction_loss(dec(visible, mask), video, mask, tubelet, patch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


# ---------------------------------------------------------------- small heads


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_distill_and_projection_heads(kind):
    x = torch.randn(2, 5, 24)
    d = DistillHead(24, 40, kind=kind)(x)
    assert d.shape == (2, 5, 40)
    # LayerNorm at the end: zero mean, unit variance per token
    assert torch.allclose(d.mean(-1), torch.zeros(2, 5), atol=1e-5)
    assert ProjectionHead(24, 12, kind=kind)(x[:, 0]).shape == (2, 12)
    assert MatchingHead(24)(x[:, 0]).shape == (2, 2)


def test_head_kind_error():
    with pytest.raises(ValueError, match="head kind must be 'linear' or 'mlp'; got 'conv'"):
        ProjectionHead(4, 4, kind="conv")


def test_hard_negatives_never_pick_positives():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    sim = torch.randn(8, 8, generator=g) * 3
    positive = ids[:, None] == ids[None, :]
    seen = torch.zeros(8, 8, dtype=torch.bool)
    for _ in range(300):
        neg = sample_hard_negatives(sim, ids, generator=g)
        assert neg.shape == (8,) and neg.dtype == torch.long
        assert not positive[torch.arange(8), neg].any()
        seen[torch.arange(8), neg] = True
    # it does sample among all negatives (not a fixed argmax)
    assert seen.sum() > 8 * 2
    # without ids the diagonal is the positive
    for _ in range(100):
        neg = sample_hard_negatives(sim, generator=g)
        assert (neg != torch.arange(8)).all()


def test_hard_negatives_follow_similarity_and_reproducible():
    sim = torch.tensor([[0.0, 10.0, -10.0], [10.0, 0.0, -10.0], [-10.0, 10.0, 0.0]])
    neg = sample_hard_negatives(sim, generator=torch.Generator().manual_seed(0))
    assert neg.tolist() == [1, 0, 1]  # the hard negative wins with probability ~1 - 2e-9
    sim6 = torch.randn(6, 6, generator=torch.Generator().manual_seed(9))
    a = sample_hard_negatives(sim6, generator=torch.Generator().manual_seed(4))
    b = sample_hard_negatives(sim6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


def test_hard_negatives_errors():
    with pytest.raises(ValueError, match=r"rows \[0, 1\] of sim have no negative column"):
        sample_hard_negatives(torch.randn(3, 2), torch.tensor([5, 5, 7]), column_ids=torch.tensor([5, 5]))
    with pytest.raises(ValueError, match=r"rows \[2\] of sim have no negative"):
        sample_hard_negatives(torch.randn(3, 2), torch.tensor([0, 1, 2]), column_ids=torch.tensor([2, 2]))
    with pytest.raises(ValueError, match="without sample_ids sim must be square"):
        sample_hard_negatives(torch.randn(3, 4))


# ---------------------------------------------------------------- causal decoder


def make_decoder(mode="cross", **kw):
    torch.manual_seed(0)
    return CausalDecoder(
        vocab_size=20, dim=32, depth=2, num_heads=4, max_length=16, memory_dim=24, mode=mode, **kw
    ).eval()


@pytest.mark.parametrize("mode", ["cross", "prefix"])
def test_causal_decoder_shapes_and_causality(mode):
    dec = make_decoder(mode)
    ids = torch.randint(1, 20, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mem = torch.randn(2, 5, 24)
    mem_mask = torch.ones(2, 5, dtype=torch.bool)
    mem_mask[1, 3:] = False
    logits = dec(ids, mask, mem, mem_mask)
    assert logits.shape == (2, 7, 20)
    j = 4
    ids2 = ids.clone()
    ids2[:, j] = (ids[:, j] % 19) + 1
    logits2 = dec(ids2, mask, mem, mem_mask)
    assert torch.allclose(logits[:, :j], logits2[:, :j], atol=1e-6)
    assert not torch.allclose(logits[:, j:], logits2[:, j:], atol=1e-4)
    # the memory is used, and padded memory tokens are not
    mem2 = mem.clone()
    mem2[1, 3:] = 99.0
    assert torch.allclose(dec(ids, mask, mem2, mem_mask), logits, atol=1e-5)
    mem2[0] += 1.0
    assert not torch.allclose(dec(ids, mask, mem2, mem_mask)[0], logits[0], atol=1e-4)


def test_causal_decoder_errors():
    dec = make_decoder()
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_length 16"):
        dec(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"memory must be \[B, M, 24\] with B = 2; got \(2, 5, 32\)"):
        dec(torch.zeros(2, 3, dtype=torch.long), None, torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match=r"mask must be \[B, L\] = \(2, 3\); got \(2, 4\)"):
        dec(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]; got 1.5"):
        dec.generate(None, None, 1, 2, 4, top_p=1.5)
    with pytest.raises(ValueError, match="mode must be 'cross' or 'prefix'"):
        CausalDecoder(10, mode="encoder")


def test_generate_greedy_deterministic_and_stops_at_eos():
    dec = make_decoder()
    mem = torch.randn(3, 5, 24)
    a = dec.generate(mem, None, bos_id=1, eos_id=2, max_new_tokens=6)
    b = dec.generate(mem, None, bos_id=1, eos_id=2, max_new_tokens=6)
    assert torch.equal(a, b)
    assert a[:, 0].eq(1).all() and a.shape[0] == 3 and 2 <= a.shape[1] <= 7
    # greedy = argmax of the forward pass at every step
    logits = dec(a[:, :-1], None, mem)
    done = torch.zeros(3, dtype=torch.bool)
    for t in range(a.shape[1] - 1):
        expect = torch.where(done, torch.zeros(3, dtype=torch.long), logits[:, t].argmax(-1))
        assert torch.equal(a[:, t + 1], expect)
        done |= a[:, t + 1] == 2

    # make eos the overwhelming choice: every row stops after one token
    with torch.no_grad():
        dec.lm_head.bias[2] = 1e3
    out = dec.generate(mem, None, 1, 2, 6)
    assert out.tolist() == [[1, 2]] * 3
    # and with eos impossible, it runs to max_new_tokens
    with torch.no_grad():
        dec.lm_head.bias[2] = -1e3
    out = dec.generate(mem, None, 1, 2, 6)
    assert out.shape == (3, 7) and not out.eq(2).any()


def test_generate_pads_after_eos():
    dec = make_decoder()
    mem = torch.randn(4, 5, 24)
    with torch.no_grad():
        # eos likely but not certain per row: rows stop at different steps
        dec.lm_head.bias[2] = 2.0
    out = dec.generate(mem, None, 1, 2, 8, top_p=0.95, generator=torch.Generator().manual_seed(1))
    for row in out.tolist():
        if 2 in row:
            after = row[row.index(2) + 1 :]
            assert all(tok == 0 for tok in after)


def test_generate_top_p_reproducible():
    dec = make_decoder("prefix")
    mem = torch.randn(2, 5, 24)
    a = dec.generate(
        mem, None, 1, 2, 8, top_p=0.9, temperature=1.5, generator=torch.Generator().manual_seed(7)
    )
    b = dec.generate(
        mem, None, 1, 2, 8, top_p=0.9, temperature=1.5, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(a, b)
    draws = {
        tuple(
            dec.generate(
                mem, None, 1, 2, 8, top_p=0.9, temperature=1.5, generator=torch.Generator().manual_seed(s)
            )[0].tolist()
        )
        for s in range(6)
    }
    assert len(draws) > 1  # sampling, not argmax
    # a tiny top_p keeps only the top token: sampling equals greedy
    greedy = dec.generate(mem, None, 1, 2, 8)
    tiny = dec.generate(mem, None, 1, 2, 8, top_p=1e-6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy, tiny)


def test_next_token_loss_ignores_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    ids = torch.randint(1, 7, (2, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = next_token_loss(logits, ids, mask)
    ids2 = ids.clone()
    ids2[0, 3:] = torch.tensor([6, 5])
    assert torch.equal(next_token_loss(logits, ids2, mask), loss)
    # by hand: positions (0,0)->ids[0,1], (0,1)->ids[0,2], (1,0..3)->ids[1,1..4]
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3)]
    expect = -sum(logits[b, t].log_softmax(-1)[ids[b, t + 1]] for b, t in pairs) / len(pairs)
    assert torch.allclose(loss, expect, atol=1e-6)
    assert torch.equal(NextTokenLoss()(logits, ids, mask), loss)
    smoothed = NextTokenLoss(label_smoothing=0.1)(logits, ids, mask)
    assert not torch.allclose(smoothed, loss)
    # nothing to predict → 0, not NaN
    empty = next_token_loss(logits, ids, torch.zeros(2, 5, dtype=torch.bool))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match=r"logits must be \[B, L, V\] with \[B, L\] = \(2, 5\)"):
        next_token_loss(logits[:, :4], ids, mask)


def test_causal_decoder_learns_to_copy_memory_token():
    """Next-token training through the cross-attention path reduces the loss."""
    torch.manual_seed(0)
    dec = CausalDecoder(vocab_size=12, dim=32, depth=1, num_heads=4, max_length=8, memory_dim=12)
    ids = torch.randint(3, 12, (8, 4))
    ids[:, 0] = 1
    memory = torch.nn.functional.one_hot(ids[:, 1:], 12).float()  # the caption is in the memory
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    first = None
    for _ in range(40):
        loss = next_token_loss(dec(ids, None, memory), ids)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


# ---------------------------------------------------------------- classification


@pytest.mark.parametrize("pool", ["attention", "mean"])
def test_classification_head(pool):
    torch.manual_seed(0)
    head = ClassificationHead(32, 5, num_heads=4, pool=pool).eval()
    tokens = torch.randn(3, 6, 32)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    logits = head(tokens, mask)
    assert logits.shape == (3, 5)
    changed = tokens.clone()
    changed[0, 4:] = 100.0
    assert torch.allclose(head(changed, mask), logits, atol=1e-5)
    with pytest.raises(ValueError, match=r"mask must be \[B, N\] = \(3, 6\); got \(3, 5\)"):
        head(tokens, mask[:, :5])
