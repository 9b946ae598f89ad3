"""Token masks for masked video modelling: tube, random and attention-guided.

Every function returns a bool tensor ``[B, T*S]`` in the encoder's (t, h, w) token order with
True = masked (dropped), and masks exactly ``round(ratio * N)`` tokens in every sample, so the
visible tokens of a batch stay rectangular.

* tube (VideoMAE, Tong et al. 2022): the same spatial positions are masked in every frame. When
  ``round(ratio*N)`` is not a multiple of T, one more tube is masked in only the first few frames so
  the count is exact.
* random (MAE-ST, Feichtenhofer et al. 2022): independent positions over the whole clip.
* attention-guided (UMT, Li et al. 2023; InternVideo2 stage 1): the visible tokens of each frame are
  drawn with ``torch.multinomial`` from a teacher's attention over that frame's tokens, so the
  tokens the teacher finds important are kept more often.
"""

from __future__ import annotations

import torch


def _num_masked(n: int, ratio: float) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1); got {ratio}")
    return round(ratio * n)


def _frame_quota(total: int, frames: int) -> list[int]:
    """Split ``total`` tokens over ``frames`` as evenly as possible (earlier frames get the rest)."""
    base, extra = divmod(total, frames)
    return [base + (1 if f < extra else 0) for f in range(frames)]


def random_mask(
    batch: int, num_tokens: int, ratio: float, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """Mask ``round(ratio * num_tokens)`` uniformly chosen tokens per sample."""
    k = _num_masked(num_tokens, ratio)
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)
    order = noise.argsort(dim=1)
    mask = torch.zeros(batch, num_tokens, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :k], True)
    return mask


def tube_mask(
    batch: int,
    num_frames: int,
    tokens_per_frame: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Mask whole tubes (one spatial position in every frame); ``[B, T*S]``, exact count."""
    t, s = num_frames, tokens_per_frame
    k = _num_masked(t * s, ratio)
    full, partial = divmod(k, t)
    order = torch.rand(batch, s, generator=generator, device=device).argsort(dim=1)
    spatial = torch.zeros(batch, s, dtype=torch.bool, device=device)
    spatial.scatter_(1, order[:, :full], True)
    mask = spatial[:, None, :].expand(batch, t, s).clone()
    if partial:
        # the next tube in the random order is masked in the first `partial` frames only
        extra = order[:, full]  # [B]
        mask[
            torch.arange(batch, device=device)[:, None],
            torch.arange(partial, device=device)[None, :],
            extra[:, None],
        ] = True
    return mask.reshape(batch, t * s)


def attention_guided_mask(
    attention: torch.Tensor,
    ratio: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep tokens sampled (without replacement) from a teacher's attention, frame by frame.

    ``attention`` is ``[B, T, S]`` non-negative weights (e.g. the teacher's attention-pool weights of
    each frame). Frame f keeps its share of the ``N - round(ratio*N)`` visible tokens, drawn with
    ``torch.multinomial``; returns the ``[B, T*S]`` mask with True = masked.
    """
    if attention.dim() != 3:
        raise ValueError(f"attention must be [B, T, S] weights per frame; got shape {tuple(attention.shape)}")
    if bool((attention < 0).any()) or not bool(torch.isfinite(attention).all()):
        raise ValueError("attention weights must be finite and non-negative")
    b, t, s = attention.shape
    keep_total = t * s - _num_masked(t * s, ratio)
    weights = attention.float().reshape(b * t, s) + 1e-12  # a frame of zeros still samples uniformly
    visible = torch.zeros(b, t, s, dtype=torch.bool, device=attention.device)
    for f, keep in enumerate(_frame_quota(keep_total, t)):
        if keep == 0:
            continue
        idx = torch.multinomial(weights.view(b, t, s)[:, f], keep, replacement=False, generator=generator)
        visible[:, f].scatter_(1, idx, True)
    return ~visible.reshape(b, t * s)


def make_mask(
    kind: str,
    batch: int,
    grid: tuple[int, int, int],
    ratio: float,
    attention: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Dispatch by name: ``"tube"``, ``"random"`` or ``"attention"`` (needs ``attention [B, T, S]``)."""
    t, h, w = grid
    if kind == "tube":
        return tube_mask(batch, t, h * w, ratio, generator, device)
    if kind == "random":
        return random_mask(batch, t * h * w, ratio, generator, device)
    if kind == "attention":
        if attention is None:
            raise ValueError("mask kind 'attention' needs the teacher's attention weights [B, T, S]")
        if attention.shape != (batch, t, h * w):
            raise ValueError(
                f"attention must be [B, T, S] = {(batch, t, h * w)}; got {tuple(attention.shape)}"
            )
        return attention_guided_mask(attention, ratio, generator)
    raise ValueError(f"mask kind must be 'tube', 'random' or 'attention'; got {kind!r}")
