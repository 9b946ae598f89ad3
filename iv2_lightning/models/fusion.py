"""Gated cross-modal fusion of video, text, audio and speech tokens (the paper's ``z = Gate(Attention(V, T, A, S))``).

InternVideo2 (arXiv 2403.15377, Sec. 3.2 / stage 2) aligns video with text, audio and speech and
fuses the modalities by cross-attention; the official code does this inside the BERT text encoder's
fusion layers. Here the fusion is one stand-alone module so that any subset of modalities can be
fused: every modality is projected to one shared width (plus a learned modality-type embedding),
then in each layer the tokens of each modality cross-attend to the tokens of every *other* present
modality, and a per-sample gate decides how much of each source modality is added:

    h_m = x_m + Σ_{n ≠ m, n present} g_{m←n} · CA_n(norm(x_m), norm(x_n))
    x_m = h_m + MLP(norm(h_m))

The gate ``g_{m←n}`` is a sigmoid (or, as Flamingo's gated cross-attention, a zero-initialised
tanh, so that the module starts as the identity) of a Linear over the masked-mean summaries of the
query and source modalities. Missing modalities are first-class: a modality can be absent for some
samples (``present`` False) or for the whole batch (left out of the dict); its gates are exactly 0
and the outputs never depend on the values of padded or absent tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from torch import nn

from iv2_lightning.models.attention import Backend, CrossAttention
from iv2_lightning.models.layers import Mlp, masked_mean

GateKind = Literal["sigmoid", "tanh"]


class FusionOutput(NamedTuple):
    """What :class:`CrossModalFusion` returns.

    ``tokens[m]`` is ``[B, L_m, dim]`` (zeros at padded positions and for absent samples);
    ``masks[m]`` is the effective mask (real token of a present sample); ``fused``/``fused_mask``
    concatenate the modalities in the module's modality order; ``pooled`` is the masked mean of
    ``fused``; ``gates[query][source]`` is ``[B]`` from the last layer (0 where either side is
    absent), ``layer_gates`` holds the gates of every layer.

    A NamedTuple so that DeepSpeed ZeRO-3 sees its tensors (see ``VideoEncoderOutput``); ZeRO-3 also
    walks the dicts and lists inside it.
    """

    tokens: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]
    fused: torch.Tensor
    fused_mask: torch.Tensor
    pooled: torch.Tensor
    gates: dict[str, dict[str, torch.Tensor]]
    # an empty tuple, not a list: a NamedTuple default is one object shared by every instance
    layer_gates: Sequence[dict[str, dict[str, torch.Tensor]]] = ()


class FusionLayer(nn.Module):
    """One gated cross-attention layer over all modality pairs, then a shared MLP residual."""

    def __init__(
        self,
        modalities: tuple[str, ...],
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        gate: GateKind = "sigmoid",
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.modalities = modalities
        self.gate_kind = gate
        self.norm_q = nn.ModuleDict({m: nn.LayerNorm(dim) for m in modalities})
        self.norm_kv = nn.ModuleDict({m: nn.LayerNorm(dim) for m in modalities})
        # one cross-attention and one gate per *source* modality: what is read from audio is
        # read the same way whoever asks; the gate still sees the query's summary
        self.cross = nn.ModuleDict({m: CrossAttention(dim, num_heads, backend=backend) for m in modalities})
        self.gate = nn.ModuleDict({m: nn.Linear(2 * dim, 1) for m in modalities})
        if gate == "tanh":
            # Flamingo: tanh(0) = 0, so the layer starts as the identity and opens up as it learns
            for lin in self.gate.values():
                nn.init.zeros_(lin.weight)
                nn.init.zeros_(lin.bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _gate(self, source: str, query_summary: torch.Tensor, source_summary: torch.Tensor) -> torch.Tensor:
        z = self.gate[source](torch.cat([query_summary, source_summary], dim=-1)).squeeze(-1)
        return torch.sigmoid(z) if self.gate_kind == "sigmoid" else torch.tanh(z)

    def forward(
        self, x: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], present: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
        names = list(x)
        q = {m: self.norm_q[m](x[m]) for m in names}
        kv = {m: self.norm_kv[m](x[m]) for m in names}
        q_sum = {m: masked_mean(q[m], masks[m]) for m in names}
        kv_sum = {m: masked_mean(kv[m], masks[m]) for m in names}
        batch = next(iter(x.values())).shape[0]
        device = next(iter(x.values())).device
        zero = torch.zeros(batch, device=device, dtype=next(iter(x.values())).dtype)

        out: dict[str, torch.Tensor] = {}
        gates: dict[str, dict[str, torch.Tensor]] = {}
        for m in self.modalities:
            gates[m] = {}
            for n in self.modalities:
                if n == m:
                    continue
                if m not in x or n not in x:
                    gates[m][n] = zero
                    continue
                both = present[m] & present[n]
                g = self._gate(n, q_sum[m], kv_sum[n])
                # where, not multiply: an absent source must contribute an exact 0, never 0 * NaN
                gates[m][n] = torch.where(both, g, torch.zeros_like(g))
        for m in names:
            h = x[m]
            for n in names:
                if n == m:
                    continue
                both = present[m] & present[n]
                # rows whose source is absent have every key masked: attention() returns zeros there
                ca = self.cross[n](q[m], kv[n], key_padding_mask=masks[n])
                h = h + torch.where(
                    both[:, None, None], gates[m][n][:, None, None] * ca, torch.zeros_like(ca)
                )
            out[m] = h + self.mlp(self.norm2(h))
        return out, gates


class CrossModalFusion(nn.Module):
    """Gated cross-attention fusion of any subset of modalities in a shared space (CMFM).

    ``input_dims`` maps each modality name to its input width, e.g.
    ``{"video": 384, "text": 256, "audio": 256, "speech": 256}``; the dict order is the order of
    the modalities in ``fused``.
    """

    def __init__(
        self,
        input_dims: dict[str, int],
        dim: int = 256,
        depth: int = 1,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        gate: GateKind = "sigmoid",
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        if not input_dims:
            raise ValueError("CrossModalFusion needs at least one modality in input_dims")
        if gate not in ("sigmoid", "tanh"):
            raise ValueError(f"gate must be 'sigmoid' or 'tanh'; got {gate!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1; got {depth}")
        self.input_dims = dict(input_dims)
        self.modalities: tuple[str, ...] = tuple(input_dims)
        self.dim = dim
        self.proj = nn.ModuleDict({m: nn.Linear(d, dim) for m, d in input_dims.items()})
        self.type_embed = nn.ParameterDict({m: nn.Parameter(torch.randn(dim) * 0.02) for m in input_dims})
        self.layers = nn.ModuleList(
            FusionLayer(self.modalities, dim, num_heads, mlp_ratio, gate, backend) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.last_gates: dict[str, dict[str, torch.Tensor]] | None = None

    def _validate(
        self,
        tokens: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor],
        present: dict[str, torch.Tensor],
    ) -> int:
        if not tokens:
            raise ValueError(f"CrossModalFusion got no modality; expected some of {list(self.modalities)}")
        for where, d in (("tokens", tokens), ("masks", masks), ("present", present)):
            for m in d:
                if m not in self.input_dims:
                    raise ValueError(
                        f"unknown modality {m!r} in {where}; expected one of {list(self.modalities)}"
                    )
        batch = None
        for m, t in tokens.items():
            width = self.input_dims[m]
            if t.dim() != 3 or t.shape[-1] != width:
                raise ValueError(f"tokens[{m!r}] must be [B, L, {width}]; got {tuple(t.shape)}")
            if batch is None:
                batch = t.shape[0]
            elif t.shape[0] != batch:
                raise ValueError(
                    f"tokens[{m!r}] has batch size {t.shape[0]}; expected {batch} like the other modalities"
                )
        for m, mask in masks.items():
            if m not in tokens:
                continue
            expected = tuple(tokens[m].shape[:2])
            if tuple(mask.shape) != expected:
                raise ValueError(f"masks[{m!r}] must be [B, L] = {expected}; got {tuple(mask.shape)}")
        for m, p in present.items():
            if m not in tokens:
                continue
            if tuple(p.shape) != (batch,):
                raise ValueError(f"present[{m!r}] must be [B] = {(batch,)}; got {tuple(p.shape)}")
        return batch

    def forward(
        self,
        tokens: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor] | None = None,
        present: dict[str, torch.Tensor] | None = None,
    ) -> FusionOutput:
        """Fuse ``tokens[m] [B, L_m, D_m]``; ``masks[m] [B, L_m]`` and ``present[m] [B]`` are True = real."""
        masks = masks or {}
        present = present or {}
        batch = self._validate(tokens, masks, present)
        names = [m for m in self.modalities if m in tokens]

        x: dict[str, torch.Tensor] = {}
        eff_mask: dict[str, torch.Tensor] = {}
        eff_present: dict[str, torch.Tensor] = {}
        for m in names:
            t = tokens[m]
            mask = masks.get(m)
            mask = torch.ones(t.shape[:2], dtype=torch.bool, device=t.device) if mask is None else mask.bool()
            p = present.get(m)
            p = torch.ones(batch, dtype=torch.bool, device=t.device) if p is None else p.bool()
            mask = mask & p[:, None]
            # a sample whose tokens are all padding counts as absent for this modality
            p = p & mask.any(dim=1)
            eff_mask[m], eff_present[m] = mask, p
            # zero the padded inputs first, so that nothing below can see their values (even NaN)
            t = torch.where(mask[..., None], t, torch.zeros_like(t))
            x[m] = self.proj[m](t) + self.type_embed[m]

        layer_gates = []
        for layer in self.layers:
            x, gates = layer(x, eff_mask, eff_present)
            layer_gates.append(gates)

        out_tokens = {}
        for m in names:
            y = self.norm(x[m])
            out_tokens[m] = torch.where(eff_mask[m][..., None], y, torch.zeros_like(y))
        fused = torch.cat([out_tokens[m] for m in names], dim=1)
        fused_mask = torch.cat([eff_mask[m] for m in names], dim=1)
        pooled = masked_mean(fused, fused_mask)
        gates = layer_gates[-1]
        self.last_gates = {q: {s: g.detach() for s, g in row.items()} for q, row in gates.items()}
        return FusionOutput(
            tokens=out_tokens,
            masks=eff_mask,
            fused=fused,
            fused_mask=fused_mask,
            pooled=pooled,
            gates=gates,
            layer_gates=layer_gates,
        )
