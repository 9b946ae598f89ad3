"""Mapping an official InternVideo2 vision encoder onto :class:`VideoEncoder`: what the tensor
shapes say about the architecture, the encoder configuration that matches them, the token grid of
the stored position table, and where each tensor that is not an encoder parameter goes.

The official checkpoints (OpenGVLab/InternVideo, ``InternVideo2/``; arXiv 2403.15377 Sec. 3) keep
training-only heads next to the encoder: the stage-1 CLIP-teacher decoders map onto
MaskedVideoStage's token and pool heads, a fine-tune's ``fc_norm`` / ``head`` become a classifier,
and the rest (VideoMAEv2-teacher head, separate image position tables) are reported as unused with
the reason.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from iv2_lightning.models.backbone import PRESETS, preset_config
from iv2_lightning.models.official.errors import OfficialCheckpointError
from iv2_lightning.models.official.layouts import ANCHOR

OFFICIAL_PRESETS = ("s14", "b14", "l14", "1b", "6b")
#: every official checkpoint was trained at 224 px with 14 px patches: a 16 x 16 token grid
_OFFICIAL_SIDE = 16
#: token-frame counts of the official checkpoints (stage-2 stores 4, stage-1 / distilled 8, some fine-tunes 16)
_OFFICIAL_FRAMES = (4, 8, 16)
SEP_POS = ("pos_embed_cls", "pos_embed_spatial", "pos_embed_temporal")

# training-only tensors of the official checkpoints that have no counterpart here
_KNOWN_UNUSED: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"clip_pos_embed(_spatial|_temporal|_cls)?"),
        "position table that the official stage-1 clip_decoder adds to the hidden states; "
        "MaskedVideoStage's token heads take none (training-only)",
    ),
    (
        re.compile(r"(clip_)?img_pos_embed"),
        "separate image position table (sep_image_video_pos_embed); VideoEncoder resamples "
        "pos_embed to one frame for images instead",
    ),
    (
        re.compile(r"mae_pos_embed|mae_decoder\..*"),
        "stage-1 VideoMAEv2-teacher head and its position table (training-only); the converter maps only "
        "the CLIP-teacher heads, so a second teacher's heads start fresh",
    ),
    (re.compile(r"final_clip_decoder\..*|clip_decoder\..*"), "stage-1 teacher head of an unknown form"),
)
_CLIP_DECODER = re.compile(r"clip_decoder\.(\d+)\.(head|norm)((?:\.\d+)?\.(?:weight|bias))")
_FINAL_DECODER = re.compile(r"final_clip_decoder\.(head|norm)((?:\.\d+)?\.(?:weight|bias))")
_CLASSIFIER = re.compile(r"(fc_norm|head)\.(weight|bias)")


def infer_arch(sub: Mapping[str, torch.Tensor], name: str) -> dict[str, Any]:
    """What the checkpoint's shapes say about the encoder (heads cannot be read off shapes)."""
    w = sub[ANCHOR]
    if w.dim() != 5:
        raise OfficialCheckpointError(
            f"{name}: {ANCHOR} has shape {tuple(w.shape)}; an InternVideo2 video encoder has a 3D patch "
            "embedding [C, 3, tubelet, patch, patch] (a 4D weight is an image ViT)"
        )
    if w.shape[3] != w.shape[4]:
        raise OfficialCheckpointError(f"{name}: non-square patches {tuple(w.shape[3:])} are not supported")
    depth = 1 + max((int(m.group(1)) for k in sub if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise OfficialCheckpointError(f"{name}: no 'blocks.N.*' tensors next to {ANCHOR}")
    fc1 = sub.get("blocks.0.mlp.fc1.weight")
    proj = sub.get("clip_projector.cross_attn.proj.weight")
    return {
        "embed_dim": int(w.shape[0]),
        "in_chans": int(w.shape[1]),
        "tubelet_size": int(w.shape[2]),
        "patch_size": int(w.shape[3]),
        "depth": depth,
        "mlp_dim": int(fc1.shape[0]) if fc1 is not None else None,
        "clip_embed_dim": int(proj.shape[0]) if proj is not None else None,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sub,
        "qk_norm": "blocks.0.attn.q_norm.weight" in sub,
        "layerscale": "blocks.0.ls1.gamma" in sub,
        "norm": "layernorm" if "blocks.0.norm1.bias" in sub else "rmsnorm",
        "use_cls_token": "cls_token" in sub,
    }


def _pick_preset(
    arch: dict[str, Any], preset: str | None, overrides: dict[str, Any], name: str
) -> tuple[str, bool]:
    """The preset the configuration starts from, and whether it is a named match (else the official
    block structure, taken from s14, at the checkpoint's own sizes)."""
    if preset is not None:
        return preset, True
    matches = [
        n
        for n in OFFICIAL_PRESETS
        if PRESETS[n]["embed_dim"] == arch["embed_dim"] and PRESETS[n]["depth"] == arch["depth"]
    ]
    if not matches and "num_heads" not in overrides:
        known = ", ".join(f"{n} ({PRESETS[n]['embed_dim']}/{PRESETS[n]['depth']})" for n in OFFICIAL_PRESETS)
        raise OfficialCheckpointError(
            f"{name}: the checkpoint's width {arch['embed_dim']} and depth {arch['depth']} match no official "
            f"preset (width/depth: {known}); pass preset=... or num_heads=... (and attn_pool_heads=...)"
        )
    # no match: the official block structure (taken from s14) at the checkpoint's own sizes
    return (matches[0] if matches else "s14"), bool(matches)


def resolve_config(
    arch: dict[str, Any],
    preset: str | None,
    num_frames: int,
    image_size: int,
    overrides: dict[str, Any],
    name: str,
) -> tuple[str, dict[str, Any]]:
    """The VideoEncoder arguments: the preset, the checkpoint's shapes and flags, the overrides."""
    base, named = _pick_preset(arch, preset, overrides, name)
    cfg = preset_config(base, **overrides)  # checks override names
    cfg.update(num_frames=num_frames, image_size=image_size)
    conflicts = []

    def settle(key: str, value: Any, always_check: bool = False) -> None:
        if value is None:
            return
        if key in overrides or always_check or (named and key in PRESETS[base]):
            if cfg.get(key) != value:
                src = "override" if key in overrides else f"preset {base!r}"
                conflicts.append(f"{key}: checkpoint {value!r}, {src} {cfg.get(key)!r}")
        else:
            cfg[key] = value

    for key in ("embed_dim", "depth", "mlp_dim", "clip_embed_dim", "in_chans"):
        settle(key, arch[key])
    # the checkpoint decides the block's structure
    for key in ("qkv_bias", "qk_norm", "norm", "use_cls_token"):
        if key in overrides and overrides[key] != arch[key]:
            conflicts.append(f"{key}: checkpoint {arch[key]!r}, override {overrides[key]!r}")
        cfg[key] = arch[key]
    if not arch["layerscale"]:
        cfg["layerscale_init"] = None
    elif not cfg.get("layerscale_init"):
        cfg["layerscale_init"] = 1e-5
    for key, value in (("attention", "joint"), ("frame_wise", False), ("pool", "attention")):
        if key in overrides and overrides[key] != value:
            conflicts.append(f"{key}: official checkpoints need {value!r}, override {overrides[key]!r}")
        cfg[key] = value
    for key in ("patch_size", "tubelet_size"):
        if cfg[key] != arch[key]:
            src = "override" if key in overrides else f"preset {base!r}"
            what = "patch size" if key == "patch_size" else "tubelet size"
            raise OfficialCheckpointError(
                f"{name}: the checkpoint's {what} is {arch[key]} but the {src} expects {cfg[key]}; "
                f"a different {what} is not converted (pass {key}={arch[key]} to build an encoder that matches)"
            )
    if conflicts:
        raise OfficialCheckpointError(
            f"{name}: the checkpoint does not match the requested encoder:\n  " + "\n  ".join(conflicts)
        )
    return (base if named else "custom"), cfg


def stored_table_grid(
    n: int,
    target: tuple[int, int, int],
    stored: tuple[int, int, int] | None,
    source_frames: int | None,
    tubelet: int,
    name: str,
) -> tuple[int, int, int]:
    """The (T, H, W) grid of a stored position table with ``n`` patch rows."""
    if stored is not None and math.prod(stored) == n:
        return stored
    if source_frames is not None:
        t = max(source_frames // tubelet, 1)
        side = math.isqrt(n // t) if n % t == 0 else 0
        if side * side * t != n:
            raise OfficialCheckpointError(
                f"{name}: the stored position table has {n} patch rows, not {source_frames} frames of a square grid"
            )
        return (t, side, side)
    _, h, w = target
    candidates = []
    for gh, gw in ((_OFFICIAL_SIDE, _OFFICIAL_SIDE), (h, w)):
        if n % (gh * gw) == 0 and (n // (gh * gw), gh, gw) not in candidates:
            candidates.append((n // (gh * gw), gh, gw))
    if len(candidates) > 1:
        usual = [c for c in candidates if c[0] * tubelet in _OFFICIAL_FRAMES or c[0] in _OFFICIAL_FRAMES]
        candidates = usual if len(usual) == 1 else candidates
    if len(candidates) != 1:
        found = " or ".join(str(c) for c in candidates) or "neither"
        raise OfficialCheckpointError(
            f"{name}: cannot tell the frame count and frame size of the stored position table ({n} patch rows: "
            f"{found} of T x {_OFFICIAL_SIDE} x {_OFFICIAL_SIDE} (224 px) or T x {h} x {w}); "
            "pass source_frames=... (`--source-frames`)"
        )
    return candidates[0]


def classify_extra(key: str) -> tuple[str | None, str | None]:
    """(target name, None) for a head tensor we map, (None, reason) for a known unused tensor."""
    if m := _CLIP_DECODER.fullmatch(key):
        part = "proj" if m.group(2) == "head" else "norm"
        return f"token_heads.{m.group(1)}.{part}{m.group(3)}", None
    if m := _FINAL_DECODER.fullmatch(key):
        part = "proj" if m.group(1) == "head" else "norm"
        return f"pool_head.{part}{m.group(2)}", None
    if _CLASSIFIER.fullmatch(key):
        return f"classifier.{key}", None
    for pattern, why in _KNOWN_UNUSED:
        if pattern.fullmatch(key):
            return None, why
    return None, None


def compose_sep_pos(sub: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Separable tables (cls, spatial [1, HW, C], temporal [1, T, C]) → one joint table, T, HW."""
    spatial, temporal = sub["pos_embed_spatial"].float(), sub["pos_embed_temporal"].float()
    t, hw = temporal.shape[1], spatial.shape[1]
    grid = spatial.repeat(1, t, 1) + torch.repeat_interleave(temporal, hw, dim=1)
    return torch.cat([sub["pos_embed_cls"].float(), grid], dim=1), t, hw


def build_classifier(tensors: dict[str, torch.Tensor], name: str) -> nn.Module:
    needed = {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    if set(tensors) != needed:
        raise OfficialCheckpointError(
            f"{name}: a classifier needs {sorted(needed)}; the checkpoint has {sorted(tensors)}"
        )
    dim = tensors["fc_norm.weight"].shape[0]
    n_cls, in_dim = tensors["head.weight"].shape
    if in_dim != dim:
        raise OfficialCheckpointError(f"{name}: fc_norm has width {dim} but head takes {in_dim}")
    # the official fine-tune: LayerNorm (torch default eps 1e-5) and Linear on the attention-pool output
    clf = nn.Sequential(OrderedDict(fc_norm=nn.LayerNorm(dim), head=nn.Linear(dim, n_cls)))
    clf.load_state_dict(tensors)
    return clf.eval()


__all__ = [
    "OFFICIAL_PRESETS",
    "SEP_POS",
    "build_classifier",
    "classify_extra",
    "compose_sep_pos",
    "infer_arch",
    "resolve_config",
    "stored_table_grid",
]
