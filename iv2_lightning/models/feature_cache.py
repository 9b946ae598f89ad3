"""Memoise a frozen encoder on the content of its input clips.

A stage that keeps its video trunk frozen (stage 3, the probes, the stage-2 HTE over a frozen trunk)
computes the same trunk tokens for the same clip in every epoch: with 5 epochs, 4 of every 5 trunk
forwards are repeats. :class:`FeatureCache` wraps one method of a module (``VideoEncoder.embed_tokens``:
the tokens of whole, unmasked clips before the attention pool) and returns the stored rows for the
clips it has seen, computing only the others as a smaller batch.

The key of a clip is the SHA-1 of its input bytes (with shape and dtype), so the cache needs no clip
ids and is exact by construction: an augmented or re-rendered clip is a different key and is
computed, never answered from a neighbour. A call is passed through untouched (computed, not stored)
whenever the result could differ from a fresh forward: gradients wanted (some parameter of the
wrapped part trains, or the input requires grad), or a stochastic layer (dropout, drop-path) active.
Weights written in place after rows were stored (``load_state_dict``, a resumed checkpoint) empty the
cache before the next lookup.
Rows computed in a different batch agree with a whole-batch forward to float rounding (about 1e-6).

Memory: one row of tokens per distinct clip (the tiny trunk: 65 x 128 floats = 33 kB), at most
``max_items`` rows, least recently used dropped first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import nn

from iv2_lightning.models.layers import DropPath

CACHE_ATTR = "_feature_cache"


def _stochastic(modules: Iterable[nn.Module]) -> bool:
    for m in modules:
        if not m.training:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if isinstance(m, DropPath) and m.active:
            return True
    return False


class FeatureCache:
    """Memoise ``fn(x) -> Tensor [B, ...]`` row by row on the bytes of ``x [B, ...]``.

    ``params``: the parameters ``fn`` uses (a call while one of them requires grad is passed
    through); ``modules``: the modules it runs (a call while one of them has active dropout or
    drop-path is passed through)."""

    def __init__(
        self,
        fn: Callable[[torch.Tensor], torch.Tensor],
        params: Iterable[nn.Parameter],
        modules: Iterable[nn.Module],
        max_items: int = 200_000,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1; got {max_items}")
        self.fn = fn
        self.params = list(params)
        self.modules = list(modules)
        self.max_items = max_items
        self.rows: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = self.misses = self.passed = 0
        self.version = self._weights_version()

    def cacheable(self, x: torch.Tensor) -> bool:
        # a parameter that trains makes stored rows stale at the next step, with or without autograd
        if x.requires_grad or any(p.requires_grad for p in self.params):
            return False
        return not _stochastic(self.modules)

    def _weights_version(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.params)  # bumped by every in-place write (load_state_dict)

    @staticmethod
    def key(row: torch.Tensor) -> bytes:
        data = row.detach().contiguous().cpu()
        digest = hashlib.sha1(data.view(torch.uint8).reshape(-1).numpy().data)
        digest.update(f"{tuple(data.shape)}{data.dtype}".encode())
        return digest.digest()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cacheable(x):
            self.passed += 1
            return self.fn(x)
        version = self._weights_version()
        if version != self.version:  # new weights were loaded into the wrapped part: forget its rows
            self.rows.clear()
            self.version = version
        keys = [self.key(row) for row in x]
        missing = [i for i, k in enumerate(keys) if k not in self.rows]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        computed: dict[int, torch.Tensor] = {}
        if missing:
            out = self.fn(x if len(missing) == len(keys) else x[missing])
            for j, i in enumerate(missing):
                computed[i] = out[j]
                # a clone: a view would keep the whole batch's storage alive
                self.rows[keys[i]] = out[j].detach().clone()
                while len(self.rows) > self.max_items:
                    self.rows.popitem(last=False)
            if len(missing) == len(keys):
                return out
        rows = []
        for i, k in enumerate(keys):
            if i in computed:
                rows.append(computed[i])
            else:
                self.rows.move_to_end(k)
                rows.append(self.rows[k])
        return torch.stack(rows)

    def clear(self) -> None:
        self.rows.clear()
        self.hits = self.misses = self.passed = 0


def trunk_parameters(encoder: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The named parameters ``embed_tokens`` uses: all of the encoder's but its attention pool."""
    return [(n, p) for n, p in encoder.named_parameters() if not n.startswith("clip_projector.")]


def cache_video_trunk(encoder: nn.Module, max_items: int = 200_000) -> FeatureCache:
    """Memoise ``encoder.embed_tokens`` (a :class:`~iv2_lightning.models.backbone.VideoEncoder`'s
    tokens of whole clips, before its attention pool) in place; the module's parameters, state dict
    and every other call are unchanged. Returns the cache (also at ``encoder._feature_cache``)."""
    existing = getattr(encoder, CACHE_ATTR, None)
    if existing is not None:
        return existing
    cache = FeatureCache(
        encoder.embed_tokens,
        [p for _, p in trunk_parameters(encoder)],
        [m for n, m in encoder.named_modules() if not n.startswith("clip_projector")],
        max_items=max_items,
    )
    encoder.embed_tokens = cache  # an instance attribute: shadows the method, not a submodule
    setattr(encoder, CACHE_ATTR, cache)
    return cache


__all__ = ["FeatureCache", "cache_video_trunk", "trunk_parameters"]
