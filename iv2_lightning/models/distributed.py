"""Gathering rows across ranks, with and without gradients: the one home of the library's collectives.

Contrastive losses need every rank's rows as negatives, with gradients flowing back to the rank that
owns them (InternVideo2, arXiv 2403.15377 Sec. 3.2, gathers its VTC features "with grad" as CLIP and
lightly's ``utils/dist.py`` do); the evaluation metrics need every rank's rows without gradients.
Ranks may hold different numbers of rows (the collate drops a clip that fails to load), so every
gather here pads to the longest rank, gathers, and trims each rank's part back to its own length.

All functions are the identity on one process (or when ``torch.distributed`` is not initialised),
so the same code runs in a plain single-process loop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["all_gather_rows", "gather_no_grad", "gather_with_grad", "rank", "world_size"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank, 0 without torch.distributed."""
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    """The number of processes, 1 without torch.distributed."""
    return dist.get_world_size() if _active() else 1


def _row_counts(x: torch.Tensor, group: Any = None) -> list[int]:
    """Every rank's ``x.shape[0]`` (one small all_gather)."""
    n = torch.tensor([x.shape[0]], device=x.device)
    parts = [torch.empty_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, n, group=group)
    return [int(p) for p in parts]


def _gather_padded(x: torch.Tensor, counts: list[int], group: Any = None) -> list[torch.Tensor]:
    """all_gather of ``x [n, ...]`` when ranks hold different ``n``: pad to the longest, gather, trim."""
    most = max(counts)
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, most - x.shape[0])) if most > x.shape[0] else x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return [p[:n] for p, n in zip(parts, counts)]


@torch.no_grad()
def all_gather_rows(x: torch.Tensor, group: Any = None) -> list[torch.Tensor]:
    """Every rank's ``x`` (one tensor per rank, in rank order; no gradient).

    Ranks may differ in ``x.shape[0]``, not in the other dimensions. A 0-d tensor is gathered as is.
    The signature of torchmetrics' ``dist_sync_fn``, so metrics sync their states through it.
    """
    if not _active():
        return [x]
    if x.dim() == 0:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return parts
    return _gather_padded(x, _row_counts(x, group), group)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x [n, ...]`` concatenated along dim 0 (no gradient; e.g. sample ids)."""
    if world_size() == 1:
        return x
    return torch.cat(all_gather_rows(x))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own rows summed over ranks.

    Every rank's loss uses every rank's rows, so the gradient of a rank's input is the sum over
    ranks of the gradients of their losses with respect to it: all_reduce(SUM), then this rank's slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ctx.start = sum(counts[: rank()])
        ctx.rows = x.shape[0]
        return torch.cat(_gather_padded(x, counts))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.rows], None


def gather_with_grad(x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """Every rank's rows of ``x [n, ...]`` concatenated along dim 0, gradients flowing to every rank's rows.

    The identity on one process. Ranks may hold different ``n``; ``counts`` (every rank's ``n``, e.g.
    from an earlier gather) saves the collective that finds them out.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x, counts if counts is not None else _row_counts(x))
