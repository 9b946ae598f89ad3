"""The pixels of a synthetic clip: an achromatic background and one anti-aliased wallpaper per
object, rolled by whole steps from frame to frame (the construction is explained in
:mod:`iv2_lightning.data.synthetic.scene`).

Shapes are drawn from signed distance functions with a one-pixel coverage ramp, the usual
anti-aliasing of SDF rendering; equal cosets give identical bytes, which
``tests/data/test_synthetic.py`` checks pixel-exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from iv2_lightning.data.synthetic.scene import BACKGROUNDS, SHAPES, ClipParams, ObjectParams

# saturated object colours on achromatic backgrounds: colour alone separates object from scene
RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (40, 200, 70),
    "blue": (50, 95, 240),
    "yellow": (240, 215, 40),
}


# Rendering and audio use NumPy, which never starts worker threads: a clip is many small ops, and
# torch's intra-op threads (2 on our CPU) make each one 40-100x slower when the cores are busy with
# training, while DataLoader workers and the main process share them.


def _background(p: ClipParams) -> np.ndarray:
    """Grey ``[S, S]`` float32 image; achromatic, so a pixel's saturation belongs to an object."""
    s = p.image_size
    if p.background == "plain":
        return np.full((s, s), p.bg_level, dtype=np.float32)
    coords = np.arange(s, dtype=np.float32) + 0.5
    y, x = coords[:, None], coords[None, :]
    if p.background == "stripes":
        a = math.radians(p.bg_angle)
        u = x * np.float32(math.cos(a)) + y * np.float32(math.sin(a)) + np.float32(p.bg_phase)
        band = np.floor(u / np.float32(p.bg_period / 2)) % 2
        return (p.bg_level + p.bg_contrast * band).astype(np.float32)
    if p.background == "dots":
        period = np.float32(p.bg_period)
        dx = (x + np.float32(p.bg_phase)) % period - period / 2
        dy = (y + np.float32(p.bg_phase)) % period - period / 2
        dot = np.clip(period / 5 + np.float32(0.5) - np.sqrt(dx * dx + dy * dy), 0, 1)
        return (p.bg_level + p.bg_contrast * dot).astype(np.float32)
    if p.background == "noise":
        rng = np.random.default_rng(p.texture_seed)
        n = max(2, s // 8)
        coarse = rng.random((n, n), dtype=np.float32)
        fine = rng.random((s, s), dtype=np.float32)
        # bilinear upsampling of the coarse field (half-pixel centres), separable and elementwise
        src = np.clip((np.arange(s, dtype=np.float32) + 0.5) * (n / s) - 0.5, 0, n - 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n - 1)
        w = (src - i0).astype(np.float32)
        rows = coarse[i0] * (1 - w)[:, None] + coarse[i1] * w[:, None]  # [s, n]
        smooth = rows[:, i0] * (1 - w)[None, :] + rows[:, i1] * w[None, :]  # [s, s]
        return (p.bg_level + p.bg_contrast * (0.75 * smooth + 0.25 * fine)).astype(np.float32)
    raise ValueError(f"unknown background {p.background!r}; expected one of {BACKGROUNDS}")


def _sprite(shape: str, radius: float, frac: tuple[float, float]) -> tuple[np.ndarray, int]:
    """Anti-aliased coverage of a shape on a small square patch and the patch's half-width.

    Coverage is ``clamp(0.5 - signed_distance, 0, 1)`` evaluated at pixel centres; ``frac`` is the
    sub-pixel part of the centre so a sprite pasted at the integer part lands exactly."""
    half = math.ceil(radius) + 2
    coords = np.arange(-half, half, dtype=np.float32) + np.float32(0.5)
    dx = coords[None, :] - np.float32(frac[0])
    dy = coords[:, None] - np.float32(frac[1])
    r = np.float32(radius)
    if shape == "circle":
        sdf = np.sqrt(dx * dx + dy * dy) - r
    elif shape == "square":
        sdf = np.maximum(np.abs(dx), np.abs(dy)) - np.float32(0.82) * r
    elif shape == "cross":
        w = np.float32(0.34) * r
        sdf = np.minimum(
            np.maximum(np.abs(dx) - r, np.abs(dy) - w), np.maximum(np.abs(dx) - w, np.abs(dy) - r)
        )
    elif shape == "triangle":
        # upright equilateral triangle whose bounding box (width 2r, height sqrt(3) r) is centred
        ri = r / np.float32(math.sqrt(3.0))  # inradius
        dyc = dy - ri / 2  # relative to the centroid (y grows downwards)
        c, s = np.float32(math.sqrt(3.0) / 2), np.float32(0.5)
        sdf = np.maximum(np.maximum(dyc, -c * dx - s * dyc), c * dx - s * dyc) - ri
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.clip(np.float32(0.5) - sdf, 0, 1).astype(np.float32), half


def _wallpaper(obj: ObjectParams) -> np.ndarray:
    """Coverage ``[S, S]`` of the wallpaper at coset 0; the frame at coset ``c`` is this rolled right
    by ``c * step`` pixels (the torus makes that exact, so equal cosets give equal bytes)."""
    s = obj.period
    copies = obj.copies(0)
    # copies differ by whole pixels, so one sprite serves every copy: paste with wrap-around
    x_int, y_int = math.floor(copies[0][0]), math.floor(copies[0][1])
    sprite, half = _sprite(obj.shape, obj.radius, (copies[0][0] - x_int, copies[0][1] - y_int))
    span = np.arange(sprite.shape[0])
    alpha = np.zeros((s, s), dtype=np.float32)
    for cx, cy in copies:
        rows = (math.floor(cy) - half + span) % s
        cols = (math.floor(cx) - half + span) % s
        block = np.ix_(rows, cols)
        alpha[block] = np.maximum(alpha[block], sprite)
    return alpha


def render_clip(params: ClipParams) -> torch.Tensor:
    """uint8 ``[T, H, W, 3]`` frames of a clip. Each frame depends only on the coset every object
    shows at that frame (and the static background), so equal cosets give identical frames."""
    t_count, s = params.num_frames, params.image_size
    video = np.broadcast_to(_background(params)[None, :, :, None], (t_count, s, s, 3))
    for obj in params.objects:
        base = _wallpaper(obj)
        alpha = np.stack([np.roll(base, c * obj.step, axis=1) for c in obj.cosets()])[..., None]
        color = np.asarray(RGB[obj.color], dtype=np.float32)
        video = video + alpha * (color - video)
    return torch.from_numpy(np.clip(np.rint(video), 0, 255).astype(np.uint8))


__all__ = ["RGB", "render_clip"]
