"""What a synthetic clip shows: the vocabulary, the lattice that hides the motion direction, and
the seeded draw of a clip's parameters (no pixels, no sound, no text: see ``render``, ``sound``,
``text``).

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

Why a per-frame model cannot solve it is the point of the dataset: InternVideo2 (arXiv 2403.15377)
adds temporal attention and a hierarchical temporal encoder to model "temporal dependencies (motion,
dynamics)", and only a model that uses the order of the frames can read the direction here.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, replace
from typing import Any

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
BACKGROUNDS: tuple[str, ...] = ("plain", "stripes", "dots", "noise")
SIZES: tuple[str, ...] = ("small", "large")

# object half-extent as a fraction of the wallpaper's nearest-neighbour distance, per size (the
# largest shape, a square's corner, reaches 1.16 x radius: copies never touch)
_RADIUS = {"small": 0.26, "large": 0.36}
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


def check_geometry(num_frames: int, image_size: int, max_objects: int) -> None:
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


def draw_params(rng: random.Random, num_frames: int, image_size: int, max_objects: int) -> ClipParams:
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
    check_geometry(num_frames, image_size, max_objects)
    return draw_params(random.Random(clip_seed(seed, split, index)), num_frames, image_size, max_objects)


def with_direction(obj: ObjectParams, direction: str, start: int | None = None) -> ObjectParams:
    """``obj`` moving in ``direction`` (optionally from another start coset); for tests, notebooks
    and hand-made clips passed to :func:`render_clip`."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    return replace(obj, direction=direction, start=obj.start if start is None else start % obj.num_frames)


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "DIRECTIONS",
    "SHAPES",
    "SIZES",
    "ClipParams",
    "ObjectParams",
    "check_geometry",
    "clip_seed",
    "draw_params",
    "lattice_shear",
    "sample_id_of",
    "sample_params",
    "with_direction",
]
