"""Loading the vision encoder of an official InternVideo2 checkpoint into :class:`VideoEncoder`:
:func:`load_official` and the :class:`ConversionReport` that accounts for every tensor.

The official vision encoder (OpenGVLab/InternVideo, ``InternVideo2/``; arXiv 2403.15377 Sec. 3) and
our joint-attention :class:`VideoEncoder` use the same parameter names, so loading is finding the
tensors (:mod:`.read`, :mod:`.layouts`), checking that the architecture matches and resampling the
position table to the requested clip (:mod:`.mapping`), and reporting every tensor that is not used.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from iv2_lightning.models.backbone import VideoEncoder
from iv2_lightning.models.official.errors import OfficialCheckpointError, PosEmbedInterpolationWarning
from iv2_lightning.models.official.layouts import find_prefix, layout_name, layouts_text, unwrap
from iv2_lightning.models.official.mapping import (
    SEP_POS,
    build_classifier,
    classify_extra,
    compose_sep_pos,
    infer_arch,
    resolve_config,
    stored_table_grid,
)
from iv2_lightning.models.official.read import read_checkpoint
from iv2_lightning.models.pos_embed import interpolate_pos_embed_3d


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
class LoadedCheckpoint:
    """The parsed checkpoint, kept for the reference forward of :func:`verify_official`."""

    sub: dict[str, torch.Tensor]
    arch: dict[str, Any]
    report: ConversionReport
    outside: dict[str, torch.Tensor] = field(default_factory=dict)  # the file's tensors not under the prefix


def load_checkpoint(
    source: str | os.PathLike | Mapping[str, Any],
    preset: str | None,
    num_frames: int,
    image_size: int,
    source_frames: int | None,
    strict: bool,
    overrides: dict[str, Any],
) -> tuple[VideoEncoder, LoadedCheckpoint]:
    """Read, map and load ``source``: the encoder and the parsed checkpoint (what :func:`load_official`
    and :func:`~iv2_lightning.models.official.verify.verify_official` share)."""
    name, obj, stored = read_checkpoint(source)
    tensors, wrappers = unwrap(obj, name)
    prefix = find_prefix(tensors, name, wrappers)
    sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    arch = infer_arch(sub, name)
    base, cfg = resolve_config(arch, preset, num_frames, image_size, dict(overrides), name)
    with torch.device("meta"):
        meta_enc = VideoEncoder(**cfg)  # validates the configuration; allocates nothing
    own = {k: tuple(v.shape) for k, v in meta_enc.state_dict().items()}
    grid = meta_enc.grid_size

    report = ConversionReport(
        source=name,
        layout=layout_name(prefix, wrappers, sub),
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
    pos = _map_pos_embed(sub, report, meta_enc.num_prefix, stored, source_frames, name)
    if pos is not None:
        loaded["pos_embed"] = pos
    classifier, mismatched = _map_tensors(sub, own, report, loaded)
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
            f"Pass strict=False to leave them at their initial values. Layouts known:\n" + layouts_text()
        )
    if classifier:
        report.classifier = build_classifier(classifier, name)
    encoder = _materialise(meta_enc, cfg, loaded, report.missing)
    outside = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    return encoder.eval(), LoadedCheckpoint(sub=sub, arch=arch, report=report, outside=outside)


def _map_pos_embed(
    sub: Mapping[str, torch.Tensor],
    report: ConversionReport,
    p: int,
    stored: tuple[int, int, int] | None,
    source_frames: int | None,
    name: str,
) -> torch.Tensor | None:
    """The position table resampled to the encoder's grid (None when the file has none): joint, or
    the separable (cls, spatial, temporal) form of some fine-tunes."""
    prefix, cfg, grid = report.prefix, report.config, report.grid
    pos = None
    if "pos_embed" in sub:
        pos = sub["pos_embed"].float()
        pos = pos[None] if pos.dim() == 2 else pos
        report.mapped[prefix + "pos_embed"] = "pos_embed"
    elif all(k in sub for k in SEP_POS):
        pos, t_sep, hw_sep = compose_sep_pos(sub)
        side = math.isqrt(hw_sep)
        stored = (t_sep, side, side) if side * side == hw_sep else stored
        for k in SEP_POS:
            report.mapped[prefix + k] = "pos_embed (composed from the separable tables)"
    if pos is None:
        return None
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[-1] != cfg["embed_dim"] or pos.shape[1] <= p:
        raise OfficialCheckpointError(
            f"{name}: pos_embed has shape {tuple(pos.shape)}; expected [1, {p} + T*H*W, {cfg['embed_dim']}]"
        )
    src = stored_table_grid(pos.shape[1] - p, grid, stored, source_frames, cfg["tubelet_size"], name)
    report.source_grid = src
    if src != grid:
        pos = interpolate_pos_embed_3d(pos, src, grid, p)
        note = (
            f"pos_embed: token grid (T, H, W) {src} -> {grid} "
            "(linear in time, bicubic in space; the cls row is kept)"
        )
        report.interpolated.append(note)
        # stacklevel: here, load_checkpoint, load_official / verify_official, then the caller's line
        warnings.warn(f"{name}: {note}", PosEmbedInterpolationWarning, stacklevel=4)
    return pos


def _map_tensors(
    sub: Mapping[str, torch.Tensor],
    own: Mapping[str, tuple[int, ...]],
    report: ConversionReport,
    loaded: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Sort every other tensor under the prefix: an encoder tensor (into ``loaded``), a classifier
    tensor (returned), a stage-1 head (``report.head_state``) or unused (``report.unmapped``).
    Returns the classifier tensors and the encoder tensors whose shapes do not match."""
    prefix = report.prefix
    classifier: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for k, v in sub.items():
        if k == "pos_embed" or k in SEP_POS:
            continue
        if k in own:
            if tuple(v.shape) != own[k]:
                mismatched.append(f"{prefix}{k}: checkpoint {tuple(v.shape)} vs encoder {own[k]}")
                continue
            loaded[k] = v
            report.mapped[prefix + k] = k
            continue
        target, why = classify_extra(k)
        if target is None:
            report.unmapped[prefix + k] = why or "unrecognised name (not a VideoEncoder tensor)"
        elif target.startswith("classifier."):
            classifier[target[len("classifier.") :]] = v.float().clone()
            report.mapped[prefix + k] = target
        else:
            report.head_state[target] = v.float().clone()
            report.mapped[prefix + k] = target
    return classifier, mismatched


def _materialise(
    meta_enc: VideoEncoder, cfg: dict[str, Any], loaded: Mapping[str, torch.Tensor], missing: list[str]
) -> VideoEncoder:
    """The encoder holding fp32 copies of ``loaded``."""
    state = {k: v.to(torch.float32, copy=True).contiguous() for k, v in loaded.items()}
    if not missing and not any(True for _ in meta_enc.buffers()):
        meta_enc.load_state_dict(state, strict=True, assign=True)  # no second copy, no random init
        return meta_enc
    encoder = VideoEncoder(**cfg)
    encoder.load_state_dict(state, strict=False)
    return encoder


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
    encoder, loaded = load_checkpoint(
        source, preset, num_frames, image_size, source_frames, strict, overrides
    )
    return encoder, loaded.report


__all__ = ["ConversionReport", "LoadedCheckpoint", "load_checkpoint", "load_official"]
