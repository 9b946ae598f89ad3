"""Load the vision encoder of official InternVideo2 checkpoints into :class:`VideoEncoder`.

The official vision encoder (OpenGVLab/InternVideo, ``InternVideo2/``; arXiv 2403.15377 Sec. 3) and
our joint-attention :class:`VideoEncoder` use the same parameter names, so loading is a matter of
finding the tensors (the layouts below wrap and prefix them differently), checking that the
architecture matches, resampling the position table to the requested clip, and reporting every
tensor that is not used:

* stage-1 ``pretrain.pth``: tensors under a ``module`` key, bare names, plus the teacher-alignment
  heads (``clip_decoder.*``, ``final_clip_decoder.*``, ``mae_decoder.*``, ``clip_pos_embed``, ...);
* stage-2 ``.pt``: names prefixed ``vision_encoder.`` next to the text / audio towers (which are not
  mapped); their position table stores 4 frames;
* the distilled S14/B14/L14 ``pytorch_model.bin``: bare names at the top level;
* classifier fine-tunes: bare names plus ``fc_norm.*`` / ``head.*`` (returned as
  ``report.classifier``, applied to ``encoder(video).pooled``).

Files are read with ``torch.load(weights_only=True)`` or safetensors and never unpickle Python
objects; a file that needs that (the 6B stage-2 checkpoint pickles an EasyDict config) is refused
with the recipe to re-save its tensors once in a trusted environment.

One job per module: :mod:`.read` (files), :mod:`.layouts` (where the encoder sits in the file),
:mod:`.mapping` (architecture, configuration, position-table grid, the other tensors),
:mod:`.load` (:func:`load_official`), :mod:`.reference` (the official equations, written
independently of :class:`VideoEncoder`), :mod:`.verify` (:func:`verify_official`), :mod:`.save`
(:func:`save_converted`), :mod:`.errors`. The ``iv2 convert SRC DST [--verify]`` command that
drives them is :mod:`iv2_lightning.convert`.
"""

from iv2_lightning.models.official.errors import (
    OfficialCheckpointError,
    PosEmbedInterpolationWarning,
    UnsafeCheckpointError,
)
from iv2_lightning.models.official.layouts import KNOWN_LAYOUTS
from iv2_lightning.models.official.load import ConversionReport, load_official
from iv2_lightning.models.official.reference import official_reference_forward
from iv2_lightning.models.official.save import save_converted
from iv2_lightning.models.official.verify import VerifyResult, verify_official

__all__ = [
    "KNOWN_LAYOUTS",
    "ConversionReport",
    "OfficialCheckpointError",
    "PosEmbedInterpolationWarning",
    "UnsafeCheckpointError",
    "VerifyResult",
    "load_official",
    "official_reference_forward",
    "save_converted",
    "verify_official",
]
