"""The attention kernel: every backend agrees, masks behave, bad shapes are refused."""

import pytest
import torch

from iv2_lightning.models.attention import Attention, CrossAttention, attention


def _qkv(b=2, h=3, nq=5, nk=7, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, nq, d, generator=g),
        torch.randn(b, h, nk, d, generator=g),
        torch.randn(b, h, nk, d, generator=g),
    )


def _reference(q, k, v, allowed=None):
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return s.softmax(-1) @ v


def test_math_and_sdpa_agree_with_the_formula():
    q, k, v = _qkv()
    ref = _reference(q, k, v)
    for backend in ("math", "sdpa", "auto"):
        torch.testing.assert_close(attention(q, k, v, backend=backend), ref, atol=1e-5, rtol=1e-5)


def test_key_padding_mask_ignores_padded_keys_in_every_backend():
    q, k, v = _qkv()
    kpm = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
    ref = _reference(q, k, v, kpm[:, None, None, :])
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 4:] = 100.0  # garbage in the padding must not matter
    v2[0, :, 4:] = -100.0
    for backend in ("math", "sdpa"):
        out = attention(q, k2, v2, key_padding_mask=kpm, backend=backend)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_causal_rows_never_see_the_future():
    q, k, v = _qkv(nq=6, nk=6)
    out = attention(q, k, v, causal=True, backend="sdpa")
    v2 = v.clone()
    v2[:, :, 4:] += 5.0
    out2 = attention(q, k, v2, causal=True, backend="math")
    torch.testing.assert_close(out[:, :, :4], out2[:, :, :4], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:, :, 4:], out2[:, :, 4:])


def test_fully_masked_rows_are_zero_and_gradients_stay_finite():
    q, k, v = _qkv(nq=3, nk=3)
    for t in (q, k, v):
        t.requires_grad_(True)
    allowed = torch.ones(2, 1, 3, 3, dtype=torch.bool)
    allowed[0, :, 1] = False  # query row 1 of sample 0 may see nothing
    for backend in ("math", "sdpa"):
        out = attention(q, k, v, attn_mask=allowed, backend=backend)
        assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1]))
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        for t in (q, k, v):
            t.grad = None


def test_flash_backend_refuses_to_run_on_cpu():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="backend='flash' needs the flash-attn package"):
        attention(q, k, v, backend="flash")


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((2, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8)), r"rank 4 \[B, H, N, Dh\]; got \(2, 5, 8\)"),
        (((2, 3, 5, 8), (2, 3, 5, 4), (2, 3, 5, 4)), r"got q \(2, 3, 5, 8\), k \(2, 3, 5, 4\)"),
    ],
)
def test_bad_shapes_name_expected_and_given(shapes, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        attention(q, k, v)


def test_bad_padding_mask_shape_and_backend_name():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, Nk\] = \(2, 7\); got \(2, 5\)"):
        attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="xformers")


def test_attention_module_backends_agree_and_use_official_names():
    torch.manual_seed(0)
    m = Attention(32, 4)
    names = {n for n, _ in m.named_parameters()}
    assert names == {"qkv.weight", "q_norm.weight", "k_norm.weight", "proj.weight", "proj.bias"}
    x = torch.randn(2, 9, 32)
    m.backend = "math"
    ref = m(x)
    m.backend = "sdpa"
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=1e-5)


def test_cross_attention_shapes_and_padding():
    torch.manual_seed(0)
    m = CrossAttention(16, 2, context_dim=24, out_dim=8)
    x, ctx = torch.randn(2, 3, 16), torch.randn(2, 5, 24)
    kpm = torch.tensor([[True, True, False, False, False], [True] * 5])
    out = m(x, ctx, kpm)
    assert out.shape == (2, 3, 8)
    ctx2 = ctx.clone()
    ctx2[0, 2:] = 7.0
    torch.testing.assert_close(m(x, ctx2, kpm), out)
