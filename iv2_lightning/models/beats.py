"""BEATs, the audio encoder of InternVideo2-6B, in the parameter layout of its released checkpoints.

InternVideo2's 6B stage 2 (``multi_modality/models/internvideo2_stage2_audiovisual.py``) encodes the
audio track with a frozen BEATs (Chen et al., "BEATs: Audio Pre-Training with Acoustic Tokenizers",
arXiv 2212.09058; checkpoints from microsoft/unilm ``beats/``) and mean-pools its tokens into
``audio_proj``. The architecture, from the paper and the released ``BEATs.py``/``backbone.py``:

* input: kaldi fbank frames ``[F, bins]`` normalised as ``(fbank - 15.41663) / (2 * 6.55582)``
  (:func:`iv2_lightning.features.fbank.compute_fbank` gives the frames); BEATs was pretrained on
  128 bins, InternVideo2's audio loader feeds 64 (``dataset/av_utils.py``);
* a 16 x 16 patch convolution (no bias) over the spectrogram seen as a 1-channel image, tokens in
  time-major order (time patch, then frequency patch), LayerNorm, a Linear from 512 to 768;
* a convolutional position embedding: a grouped 1-D convolution over the token sequence (kernel 128,
  16 groups) with weight normalisation over the kernel axis, the last output dropped ("same" padding
  for an even kernel), GELU, added to the tokens; then LayerNorm (post-norm variant);
* 12 post-norm transformer layers with DeepNorm residual scaling ``alpha = (2 N) ** 0.25``
  (``x = LN(alpha x + f(x))``), GELU feed-forward 3072;
* a relative position bias from T5-style log buckets (320 buckets over both directions, ``max_distance``),
  one table owned by the first layer and shared by all; with the WavLM gate (``gru_rel_pos``), each
  layer scales the bias per query by ``a (b g - 1) + 2`` with ``a, b = sigmoid`` of a Linear of the
  query (8 outputs summed in two groups of 4) and a learned per-head ``g``.

:class:`BEATsEncoder` keeps the checkpoint's own names (``patch_embedding``, ``encoder.layers.{i}.
self_attn.q_proj``, ``encoder.pos_conv.0.weight_g``, ...), so :meth:`BEATsEncoder.from_checkpoint`
loads a BEATs ``.pt`` (``{"cfg": ..., "model": ...}``) without a name table. It is written for use as
a frozen feature extractor: no dropout, no layer drop, no label predictor. ``forward`` follows our
``AudioEncoder`` convention (raw fbank in, :class:`~iv2_lightning.models.audio.AudioOutput` out:
``cls`` is the mean of the real tokens, InternVideo2's pooling).

Where we differ from the released code, on purpose: a padded patch is one whose 16 frames are all
padding (the released code groups the flattened token sequence into equal runs of frames, which does
not follow the time-major patch grid); the attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (the released code scales the query by 1/32 and
the logits back by 32 after subtracting the row maximum, which cancels in the softmax).
:mod:`iv2_lightning.models.official.reference_beats` is the released equations written out, and the
tests hold the two together.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from iv2_lightning.features.fbank import FBANK_MEAN, FBANK_STD
from iv2_lightning.models.audio import AudioOutput

__all__ = [
    "BEATS_PRESETS",
    "BEATsConfig",
    "BEATsEncoder",
    "BEATsLoadReport",
    "beats_state_from_file",
    "relative_position_buckets",
]


# the released BEATsConfig's field names -> ours
OFFICIAL_NAMES: dict[str, str] = {
    "input_patch_size": "patch_size",
    "embed_dim": "patch_dim",
    "conv_bias": "conv_bias",
    "encoder_layers": "depth",
    "encoder_embed_dim": "dim",
    "encoder_ffn_embed_dim": "mlp_dim",
    "encoder_attention_heads": "num_heads",
    "conv_pos": "conv_pos",
    "conv_pos_groups": "conv_pos_groups",
    "relative_position_embedding": "relative_position",
    "num_buckets": "num_buckets",
    "max_distance": "max_distance",
    "gru_rel_pos": "gated_relative_position",
    "deep_norm": "deep_norm",
    "layer_norm_first": "layer_norm_first",
}
# released fields that only matter for training or for the fine-tuned label predictor
OFFICIAL_IGNORED: frozenset[str] = frozenset(
    {
        "dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "dropout_input",
        "layer_wise_gradient_decay_ratio", "predictor_dropout", "predictor_class", "finetuned_model",
    }
)  # fmt: skip


@dataclass(frozen=True)
class BEATsConfig:
    """BEATs hyper-parameters in our names; :meth:`from_official` reads a checkpoint's ``cfg``."""

    patch_size: int = 16
    patch_dim: int = 512
    conv_bias: bool = False
    depth: int = 12
    dim: int = 768
    mlp_dim: int = 3072
    num_heads: int = 12
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gated_relative_position: bool = True
    deep_norm: bool = True
    layer_norm_first: bool = False
    num_mel_bins: int = 128
    fbank_mean: float = FBANK_MEAN
    fbank_std: float = FBANK_STD
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"BEATs dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.dim % self.conv_pos_groups:
            raise ValueError(
                f"BEATs dim {self.dim} is not divisible by conv_pos_groups {self.conv_pos_groups}"
            )
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("BEATs: deep_norm needs the post-norm layers (layer_norm_first false)")
        if self.num_mel_bins < self.patch_size:
            raise ValueError(
                f"BEATs num_mel_bins {self.num_mel_bins} is smaller than patch_size {self.patch_size}"
            )
        if self.gated_relative_position and self.dim // self.num_heads < 1:
            raise ValueError("BEATs: head width must be >= 1")

    @classmethod
    def from_official(cls, cfg: dict[str, Any], source: str = "cfg", **overrides: Any) -> BEATsConfig:
        """The released ``BEATsConfig`` dict (a checkpoint's ``cfg``) in our fields; ``overrides``
        (our names) win. Unknown keys and activations other than GELU are refused by name."""
        values: dict[str, Any] = {}
        for key, value in cfg.items():
            if key in OFFICIAL_NAMES:
                values[OFFICIAL_NAMES[key]] = value
            elif key == "activation_fn":
                if value != "gelu":
                    raise ValueError(
                        f"{source}: activation_fn {value!r} is not supported (BEATs uses 'gelu')"
                    )
            elif key not in OFFICIAL_IGNORED:
                raise ValueError(f"{source}: unknown BEATs config key {key!r}")
        if values.get("patch_size", 16) <= 0:
            raise ValueError(f"{source}: input_patch_size must be positive; got {values.get('patch_size')}")
        return cls(**{**values, **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "beats") -> BEATsConfig:
        """Our field names (e.g. from YAML); an unknown key is named with the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown BEATs field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


# ``beats-iter3``: the architecture of the released BEATs_iter3 / iter3+ checkpoints (90M parameters;
# a checkpoint's own cfg always wins when it is loaded). ``tiny``: the same equations at test size.
BEATS_PRESETS: dict[str, BEATsConfig] = {
    "beats-iter3": BEATsConfig(),
    "tiny": BEATsConfig(
        patch_dim=32, depth=2, dim=48, mlp_dim=96, num_heads=4, conv_pos=16, conv_pos_groups=4,
        num_buckets=32, max_distance=64,
    ),
}  # fmt: skip


def relative_position_buckets(
    query_len: int, key_len: int, num_buckets: int, max_distance: int, device: torch.device | None = None
) -> torch.Tensor:
    """``[query_len, key_len]`` bucket of each relative position ``key - query`` (T5 / WavLM log
    buckets, bidirectional): half the buckets per direction, exact below a quarter of ``num_buckets``,
    logarithmic up to ``max_distance``, the last bucket beyond."""
    rel = torch.arange(key_len, device=device)[None, :] - torch.arange(query_len, device=device)[:, None]
    half = num_buckets // 2
    exact = half // 2
    bucket = (rel > 0).long() * half
    dist = rel.abs()
    far = (
        exact
        + (
            torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact) * (half - exact)
        ).long()
    )
    far = far.clamp(max=half - 1)
    return bucket + torch.where(dist < exact, dist, far)


class _WeightNormConv1d(nn.Module):
    """Grouped Conv1d whose kernel is ``g * v / ||v||`` with the norm over all axes but the kernel
    axis (``torch.nn.utils.weight_norm(conv, dim=2)``); parameters ``weight_g [1, 1, k]``,
    ``weight_v [out, in/groups, k]``, ``bias``, as the released checkpoints name them."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.kernel, self.groups = kernel, groups
        v = torch.empty(dim, dim // groups, kernel)
        nn.init.normal_(v, std=math.sqrt(4.0 / (kernel * dim)))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(dim))

    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return v * (self.weight_g / v.norm(dim=(0, 1), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, N] -> [B, C, N]
        out = F.conv1d(x, self.weight(), self.bias, padding=self.kernel // 2, groups=self.groups)
        return out[..., : x.shape[-1]]  # an even kernel gives one extra output at the end


class _SelfAttention(nn.Module):
    def __init__(self, cfg: BEATsConfig, owns_bias: bool) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.dim // cfg.num_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.dim)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim)
        self.out_proj = nn.Linear(cfg.dim, cfg.dim)
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        if cfg.relative_position and owns_bias:
            self.relative_attention_bias = nn.Embedding(cfg.num_buckets, cfg.num_heads)
        self.gated = cfg.relative_position and cfg.gated_relative_position
        if self.gated:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, cfg.num_heads, 1, 1))

    def position_bias(self, n: int, device: torch.device) -> torch.Tensor:
        """``[H, n, n]`` from this layer's bucket table (the first layer's, shared by all)."""
        buckets = relative_position_buckets(n, n, self.num_buckets, self.max_distance, device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        scores_bias = None
        if bias is not None:
            scores_bias = bias[None].to(q.dtype)  # [1, H, n, n]
            if self.gated:
                a, g = torch.sigmoid(self.grep_linear(q).view(b, self.num_heads, n, 2, 4).sum(-1)).unbind(-1)
                gate = a * (g * self.grep_a[..., 0] - 1.0) + 2.0  # [B, H, n]
                scores_bias = gate[..., None] * scores_bias
        if key_mask is not None:
            pad = torch.zeros(b, 1, 1, n, dtype=q.dtype, device=q.device).masked_fill(
                ~key_mask[:, None, None, :], float("-inf")
            )
            scores_bias = pad if scores_bias is None else scores_bias + pad
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=scores_bias)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class _Layer(nn.Module):
    def __init__(self, cfg: BEATsConfig, owns_bias: bool) -> None:
        super().__init__()
        self.self_attn = _SelfAttention(cfg, owns_bias)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.final_layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.pre_norm = cfg.layer_norm_first
        self.alpha = (2.0 * cfg.depth) ** 0.25 if cfg.deep_norm else 1.0

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ffn = lambda t: self.fc2(F.gelu(self.fc1(t)))  # noqa: E731
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), key_mask, bias)
            return x + ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(self.alpha * x + self.self_attn(x, key_mask, bias))
        return self.final_layer_norm(self.alpha * x + ffn(x))


class _Transformer(nn.Module):
    def __init__(self, cfg: BEATsConfig) -> None:
        super().__init__()
        self.pos_conv = nn.Sequential(_WeightNormConv1d(cfg.dim, cfg.conv_pos, cfg.conv_pos_groups))
        self.layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(cfg, owns_bias=i == 0) for i in range(cfg.depth))
        self.pre_norm = cfg.layer_norm_first
        self.relative_position = cfg.relative_position

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        if key_mask is not None:
            x = x.masked_fill(~key_mask[..., None], 0.0)  # padding never reaches the position conv
        x = x + F.gelu(self.pos_conv(x.transpose(1, 2))).transpose(1, 2)
        if not self.pre_norm:
            x = self.layer_norm(x)
        bias = (
            self.layers[0].self_attn.position_bias(x.shape[1], x.device) if self.relative_position else None
        )
        for layer in self.layers:
            x = layer(x, key_mask, bias)
        return self.layer_norm(x) if self.pre_norm else x


class BEATsLoadReport(NamedTuple):
    """What :meth:`BEATsEncoder.load_beats_state` did: ``loaded`` our names, ``missing`` ours the file
    lacked, ``unused`` file names not used (the fine-tuned label predictor), ``shared`` the per-layer
    copies of the shared relative-position table (checked equal to the first layer's)."""

    loaded: list[str]
    missing: list[str]
    unused: list[str]
    shared: list[str]


def beats_state_from_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BEATs state dict with torch's newer weight-norm names (``parametrizations.weight.original0``
    / ``original1``) renamed to the released ``weight_g`` / ``weight_v``; a ``beats.`` /
    ``audio_encoder.`` prefix (a BEATs inside a bigger model) dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("audio_encoder.", "beats."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        out[key] = value
    return out


class BEATsEncoder(nn.Module):
    """BEATs over kaldi fbank frames: ``forward(fbank [B, F, bins], frame_mask [B, F] | None) ->
    AudioOutput(cls=mean of real tokens, tokens [B, N, dim], mask [B, N])``.

    ``config``: a :class:`BEATsConfig`, a dict of its fields or a :data:`BEATS_PRESETS` name.
    ``frozen``: no gradients (InternVideo2 freezes BEATs; ``freeze_audio``). ``max_frames``: refuse
    longer inputs (None: any length; the relative bias has no table to outgrow). Frames past the last
    whole 16-frame patch are dropped, as the patch convolution of the released model drops them.
    """

    def __init__(
        self, config: BEATsConfig | dict[str, Any] | str = "beats-iter3", frozen: bool = True,
        max_frames: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if isinstance(config, str):
            if config not in BEATS_PRESETS:
                raise ValueError(f"unknown BEATs preset {config!r}; known: {sorted(BEATS_PRESETS)}")
            config = BEATS_PRESETS[config]
        elif isinstance(config, dict):
            config = BEATsConfig.from_dict(config)
        self.config = cfg = config
        self.dim = self.embed_dim = cfg.dim
        self.num_mel_bins = cfg.num_mel_bins
        self.max_frames = max_frames
        self.patch_embedding = nn.Conv2d(
            1, cfg.patch_dim, cfg.patch_size, stride=cfg.patch_size, bias=cfg.conv_bias
        )
        self.layer_norm = nn.LayerNorm(cfg.patch_dim, eps=cfg.layer_norm_eps)
        self.post_extract_proj = nn.Linear(cfg.patch_dim, cfg.dim) if cfg.patch_dim != cfg.dim else None
        self.encoder = _Transformer(cfg)
        self._init_weights()
        self.frozen = frozen
        if frozen:
            self.requires_grad_(False)

    def _init_weights(self) -> None:
        # BERT-style N(0, 0.02) for every Linear/Embedding; with DeepNorm, the value, output and
        # feed-forward matrices are Xavier-normal scaled by beta = (8 N) ** -0.25 (as BEATs initialises)
        cfg = self.config
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        if cfg.deep_norm:
            beta = (8.0 * cfg.depth) ** -0.25
            for layer in self.encoder.layers:
                a = layer.self_attn
                for lin, gain in ((a.q_proj, 1.0), (a.k_proj, 1.0), (a.v_proj, beta), (a.out_proj, beta),
                                  (layer.fc1, beta), (layer.fc2, beta)):  # fmt: skip
                    nn.init.xavier_normal_(lin.weight, gain=gain)

    def train(self, mode: bool = True) -> BEATsEncoder:
        # a frozen encoder has nothing that behaves differently in training; keep it in eval mode so
        # that hooks and summaries report it as the fixed feature extractor it is
        return super().train(mode and not self.frozen)

    def num_tokens(self, num_frames: int) -> int:
        p = self.config.patch_size
        return (num_frames // p) * (self.num_mel_bins // p)

    def forward(self, fbank: torch.Tensor, frame_mask: torch.Tensor | None = None) -> AudioOutput:
        cfg = self.config
        if fbank.dim() != 3 or fbank.shape[-1] != cfg.num_mel_bins:
            raise ValueError(
                f"BEATsEncoder expects fbank [B, F, {cfg.num_mel_bins}]; got shape {tuple(fbank.shape)}"
            )
        b, frames, _ = fbank.shape
        p = cfg.patch_size
        if frames < p:
            raise ValueError(f"BEATsEncoder: {frames} fbank frames is shorter than one {p}-frame patch")
        if self.max_frames is not None and frames > self.max_frames:
            raise ValueError(
                f"BEATsEncoder: audio has {frames} frames, more than max_frames {self.max_frames}"
            )
        if frame_mask is not None and frame_mask.shape != (b, frames):
            raise ValueError(
                f"BEATsEncoder expects frame_mask [B, F] = {(b, frames)} like fbank; got {tuple(frame_mask.shape)}"
            )
        n_time, n_freq = frames // p, cfg.num_mel_bins // p
        x = (fbank[:, : n_time * p] - cfg.fbank_mean) / (2 * cfg.fbank_std)
        key_mask = None
        if frame_mask is not None:
            frame_mask = frame_mask[:, : n_time * p].to(device=fbank.device, dtype=torch.bool)
            real = frame_mask.view(b, n_time, p).any(-1)  # a patch is padding when all its frames are
            key_mask = real[:, :, None].expand(b, n_time, n_freq).reshape(b, -1)
            key_mask = key_mask | ~key_mask.any(1, keepdim=True)  # an all-padding row attends to everything
            if bool(key_mask.all()):
                key_mask = None
        w = self.patch_embedding.weight
        t = self.patch_embedding(x[:, None].to(w.dtype)).flatten(2).transpose(1, 2)  # [B, T'F', C] time-major
        t = self.layer_norm(t)
        if self.post_extract_proj is not None:
            t = self.post_extract_proj(t)
        tokens = self.encoder(t, key_mask)
        mask = (
            key_mask
            if key_mask is not None
            else torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        )
        weights = mask.to(tokens.dtype)[..., None]
        cls = (tokens * weights).sum(1) / weights.sum(1)
        return AudioOutput(cls=cls, tokens=tokens, mask=mask)

    def load_beats_state(
        self, state: dict[str, torch.Tensor], source: str = "state", strict: bool = True
    ) -> BEATsLoadReport:
        """Load a BEATs state dict (released names; see :func:`beats_state_from_file`). ``strict``:
        a missing tensor or a shape mismatch raises, naming the key and ``source``."""
        state = beats_state_from_file(state)
        own = self.state_dict()
        first = "encoder.layers.0.self_attn.relative_attention_bias.weight"
        shared, unused, loaded = [], [], {}
        for key, value in state.items():
            if key.endswith("self_attn.relative_attention_bias.weight") and key != first and key not in own:
                if first in state and not torch.equal(value, state[first]):
                    raise ValueError(
                        f"{source}: {key} differs from {first}; BEATs shares one relative-position table"
                    )
                shared.append(key)
                continue
            if key not in own:
                unused.append(key)
                continue
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"{source}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)} "
                    "(does the file's cfg match the model's config?)"
                )
            loaded[key] = value
        missing = sorted(set(own) - set(loaded))
        if strict and missing:
            raise ValueError(
                f"{source}: BEATs tensors missing from the file: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
            )
        self.load_state_dict(loaded, strict=False)
        return BEATsLoadReport(sorted(loaded), missing, sorted(unused), sorted(shared))

    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, frozen: bool = True, max_frames: int | None = None, **overrides: Any
    ) -> tuple[BEATsEncoder, BEATsLoadReport]:
        """A released BEATs checkpoint (``{"cfg": {...}, "model": {...}}``, read weights-only, never
        downloaded); ``overrides`` are our config fields the file's cfg does not hold, e.g.
        ``num_mel_bins=64`` for InternVideo2's audio loader."""
        from iv2_lightning.models.official.read import _torch_load

        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(
                f"BEATs checkpoint {str(file)!r} is not a local file; iv2_lightning never downloads models at "
                "run time: download e.g. BEATs_iter3_plus_AS2M.pt from microsoft/unilm (beats/README.md) once "
                "and pass its path"
            )
        ckpt = _torch_load(file)
        if not isinstance(ckpt, dict) or "cfg" not in ckpt or "model" not in ckpt:
            keys = sorted(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise ValueError(
                f"{file}: not a BEATs checkpoint (expected keys 'cfg' and 'model'; found {keys})"
            )
        config = BEATsConfig.from_official(dict(ckpt["cfg"]), source=f"{file} cfg", **overrides)
        model = cls(config, frozen=frozen, max_frames=max_frames)
        return model, model.load_beats_state(dict(ckpt["model"]), source=str(file))

    def extra_repr(self) -> str:
        c = self.config
        return f"depth={c.depth}, dim={c.dim}, heads={c.num_heads}, mel_bins={c.num_mel_bins}, frozen={self.frozen}"
