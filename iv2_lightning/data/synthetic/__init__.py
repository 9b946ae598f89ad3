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

Every clip also has a 16 kHz waveform tied to the scene (a tone whose base pitch names the shape,
whose timbre names the colour and loudness the size, gliding *up* for right/up and *down* for
left/down — partial direction information, available only in temporal order), an audio caption
describing that sound, an ASR-style transcript that names the shape and the background (sometimes
the colour or size, never the direction), a caption from paraphrase templates, and 2-3
question/answer turns for dialogue.

One job per module:

* :mod:`.scene`: the vocabulary, the twisted-torus lattice that hides the direction (the
  construction is explained there), and the seeded draw of a clip's parameters;
* :mod:`.render`: the frames; :mod:`.sound`: the waveform; :mod:`.text`: captions, transcript,
  audio caption, question/answer turns, attribute parsing and zero-shot prompts;
* :mod:`.dataset`: :func:`generate_clip` (one clip, every modality) and
  :class:`SyntheticVideoDataset`;
* :mod:`.synth`: ``iv2 synth`` (:func:`synth_main`), which writes clips out as real media files with
  a JSONL annotation file.
"""

from iv2_lightning.data.synthetic.dataset import SyntheticClip, SyntheticVideoDataset, generate_clip
from iv2_lightning.data.synthetic.render import RGB, render_clip
from iv2_lightning.data.synthetic.scene import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    ClipParams,
    ObjectParams,
    clip_seed,
    lattice_shear,
    sample_id_of,
    sample_params,
    with_direction,
)
from iv2_lightning.data.synthetic.sound import SAMPLE_RATE, synthesize_audio
from iv2_lightning.data.synthetic.synth import synth_main
from iv2_lightning.data.synthetic.text import (
    CAPTION_TEMPLATES,
    DIRECTION_ADJECTIVES,
    DIRECTION_ADVERBS,
    LABEL_ATTRIBUTES,
    SPEECH_TEMPLATES,
    attribute_prompts,
    attributes_from_text,
    direction_prompts,
    sequence_names,
    sequence_of,
    sequence_prompts,
)

__all__ = [
    "BACKGROUNDS",
    "CAPTION_TEMPLATES",
    "COLORS",
    "DIRECTIONS",
    "DIRECTION_ADJECTIVES",
    "DIRECTION_ADVERBS",
    "LABEL_ATTRIBUTES",
    "RGB",
    "SAMPLE_RATE",
    "SHAPES",
    "SIZES",
    "SPEECH_TEMPLATES",
    "ClipParams",
    "ObjectParams",
    "SyntheticClip",
    "SyntheticVideoDataset",
    "attribute_prompts",
    "attributes_from_text",
    "clip_seed",
    "direction_prompts",
    "generate_clip",
    "lattice_shear",
    "render_clip",
    "sample_id_of",
    "sample_params",
    "sequence_names",
    "sequence_of",
    "sequence_prompts",
    "synth_main",
    "synthesize_audio",
    "with_direction",
]
