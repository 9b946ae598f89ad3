"""Training objectives of the curriculum, as ``nn.Module``s: one home for every loss.

* :class:`InfoNCELoss`: the stage-2 contrastive loss (arXiv 2403.15377 Sec. 3.2; the official VTC,
  used for every pair: video-text, audio-text, video-audio, video-speech, audio+video-text):
  symmetric InfoNCE with a learnable temperature (init 0.07, clamped to [0.001, 0.5]),
  multi-positive targets from sample ids, rows whose modality is absent masked out, and negatives
  gathered from every rank with gradients (:mod:`iv2_lightning.models.distributed`). The module
  layout (a ``gather_distributed`` switch, gather with grads) follows lightly's ``NTXentLoss``.
* :class:`CosineDistillLoss`: the stage-1 UMT-style teacher distillation loss ``mean(2 - 2 cos)``
  (Sec. 3.1), optionally over a subset of tokens.
* :class:`MatchingLoss`: the stage-2 video-text matching loss (official VTM): cross-entropy of the
  2-way matching logits, positives vs the hard negatives (drawn by
  :func:`~iv2_lightning.models.heads.sample_hard_negatives`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.models.distributed import gather_no_grad, gather_with_grad, rank, world_size


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE between paired embeddings ``a [B, E]`` and ``b [B, E]``.

    Both are L2-normalised; ``logits = a @ b_all.T / t`` and ``b @ a_all.T / t`` where ``*_all`` are
    gathered from every rank when ``gather_distributed``. With ``sample_ids [B]``, every column with
    the row's id is a positive and the target spreads evenly over them (the official VTC with
    ``idx``); without, a row's only positive is its own pair. The loss is
    ``-Σ target · log_softmax(logits)`` averaged over rows, then over the two directions. The
    temperature is a parameter when ``learnable`` and is clamped to ``temperature_range`` in
    forward, out of place (the official code clamps the parameter in place under no_grad); like
    ``torch.clamp``, a raw value outside the range gets no gradient.

    ``valid [B]`` (bool) marks the rows whose pair exists (a clip without audio has no video-audio
    pair): the others take part neither as rows nor as columns, and may hold anything, even NaN.
    Across ranks, each rank's rows are gathered with gradients (ranks may hold different numbers of
    rows: they are padded with rows that are not valid), each rank sums the loss of its own valid
    rows against every rank's valid columns and divides by the global number of valid rows, times
    the world size, which DDP's gradient averaging cancels: the gradient is that of the mean over
    every valid row however the rows are spread over the ranks, and every rank joins the same
    collectives whatever its own rows hold. With ``valid``, the loss is None, on every rank alike,
    when fewer than two rows are valid in the whole (gathered) batch.
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
        # the (detached) temperature of the last forward: under DeepSpeed ZeRO-3 a parameter is only
        # whole inside its module's forward, so code that needs the value elsewhere reads it here
        self.last_temperature: torch.Tensor | None = None

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
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        sample_ids: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        if a.dim() != 2 or a.shape != b.shape:
            raise ValueError(f"a and b must both be [B, E]; got {tuple(a.shape)} and {tuple(b.shape)}")
        for name, x in (("sample_ids", sample_ids), ("valid", valid)):
            if x is not None and tuple(x.shape) != (a.shape[0],):
                raise ValueError(f"{name} must be [B] = {(a.shape[0],)}; got {tuple(x.shape)}")
        t = self.temperature
        self.last_temperature = t.detach()
        masked = valid is not None
        valid = valid.bool() if masked else torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
        a = F.normalize(a.float(), dim=-1)
        b = F.normalize(b.float(), dim=-1)
        world = world_size() if self.gather_distributed else 1
        if world > 1:
            counts = gather_no_grad(torch.tensor([a.shape[0]], device=a.device)).tolist()
            if sample_ids is None:  # a row's pair is its own column: number the rows globally
                sample_ids = torch.arange(a.shape[0], device=a.device) + sum(counts[: rank()])
            a_all, b_all = gather_with_grad(a, counts), gather_with_grad(b, counts)
            ids_all, valid_all = gather_no_grad(sample_ids), gather_no_grad(valid)
        else:
            if sample_ids is None:
                sample_ids = torch.arange(a.shape[0], device=a.device)
            a_all, b_all, ids_all, valid_all = a, b, sample_ids, valid
        # (without a mask every row counts: no host sync for the count)
        total = int(valid_all.sum()) if masked else valid_all.shape[0]
        if masked and total < 2:
            return None
        positive = (sample_ids[:, None] == ids_all[None, :]) & valid_all[None, :]
        target = positive.float() / positive.sum(dim=1, keepdim=True).clamp_min(1).float()

        def row_losses(logits: torch.Tensor) -> torch.Tensor:
            logp = logits.masked_fill(~valid_all[None, :], float("-inf")).log_softmax(dim=1)
            # where, not multiply: target 0 times logp -inf (a column that is not valid) would be NaN
            return -torch.where(positive, target * logp, torch.zeros_like(logp)).sum(dim=1)

        per_row = (row_losses(a @ b_all.T / t) + row_losses(b @ a_all.T / t)) / 2
        return torch.where(valid, per_row, torch.zeros_like(per_row)).sum() * world / max(total, 1)


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
