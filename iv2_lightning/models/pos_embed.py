"""Fixed sin-cos tables (1D, 2D, 3D) and interpolation of learned position tables.

The 3D table follows the split of the official InternVideo2 code (a quarter of the channels encode
time, three quarters encode the 2D position in the frame); learned tables are initialised from it.
Interpolation is linear in time and bicubic in space, the modes the official code uses when it
loads a checkpoint at another frame count or resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``[len(positions), dim]``: sin in the first half of the channels, cos in the second."""
    if dim % 2 != 0:
        raise ValueError(f"sin-cos embedding needs an even width; got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.double().reshape(-1)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """``[grid_h * grid_w, dim]`` in row-major (h, w) order; half the channels per axis."""
    if dim % 4 != 0:
        raise ValueError(f"2D sin-cos embedding needs a width divisible by 4; got {dim}")
    hh, ww = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, hh), sincos_1d(dim // 2, ww)], dim=1)


def sincos_3d(dim: int, grid_t: int, grid_h: int, grid_w: int, cls_token: bool = False) -> torch.Tensor:
    """``[(1 +) T*H*W, dim]`` in (t, h, w) order: D/4 channels for time, 3D/4 for space."""
    if dim % 4 != 0:
        raise ValueError(f"3D sin-cos embedding needs a width divisible by 4; got {dim}")
    d_t, d_s = dim // 4, dim - dim // 4
    if d_s % 4 != 0:
        raise ValueError(
            f"3D sin-cos embedding: the spatial part {d_s} of width {dim} must be divisible by 4"
        )
    spatial = sincos_2d(d_s, grid_h, grid_w)  # [S, 3D/4]
    temporal = sincos_1d(d_t, torch.arange(grid_t))  # [T, D/4]
    table = torch.cat(
        [
            temporal[:, None, :].expand(grid_t, grid_h * grid_w, d_t),
            spatial[None, :, :].expand(grid_t, grid_h * grid_w, d_s),
        ],
        dim=-1,
    ).reshape(grid_t * grid_h * grid_w, dim)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table], dim=0)
    return table


def interpolate_pos_embed_3d(
    pos: torch.Tensor,
    src_grid: tuple[int, int, int],
    dst_grid: tuple[int, int, int],
    num_extra_tokens: int = 0,
) -> torch.Tensor:
    """Resample a ``[1, extra + T*H*W, D]`` table from ``src_grid`` (T, H, W) to ``dst_grid``.

    Time is resampled linearly, space bicubically (align_corners=False); the leading extra rows
    (the cls position) are kept as they are.
    """
    t, h, w = src_grid
    t2, h2, w2 = dst_grid
    expected = num_extra_tokens + t * h * w
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[1] != expected:
        raise ValueError(
            f"position table must be [1, {expected}, D] for grid {src_grid} with {num_extra_tokens} extra "
            f"token(s); got {tuple(pos.shape)}"
        )
    if (t, h, w) == (t2, h2, w2):
        return pos
    extra, grid = pos[:, :num_extra_tokens], pos[:, num_extra_tokens:]
    dim = pos.shape[-1]
    dtype = grid.dtype
    x = grid.float().reshape(t, h, w, dim)
    if (h, w) != (h2, w2):
        x = x.permute(0, 3, 1, 2)  # [T, D, H, W]
        x = F.interpolate(x, size=(h2, w2), mode="bicubic", align_corners=False)
        x = x.permute(0, 2, 3, 1)  # [T, H2, W2, D]
    if t != t2:
        x = x.permute(1, 2, 3, 0).reshape(h2 * w2, dim, t)  # [S, D, T]
        x = F.interpolate(x, size=t2, mode="linear", align_corners=False)
        x = x.reshape(h2, w2, dim, t2).permute(3, 0, 1, 2)
    x = x.reshape(1, t2 * h2 * w2, dim).to(dtype)
    return torch.cat([extra, x], dim=1)
