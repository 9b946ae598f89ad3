"""The embedded synthetic multimodal dataset: coloured shapes whose motion direction can only be
read from the *order* of the frames.

Why it exists. InternVideo2 (arXiv 2403.15377) is motivated by what separates video from images —
"temporal dependencies (motion, dynamics)", in the words of the paper summary this project was built
from — and its spatio-temporal backbone adds temporal attention across frames and a hierarchical
temporal encoder to model them. A toy dataset where a per-frame image model does as well as a video
model cannot show whether those parts work, so this one makes the ground truth (the motion
direction) *invisible in any single frame and in the unordered set of frames*, while keeping
everything else a model must align across modalities (colour, shape, background, a scene-dependent
sound, a speech-like transcript, captions and dialogue) easy to see. It needs no download, renders
on the fly in about a millisecond, and the same ``(seed, split, index)`` always gives the same bytes.

The construction: a moving wallpaper on a twisted torus. With ``T`` frames of side ``S`` (``S``
divisible by ``T``), let ``s = S / T`` be the step and ``a`` the *shear*, an integer with
``gcd(a, T) = 1`` and ``a != ±1 (mod T)`` (3 for 8 frames; :func:`lattice_shear`). The object is
drawn as a wallpaper: one copy at every point of the lattice ``L`` spanned by ``(S, 0)`` and
``(-a s, s)`` (``T`` copies per frame, periodic with period ``S`` in both axes, so the frame is a
torus), shifted by a random origin. Shifting the wallpaper by ``(x, y) = (i s, j s)`` gives the same
image as the shift ``(c s, 0)`` with ``c = i + a j (mod T)``: every frame the wallpaper can show is
one of ``T`` *cosets* ``c``, and frame ``t`` of a clip shows::

    c_t = c_0 + m t (mod T),   m = +1 (right), -1 (left), +a (down), -a (up)

i.e. the whole pattern moves by exactly ``s`` pixels per frame in the clip's direction (the copies'
nearest-neighbour distance is at least ``sqrt(5) s``, so a move of ``s`` is never ambiguous to the
eye). Because every ``m`` is a unit modulo ``T``, ``c_0 + m t`` runs over *all* ``T`` cosets exactly
once whatever the direction and the start ``c_0``: the unordered set of frames of a clip is
pixel-for-pixel the same for left, right, up and down — neither the sign nor the axis of the motion
can be read from it, and any order-free model is at chance (25%). Only the order of the frames, i.e.
how consecutive frames differ, tells the direction. The construction needs a shear, which exists
for ``T = 5`` and every ``T >= 7`` (not for 3, 4 or 6 frames). ``tests/data/test_synthetic.py``
checks the symmetry pixel-exactly and with a hand-written tracker that reads the direction from
ordered frames and not from shuffled ones.

A second object, when present, is a second wallpaper with its own origin, start and direction
(drawn over the first). The set of frames then carries the *ratio* of the two directions' steps
(e.g. whether both move the same way) but still nothing about either direction alone.

Every clip also has a 16 kHz waveform tied to the scene (a tone whose base pitch names the shape,
whose timbre names the colour and loudness the size, gliding *up* for right/up and *down* for
left/down — partial direction information, available only in temporal order), an audio caption
describing that sound, an ASR-style transcript that names the shape and the background (sometimes
the colour or size, never the direction), a caption from paraphrase templates, and 2-3
question/answer turns for dialogue. ``synth_main`` (``iv2 synth``) writes clips out as real media
files with a JSONL annotation file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from iv2_lightning.data.batch import VideoSample
from iv2_lightning.data.transforms import VideoTransform
from iv2_lightning.models.audio import compute_fbank

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "dots", "noise")
SIZES: tuple[str, ...] = ("small", "large")
SAMPLE_RATE = 16_000

# saturated object colours on achromatic backgrounds: colour alone separates object from scene
RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (40, 200, 70),
    "blue": (50, 95, 240),
    "yellow": (240, 215, 40),
}
# object half-extent as a fraction of the wallpaper's nearest-neighbour distance, per size (the
# largest shape, a square's corner, reaches 1.16 x radius: copies never touch)
_RADIUS = {"small": 0.26, "large": 0.36}
# audio: base pitch per shape (Hz), harmonic amplitudes per colour, loudness per size
_BASE_HZ = {"circle": 220.0, "square": 330.0, "triangle": 494.0, "cross": 740.0}
_HARMONICS = {
    "red": (1.0, 0.5, 0.33, 0.25),
    "green": (1.0,),
    "blue": (1.0, 0.0, 0.33, 0.0, 0.2),
    "yellow": (1.0, 0.6, 0.0, 0.3),
}
_LOUDNESS = {"small": 0.35, "large": 0.6}
_GLIDE_OCTAVES = 0.5  # total pitch change over the clip; ranges of different shapes never overlap
_MIN_STEP = 2  # pixels per frame: below this the smallest copies are a pixel or two wide


# --------------------------------------------------------------------------- the lattice


def _lattice_vectors(num_frames: int, shear: int) -> list[tuple[int, int]]:
    """Short vectors of the lattice spanned by ``(T, 0)`` and ``(-a, 1)``, in steps: for each row
    offset ``j`` the vector with the smallest horizontal part."""
    out = [(num_frames, 0)]
    for j in range(1, num_frames):
        x = (-shear * j) % num_frames
        out.append((x - num_frames if x > num_frames / 2 else x, j))
    return out


def _shortest(num_frames: int, shear: int) -> float:
    return min(math.hypot(x, y) for x, y in _lattice_vectors(num_frames, shear))


def lattice_shear(num_frames: int) -> int:
    """The shear ``a`` for ``T`` frames: a unit modulo ``T`` other than ±1 whose lattice has the
    longest shortest vector (copies spread as evenly as possible); ValueError where none exists."""
    candidates = [a for a in range(2, num_frames - 1) if math.gcd(a, num_frames) == 1]
    if not candidates:
        raise ValueError(
            f"num_frames={num_frames} is not supported by the synthetic clips: hiding the motion axis "
            "from the unordered set of frames needs a unit modulo num_frames other than +-1, which "
            "exists for 5 and for 7 or more frames (not for 3, 4 or 6); use e.g. 8 or 16 frames"
        )
    return max(candidates, key=lambda a: (round(_shortest(num_frames, a), 9), -a))


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class ObjectParams:
    """One object, drawn as a wallpaper that moves ``step`` pixels per frame (see the module
    docstring). ``origin``: centre of one copy at coset 0 (pixels, pixel ``i`` spans ``[i, i+1)``);
    ``start``: the coset of frame 0; ``shear``: ``a``; ``num_frames``: ``T``; ``radius``: half-extent
    of each copy in pixels."""

    color: str
    shape: str
    direction: str
    size: str
    origin: tuple[float, float]
    start: int
    step: int
    shear: int
    num_frames: int
    radius: float

    @property
    def period(self) -> int:
        """The wallpaper's period in pixels (the image side)."""
        return self.step * self.num_frames

    @property
    def move(self) -> int:
        """Coset increment per frame, ``m``."""
        m = {"right": 1, "left": -1, "down": self.shear, "up": -self.shear}[self.direction]
        return m % self.num_frames

    def cosets(self) -> list[int]:
        """The coset shown at every frame."""
        return [(self.start + self.move * t) % self.num_frames for t in range(self.num_frames)]

    def velocity(self) -> tuple[int, int]:
        """``(dx, dy)`` pixels per frame (image y grows downwards)."""
        return {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}[self.direction]

    def copies(self, coset: int) -> list[tuple[float, float]]:
        """Centres ``(x, y)`` of the ``T`` copies in ``[0, S)^2`` when the wallpaper shows ``coset``."""
        s, p, (ox, oy) = self.step, self.period, self.origin
        return [((ox + (coset - self.shear * j) * s) % p, (oy + j * s) % p) for j in range(self.num_frames)]

    def attributes(self) -> dict[str, str]:
        return {"color": self.color, "shape": self.shape, "direction": self.direction, "size": self.size}


@dataclass(frozen=True)
class ClipParams:
    """Everything that determines a clip's frames and sound (``render_clip``, ``synthesize_audio``).

    Background fields: ``bg_level`` (grey level), ``bg_contrast`` (pattern amplitude), ``bg_period``
    (stripe/dot spacing in pixels), ``bg_angle`` (stripe orientation in degrees), ``bg_phase``
    (pattern offset in pixels), ``texture_seed`` (noise texture)."""

    num_frames: int
    image_size: int
    objects: tuple[ObjectParams, ...]
    background: str
    bg_level: float
    bg_contrast: float
    bg_period: float
    bg_angle: int
    bg_phase: float
    texture_seed: int

    def attributes(self) -> dict[str, Any]:
        """First object's attributes at the top level, plus background and every object."""
        first = self.objects[0].attributes()
        return {
            **first,
            "background": self.background,
            "num_objects": len(self.objects),
            "objects": [o.attributes() for o in self.objects],
        }


def clip_seed(seed: int, split: str, index: int) -> int:
    """A stable 64-bit seed for one clip (blake2b, not Python's per-process salted ``hash``), so
    splits are disjoint streams and every process renders the same bytes."""
    digest = hashlib.blake2b(f"iv2-synthetic/{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sample_id_of(color: str, shape: str, direction: str) -> int:
    """The contrastive identity of a clip: one integer per (color, shape, direction)."""
    return (COLORS.index(color) * len(SHAPES) + SHAPES.index(shape)) * len(DIRECTIONS) + DIRECTIONS.index(
        direction
    )


def _check_geometry(num_frames: int, image_size: int, max_objects: int) -> None:
    lattice_shear(num_frames)  # raises for 3, 4 or 6 frames (and fewer)
    if image_size % num_frames:
        raise ValueError(
            f"image_size {image_size} must be divisible by num_frames {num_frames}: the wallpaper "
            f"moves image_size / num_frames pixels per frame and repeats after num_frames frames "
            f"(e.g. image_size {num_frames * max(_MIN_STEP, round(image_size / num_frames))})"
        )
    if image_size // num_frames < _MIN_STEP:
        raise ValueError(
            f"image_size {image_size} is too small for {num_frames} frames: the step image_size / "
            f"num_frames must be at least {_MIN_STEP} pixels; use image_size >= {_MIN_STEP * num_frames}"
        )
    if max_objects not in (1, 2):
        raise ValueError(f"max_objects must be 1 or 2; got {max_objects}")


def _sample(rng: random.Random, num_frames: int, image_size: int, max_objects: int) -> ClipParams:
    n_objects = rng.randint(1, max_objects)
    background = rng.choice(BACKGROUNDS)
    bg_level = rng.uniform(35.0, 120.0)
    bg_contrast = rng.uniform(35.0, 70.0)
    bg_period = rng.uniform(image_size / 12, image_size / 6)
    bg_angle = rng.choice((0, 45, 90, 135))
    bg_phase = rng.uniform(0.0, bg_period)
    texture_seed = rng.getrandbits(62)
    shear = lattice_shear(num_frames)
    step = image_size // num_frames
    spacing = _shortest(num_frames, shear) * step
    objects: list[ObjectParams] = []
    for _ in range(n_objects):
        # a second object differs in colour and shape so that text can name each one unambiguously
        color = rng.choice([c for c in COLORS if all(o.color != c for o in objects)])
        shape = rng.choice([s for s in SHAPES if all(o.shape != s for o in objects)])
        direction = rng.choice(DIRECTIONS)
        size = rng.choice(SIZES)
        objects.append(
            ObjectParams(
                color=color,
                shape=shape,
                direction=direction,
                size=size,
                origin=(rng.uniform(0, image_size), rng.uniform(0, image_size)),
                start=rng.randrange(num_frames),
                step=step,
                shear=shear,
                num_frames=num_frames,
                radius=_RADIUS[size] * spacing,
            )
        )
    return ClipParams(
        num_frames=num_frames,
        image_size=image_size,
        objects=tuple(objects),
        background=background,
        bg_level=bg_level,
        bg_contrast=bg_contrast,
        bg_period=bg_period,
        bg_angle=bg_angle,
        bg_phase=bg_phase,
        texture_seed=texture_seed,
    )


def sample_params(
    index: int,
    split: str = "train",
    seed: int = 0,
    num_frames: int = 8,
    image_size: int = 64,
    max_objects: int = 1,
) -> ClipParams:
    """The parameters of clip ``index`` of ``split`` (cheap: no rendering)."""
    _check_geometry(num_frames, image_size, max_objects)
    return _sample(random.Random(clip_seed(seed, split, index)), num_frames, image_size, max_objects)


# --------------------------------------------------------------------------- rendering


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


def synthesize_audio(params: ClipParams, fps: float = 8.0, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """float32 ``[round(T / fps * sample_rate)]`` waveform in [-1, 1]: one gliding tone per object."""
    n = max(1, round(params.num_frames / fps * sample_rate))
    u = np.arange(n, dtype=np.float64) / max(n - 1, 1)  # 0 -> 1 over the clip
    wave = np.zeros(n, dtype=np.float64)
    for obj in params.objects:
        sign = 1.0 if obj.direction in ("right", "up") else -1.0
        freq = _BASE_HZ[obj.shape] * np.power(2.0, sign * _GLIDE_OCTAVES * (u - 0.5))
        phase = 2 * math.pi * np.cumsum(freq) / sample_rate
        amps = _HARMONICS[obj.color]
        tone = np.zeros(n, dtype=np.float64)
        for h, amp in enumerate(amps, start=1):
            if amp > 0 and h * _BASE_HZ[obj.shape] * 2**_GLIDE_OCTAVES < sample_rate / 2:
                tone += amp * np.sin(h * phase)
        wave += _LOUDNESS[obj.size] * tone / sum(amps)
    wave /= len(params.objects)
    ramp = min(n // 2, max(1, round(0.015 * sample_rate)))  # 15 ms fades: no clicks at the edges
    env = np.ones(n, dtype=np.float64)
    env[:ramp] = np.linspace(0, 1, ramp)
    env[n - ramp :] = np.linspace(1, 0, ramp)
    return torch.from_numpy(np.clip(wave * env, -1, 1).astype(np.float32))


# --------------------------------------------------------------------------- text

DIRECTION_ADVERBS = {
    "left": ("left", "to the left", "leftward"),
    "right": ("right", "to the right", "rightward"),
    "up": ("up", "upward", "upwards"),
    "down": ("down", "downward", "downwards"),
}
DIRECTION_ADJECTIVES = {"left": "leftward", "right": "rightward", "up": "upward", "down": "downward"}
# {a} = noun phrase with an indefinite article, {the} = with the definite one
CAPTION_TEMPLATES: tuple[str, ...] = (
    "{a} moves {adv}",
    "{the} slides {adv}",
    "{a} moving {adv}",
    "{adj} motion of {a}",
    "{a} drifts {adv}",
    "{the} travels {adv}",
    "{a} heading {adv}",
    "{the} goes {adv}",
)
_BG_ADJECTIVES = {"plain": "plain", "stripes": "striped", "dots": "dotted", "noise": "noisy"}
_SIZE_WORDS = {"small": "small", "large": "big"}
SPEECH_TEMPLATES: tuple[str, ...] = (
    "uh so there's {a} on a {bg} background",
    "okay um a {bg} background and {a}",
    "so we've got {a} here with a {bg} background",
    "um the background is {bg} and uh there's {a}",
    "yeah {a} on a {bg} background you know",
)
_PITCH_WORDS = {"circle": "low", "square": "mid-range", "triangle": "high", "cross": "very high"}
_TIMBRE_WORDS = {"red": "buzzy", "green": "pure", "blue": "hollow", "yellow": "bright"}
_LOUD_WORDS = {"small": "soft", "large": "loud"}
_AUDIO_TEMPLATES = (
    "a {loud} {pitch} {timbre} tone {rising}",
    "a {pitch} {timbre} tone that {rises}",
    "{loud} {timbre} {pitch} tone, pitch {rising}",
)


def _article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _clause(template: str, noun: str, direction: str, rng: random.Random) -> str:
    return template.format(
        a=_article(noun),
        the=f"the {noun}",
        adv=rng.choice(DIRECTION_ADVERBS[direction]),
        adj=DIRECTION_ADJECTIVES[direction],
    )


def _caption(p: ClipParams, rng: random.Random) -> str:
    clauses = [
        _clause(rng.choice(CAPTION_TEMPLATES), f"{o.color} {o.shape}", o.direction, rng) for o in p.objects
    ]
    return " while ".join(clauses)


def _speech(p: ClipParams, rng: random.Random) -> str:
    things = []
    for o in p.objects:
        r = rng.random()
        noun = (
            f"{o.color} {o.shape}" if r < 0.4 else f"{_SIZE_WORDS[o.size]} {o.shape}" if r < 0.6 else o.shape
        )
        things.append(_article(noun))
    return rng.choice(SPEECH_TEMPLATES).format(a=" and ".join(things), bg=_BG_ADJECTIVES[p.background])


def _audio_caption(p: ClipParams, rng: random.Random) -> str:
    parts = []
    for o in p.objects:
        up = o.direction in ("right", "up")
        parts.append(
            rng.choice(_AUDIO_TEMPLATES).format(
                loud=_LOUD_WORDS[o.size],
                pitch=_PITCH_WORDS[o.shape],
                timbre=_TIMBRE_WORDS[o.color],
                rising="rising" if up else "falling",
                rises="rises" if up else "falls",
            )
        )
    return parts[0] if len(parts) == 1 else f"two tones: {parts[0]} and {parts[1]}"


def _qa(p: ClipParams, rng: random.Random, max_objects: int) -> list[tuple[str, str]]:
    # counting is only a question where the answer can vary
    count = [("how many objects are there?", ("one", "two")[len(p.objects) - 1])] if max_objects > 1 else []
    if len(p.objects) == 1:
        o = p.objects[0]
        pool = [
            (rng.choice(("what color is the object?", "what colour is it?")), o.color),
            (rng.choice(("what shape is it?", "what shape is the object?")), o.shape),
            (rng.choice(("which way does it move?", "which way is it moving?")), o.direction),
            (rng.choice(("what is the background?", "what is the background like?")), p.background),
            ("is it small or large?", o.size),
            *count,
        ]
    else:
        pool = [("what is the background?", p.background), *count]
        for o in p.objects:
            pool += [
                (f"what color is the {o.shape}?", o.color),
                (f"what shape is the {o.color} object?", o.shape),
                (f"which way does the {o.color} {o.shape} move?", o.direction),
            ]
    return rng.sample(pool, rng.randint(2, 3))


_VOCAB: dict[str, tuple[str, str]] = {
    **{c: ("color", c) for c in COLORS},
    **{s: ("shape", s) for s in SHAPES},
    **{w: ("direction", d) for d, ws in DIRECTION_ADVERBS.items() for w in ws if " " not in w},
    **{w: ("direction", d) for d in DIRECTIONS for w in (d, f"{d}ward", f"{d}wards")},
    **{b: ("background", b) for b in BACKGROUNDS},
    **{a: ("background", b) for b, a in _BG_ADJECTIVES.items()},
    "stripe": ("background", "stripes"),
    "stripy": ("background", "stripes"),
    "dot": ("background", "dots"),
    "spotted": ("background", "dots"),
    "small": ("size", "small"),
    "little": ("size", "small"),
    "large": ("size", "large"),
    "big": ("size", "large"),
}


def attributes_from_text(text: str) -> dict[str, str]:
    """Parse color, shape, direction (and background, size when named) from free text such as a
    generated caption; every synonym the templates use is understood, the first mention of each
    key wins (a caption names the first object first) and keys the text does not name are absent."""
    found: dict[str, str] = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        key, value = _VOCAB.get(word, ("", ""))
        if key and key not in found:
            found[key] = value
    return found


def direction_prompts(with_attributes: bool = True) -> dict[str, list[str]]:
    """Text prompts per direction for zero-shot classification (average their embeddings, as CLIP's
    prompt ensembles do). Generic prompts ("an object moves to the left") come first; with
    ``with_attributes`` every caption template is also instantiated for every colour x shape, which
    keeps the prompts on the caption distribution and averages colour and shape out."""
    prompts: dict[str, list[str]] = {}
    for d in DIRECTIONS:
        rows = [
            t.format(a="an object", the="the object", adv=adv, adj=DIRECTION_ADJECTIVES[d])
            for t in CAPTION_TEMPLATES
            for adv in DIRECTION_ADVERBS[d]
        ]
        rows = list(dict.fromkeys(rows))
        if with_attributes:
            i = 0
            for c in COLORS:
                for s in SHAPES:
                    for t in CAPTION_TEMPLATES:
                        adv = DIRECTION_ADVERBS[d][i % len(DIRECTION_ADVERBS[d])]
                        rows.append(
                            t.format(
                                a=_article(f"{c} {s}"),
                                the=f"the {c} {s}",
                                adv=adv,
                                adj=DIRECTION_ADJECTIVES[d],
                            )
                        )
                        i += 1
        prompts[d] = rows
    return prompts


# --------------------------------------------------------------------------- clips


@dataclass
class SyntheticClip:
    """One generated clip. ``frames`` uint8 ``[T, H, W, 3]``; ``waveform`` float32 ``[S]`` at
    ``sample_rate`` (None when generated without audio); ``label`` = index of the first object's
    direction in ``DIRECTIONS``; ``attributes``: see :meth:`ClipParams.attributes`."""

    frames: torch.Tensor
    waveform: torch.Tensor | None
    sample_rate: int
    fps: float
    caption: str
    speech: str
    audio_caption: str
    qa: list[tuple[str, str]]
    label: int
    sample_id: int
    attributes: dict[str, Any]
    params: ClipParams
    index: int
    split: str
    seed: int


def generate_clip(
    index: int,
    split: str = "train",
    seed: int = 0,
    num_frames: int = 8,
    image_size: int = 64,
    fps: float = 8.0,
    max_objects: int = 1,
    with_audio: bool = True,
) -> SyntheticClip:
    """Clip ``index`` of ``split``: identical bytes for the same arguments, in any process."""
    if fps <= 0:
        raise ValueError(f"fps must be positive; got {fps}")
    _check_geometry(num_frames, image_size, max_objects)
    rng = random.Random(clip_seed(seed, split, index))
    params = _sample(rng, num_frames, image_size, max_objects)
    # text draws come after the parameter draws, so sample_params stays a cheap prefix of this
    caption = _caption(params, rng)
    speech = _speech(params, rng)
    audio_caption = _audio_caption(params, rng)
    qa = _qa(params, rng, max_objects)
    first = params.objects[0]
    return SyntheticClip(
        frames=render_clip(params),
        waveform=synthesize_audio(params, fps, SAMPLE_RATE) if with_audio else None,
        sample_rate=SAMPLE_RATE,
        fps=float(fps),
        caption=caption,
        speech=speech,
        audio_caption=audio_caption,
        qa=qa,
        label=DIRECTIONS.index(first.direction),
        sample_id=sample_id_of(first.color, first.shape, first.direction),
        attributes=params.attributes(),
        params=params,
        index=index,
        split=split,
        seed=seed,
    )


def with_direction(obj: ObjectParams, direction: str, start: int | None = None) -> ObjectParams:
    """``obj`` moving in ``direction`` (optionally from another start coset); for tests, notebooks
    and hand-made clips passed to :func:`render_clip`."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    return replace(obj, direction=direction, start=obj.start if start is None else start % obj.num_frames)


class SyntheticVideoDataset(Dataset):
    """Map-style dataset of :class:`VideoSample` rendered on the fly from ``(seed, split, index)``.

    ``video``: ``transform`` of the ``[3, T, H, W]`` uint8 clip (default: evaluation
    ``VideoTransform(image_size)``, i.e. normalisation only); ``audio``: kaldi fbank of the
    waveform (``compute_fbank``); ``speech``: the ASR-style transcript; ``sample_id``: one id per
    (colour, shape, direction) of the first object; ``meta``: index, split, seed, attributes,
    audio caption.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 2000,
        num_frames: int = 8,
        image_size: int = 64,
        seed: int = 0,
        fps: float = 8.0,
        max_objects: int = 1,
        with_audio: bool = True,
        with_speech: bool = True,
        transform: VideoTransform | None = None,
    ) -> None:
        if not split:
            raise ValueError("split must be a non-empty name such as 'train', 'val' or 'test'")
        if size < 0:
            raise ValueError(f"size must be >= 0; got {size}")
        if fps <= 0:
            raise ValueError(f"fps must be positive; got {fps}")
        _check_geometry(num_frames, image_size, max_objects)
        self.split = split
        self.size = size
        self.num_frames = num_frames
        self.image_size = image_size
        self.seed = seed
        self.fps = fps
        self.max_objects = max_objects
        self.with_audio = with_audio
        self.with_speech = with_speech
        self.transform = transform if transform is not None else VideoTransform(image_size, train=False)

    def __len__(self) -> int:
        return self.size

    def _index(self, i: int) -> int:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for SyntheticVideoDataset of size {self.size}")
        return i % self.size if self.size else i

    def clip(self, i: int) -> SyntheticClip:
        return generate_clip(
            self._index(i),
            self.split,
            self.seed,
            self.num_frames,
            self.image_size,
            self.fps,
            self.max_objects,
            with_audio=self.with_audio,
        )

    def attributes(self, i: int) -> dict[str, Any]:
        """The clip's attributes without rendering it."""
        return sample_params(
            self._index(i),
            self.split,
            self.seed,
            self.num_frames,
            self.image_size,
            self.max_objects,
        ).attributes()

    def __getitem__(self, i: int) -> VideoSample:
        clip = self.clip(i)
        video = self.transform(clip.frames.permute(3, 0, 1, 2))
        audio = compute_fbank(clip.waveform, clip.sample_rate) if clip.waveform is not None else None
        return VideoSample(
            video=video,
            sample_id=clip.sample_id,
            caption=clip.caption,
            audio=audio,
            speech=clip.speech if self.with_speech else None,
            label=clip.label,
            qa=list(clip.qa),
            meta={
                "index": clip.index,
                "split": clip.split,
                "seed": clip.seed,
                "attributes": clip.attributes,
                "audio_caption": clip.audio_caption,
                "source": "synthetic",
            },
        )


# --------------------------------------------------------------------------- iv2 synth


def build_synth_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iv2 synth",
        description="Write synthetic clips (video + audio track) and an annotations.jsonl with captions, "
        "ASR transcripts, audio captions, labels and question/answer turns.",
    )
    p.add_argument("--out", required=True, help="output folder (videos/ and annotations.jsonl go there)")
    p.add_argument("--num-clips", type=int, required=True, help="number of clips to write")
    p.add_argument("--split", default="train", help="stream to draw from (train, val, test, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128, help="frame side in pixels (even)")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--max-objects", type=int, default=1, choices=(1, 2))
    p.add_argument("--format", default="mp4", choices=("mp4", "webm", "mkv"), help="container")
    p.add_argument("--overwrite", action="store_true", help="replace an existing annotations.jsonl")
    return p


def synth_main(argv: list[str] | None = None) -> int:
    """``iv2 synth``: render clips to ``OUT/videos/<split>_<index>.<format>`` and ``OUT/annotations.jsonl``."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from iv2_lightning.data.writer import write_video

    parser = build_synth_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.num_clips < 1:
        parser.error(f"--num-clips must be >= 1; got {args.num_clips}")
    if args.image_size % 2:
        parser.error(f"--image-size must be even for yuv420p video; got {args.image_size}")
    if args.fps <= 0:
        parser.error(f"--fps must be positive; got {args.fps}")
    try:
        _check_geometry(args.num_frames, args.image_size, args.max_objects)
    except ValueError as err:
        parser.error(str(err))
    out = Path(args.out)
    ann = out / "annotations.jsonl"
    if ann.exists() and ann.stat().st_size > 0 and not args.overwrite:
        print(
            f"iv2 synth: error: {ann} exists and is not empty; pass --overwrite to replace it",
            file=sys.stderr,
        )
        return 1
    (out / "videos").mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    start = time.perf_counter()
    rows = []
    labels: Counter[str] = Counter()
    columns = (TextColumn("[bold]synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("clips", total=args.num_clips)
        for i in range(args.num_clips):
            clip = generate_clip(
                i, args.split, args.seed, args.num_frames, args.image_size, args.fps, args.max_objects
            )
            rel = f"videos/{args.split}_{i:06d}.{args.format}"
            write_video(
                out / rel, clip.frames, fps=args.fps, audio=clip.waveform, sample_rate=clip.sample_rate
            )
            rows.append(
                {
                    "video": rel,
                    "caption": clip.caption,
                    "asr": clip.speech,
                    "audio_caption": clip.audio_caption,
                    "label": clip.label,
                    "qa": [list(turn) for turn in clip.qa],
                    "attributes": clip.attributes,
                    "sample_id": clip.sample_id,
                    "split": args.split,
                    "index": i,
                }
            )
            labels[DIRECTIONS[clip.label]] += 1
            progress.advance(task)
    tmp = ann.with_name(".annotations.jsonl.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, ann)
    elapsed = time.perf_counter() - start
    table = Table(title="iv2 synth", show_header=False)
    table.add_row("clips", f"{args.num_clips} ({args.split}, seed {args.seed})")
    table.add_row(
        "video",
        f"{args.num_frames} frames x {args.image_size}x{args.image_size} at {args.fps:g} fps "
        f"({args.num_frames / args.fps:.2f} s), {args.format}, 16 kHz mono audio",
    )
    table.add_row("labels", ", ".join(f"{d} {labels[d]}" for d in DIRECTIONS))
    table.add_row("annotations", str(ann))
    table.add_row("time", f"{elapsed:.1f} s ({1000 * elapsed / args.num_clips:.0f} ms/clip)")
    Console().print(table)
    return 0


__all__ = [
    "BACKGROUNDS",
    "CAPTION_TEMPLATES",
    "COLORS",
    "DIRECTIONS",
    "DIRECTION_ADJECTIVES",
    "DIRECTION_ADVERBS",
    "RGB",
    "SAMPLE_RATE",
    "SHAPES",
    "SIZES",
    "SPEECH_TEMPLATES",
    "ClipParams",
    "ObjectParams",
    "SyntheticClip",
    "SyntheticVideoDataset",
    "attributes_from_text",
    "clip_seed",
    "direction_prompts",
    "generate_clip",
    "lattice_shear",
    "render_clip",
    "sample_id_of",
    "sample_params",
    "synth_main",
    "synthesize_audio",
    "with_direction",
]
