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

``iv2 convert SRC DST [--verify]`` (:func:`convert_main`) writes the converted weights in the layout
``init_from`` reads (tensors prefixed ``video_encoder.``); ``--verify`` checks the conversion against
:func:`official_reference_forward`, the official equations evaluated straight on the checkpoint's
tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import sys
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.models.backbone import PRESETS, VideoEncoder, preset_config
from iv2_lightning.models.pos_embed import interpolate_pos_embed_3d

__all__ = [
    "KNOWN_LAYOUTS",
    "ConversionReport",
    "OfficialCheckpointError",
    "PosEmbedInterpolationWarning",
    "UnsafeCheckpointError",
    "VerifyResult",
    "convert_main",
    "load_official",
    "official_reference_forward",
    "save_converted",
    "verify_official",
]


class OfficialCheckpointError(ValueError):
    """The checkpoint cannot be mapped onto a :class:`VideoEncoder` (layout, architecture or shapes)."""


class UnsafeCheckpointError(OfficialCheckpointError):
    """The file holds pickled Python objects besides tensors; reading it would run arbitrary code."""


class PosEmbedInterpolationWarning(UserWarning):
    """The stored position table was resampled to another frame count or frame size."""


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
_ANCHOR = "patch_embed.proj.weight"
_OFFICIAL_PRESETS = ("s14", "b14", "l14", "1b", "6b")
#: every official checkpoint was trained at 224 px with 14 px patches: a 16 x 16 token grid
_OFFICIAL_SIDE = 16
#: token-frame counts of the official checkpoints (stage-2 stores 4, stage-1 / distilled 8, some fine-tunes 16)
_OFFICIAL_FRAMES = (4, 8, 16)
_SEP_POS = ("pos_embed_cls", "pos_embed_spatial", "pos_embed_temporal")

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
        "stage-1 VideoMAEv2-teacher head; MaskedVideoStage distils from one teacher, so it has no counterpart",
    ),
    (re.compile(r"final_clip_decoder\..*|clip_decoder\..*"), "stage-1 teacher head of an unknown form"),
)
_CLIP_DECODER = re.compile(r"clip_decoder\.(\d+)\.(head|norm)((?:\.\d+)?\.(?:weight|bias))")
_FINAL_DECODER = re.compile(r"final_clip_decoder\.(head|norm)((?:\.\d+)?\.(?:weight|bias))")
_CLASSIFIER = re.compile(r"(fc_norm|head)\.(weight|bias)")


def _layouts_text() -> str:
    return "\n".join(f"  - {name}: {text}" for name, text in KNOWN_LAYOUTS.items())


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _resave_message(path: Path, err: Exception) -> str:
    found = re.findall(r"GLOBAL ([\w.]+)", str(err))
    what = f" ({', '.join(dict.fromkeys(found))})" if found else ""
    return (
        f"{path} cannot be read with torch.load(weights_only=True): besides tensors it pickles a Python "
        f"object{what}, and unpickling that could run arbitrary code, which iv2 never does. The official "
        "InternVideo2-6B stage-2 checkpoint is such a file (it stores its EasyDict config next to the weights). "
        "If you trust the file, re-save its tensors alone once, in an environment where that class can be "
        "imported:\n\n"
        "    import torch\n"
        f"    ckpt = torch.load({str(path)!r}, map_location='cpu', weights_only=False)  # trusted files only\n"
        "    state = ckpt.get('module', ckpt.get('model', ckpt))  # the state dict\n"
        "    torch.save({k: v for k, v in state.items() if torch.is_tensor(v)}, 'weights_only.pt')\n\n"
        "(or safetensors.torch.save_file(...) with the same dict, contiguous tensors), then convert "
        f"that file. Original error: {str(err).splitlines()[0][:200]}"
    )


def _torch_load(path: Path) -> Any:
    def load(mmap: bool) -> Any:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            if "GLOBAL" in str(err):  # a Python object (class or function) the file wants built
                raise UnsafeCheckpointError(_resave_message(path, err)) from err
            detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
            raise OfficialCheckpointError(
                f"{path} is not a readable torch checkpoint ({detail.group(1) if detail else err})"
            ) from err
        except RuntimeError:
            raise
        except Exception as err:  # e.g. KeyError / EOFError from a file that is not a checkpoint
            raise OfficialCheckpointError(
                f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err})"
            ) from err

    try:
        return load(mmap=True)  # zip-format files are mapped, not copied into memory
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise OfficialCheckpointError(f"{path}: torch.load failed ({err})") from err
        return load(mmap=False)  # the legacy (pre-1.6) format cannot be mapped


def _stored_grid(meta: Mapping[str, str] | None) -> tuple[int, int, int] | None:
    """The token grid recorded by :func:`save_converted` in a safetensors header, if any."""
    if not meta or "video_encoder_config" not in meta:
        return None
    try:
        cfg = json.loads(meta["video_encoder_config"])
        side = cfg["image_size"] // cfg["patch_size"]
        return (cfg["num_frames"] // cfg["tubelet_size"], side, side)
    except (ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def _read(source: str | os.PathLike | Mapping[str, Any]) -> tuple[str, Any, tuple[int, int, int] | None]:
    if isinstance(source, Mapping):
        return "<state dict>", source, None
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        except Exception as err:
            raise OfficialCheckpointError(f"{path} is not a readable safetensors file ({err})") from err
        return str(path), tensors, _stored_grid(meta)
    return str(path), _torch_load(path), None


def _unwrap(obj: Any, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The flat tensor dict holding the encoder, and the wrapper keys stripped to reach it."""
    wrappers: list[str] = []
    while True:
        if not isinstance(obj, Mapping):
            raise OfficialCheckpointError(
                f"{name}: expected a state dict (a mapping of names to tensors); got {type(obj).__name__}"
            )
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if any(k.endswith(_ANCHOR) for k in tensors):
            return tensors, wrappers
        inner = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return tensors, wrappers
        wrappers.append(inner)
        obj = obj[inner]


def _find_prefix(tensors: dict[str, torch.Tensor], name: str, wrappers: list[str]) -> str:
    prefixes = [
        k[: -len(_ANCHOR)]
        for k in tensors
        if k.endswith(_ANCHOR) and (k == _ANCHOR or k[: -len(_ANCHOR)].endswith("."))
    ]
    if not prefixes:
        keys = sorted(tensors)[:12]
        where = f" (inside {' -> '.join(repr(w) for w in wrappers)})" if wrappers else ""
        raise OfficialCheckpointError(
            f"{name}: unknown checkpoint layout{where}: no tensor named '[prefix.]{_ANCHOR}' (the 3D patch "
            f"embedding of an InternVideo2 vision encoder). First unmatched keys: {keys}. Layouts known:\n"
            + _layouts_text()
        )

    def rank(p: str) -> tuple[int, int]:
        return (0 if p.endswith("vision_encoder.") else 1 if p == "" else 2, len(p))

    return min(prefixes, key=rank)


def _layout_name(prefix: str, wrappers: list[str], sub: Mapping[str, torch.Tensor]) -> str:
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


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


def _infer_arch(sub: Mapping[str, torch.Tensor], name: str) -> dict[str, Any]:
    """What the checkpoint's shapes say about the encoder (heads cannot be read off shapes)."""
    w = sub[_ANCHOR]
    if w.dim() != 5:
        raise OfficialCheckpointError(
            f"{name}: {_ANCHOR} has shape {tuple(w.shape)}; an InternVideo2 video encoder has a 3D patch "
            "embedding [C, 3, tubelet, patch, patch] (a 4D weight is an image ViT)"
        )
    if w.shape[3] != w.shape[4]:
        raise OfficialCheckpointError(f"{name}: non-square patches {tuple(w.shape[3:])} are not supported")
    depth = 1 + max((int(m.group(1)) for k in sub if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if depth == 0:
        raise OfficialCheckpointError(f"{name}: no 'blocks.N.*' tensors next to {_ANCHOR}")
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


def _resolve_config(
    arch: dict[str, Any],
    preset: str | None,
    num_frames: int,
    image_size: int,
    overrides: dict[str, Any],
    name: str,
) -> tuple[str, dict[str, Any]]:
    """The VideoEncoder arguments: the preset, the checkpoint's shapes and flags, the overrides."""
    if preset is None:
        matches = [
            n
            for n in _OFFICIAL_PRESETS
            if PRESETS[n]["embed_dim"] == arch["embed_dim"] and PRESETS[n]["depth"] == arch["depth"]
        ]
        if not matches and "num_heads" not in overrides:
            known = ", ".join(
                f"{n} ({PRESETS[n]['embed_dim']}/{PRESETS[n]['depth']})" for n in _OFFICIAL_PRESETS
            )
            raise OfficialCheckpointError(
                f"{name}: the checkpoint's width {arch['embed_dim']} and depth {arch['depth']} match no official "
                f"preset (width/depth: {known}); pass preset=... or num_heads=... (and attn_pool_heads=...)"
            )
        # no match: the official block structure (taken from s14) at the checkpoint's own sizes
        base, named = (matches[0] if matches else "s14"), bool(matches)
    else:
        base, named = preset, True
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


def _source_grid(
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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    """What :func:`load_official` did with each tensor of the checkpoint.

    ``mapped``: checkpoint name → name it was loaded as (a VideoEncoder parameter, ``classifier.*`` for
    a fine-tune's ``fc_norm``/``head``, ``token_heads.*`` / ``pool_head.*`` for the stage-1 CLIP-teacher
    heads, in MaskedVideoStage's names). ``interpolated``: one note per resampled table.
    ``unmapped``: checkpoint name → why it is not used. ``missing``: encoder tensors the file lacks
    (left at their initial values; only possible with ``strict=False``).
    ``classifier``: ``nn.Sequential(fc_norm, head)`` for a fine-tune (apply it to ``encoder(video).pooled``),
    else None. ``head_state``: the stage-1 heads' tensors, loadable with
    ``masked_stage.load_state_dict(report.head_state, strict=False)`` (use ``distill_head="mlp"`` when the
    file's decoders are MLPs).
    """

    source: str
    layout: str
    wrappers: list[str]
    prefix: str
    preset: str
    config: dict[str, Any]
    source_grid: tuple[int, int, int]
    grid: tuple[int, int, int]
    mapped: dict[str, str] = field(default_factory=dict)
    interpolated: list[str] = field(default_factory=list)
    unmapped: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    classifier: nn.Module | None = None
    head_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def summary(self, examples: int = 3) -> str:
        wrap = f", inside {'/'.join(repr(w) for w in self.wrappers)}" if self.wrappers else ""
        pre = f", prefix {self.prefix!r}" if self.prefix else ""
        c = self.config
        n_enc = sum(
            1 for t in self.mapped.values() if not t.startswith(("classifier.", "token_heads.", "pool_head."))
        )
        extra = len(self.mapped) - n_enc
        lines = [
            f"source: {self.source}",
            f"layout: {self.layout}{wrap}{pre}",
            f"encoder: preset {self.preset} (width {c['embed_dim']}, depth {c['depth']}, heads {c['num_heads']}), "
            f"{c['num_frames']} frames x {c['image_size']} px, token grid {self.grid}",
            f"mapped: {n_enc} encoder tensors" + (f" + {extra} head tensors" if extra else ""),
        ]
        lines += [f"interpolated: {note}" for note in self.interpolated]
        if self.missing:
            lines.append(f"missing (left at init): {len(self.missing)}: {self.missing[:examples]}")
        by_reason: dict[str, list[str]] = {}
        for key, why in self.unmapped.items():
            by_reason.setdefault(why, []).append(key)
        lines.append(f"unmapped: {len(self.unmapped)} tensors")
        for why, keys in by_reason.items():
            more = ", ..." if len(keys) > examples else ""
            lines.append(f"  {len(keys)} x {why}: {', '.join(keys[:examples])}{more}")
        return "\n".join(lines)


@dataclass
class _Loaded:
    """The parsed checkpoint, kept for the reference forward of :func:`verify_official`."""

    sub: dict[str, torch.Tensor]
    arch: dict[str, Any]
    report: ConversionReport


def _classify_extra(key: str) -> tuple[str | None, str | None]:
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


def _compose_sep_pos(sub: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """Separable tables (cls, spatial [1, HW, C], temporal [1, T, C]) → one joint table, T, HW."""
    spatial, temporal = sub["pos_embed_spatial"].float(), sub["pos_embed_temporal"].float()
    t, hw = temporal.shape[1], spatial.shape[1]
    grid = spatial.repeat(1, t, 1) + torch.repeat_interleave(temporal, hw, dim=1)
    return torch.cat([sub["pos_embed_cls"].float(), grid], dim=1), t, hw


def _load(
    source: str | os.PathLike | Mapping[str, Any],
    preset: str | None,
    num_frames: int,
    image_size: int,
    source_frames: int | None,
    strict: bool,
    overrides: dict[str, Any],
) -> tuple[VideoEncoder, _Loaded]:
    name, obj, stored = _read(source)
    tensors, wrappers = _unwrap(obj, name)
    prefix = _find_prefix(tensors, name, wrappers)
    sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    arch = _infer_arch(sub, name)
    base, cfg = _resolve_config(arch, preset, num_frames, image_size, dict(overrides), name)
    with torch.device("meta"):
        meta_enc = VideoEncoder(**cfg)  # validates the configuration; allocates nothing
    own = {k: tuple(v.shape) for k, v in meta_enc.state_dict().items()}
    grid = meta_enc.grid_size
    p = meta_enc.num_prefix

    report = ConversionReport(
        source=name,
        layout=_layout_name(prefix, wrappers, sub),
        wrappers=wrappers,
        prefix=prefix,
        preset=base,
        config=cfg,
        source_grid=grid,
        grid=grid,
    )
    for k in tensors:
        if not k.startswith(prefix):
            report.unmapped[k] = f"outside the vision encoder (not under {prefix!r})"

    loaded: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    # position table: joint, or the separable (cls, spatial, temporal) form of some fine-tunes
    pos = None
    if "pos_embed" in sub:
        pos = sub["pos_embed"].float()
        pos = pos[None] if pos.dim() == 2 else pos
        report.mapped[prefix + "pos_embed"] = "pos_embed"
    elif all(k in sub for k in _SEP_POS):
        pos, t_sep, hw_sep = _compose_sep_pos(sub)
        side = math.isqrt(hw_sep)
        stored = (t_sep, side, side) if side * side == hw_sep else stored
        for k in _SEP_POS:
            report.mapped[prefix + k] = "pos_embed (composed from the separable tables)"
    if pos is not None:
        if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[-1] != cfg["embed_dim"] or pos.shape[1] <= p:
            raise OfficialCheckpointError(
                f"{name}: pos_embed has shape {tuple(pos.shape)}; expected [1, {p} + T*H*W, {cfg['embed_dim']}]"
            )
        src = _source_grid(pos.shape[1] - p, grid, stored, source_frames, cfg["tubelet_size"], name)
        report.source_grid = src
        if src != grid:
            pos = interpolate_pos_embed_3d(pos, src, grid, p)
            note = (
                f"pos_embed: token grid (T, H, W) {src} -> {grid} "
                "(linear in time, bicubic in space; the cls row is kept)"
            )
            report.interpolated.append(note)
            warnings.warn(f"{name}: {note}", PosEmbedInterpolationWarning, stacklevel=3)
        loaded["pos_embed"] = pos

    classifier: dict[str, torch.Tensor] = {}
    for k, v in sub.items():
        if k == "pos_embed" or k in _SEP_POS:
            continue
        if k in own:
            if tuple(v.shape) != own[k]:
                mismatched.append(f"{prefix}{k}: checkpoint {tuple(v.shape)} vs encoder {own[k]}")
                continue
            loaded[k] = v
            report.mapped[prefix + k] = k
            continue
        target, why = _classify_extra(k)
        if target is None:
            report.unmapped[prefix + k] = why or "unrecognised name (not a VideoEncoder tensor)"
        elif target.startswith("classifier."):
            classifier[target[len("classifier.") :]] = v.float().clone()
            report.mapped[prefix + k] = target
        else:
            report.head_state[target] = v.float().clone()
            report.mapped[prefix + k] = target
    if mismatched:
        raise OfficialCheckpointError(
            f"{name}: {len(mismatched)} tensor(s) have another shape than the encoder built from preset "
            f"{base!r} ({cfg['num_heads']} heads):\n  " + "\n  ".join(mismatched[:20])
        )
    report.missing = sorted(set(own) - set(loaded))
    if report.missing and strict:
        unmatched = [k for k, why in report.unmapped.items() if why.startswith("unrecognised")][:10]
        raise OfficialCheckpointError(
            f"{name}: {len(report.missing)} encoder tensor(s) are not in the checkpoint (layout "
            f"{report.layout!r}, prefix {prefix!r}): {report.missing[:10]}. First unmatched keys: {unmatched}. "
            f"Pass strict=False to leave them at their initial values. Layouts known:\n" + _layouts_text()
        )
    if classifier:
        report.classifier = _build_classifier(classifier, name)

    state = {k: v.to(torch.float32, copy=True).contiguous() for k, v in loaded.items()}
    if not report.missing and not any(True for _ in meta_enc.buffers()):
        meta_enc.load_state_dict(state, strict=True, assign=True)  # no second copy, no random init
        encoder = meta_enc
    else:
        encoder = VideoEncoder(**cfg)
        encoder.load_state_dict(state, strict=False)
    return encoder.eval(), _Loaded(sub=sub, arch=arch, report=report)


def _build_classifier(tensors: dict[str, torch.Tensor], name: str) -> nn.Module:
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


def load_official(
    source: str | os.PathLike | Mapping[str, Any],
    preset: str | None = None,
    num_frames: int = 8,
    image_size: int = 224,
    *,
    source_frames: int | None = None,
    strict: bool = True,
    **overrides: Any,
) -> tuple[VideoEncoder, ConversionReport]:
    """Build a :class:`VideoEncoder` from an official InternVideo2 checkpoint (path or state dict).

    ``preset``: an official size (``s14``, ``b14``, ``l14``, ``1b``, ``6b``); None picks the one whose
    width and depth match the checkpoint (for other sizes pass ``num_heads=...``). The checkpoint's
    shapes and block structure (qkv bias, QK-norm, LayerScale, norm kind) override the preset;
    ``overrides`` are further :class:`VideoEncoder` arguments (e.g. ``mlp_act="gelu_tanh"``,
    ``backend``) and must agree with the checkpoint. The position table is resampled to
    ``num_frames`` x ``image_size`` when it was stored for another grid (with a
    :class:`PosEmbedInterpolationWarning`); ``source_frames`` names the stored frame count when it is
    ambiguous. With ``strict`` every encoder tensor must come from the file.

    Returns the encoder (fp32, CPU, eval mode; ``encoder(video).pooled`` is the official attention-pool
    output) and a :class:`ConversionReport`.
    """
    encoder, loaded = _load(source, preset, num_frames, image_size, source_frames, strict, overrides)
    return encoder, loaded.report


# --------------------------------------------------------------------------------------------
# Reference equations and verification
# --------------------------------------------------------------------------------------------


def _reference_pos(
    sub: Mapping[str, torch.Tensor], src: tuple[int, int, int], dst: tuple[int, int, int], p: int
) -> torch.Tensor:
    """The position table resampled the way the official loader does it: time first (linear),
    then space (bicubic), both with align_corners=False."""
    if "pos_embed" in sub:
        pos = sub["pos_embed"].float().reshape(1, -1, sub["pos_embed"].shape[-1])
    else:
        pos, _, _ = _compose_sep_pos(sub)
    extra, table = pos[:, :p], pos[0, p:]
    (t, h, w), (t2, h2, w2) = src, dst
    c = table.shape[-1]
    x = table.reshape(t, h * w, c)
    if t != t2:
        x = F.interpolate(x.permute(1, 2, 0), size=t2, mode="linear", align_corners=False).permute(2, 0, 1)
    x = x.reshape(t2, h, w, c)
    if (h, w) != (h2, w2):
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(h2, w2), mode="bicubic", align_corners=False)
        x = x.permute(0, 2, 3, 1)
    return torch.cat([extra, x.reshape(1, t2 * h2 * w2, c)], dim=1)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, nq, c = q.shape
    nk = k.shape[1]
    dh = c // heads
    qh = q.reshape(b, nq, heads, dh).transpose(1, 2)
    kh = k.reshape(b, nk, heads, dh).transpose(1, 2)
    vh = v.reshape(b, nk, heads, dh).transpose(1, 2)
    probs = torch.softmax((qh * dh**-0.5) @ kh.transpose(-2, -1), dim=-1)
    return (probs @ vh).transpose(1, 2).reshape(b, nq, c)


def official_reference_forward(
    state: Mapping[str, torch.Tensor],
    video: torch.Tensor,
    num_heads: int,
    attn_pool_heads: int = 16,
    pos_embed: torch.Tensor | None = None,
    mlp_act: str = "gelu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official vision encoder's equations on a bare-named state dict: ``(tokens, pooled)``.

    Written straight from the official block, independently of :class:`VideoEncoder`: Conv3d patches,
    cls token, ``+ pos_embed``; per block ``x + ls1 * proj(attn(rms_qk(qkv(rms(x)))))`` and
    ``x + ls2 * fc2(gelu(fc1(rms(x))))`` (RMSNorm eps 1e-6, QK-norm over the full width before the
    heads are split, softmax spelled out); no final norm; attention pool with the mean of all tokens
    (cls included) as query, LayerNorm eps 1e-5 on q / k / v inputs, bias-free q / k / v projections
    plus separate biases, then ``proj``. ``pos_embed`` replaces the stored table (e.g. resampled).
    """
    sd = {k: v.float() for k, v in state.items()}
    w = sd[_ANCHOR]
    x = F.conv3d(video.float(), w, sd.get("patch_embed.proj.bias"), stride=tuple(w.shape[2:]))
    x = x.flatten(2).transpose(1, 2)
    b, c = x.shape[0], x.shape[-1]
    if "cls_token" in sd:
        x = torch.cat([sd["cls_token"].reshape(1, 1, c).expand(b, 1, c), x], dim=1)
    pos = pos_embed if pos_embed is not None else sd["pos_embed"].reshape(1, -1, c)
    x = x + pos

    def norm(t: torch.Tensor, key: str) -> torch.Tensor:
        if key + ".bias" in sd:  # LayerNorm variant
            return F.layer_norm(t, (c,), sd[key + ".weight"], sd[key + ".bias"], eps=1e-6)
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[key + ".weight"]

    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    approximate = "tanh" if mlp_act == "gelu_tanh" else "none"
    for i in range(depth):
        p = f"blocks.{i}."
        qkv = F.linear(norm(x, p + "norm1"), sd[p + "attn.qkv.weight"], sd.get(p + "attn.qkv.bias"))
        q, k, v = qkv[..., :c], qkv[..., c : 2 * c], qkv[..., 2 * c :]
        if p + "attn.q_norm.weight" in sd:
            q, k = norm(q, p + "attn.q_norm"), norm(k, p + "attn.k_norm")
        a = F.linear(
            _reference_attention(q, k, v, num_heads), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]
        )
        x = x + a * sd.get(p + "ls1.gamma", torch.ones(()))
        h = F.gelu(
            F.linear(norm(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]),
            approximate=approximate,
        )
        x = x + F.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]) * sd.get(
            p + "ls2.gamma", torch.ones(())
        )

    cp = "clip_projector."

    def ln(t: torch.Tensor, key: str) -> torch.Tensor:
        return F.layer_norm(t, (c,), sd[cp + key + ".weight"], sd[cp + key + ".bias"], eps=1e-5)

    ca = cp + "cross_attn."
    q = F.linear(ln(x.mean(dim=1, keepdim=True), "norm1_q"), sd[ca + "q.weight"], sd[ca + "q_bias"])
    k = F.linear(ln(x, "norm1_k"), sd[ca + "k.weight"], sd[ca + "k_bias"])
    v = F.linear(ln(x, "norm1_v"), sd[ca + "v.weight"], sd[ca + "v_bias"])
    pooled = F.linear(
        _reference_attention(q, k, v, attn_pool_heads), sd[ca + "proj.weight"], sd[ca + "proj.bias"]
    )
    return x, pooled.squeeze(1)


@dataclass
class VerifyResult:
    """What :func:`verify_official` checked; ``ok`` when ``problems`` is empty."""

    problems: list[str]
    tokens_max_abs_err: float
    pooled_max_abs_err: float
    checked: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = "verify: OK" if self.ok else f"verify: FAILED ({len(self.problems)} problem(s))"
        lines = [head] + [f"  ok: {c}" for c in self.checked] + [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _verify(
    encoder: VideoEncoder,
    loaded: _Loaded,
    written: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> VerifyResult:
    report, sub = loaded.report, loaded.sub
    problems: list[str] = []
    checked: list[str] = []
    if report.missing:
        problems.append(
            f"{len(report.missing)} encoder tensor(s) missing from the file: {report.missing[:5]}"
        )
    else:
        checked.append(f"every encoder tensor comes from the file ({len(encoder.state_dict())} tensors)")
    unknown = [k for k, why in report.unmapped.items() if why.startswith("unrecognised")]
    if unknown:
        problems.append(f"{len(unknown)} unrecognised tensor(s) under {report.prefix!r}: {unknown[:5]}")
    else:
        checked.append(
            f"every tensor under {report.prefix!r} is mapped or a known training-only head "
            f"({len(report.mapped)} mapped, {len(report.unmapped)} reported)"
        )
    bad = [k for k, v in sub.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        problems.append(f"{len(bad)} tensor(s) hold NaN or inf: {[report.prefix + k for k in bad[:5]]}")
    else:
        checked.append("all tensors are finite")

    cfg = report.config
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(
        1, cfg["in_chans"], cfg["num_frames"], cfg["image_size"], cfg["image_size"], generator=gen
    )
    tok_err = pool_err = float("nan")
    if report.missing:  # the reference needs every tensor from the file
        problems.append("parity not checked: the file lacks encoder tensors")
        return VerifyResult(problems, tok_err, pool_err, checked)
    with torch.no_grad():
        out = encoder(video)
        pos = _reference_pos(sub, report.source_grid, report.grid, encoder.num_prefix)
        ref_tokens, ref_pooled = official_reference_forward(
            sub, video, cfg["num_heads"], cfg["attn_pool_heads"], pos, cfg.get("mlp_act", "gelu")
        )
        tok_err = float((out.tokens - ref_tokens).abs().max())
        pool_err = float((out.pooled - ref_pooled).abs().max())
        for what, err, ref in (("tokens", tok_err, ref_tokens), ("pooled", pool_err, ref_pooled)):
            bound = atol + rtol * float(ref.abs().max())
            if not err <= bound:  # also catches NaN
                problems.append(
                    f"{what} differ from the reference equations: max abs error {err:.3g} > {bound:.3g}"
                )
            else:
                checked.append(
                    f"{what} match the reference equations (max abs error {err:.3g} <= {bound:.3g})"
                )
        if report.classifier is not None:
            logits = report.classifier(out.pooled)
            fc_w = sub["fc_norm.weight"].float()
            ref_logits = F.linear(
                F.layer_norm(ref_pooled, fc_w.shape, fc_w, sub["fc_norm.bias"].float()),
                sub["head.weight"].float(),
                sub["head.bias"].float(),
            )
            err = float((logits - ref_logits).abs().max())
            bound = atol + rtol * float(ref_logits.abs().max())
            (checked if err <= bound else problems).append(
                f"classifier logits max abs error {err:.3g} (bound {bound:.3g})"
            )
    if written is not None:
        expected = {f"video_encoder.{k}": v for k, v in encoder.state_dict().items()}
        diff = [k for k, v in expected.items() if k not in written or not torch.equal(written[k], v.float())]
        if diff:
            problems.append(
                f"{len(diff)} tensor(s) of the written file differ from the loaded encoder: {diff[:5]}"
            )
        else:
            checked.append(f"the written file holds the loaded encoder exactly ({len(expected)} tensors)")
    return VerifyResult(problems, tok_err, pool_err, checked)


def verify_official(
    source: str | os.PathLike | Mapping[str, Any],
    preset: str | None = None,
    num_frames: int = 8,
    image_size: int = 224,
    *,
    source_frames: int | None = None,
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    **overrides: Any,
) -> VerifyResult:
    """Load ``source`` like :func:`load_official` (non-strict) and check the conversion.

    Checks: every encoder tensor comes from the file; every tensor under the encoder's prefix is
    mapped or a known training-only head; all tensors are finite; on a random clip
    (``[1, 3, num_frames, image_size, image_size]``, ``seed``) the encoder's tokens and pooled output
    match :func:`official_reference_forward` evaluated on the file's own tensors (position table
    resampled by the reference's own code) within ``atol + rtol * max|reference|``; a fine-tune's
    classifier logits match too.
    """
    encoder, loaded = _load(source, preset, num_frames, image_size, source_frames, False, overrides)
    return _verify(encoder, loaded, seed=seed, atol=atol, rtol=rtol)


# --------------------------------------------------------------------------------------------
# Writing and the command line
# --------------------------------------------------------------------------------------------


def _tensors_to_write(encoder: VideoEncoder, report: ConversionReport) -> dict[str, torch.Tensor]:
    out = {f"video_encoder.{k}": v.detach().float().contiguous() for k, v in encoder.state_dict().items()}
    if report.classifier is not None:
        out.update(
            {
                f"classifier.{k}": v.detach().float().contiguous()
                for k, v in report.classifier.state_dict().items()
            }
        )
    out.update({k: v.contiguous() for k, v in report.head_state.items()})
    return out


def save_converted(encoder: VideoEncoder, report: ConversionReport, dst: str | os.PathLike) -> Path:
    """Write the converted weights where ``init_from`` reads them.

    ``dst`` ending in ``.safetensors``: one file. Otherwise a folder with ``weights.safetensors`` and
    ``manifest.json`` (the layout of a stage export). Encoder tensors are prefixed ``video_encoder.``;
    a fine-tune's classifier is stored as ``classifier.fc_norm.*`` / ``classifier.head.*`` and the
    stage-1 heads under MaskedVideoStage's names (``init_from`` loads only the encoder). The encoder
    configuration is kept in the safetensors header. Files are written under temporary names and
    renamed.
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    tensors = _tensors_to_write(encoder, report)
    meta = {
        "format": "iv2_lightning",
        "converted_from": report.source,
        "layout": report.layout,
        "preset": report.preset,
        "video_encoder_config": json.dumps(report.config, default=str),
    }
    if dst.suffix == ".safetensors":
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.partial")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, dst)
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / ".weights.safetensors.partial"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, dst / "weights.safetensors")
    manifest = {
        "stage": "official",
        "preset": report.preset,
        "source": report.source,
        "layout": report.layout,
        "architecture": {"video_encoder": "VideoEncoder", "video_encoder_config": report.config},
        "interpolated": report.interpolated,
        "num_tensors": len(tensors),
        "num_parameters": int(sum(t.numel() for t in tensors.values())),
    }
    tmp = dst / ".manifest.json.partial"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, dst / "manifest.json")
    return dst


def _read_written(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path if path.suffix == ".safetensors" else path / "weights.safetensors"))


def convert_main(argv: list[str] | None = None) -> int:
    """``iv2 convert SRC DST [--preset l14] [--num-frames 8] [--image-size 224] [--verify]``."""
    parser = argparse.ArgumentParser(
        prog="iv2 convert",
        description="Convert the vision encoder of an official InternVideo2 checkpoint (stage-1 pretrain.pth, "
        "stage-2 .pt, distilled pytorch_model.bin, classifier fine-tune) into iv2 weights for init_from.",
    )
    parser.add_argument(
        "src", help="the official checkpoint (.pth/.pt/.bin read weights-only, or .safetensors)"
    )
    parser.add_argument(
        "dst", help="DST.safetensors (one file), or a folder (weights.safetensors + manifest.json)"
    )
    parser.add_argument(
        "--preset",
        choices=_OFFICIAL_PRESETS,
        default=None,
        help="official size (default: from the checkpoint)",
    )
    parser.add_argument("--num-frames", type=int, default=8, help="frames per clip of the converted encoder")
    parser.add_argument(
        "--image-size", type=int, default=224, help="frame size (px) of the converted encoder"
    )
    parser.add_argument(
        "--source-frames",
        type=int,
        default=None,
        help="frames the stored position table was trained with, when it cannot be told from its size",
    )
    parser.add_argument(
        "--num-heads", type=int, default=None, help="attention heads (sizes without a preset)"
    )
    parser.add_argument("--attn-pool-heads", type=int, default=None, help="attention-pool heads (default 16)")
    parser.add_argument(
        "--mlp-act",
        choices=("gelu", "gelu_tanh"),
        default=None,
        help="MLP activation (gelu_tanh = flash-attn FusedMLP's, used on the official fused training path)",
    )
    parser.add_argument(
        "--no-strict", action="store_true", help="allow encoder tensors missing from the file"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the result against the official equations on the file's tensors; write DST only if it passes",
    )
    args = parser.parse_args(argv)
    overrides = {
        k: v
        for k, v in (
            ("num_heads", args.num_heads),
            ("attn_pool_heads", args.attn_pool_heads),
            ("mlp_act", args.mlp_act),
        )
        if v is not None
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PosEmbedInterpolationWarning)  # the summary lists it
            encoder, loaded = _load(
                args.src,
                args.preset,
                args.num_frames,
                args.image_size,
                args.source_frames,
                not args.no_strict,
                overrides,
            )
    except (OfficialCheckpointError, FileNotFoundError) as err:
        print(f"iv2 convert: error: {err}", file=sys.stderr)
        return 2
    report = loaded.report
    print(report.summary())
    dst = Path(args.dst)
    if not args.verify:
        print(f"wrote {save_converted(encoder, report, dst)}")
        return 0
    # write beside the destination, verify the written tensors, then move into place
    staging = dst.with_name(f".{dst.name}.verify{dst.suffix}")
    save_converted(encoder, report, staging)
    try:
        result = _verify(encoder, loaded, written=_read_written(staging))
        print(result.summary())
        if not result.ok:
            print(f"iv2 convert: verification failed; {dst} was not written", file=sys.stderr)
            return 1
        if staging.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            for name in ("weights.safetensors", "manifest.json"):  # weights first, manifest last
                os.replace(staging / name, dst / name)
        else:
            os.replace(staging, dst)
    finally:
        if staging.is_dir():
            for child in staging.iterdir():
                child.unlink()
            staging.rmdir()
        elif staging.exists():
            staging.unlink()
    print(f"wrote {dst}")
    return 0
