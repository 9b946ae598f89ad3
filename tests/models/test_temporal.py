"""HierarchicalTemporalEncoder: windows, shapes, attention span, padding, memory growth."""

import pytest
import torch

from iv2_lightning.models import Attention, HierarchicalTemporalEncoder, build_video_encoder
from iv2_lightning.models.layers import PoolCrossAttention


def make(window=4, **kw):
    torch.manual_seed(0)
    enc = build_video_encoder("tiny", image_size=16, num_frames=window, depth=1, attention="joint")
    return HierarchicalTemporalEncoder(enc, window=window, tokens_per_window=2, depth=1, **kw).eval()


def test_shapes_for_a_long_clip_with_a_partial_last_window():
    hte = make(window=4, window_batch=2)
    out = hte(torch.randn(2, 3, 22, 16, 16))
    assert out.embedding.shape == (2, 128)
    assert out.window_tokens.shape == (2, 6, 2, 128)
    assert out.window_embeddings.shape == (2, 6, 128)
    assert out.window_mask.all()


def test_no_attention_inside_the_encoder_spans_more_than_one_window():
    hte = make(window=4, window_batch=3)
    per_window = 1 + 4 * 2 * 2  # cls + frames x (16/8)^2 patches
    seen = []

    def spy(module, args, output):
        seen.append(args[0].shape[1])

    for m in hte.encoder.modules():
        if isinstance(m, (Attention, PoolCrossAttention)):
            m.register_forward_hook(spy)
    hte(torch.randn(1, 3, 40, 16, 16))
    assert seen and max(seen) <= per_window, seen


def test_window_batch_does_not_change_the_result():
    hte = make()
    v = torch.randn(1, 3, 16, 16, 16)
    a = hte(v).embedding
    hte.window_batch = 1
    torch.testing.assert_close(hte(v).embedding, a, atol=1e-5, rtol=1e-5)


def test_order_of_windows_matters():
    hte = make()
    v = torch.randn(1, 3, 8, 16, 16)
    swapped = torch.cat([v[:, :, 4:], v[:, :, :4]], dim=2)
    assert (hte(v).embedding - hte(swapped).embedding).abs().max() > 1e-4


def test_padded_frames_of_shorter_videos_are_ignored():
    hte = make()
    short = torch.randn(1, 3, 8, 16, 16)
    frame_mask = torch.tensor([[True] * 8 + [False] * 8])
    a = hte(torch.cat([short, torch.randn(1, 3, 8, 16, 16)], dim=2), frame_mask)
    b = hte(torch.cat([short, torch.zeros(1, 3, 8, 16, 16)], dim=2), frame_mask)
    assert a.window_mask.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(a.embedding, b.embedding)


def test_checkpointing_over_windows_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        hte = make(checkpoint_windows=ckpt, window_batch=1).train()
        out = hte(torch.randn(1, 3, 12, 16, 16, generator=torch.Generator().manual_seed(0)))
        (out.embedding.sum() + out.window_embeddings.square().sum()).backward()
        grads.append([p.grad.clone() for p in hte.parameters()])
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bad_inputs():
    hte = make()
    with pytest.raises(ValueError, match=r"rank 5 \[B, C, T, H, W\]; got shape \(3, 8, 16, 16\)"):
        hte(torch.randn(3, 8, 16, 16))
    with pytest.raises(ValueError, match=r"frame_mask must be \[B, T\] = \(1, 8\); got \(1, 7\)"):
        hte(torch.randn(1, 3, 8, 16, 16), torch.ones(1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="window 3 is not divisible by the encoder's tubelet 2"):
        HierarchicalTemporalEncoder(build_video_encoder("tiny", tubelet_size=2), window=3)


def test_mean_aggregate_cannot_see_the_order_of_windows():
    hte = make(aggregate="mean")
    assert len(hte.blocks) == 0
    v = torch.randn(2, 3, 8, 16, 16)
    swapped = torch.cat([v[:, :, 4:], v[:, :, :4]], dim=2)
    torch.testing.assert_close(hte(v).embedding, hte(swapped).embedding, atol=1e-5, rtol=1e-5)


def test_an_hte_that_does_not_own_its_encoder_leaves_it_out_of_its_state():
    owned = make()
    borrowed = HierarchicalTemporalEncoder(
        owned.encoder, window=4, tokens_per_window=2, depth=1, own_encoder=False
    ).eval()
    borrowed.load_state_dict({k: v for k, v in owned.state_dict().items() if not k.startswith("encoder.")})
    assert not any(k.startswith("encoder.") for k in borrowed.state_dict())
    assert not any(n.startswith("encoder.") for n, _ in borrowed.named_parameters())
    v = torch.randn(1, 3, 8, 16, 16)
    torch.testing.assert_close(borrowed(v).embedding, owned(v).embedding)
    with pytest.raises(ValueError, match="aggregate must be 'transformer' or 'mean'; got 'max'"):
        make(aggregate="max")
