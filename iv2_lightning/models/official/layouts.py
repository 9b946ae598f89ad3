"""Where the vision encoder sits inside an official InternVideo2 checkpoint: the known layouts,
unwrapping the ``module`` / ``model`` / ``state_dict`` wrappers, and finding the name prefix.

The official vision encoder (OpenGVLab/InternVideo, ``InternVideo2/``; arXiv 2403.15377 Sec. 3) and
our :class:`~iv2_lightning.models.backbone.VideoEncoder` share parameter names; the checkpoints only
wrap and prefix them differently. Every layout is recognised by one anchor tensor, the 3D patch
embedding ``[prefix.]patch_embed.proj.weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from iv2_lightning.models.official.errors import OfficialCheckpointError

#: The checkpoint layouts :func:`load_official` recognises (named in ``report.layout``).
KNOWN_LAYOUTS: dict[str, str] = {
    "module-wrapped": "stage-1 pretrain.pth: tensors under a 'module' key with bare names "
    "(patch_embed.proj.weight, blocks.N.*, clip_projector.*, plus clip_decoder.* / mae_decoder.* heads)",
    "vision_encoder-prefixed": "stage-2 .pt: names prefixed 'vision_encoder.' (possibly under 'module' "
    "or 'model'); the text / audio towers next to it are reported, not mapped",
    "bare": "distilled S14/B14/L14 pytorch_model.bin: bare names at the top level",
    "classifier": "classifier fine-tune: bare names plus fc_norm.* and head.* (possibly under 'model' or 'module')",
    "iv2_lightning": "an iv2 export or `iv2 convert` output: names prefixed 'video_encoder.'",
}

_WRAPPER_KEYS = ("module", "model", "state_dict", "model_state_dict")
ANCHOR = "patch_embed.proj.weight"


def layouts_text() -> str:
    return "\n".join(f"  - {name}: {text}" for name, text in KNOWN_LAYOUTS.items())


def unwrap(obj: Any, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The flat tensor dict holding the encoder, and the wrapper keys stripped to reach it."""
    wrappers: list[str] = []
    while True:
        if not isinstance(obj, Mapping):
            raise OfficialCheckpointError(
                f"{name}: expected a state dict (a mapping of names to tensors); got {type(obj).__name__}"
            )
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if any(k.endswith(ANCHOR) for k in tensors):
            return tensors, wrappers
        inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return tensors, wrappers
        wrappers.append(inner)
        obj = obj[inner]


def find_prefix(tensors: dict[str, torch.Tensor], name: str, wrappers: list[str]) -> str:
    prefixes = [
        k[: -len(ANCHOR)]
        for k in tensors
        if k.endswith(ANCHOR) and (k == ANCHOR or k[: -len(ANCHOR)].endswith("."))
    ]
    if not prefixes:
        keys = sorted(tensors)[:12]
        where = f" (inside {' -> '.join(repr(w) for w in wrappers)})" if wrappers else ""
        raise OfficialCheckpointError(
            f"{name}: unknown checkpoint layout{where}: no tensor named '[prefix.]{ANCHOR}' (the 3D patch "
            f"embedding of an InternVideo2 vision encoder). First unmatched keys: {keys}. Layouts known:\n"
            + layouts_text()
        )

    def rank(p: str) -> tuple[int, int]:
        return (0 if p.endswith("vision_encoder.") else 1 if p == "" else 2, len(p))

    return min(prefixes, key=rank)


def layout_name(prefix: str, wrappers: list[str], sub: Mapping[str, torch.Tensor]) -> str:
    if prefix == "video_encoder.":
        return "iv2_lightning"
    if prefix.endswith("vision_encoder."):
        return "vision_encoder-prefixed"
    if prefix:
        return f"prefixed {prefix!r}"
    if "head.weight" in sub and "fc_norm.weight" in sub:
        return "classifier"
    if wrappers:
        return f"{'/'.join(wrappers)}-wrapped"
    return "bare"


__all__ = ["ANCHOR", "KNOWN_LAYOUTS", "find_prefix", "layout_name", "layouts_text", "unwrap"]
