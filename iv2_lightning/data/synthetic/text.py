"""The words of a synthetic clip: captions from paraphrase templates, an ASR-style transcript, an
audio caption, question/answer turns, and the reverse direction (attributes parsed from free text,
prompts per direction for zero-shot classification).

The texts feed the caption, ASR and audio-caption fields InternVideo2 aligns with video in stage 2
and the dialogue of stage 3 (arXiv 2403.15377 Sec. 3.2-3.3). The transcript names the shape and the
background (sometimes the colour or size), never the direction; the prompts average their
embeddings per class, as CLIP's prompt ensembles do.
"""

from __future__ import annotations

import itertools
import random
import re

from iv2_lightning.data.synthetic.scene import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, ClipParams

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


def make_caption(p: ClipParams, rng: random.Random) -> str:
    clauses = [
        _clause(rng.choice(CAPTION_TEMPLATES), f"{o.color} {o.shape}", o.direction, rng) for o in p.objects
    ]
    return " while ".join(clauses)


def sequence_of(directions: tuple[str, ...] | list[str]) -> int:
    """Class index of a direction sequence in which consecutive directions differ: the first
    direction's index, then per later window the index among the 3 directions other than the one
    before (``4 * 3 ** (W - 1)`` classes for ``W`` windows; :func:`sequence_names` is the inverse)."""
    index = DIRECTIONS.index(directions[0])
    for before, now in itertools.pairwise(directions):
        if now == before:
            raise ValueError(f"consecutive windows move the same way: {list(directions)}")
        index = index * 3 + [d for d in DIRECTIONS if d != before].index(now)
    return index


def sequence_names(windows: int) -> list[str]:
    """Every direction sequence of ``windows`` windows, in class order ("left then up", ...)."""
    seqs: list[list[str]] = [[d] for d in DIRECTIONS]
    for _ in range(windows - 1):
        seqs = [[*s, d] for s in seqs for d in DIRECTIONS if d != s[-1]]
    return [" then ".join(s) for s in seqs]


def sequence_caption(caption: str, directions: tuple[str, ...], rng: random.Random) -> str:
    """A first window's caption continued by the later windows' directions: "..., then up"."""
    return caption + "".join(f", then {rng.choice(DIRECTION_ADVERBS[d])}" for d in directions[1:])


def sequence_prompts(windows: int) -> dict[str, list[str]]:
    """Prompts per direction sequence (class order of :func:`sequence_names`) for zero-shot
    classification: every caption template over every colour x shape, continued by the later windows."""
    prompts: dict[str, list[str]] = {}
    for name in sequence_names(windows):
        dirs = name.split(" then ")
        rows = []
        for c in COLORS:
            for sh in SHAPES:
                for i, t in enumerate(CAPTION_TEMPLATES):
                    first = t.format(
                        a=_article(f"{c} {sh}"),
                        the=f"the {c} {sh}",
                        adv=DIRECTION_ADVERBS[dirs[0]][i % 3],
                        adj=DIRECTION_ADJECTIVES[dirs[0]],
                    )
                    rows.append(first + "".join(f", then {DIRECTION_ADVERBS[d][i % 3]}" for d in dirs[1:]))
        prompts[name] = rows
    return prompts


def make_speech(p: ClipParams, rng: random.Random) -> str:
    things = []
    for o in p.objects:
        r = rng.random()
        noun = (
            f"{o.color} {o.shape}" if r < 0.4 else f"{_SIZE_WORDS[o.size]} {o.shape}" if r < 0.6 else o.shape
        )
        things.append(_article(noun))
    return rng.choice(SPEECH_TEMPLATES).format(a=" and ".join(things), bg=_BG_ADJECTIVES[p.background])


def make_audio_caption(p: ClipParams, rng: random.Random) -> str:
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


def make_qa(p: ClipParams, rng: random.Random, max_objects: int) -> list[tuple[str, str]]:
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
    return attribute_prompts("direction", with_attributes)


LABEL_ATTRIBUTES: dict[str, tuple[str, ...]] = {"direction": DIRECTIONS, "shape": SHAPES, "color": COLORS}


def attribute_prompts(attribute: str = "direction", with_attributes: bool = True) -> dict[str, list[str]]:
    """Prompts per value of ``attribute`` (``direction``, ``shape`` or ``color`` of the first object),
    in the order of :data:`LABEL_ATTRIBUTES`: generic phrases first ("a circle moves", "an object
    moves to the left"), then, with ``with_attributes``, every caption template instantiated over the
    other attributes' values, so the ensemble stays on the caption distribution and averages them out."""
    if attribute not in LABEL_ATTRIBUTES:
        raise ValueError(f"attribute must be one of {sorted(LABEL_ATTRIBUTES)}; got {attribute!r}")
    prompts: dict[str, list[str]] = {}
    for value in LABEL_ATTRIBUTES[attribute]:
        colors = [value] if attribute == "color" else [None]
        shapes = [value] if attribute == "shape" else [None]
        directions = [value] if attribute == "direction" else list(DIRECTIONS)
        rows = []
        for t in CAPTION_TEMPLATES:  # generic: the attribute alone
            for d in directions:
                for adv in DIRECTION_ADVERBS[d] if attribute == "direction" else DIRECTION_ADVERBS[d][:1]:
                    noun = shapes[0] or (f"{colors[0]} object" if colors[0] else "object")
                    rows.append(
                        t.format(a=_article(noun), the=f"the {noun}", adv=adv, adj=DIRECTION_ADJECTIVES[d])
                    )
        rows = list(dict.fromkeys(rows))
        if with_attributes:
            i = 0
            for c in colors if colors[0] else COLORS:
                for s in shapes if shapes[0] else SHAPES:
                    for t in CAPTION_TEMPLATES:
                        d = directions[i % len(directions)]
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
        prompts[value] = rows
    return prompts


__all__ = [
    "CAPTION_TEMPLATES",
    "DIRECTION_ADJECTIVES",
    "DIRECTION_ADVERBS",
    "LABEL_ATTRIBUTES",
    "SPEECH_TEMPLATES",
    "attribute_prompts",
    "attributes_from_text",
    "direction_prompts",
    "make_audio_caption",
    "make_caption",
    "make_qa",
    "make_speech",
    "sequence_caption",
    "sequence_names",
    "sequence_of",
    "sequence_prompts",
]
