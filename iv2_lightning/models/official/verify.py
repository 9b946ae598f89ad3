"""Checking a conversion: :func:`verify_official` (``iv2 convert --verify``) runs the converted
encoder and :func:`~iv2_lightning.models.official.reference.official_reference_forward` (the official
equations on the file's own tensors) on one random clip and compares them.

A conversion is trusted only when every encoder tensor comes from the file, every tensor under the
encoder's prefix is mapped or a known training-only head, all are finite, and the outputs agree
within ``atol + rtol * max|reference|``: the parity test a port of the official encoder
(OpenGVLab/InternVideo, ``InternVideo2/``; arXiv 2403.15377) must pass before its numbers mean anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from iv2_lightning.models.backbone import VideoEncoder
from iv2_lightning.models.official.load import ConversionReport, LoadedCheckpoint, load_checkpoint
from iv2_lightning.models.official.reference import official_reference_forward, reference_pos


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


def verify_loaded(
    encoder: VideoEncoder,
    loaded: LoadedCheckpoint,
    written: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> VerifyResult:
    """Check a loaded encoder against its file: coverage, finiteness, parity with the reference
    equations on a random clip, and (``written``) the tensors of the file written from it."""
    report, sub = loaded.report, loaded.sub
    problems, checked = _coverage_checks(encoder, report, sub)
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
        tok_err, pool_err = _parity_checks(encoder, loaded, video, atol, rtol, problems, checked)
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


def _coverage_checks(
    encoder: VideoEncoder, report: ConversionReport, sub: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    """(problems, checked): every encoder tensor from the file, every tensor accounted for, all finite."""
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
    return problems, checked


def _parity_checks(
    encoder: VideoEncoder,
    loaded: LoadedCheckpoint,
    video: torch.Tensor,
    atol: float,
    rtol: float,
    problems: list[str],
    checked: list[str],
) -> tuple[float, float]:
    """Tokens, pooled output and (fine-tunes) classifier logits against the reference equations
    evaluated on the file's own tensors; returns the tokens' and the pooled output's max abs errors."""
    report, sub, cfg = loaded.report, loaded.sub, loaded.report.config
    out = encoder(video)
    pos = reference_pos(sub, report.source_grid, report.grid, encoder.num_prefix)
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
            checked.append(f"{what} match the reference equations (max abs error {err:.3g} <= {bound:.3g})")
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
    return tok_err, pool_err


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
    encoder, loaded = load_checkpoint(source, preset, num_frames, image_size, source_frames, False, overrides)
    return verify_loaded(encoder, loaded, seed=seed, atol=atol, rtol=rtol)


__all__ = ["VerifyResult", "verify_loaded", "verify_official"]
