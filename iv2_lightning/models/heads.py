"""Task heads for the three curriculum stages and for fine-tuning.

* Masked video modelling (stage 1, arXiv 2403.15377 Sec. 3.1): ``patchify``/``unpatchify`` and
  normalised pixel targets in the VideoMAE layout (Tong et al. 2022; the Hugging Face
  ``VideoMAEForPreTraining`` loss), a light ``PixelDecoder`` (VideoMAE/MAE decoder: learned mask
  token, fixed 3D sin-cos positions) and ``DistillHead``, the official ``clip_decoder``
  (Linear + LayerNorm; the L2 normalisation lives in the loss, as in UMT).
* Contrastive alignment and matching (stage 2, Sec. 3.2): ``ProjectionHead`` (the official
  ``vision_proj``/``text_proj``), ``MatchingHead`` (``itm_head``) and ``sample_hard_negatives``,
  the official VTM sampling of one negative per query from ``softmax(sim)``.
* Next-token prediction (stage 3, Sec. 3.3): ``CausalDecoder``, a small causal language model over
  a visual memory (cross-attention, or a prefix-LM in the style of SimVLM/PaLI), with greedy and
  nucleus decoding (the loop and sampler of :mod:`~iv2_lightning.models.generation`), and
  ``next_token_loss``.
* Action recognition: ``ClassificationHead``, the official ``clip_projector``-style attention pool
  (or mean pool) + ``fc_norm`` + Linear.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.models.attention import Backend, CrossAttention
from iv2_lightning.models.generation import check_sampling, generate_tokens
from iv2_lightning.models.layers import AttentionPool, Block, masked_mean
from iv2_lightning.models.pos_embed import sincos_3d

HeadKind = Literal["linear", "mlp"]

# --------------------------------------------------------------------------------------------
# Masked video modelling: pixel targets and decoder
# --------------------------------------------------------------------------------------------


def _check_video(video: torch.Tensor, tubelet: int, patch: int) -> None:
    if video.dim() != 5:
        raise ValueError(f"video must be [B, C, T, H, W]; got {tuple(video.shape)}")
    _, _, t, h, w = video.shape
    if t % tubelet or h % patch or w % patch:
        raise ValueError(
            f"video [B, C, T, H, W] = {tuple(video.shape)} is not divisible into tubelets of {tubelet} frames "
            f"and patches of {patch}x{patch}"
        )


def patchify(video: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """``[B, C, T, H, W]`` → ``[B, N, tubelet*patch*patch*C]``.

    Tokens are in (t, h, w) order and the values of one token in (tubelet, patch_h, patch_w,
    channel) order: the VideoMAE / Hugging Face ``VideoMAEForPreTraining`` layout, so a decoder
    trained here predicts the same vector layout as theirs.
    """
    _check_video(video, tubelet, patch)
    b, c, t, h, w = video.shape
    x = video.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # [B, T', H', W', tubelet, p, p, C]
    return x.reshape(b, (t // tubelet) * (h // patch) * (w // patch), tubelet * patch * patch * c)


def unpatchify(
    patches: torch.Tensor, tubelet: int, patch: int, grid: tuple[int, int, int], channels: int = 3
) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[B, N, tubelet*patch*patch*C]`` → ``[B, C, T, H, W]``."""
    gt, gh, gw = grid
    expected = (gt * gh * gw, tubelet * patch * patch * channels)
    if patches.dim() != 3 or tuple(patches.shape[1:]) != expected:
        raise ValueError(
            f"patches must be [B, {expected[0]}, {expected[1]}] for grid {tuple(grid)}, tubelet {tubelet}, "
            f"patch {patch}, {channels} channels; got {tuple(patches.shape)}"
        )
    b = patches.shape[0]
    x = patches.reshape(b, gt, gh, gw, tubelet, patch, patch, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, T', tubelet, H', p, W', p]
    return x.reshape(b, channels, gt * tubelet, gh * patch, gw * patch)


def norm_pixel_targets(
    video: torch.Tensor, tubelet: int, patch: int, normalize: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Pixel targets ``[B, N, tubelet*patch*patch*C]``, normalised per patch and per channel.

    Each channel of each tubelet patch is standardised with its own mean and *unbiased* standard
    deviation: ``(x - mean) / (std + eps)``, exactly VideoMAE's ``norm_pix_loss`` (and Hugging
    Face's port of it). MAE on images puts the eps inside the square root instead; the
    difference is below 1e-5 for natural pixel statistics, but the parity test pins VideoMAE's form.
    """
    x = patchify(video, tubelet, patch)
    if not normalize:
        return x
    b, n, d = x.shape
    c = video.shape[1]
    x = x.float().reshape(b, n, d // c, c)
    mean = x.mean(dim=-2, keepdim=True)
    std = x.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return ((x - mean) / (std + eps)).reshape(b, n, d)


def _check_token_mask(mask: torch.Tensor, batch: int, num_tokens: int) -> int:
    """The number of masked tokens per row; every row must mask the same count."""
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, num_tokens):
        raise ValueError(
            f"mask must be a bool tensor [B, N] = {(batch, num_tokens)} (True = masked); "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    counts = mask.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise ValueError(
            f"every row of the mask must hide the same number of tokens; got counts {counts.tolist()}"
        )
    return int(counts[0])


def pixel_reconstruction_loss(
    pred: torch.Tensor,
    video: torch.Tensor,
    mask: torch.Tensor,
    tubelet: int,
    patch: int,
    normalize: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """MSE between ``pred [B, N_masked, P]`` and the (normalised) pixel targets of the masked tokens.

    ``video`` is ``[B, C, T, H, W]`` in the pixel space the targets should live in (VideoMAE
    un-normalises the ImageNet mean/std first); ``mask [B, N]`` is True where a token was masked.
    """
    if not normalize:
        target = patchify(video, tubelet, patch)
        b, n, d = target.shape
        n_masked = _check_token_mask(mask, b, n)
        _check_pred(pred, b, n_masked, d)
        target = target[mask].reshape(b, n_masked, d)
        return F.mse_loss(pred.float(), target.detach())
    # The same numbers as norm_pixel_targets(...)[mask], computed faster (benchmarks/run.py): only
    # the masked tokens, each (token, channel) standardised over one contiguous row (one var_mean),
    # and pred compared in that (channel, tubelet, p, p) element order, which leaves the mean
    # squared error unchanged.
    _check_video(video, tubelet, patch)
    b, c, t, h, w = video.shape
    x = video.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, T', H', W', C, tubelet, p, p]
    n, k = (t // tubelet) * (h // patch) * (w // patch), tubelet * patch * patch
    n_masked = _check_token_mask(mask, b, n)
    _check_pred(pred, b, n_masked, k * c)
    x = x.reshape(b, n, c, k)[mask].float()  # [B * N_masked, C, K]
    var, mean = torch.var_mean(x, dim=-1, correction=1, keepdim=True)
    target = (x - mean).div_(var.sqrt_().add_(eps))
    pred = pred.float().reshape(b * n_masked, k, c).transpose(1, 2)
    return F.mse_loss(pred, target.detach())


def _check_pred(pred: torch.Tensor, b: int, n_masked: int, d: int) -> None:
    if tuple(pred.shape) != (b, n_masked, d):
        raise ValueError(f"pred must be [B, N_masked, P] = {(b, n_masked, d)}; got {tuple(pred.shape)}")


class PixelDecoder(nn.Module):
    """VideoMAE-style decoder: visible encoder tokens + learned mask tokens → pixels of the masked tokens.

    ``grid`` is the token grid ``(T', H', W')``; ``patch_dim = tubelet*patch*patch*3``. The position
    table is the fixed 3D sin-cos table (VideoMAE uses a fixed table for its decoder too).
    """

    def __init__(
        self,
        encoder_dim: int,
        patch_dim: int,
        grid: tuple[int, int, int],
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        has_cls: bool = True,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.grid = tuple(grid)
        self.num_tokens = grid[0] * grid[1] * grid[2]
        self.has_cls = has_cls
        self.patch_dim = patch_dim
        self.proj = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("pos_embed", sincos_3d(dim, *grid), persistent=False)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                int(dim * mlp_ratio),
                norm="layernorm",
                qk_norm=False,
                qkv_bias=True,
                layerscale_init=None,
                backend=backend,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_dim)

    def forward(self, visible: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``visible [B, (1+) N_visible, encoder_dim]`` in token order, ``mask [B, N]`` True = masked
        → predictions ``[B, N_masked, patch_dim]`` for the masked tokens in token order."""
        b = visible.shape[0]
        n_masked = _check_token_mask(mask, b, self.num_tokens)
        x = visible[:, 1:] if self.has_cls else visible
        n_visible = self.num_tokens - n_masked
        if x.dim() != 3 or x.shape[1] != n_visible:
            raise ValueError(
                f"visible tokens must be [B, {'1 + ' if self.has_cls else ''}{n_visible}, D] for a mask hiding "
                f"{n_masked} of {self.num_tokens} tokens; got {tuple(visible.shape)}"
            )
        x = self.proj(x)
        d = x.shape[-1]
        # scatter the visible tokens back to their grid positions (row-major order of ~mask)
        full = x.new_zeros(b, self.num_tokens, d).masked_scatter(~mask[..., None], x)
        full = torch.where(mask[..., None], self.mask_token.to(x.dtype).expand_as(full), full)
        full = full + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            full = blk(full)
        out = self.head(self.norm(full))
        return out[mask].reshape(b, n_masked, self.patch_dim)


# --------------------------------------------------------------------------------------------
# Distillation, projection and matching
# --------------------------------------------------------------------------------------------


def _linear_or_mlp(in_dim: int, out_dim: int, kind: HeadKind, hidden_dim: int | None) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        hidden = hidden_dim or in_dim
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))
    raise ValueError(f"head kind must be 'linear' or 'mlp'; got {kind!r}")


class DistillHead(nn.Module):
    """Student → teacher feature space: Linear (or Linear-GELU-Linear) + LayerNorm.

    The official stage-1 ``clip_decoder`` is Linear + LayerNorm; the L2 normalisation before the
    cosine loss is done by :class:`~iv2_lightning.models.losses.CosineDistillLoss`.
    """

    def __init__(
        self, in_dim: int, out_dim: int, kind: HeadKind = "linear", hidden_dim: int | None = None
    ) -> None:
        super().__init__()
        self.proj = _linear_or_mlp(in_dim, out_dim, kind, hidden_dim)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class ProjectionHead(nn.Module):
    """Embedding → shared contrastive space (official ``vision_proj``/``text_proj``: one Linear)."""

    def __init__(
        self, in_dim: int, out_dim: int, kind: HeadKind = "linear", hidden_dim: int | None = None
    ) -> None:
        super().__init__()
        self.proj = _linear_or_mlp(in_dim, out_dim, kind, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MatchingHead(nn.Module):
    """Two-way match / no-match logits from a fused embedding (official ``itm_head``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


@torch.no_grad()
def sample_hard_negatives(
    sim: torch.Tensor,
    sample_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    column_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """One hard negative column per row of ``sim [B, N]`` (rows = queries), ``[B]`` long.

    As the official VTM: the column is drawn with ``torch.multinomial`` from ``softmax(sim)`` of the
    row, the row's positives given zero weight. Positives are the columns with the row's sample id
    (``sample_ids [B]`` for rows, ``column_ids [N]`` for columns, defaulting to ``sample_ids`` when
    ``sim`` is square), or the diagonal when no ids are given.
    """
    if sim.dim() != 2:
        raise ValueError(f"sim must be [B, N]; got {tuple(sim.shape)}")
    b, n = sim.shape
    if sample_ids is None:
        if column_ids is not None or b != n:
            raise ValueError(
                f"without sample_ids sim must be square (positives on the diagonal); got {tuple(sim.shape)}"
            )
        positive = torch.eye(b, dtype=torch.bool, device=sim.device)
    else:
        column_ids = sample_ids if column_ids is None else column_ids
        if tuple(sample_ids.shape) != (b,) or tuple(column_ids.shape) != (n,):
            raise ValueError(
                f"sample_ids must be [B] = {(b,)} and column_ids [N] = {(n,)} for sim {tuple(sim.shape)}; "
                f"got {tuple(sample_ids.shape)} and {tuple(column_ids.shape)}"
            )
        positive = sample_ids[:, None] == column_ids[None, :]
    no_negative = positive.all(dim=1)
    if bool(no_negative.any()):
        rows = no_negative.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} of sim have no negative column (every column shares their sample id)")
    # masking with -inf before the softmax is softmax-then-zero renormalised, and cannot underflow
    # to an all-zero row the way zeroing the positives after the softmax can at low temperature
    weights = sim.float().masked_fill(positive, float("-inf")).softmax(dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


# --------------------------------------------------------------------------------------------
# Next-token prediction
# --------------------------------------------------------------------------------------------


class CausalDecoder(nn.Module):
    """A small causal transformer language model conditioned on a memory (video/fused tokens).

    ``mode="cross"``: every layer first cross-attends from the text to the memory
    (``x + CA(norm(x), memory)``), then runs a causal self-attention ``Block``; the decoder layout
    of BLIP / CoCa's text decoder. ``mode="prefix"``: the memory is projected to ``dim`` and
    prepended as a prefix (prefix-LM, SimVLM / PaLI). Prefix tokens attend bidirectionally among
    themselves and never to the text (so they are the same whatever the text); every text token
    sees the whole prefix and the text before it. Logits are returned for the text positions only.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 256,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        max_length: int = 128,
        memory_dim: int | None = None,
        mode: Literal["cross", "prefix"] = "cross",
        pad_id: int = 0,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if mode not in ("cross", "prefix"):
            raise ValueError(f"mode must be 'cross' or 'prefix'; got {mode!r}")
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.mode = mode
        self.pad_id = pad_id
        self.memory_dim = memory_dim or dim
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.blocks = nn.ModuleList(
            Block(
                dim,
                num_heads,
                int(dim * mlp_ratio),
                norm="layernorm",
                qk_norm=False,
                qkv_bias=True,
                layerscale_init=None,
                backend=backend,
            )
            for _ in range(depth)
        )
        if mode == "cross":
            self.cross_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
            self.cross_attn = nn.ModuleList(
                CrossAttention(dim, num_heads, context_dim=self.memory_dim, backend=backend)
                for _ in range(depth)
            )
        else:
            self.memory_proj = nn.Linear(self.memory_dim, dim)
            # marks prefix tokens as "not text" (they get no text position)
            self.prefix_embed = nn.Parameter(torch.zeros(dim))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size)

    def _check(self, ids, mask, memory, memory_mask) -> None:
        if ids.dim() != 2:
            raise ValueError(f"ids must be [B, L]; got {tuple(ids.shape)}")
        b, length = ids.shape
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds max_length {self.max_length}")
        if mask is not None and tuple(mask.shape) != (b, length):
            raise ValueError(f"mask must be [B, L] = {(b, length)}; got {tuple(mask.shape)}")
        if memory is not None:
            if memory.dim() != 3 or memory.shape[0] != b or memory.shape[-1] != self.memory_dim:
                raise ValueError(
                    f"memory must be [B, M, {self.memory_dim}] with B = {b}; got {tuple(memory.shape)}"
                )
            if memory_mask is not None and tuple(memory_mask.shape) != tuple(memory.shape[:2]):
                raise ValueError(
                    f"memory_mask must be [B, M] = {tuple(memory.shape[:2])}; got {tuple(memory_mask.shape)}"
                )

    def forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``ids [B, L]``, ``mask [B, L]`` (True = real), ``memory [B, M, memory_dim]`` → logits ``[B, L, vocab]``."""
        self._check(ids, mask, memory, memory_mask)
        b, length = ids.shape
        x = self.tok_embed(ids) + self.pos_embed[:length]
        if mask is None:
            mask = torch.ones(b, length, dtype=torch.bool, device=ids.device)
        mask = mask.bool()

        if self.mode == "prefix" and memory is not None:
            m = memory.shape[1]
            prefix = self.memory_proj(memory) + self.prefix_embed
            if memory_mask is None:
                memory_mask = torch.ones(b, m, dtype=torch.bool, device=ids.device)
            x = torch.cat([prefix, x], dim=1)
            keys = torch.cat([memory_mask.bool(), mask], dim=1)
            total = m + length
            allowed = torch.ones(total, total, dtype=torch.bool, device=ids.device).tril()
            allowed[:, :m] = True  # everyone sees the whole prefix
            for blk in self.blocks:
                x = blk(x, key_padding_mask=keys, attn_mask=allowed)
            x = x[:, m:]
        else:
            for i, blk in enumerate(self.blocks):
                if self.mode == "cross" and memory is not None:
                    x = x + self.cross_attn[i](self.cross_norms[i](x), memory, key_padding_mask=memory_mask)
                x = blk(x, key_padding_mask=mask, causal=True)
        return self.lm_head(self.norm(x))

    @torch.no_grad()
    def generate(
        self,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor | None,
        bos_id: int,
        eos_id: int,
        max_new_tokens: int,
        top_p: float | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """Decode ``[B, 1 + n]`` ids starting with ``bos_id``; greedy when ``top_p`` is None, else nucleus.

        A row stops at its first ``eos_id`` (kept) and is filled with ``pad_id`` after it; decoding
        stops when every row has stopped or after ``max_new_tokens``. Without a memory, pass
        ``batch_size``. No KV cache: each step reruns the prefix (the decoder is small).
        """
        check_sampling(top_p, temperature)
        if 1 + max_new_tokens > self.max_length:
            raise ValueError(
                f"1 + max_new_tokens = {1 + max_new_tokens} exceeds max_length {self.max_length}"
            )
        if memory is not None:
            b, device = memory.shape[0], memory.device
        else:
            b, device = batch_size or 1, self.pos_embed.device

        def step(ids: torch.Tensor, state: None) -> tuple[torch.Tensor, None]:
            return self(ids, None, memory, memory_mask)[:, -1], None

        prompt = torch.full((b, 1), bos_id, dtype=torch.long, device=device)
        out = generate_tokens(
            step,
            prompt,
            max_new_tokens,
            eos_id=eos_id,
            pad_id=self.pad_id,
            top_p=top_p,
            temperature=temperature,
            generator=generator,
        )
        return out.ids


def next_token_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy of ``logits[:, t]`` against ``ids[:, t + 1]``, counting only real next tokens."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise ValueError(
            f"logits must be [B, L, V] with [B, L] = {tuple(ids.shape)}; got {tuple(logits.shape)}"
        )
    if mask is not None and tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"mask must be [B, L] = {tuple(ids.shape)}; got {tuple(mask.shape)}")
    targets = ids[:, 1:]
    if mask is not None:
        targets = targets.masked_fill(~mask[:, 1:].bool(), ignore_index)
    if not bool((targets != ignore_index).any()):
        # nothing to predict: a zero that still belongs to the graph (cross_entropy would give NaN)
        return logits.sum() * 0.0
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
    )


class NextTokenLoss(nn.Module):
    """:func:`next_token_loss` as a module (for configs)."""

    def __init__(self, label_smoothing: float = 0.0, ignore_index: int = -100) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.ignore_index = ignore_index

    def forward(
        self, logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return next_token_loss(logits, ids, mask, self.label_smoothing, self.ignore_index)


# --------------------------------------------------------------------------------------------
# Action recognition
# --------------------------------------------------------------------------------------------


class ClassificationHead(nn.Module):
    """Tokens ``[B, N, D]`` → class logits ``[B, C]``: pool, LayerNorm (official ``fc_norm``), Linear."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        num_heads: int = 4,
        pool: Literal["attention", "mean"] = "attention",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pool not in ("attention", "mean"):
            raise ValueError(f"pool must be 'attention' or 'mean'; got {pool!r}")
        self.pool_kind = pool
        self.pool = AttentionPool(dim, num_heads) if pool == "attention" else None
        self.fc_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be [B, N, D]; got {tuple(tokens.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(tokens.shape[:2]):
            raise ValueError(f"mask must be [B, N] = {tuple(tokens.shape[:2])}; got {tuple(mask.shape)}")
        pooled = self.pool(tokens, mask) if self.pool is not None else masked_mean(tokens, mask)
        return self.head(self.dropout(self.fc_norm(pooled)))
