"""Training objectives of the curriculum, as ``nn.Module``s, and cross-rank gathering with gradients.

* :class:`InfoNCELoss`: the stage-2 video-text contrastive loss (arXiv 2403.15377 Sec. 3.2; the
  official VTC): symmetric InfoNCE with a learnable temperature (init 0.07, clamped to
  [0.001, 0.5]), multi-positive targets from sample ids, and negatives gathered from every rank
  with gradients. The module layout (a ``gather_distributed`` switch, gather with grads) follows
  lightly's ``NTXentLoss``.
* :class:`CosineDistillLoss`: the stage-1 UMT-style teacher distillation loss ``mean(2 - 2 cos)``
  (Sec. 3.1), optionally over a subset of tokens.
* :class:`MatchingLoss`: the stage-2 video-text matching loss (official VTM): cross-entropy of the
  2-way matching logits, positives vs the hard negatives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    """(rank, world size), or (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each rank the gradient of its own rows summed over ranks.

    Every rank's loss uses every rank's rows, so the gradient of a rank's input is the sum over
    ranks of the gradients of their losses with respect to it: all_reduce(SUM), then this rank's slice.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world = _world()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x [B, ...]`` from every rank along dim 0, keeping gradients to every rank's rows.

    The identity on one process. Every rank must pass the same shape (all_gather needs it).
    """
    if _world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x [B, ...]`` from every rank along dim 0 (no gradient; e.g. sample ids)."""
    world = _world()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE between paired embeddings ``a [B, E]`` and ``b [B, E]``.

    Both are L2-normalised; ``logits = a @ b_all.T / t`` and ``b @ a_all.T / t`` where ``*_all`` are
    gathered from every rank when ``gather_distributed``. With ``sample_ids [B]``, every column with
    the row's id is a positive and the target spreads evenly over them (the official VTC with
    ``idx``); the loss is ``-Σ target · log_softmax(logits)`` averaged over rows, then over the two
    directions. The temperature is a parameter when ``learnable`` and is clamped to
    ``temperature_range`` in forward, out of place (the official code clamps the parameter in
    place under no_grad); like ``torch.clamp``, a raw value outside the range gets no gradient.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        learnable: bool = True,
        temperature_range: tuple[float, float] = (0.001, 0.5),
        gather_distributed: bool = False,
    ) -> None:
        super().__init__()
        lo, hi = temperature_range
        if not 0.0 < lo <= hi:
            raise ValueError(
                f"temperature_range must satisfy 0 < low <= high; got {tuple(temperature_range)}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0; got {temperature}")
        self.temperature_range = (float(lo), float(hi))
        self.gather_distributed = gather_distributed
        self.learnable = learnable
        # shape [1], not a 0-d tensor: DeepSpeed (0.19) broadcasts every parameter at start-up as
        # `p.data.view(torch.uint8)`, which a 0-d tensor cannot do
        t = torch.tensor([float(temperature)])
        if learnable:
            self.temp = nn.Parameter(t)
        else:
            self.register_buffer("temp", t)

    @property
    def temperature(self) -> torch.Tensor:
        """The temperature used in forward (a 0-d tensor): the raw value clamped to ``temperature_range``."""
        return self.temp.clamp(*self.temperature_range).reshape(())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # checkpoints written before the temperature had shape [1] hold a 0-d tensor
        key = prefix + "temp"
        if isinstance(state_dict.get(key), torch.Tensor) and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self, a: torch.Tensor, b: torch.Tensor, sample_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if a.dim() != 2 or a.shape != b.shape:
            raise ValueError(f"a and b must both be [B, E]; got {tuple(a.shape)} and {tuple(b.shape)}")
        if sample_ids is not None and tuple(sample_ids.shape) != (a.shape[0],):
            raise ValueError(f"sample_ids must be [B] = {(a.shape[0],)}; got {tuple(sample_ids.shape)}")
        a = F.normalize(a.float(), dim=-1)
        b = F.normalize(b.float(), dim=-1)
        rows = a.shape[0]
        if self.gather_distributed:
            rank = _world()[0]
            a_all, b_all = gather_with_grad(a), gather_with_grad(b)
            ids_all = gather_no_grad(sample_ids) if sample_ids is not None else None
        else:
            rank, a_all, b_all, ids_all = 0, a, b, sample_ids

        if sample_ids is None:
            # the local row i is the global row rank * B + i
            cols = torch.arange(a_all.shape[0], device=a.device)
            positive = cols[None, :] == (torch.arange(rows, device=a.device) + rank * rows)[:, None]
        else:
            positive = sample_ids[:, None] == ids_all[None, :]
        target = positive.float() / positive.sum(dim=1, keepdim=True).float()

        t = self.temperature
        logits_ab = a @ b_all.T / t
        logits_ba = b @ a_all.T / t
        loss_ab = -(target * logits_ab.log_softmax(dim=1)).sum(dim=1).mean()
        loss_ba = -(target * logits_ba.log_softmax(dim=1)).sum(dim=1).mean()
        return (loss_ab + loss_ba) / 2


class CosineDistillLoss(nn.Module):
    """``mean(2 - 2 cos(pred, target))`` over tokens (UMT / official stage-1 distillation).

    ``pred`` and ``target`` are ``[..., D]``, both L2-normalised here; with ``mask`` (shape
    ``pred.shape[:-1]``, True = count this token) only the counted tokens are averaged. The
    target (a teacher's feature) is detached unless ``detach_target`` is False.
    """

    def __init__(self, detach_target: bool = True) -> None:
        super().__init__()
        self.detach_target = detach_target

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(
                f"pred and target must have the same shape; got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if mask is not None and tuple(mask.shape) != tuple(pred.shape[:-1]):
            raise ValueError(f"mask must be {tuple(pred.shape[:-1])}; got {tuple(mask.shape)}")
        if self.detach_target:
            target = target.detach()
        cos = (F.normalize(pred.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(dim=-1)
        loss = 2.0 - 2.0 * cos
        if mask is None:
            return loss.mean()
        w = mask.to(loss.dtype)
        return (loss * w).sum() / w.sum().clamp_min(1.0)


class MatchingLoss(nn.Module):
    """Cross-entropy of 2-way matching logits: ``pos_logits [P, 2]`` → label 1, ``neg_logits [N, 2]`` → 0."""

    def forward(self, pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
        if (
            pos_logits.dim() != 2
            or pos_logits.shape[-1] != 2
            or neg_logits.dim() != 2
            or neg_logits.shape[-1] != 2
        ):
            raise ValueError(
                f"matching logits must be [P, 2] and [N, 2]; got {tuple(pos_logits.shape)} and "
                f"{tuple(neg_logits.shape)}"
            )
        logits = torch.cat([pos_logits, neg_logits], dim=0).float()
        labels = torch.cat(
            [
                torch.ones(pos_logits.shape[0], dtype=torch.long, device=logits.device),
                torch.zeros(neg_logits.shape[0], dtype=torch.long, device=logits.device),
            ]
        )
        return F.cross_entropy(logits, labels)
