"""Sin-cos tables and the interpolation of learned position tables."""

import pytest
import torch

from iv2_lightning.models.pos_embed import interpolate_pos_embed_3d, sincos_1d, sincos_2d, sincos_3d


def test_sincos_1d_matches_formula():
    table = sincos_1d(8, torch.arange(5))
    pos, i = 3, 2
    omega = 1.0 / 10000 ** (i / 4)
    assert table.shape == (5, 8)
    assert table[pos, i].item() == pytest.approx(torch.sin(torch.tensor(pos * omega)).item(), abs=1e-6)
    assert table[pos, 4 + i].item() == pytest.approx(torch.cos(torch.tensor(pos * omega)).item(), abs=1e-6)


def test_sincos_3d_splits_time_and_space():
    t, h, w, d = 3, 2, 4, 32
    table = sincos_3d(d, t, h, w, cls_token=True)
    assert table.shape == (1 + t * h * w, d)
    assert torch.equal(table[0], torch.zeros(d))
    grid = table[1:].reshape(t, h * w, d)
    # the first D/4 channels depend on the frame only, the rest on the position in the frame only
    assert torch.allclose(grid[:, :1, : d // 4].expand(t, h * w, d // 4), grid[:, :, : d // 4])
    assert torch.allclose(grid[:1, :, d // 4 :].expand(t, h * w, 3 * d // 4), grid[:, :, d // 4 :])
    assert not torch.allclose(grid[0, :, : d // 4], grid[1, :, : d // 4])
    assert torch.equal(sincos_2d(24, h, w), grid[0, :, d // 4 :])


def test_sincos_rejects_bad_widths():
    with pytest.raises(ValueError, match="divisible by 4; got 30"):
        sincos_3d(30, 2, 2, 2)
    with pytest.raises(ValueError, match="even width; got 7"):
        sincos_1d(7, torch.arange(3))


def test_interpolation_is_identity_on_same_grid_and_exact_on_a_linear_ramp():
    d = 8
    pos = torch.randn(1, 1 + 4 * 3 * 3, d)
    assert interpolate_pos_embed_3d(pos, (4, 3, 3), (4, 3, 3), 1) is pos
    # a table constant in space and linear in time stays linear in time after resampling
    ramp = torch.linspace(0, 3, 4)[:, None, None, None].expand(4, 3, 3, d).reshape(1, 36, d)
    ramp = torch.cat([torch.full((1, 1, d), 9.0), ramp], dim=1)
    out = interpolate_pos_embed_3d(ramp, (4, 3, 3), (8, 5, 5), 1)
    assert out.shape == (1, 1 + 8 * 25, d)
    assert torch.equal(out[0, 0], torch.full((d,), 9.0))  # the cls row is carried over
    per_frame = out[0, 1:].reshape(8, 25, d)
    assert torch.allclose(
        per_frame, per_frame[:, :1].expand_as(per_frame), atol=1e-5
    )  # still constant in space
    # align_corners=False: interior target frames sit at (i + 0.5) / 2 - 0.5 of the source grid
    expected = ((torch.arange(8) + 0.5) / 2 - 0.5).clamp(0, 3)
    assert torch.allclose(per_frame[:, 0, 0], expected, atol=1e-5)


def test_interpolation_rejects_a_table_of_the_wrong_length():
    with pytest.raises(
        ValueError,
        match=r"must be \[1, 37, D\] for grid \(4, 3, 3\) with 1 extra token\(s\); got \(1, 36, 8\)",
    ):
        interpolate_pos_embed_3d(torch.randn(1, 36, 8), (4, 3, 3), (8, 3, 3), 1)
