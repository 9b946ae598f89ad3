"""BaseStage: the Lightning shell every curriculum stage shares, so a stage file holds only its objective.

A stage is a torch model (``models/``: the math, usable in a plain PyTorch loop) plus a thin
LightningModule that builds it, calls it in ``training_step`` and logs. This template follows
torchgeo's ``trainers/base.py`` (``BaseTask``): the constructor saves the hyperparameters and calls the
hooks, so a subclass overrides hooks and has nothing to remember to call:

* :meth:`build_model` (abstract) returns the stage's torch model, kept as ``self.model``; it
  holds the shared modules under fixed names (:data:`SHARED_MODULES`), so weights move from stage to
  stage by name (``init_from``) and ``StageTransition`` knows what to export. (Not Lightning's
  ``configure_model``: the Trainer calls that hook again at every fit, validate and test, which would
  build a second model, inside ``deepspeed.zero.Init`` under ZeRO-3 where it cannot be built);
* :meth:`configure_metrics` (optional) builds the torchmetrics the stage updates in evaluation;
* :meth:`compute_loss` (abstract) returns a dict with a ``loss`` tensor (other scalar entries are
  logged as ``train/<key>``);
* :meth:`batch_contract` (optional) names the batch fields each switched-on loss term needs; a fit
  whose data does not provide one fails at the start, naming the term and the field.

What the base owns for every stage: ``init_from`` (loaded into the model after it is built) and
``freeze`` (parameter names or prefixes of the model that do not train, kept out of the optimizer and
put in eval mode); AdamW with betas (0.9, 0.98) and weight decay 0.05 except norms, biases,
positional embeddings, tokens and temperatures (the official InternVideo2 recipe) and per-prefix
learning-rate multipliers (``lr_mult``); linear warmup then cosine decay, stepped every batch; bad
steps: non-finite inputs (video, audio), losses or gradients skip the step (no optimizer update) and
are counted (``train/bad_steps``), and ``max_bad_steps`` in a row stop the run with a message that
says so; the gradient norm is logged before each optimizer step (``train/grad_norm``, before
clipping). Names in ``freeze``, ``lr_mult`` and ``init_prefix_map`` are relative to the model
(``video_encoder.blocks``), as in an export. ``compile``: ``torch.compile`` each repeated block of
the model (regional compilation, :mod:`iv2_lightning.models.compile`); the first training step then
includes the compilation, and parameter names and checkpoints stay as in eager mode.
``cache_frozen``: a frozen video trunk's tokens are computed once per distinct clip and read back in
later epochs and validations (:mod:`iv2_lightning.models.feature_cache`; exact, keyed on the clip's
bytes), for stages that keep the trunk frozen on fixed clips (stage 3, probes, the stage-2 HTE).
"""

from __future__ import annotations

import abc
import inspect
import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from typing import Any

import lightning as L
import torch
from torch import nn

from iv2_lightning.data.batch import VideoBatch
from iv2_lightning.models.audio import AudioEncoder
from iv2_lightning.models.backbone import VideoEncoder, preset_config
from iv2_lightning.models.bert import BERT_PRESETS, BertConfig, BertTextEncoder
from iv2_lightning.models.compile import compile_blocks
from iv2_lightning.models.feature_cache import FeatureCache, cache_video_trunk, trunk_parameters
from iv2_lightning.models.text import HFTextEncoder, TextEncoder, build_tokenizer
from iv2_lightning.models.weights import (
    STAGE_MODEL_PREFIX,
    architecture_of,
    load_shared_weights,
    shared_modules_of,
)

log = logging.getLogger(__name__)

_NO_DECAY_NAMES = (
    "pos_embed",
    "cls_token",
    "mask_token",
    "query",
    "slot_embed",
    "type_embed",
    "temp",
    "gamma",
)

#: batch fields a stage's loss terms can ask for (``VideoBatch.present`` names; ``qa`` = dialogue turns)
BATCH_FIELDS = ("video", "audio", "caption", "speech", "label", "qa")


def deepspeed_zero_stage(strategy: Any) -> int | None:
    """The ZeRO stage of a DeepSpeed strategy (read from its config dict), None for any other strategy."""
    config = getattr(strategy, "config", None)
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    return int(zero.get("stage", 0)) if isinstance(zero, dict) else None


def batch_fields_of(batch: VideoBatch) -> set[str]:
    """The fields a batch carries at all (a field can still be missing for some of its clips)."""
    carried = {
        "video": batch.video,
        "audio": batch.audio,
        "caption": batch.caption_ids,
        "speech": batch.speech_ids,
        "label": batch.label,
        "qa": batch.dialogue_ids,
    }
    return {name for name, value in carried.items() if value is not None}


class BaseStage(L.LightningModule, abc.ABC):
    """Shared optimizer, schedule, ``init_from``, ``freeze`` and bad-step handling around ``self.model``.

    Subclasses take their own arguments and forward the rest with ``**kwargs`` (jsonargparse follows
    ``**kwargs`` into this signature, so configs and typo checks see every argument; Lightning's
    ``save_hyperparameters`` records both) and read their own arguments from ``self.hparams`` in the
    hooks, which this constructor calls.

    ``num_frames``, ``image_size``, ``tokenizer`` and ``max_audio_frames`` come from the data (the CLI
    links them); ``data_fields`` too: the batch fields the data provides, which the batch contract is
    checked against (and stages may default their loss terms to).
    """

    stage_name = "base"

    def __init__(
        self,
        preset: str = "tiny",
        encoder: dict[str, Any] | None = None,
        num_frames: int | None = None,
        image_size: int | None = None,
        tokenizer: str = "byte",
        max_audio_frames: int | None = None,
        data_fields: list[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup: float = 0.05,
        min_lr_ratio: float = 0.01,
        init_from: str | None = None,
        init_prefix_map: dict[str, str] | None = None,
        init_strict: bool = False,
        freeze: list[str] | None = None,
        lr_mult: dict[str, float] | None = None,
        max_bad_steps: int = 5,
        compile: bool = False,
        cache_frozen: bool = False,
    ) -> None:
        super().__init__()
        # collects the arguments of the subclass __init__ too (Lightning walks the __init__ frames)
        self.save_hyperparameters()
        self.preset = preset
        self.encoder_overrides = dict(encoder or {})
        # the data decides the clip geometry (linked by the CLI); explicit encoder overrides win
        if num_frames is not None:
            self.encoder_overrides.setdefault("num_frames", num_frames)
        if image_size is not None:
            self.encoder_overrides.setdefault("image_size", image_size)
        self.encoder_config = preset_config(preset, **self.encoder_overrides)
        self.tokenizer_name = tokenizer
        self.tokenizer = build_tokenizer(tokenizer)
        self.max_audio_frames = max_audio_frames
        unknown = sorted(set(data_fields or ()) - set(BATCH_FIELDS))
        if unknown:
            raise ValueError(
                f"data_fields: unknown field(s) {unknown}; expected names from {list(BATCH_FIELDS)}"
            )
        self.data_fields = None if data_fields is None else {"video", *data_fields}
        self.lr = lr
        self.weight_decay = weight_decay
        self.betas = tuple(betas)
        self.eps = eps
        self.warmup = warmup
        self.min_lr_ratio = min_lr_ratio
        self.lr_mult = {str(k): float(v) for k, v in (lr_mult or {}).items()}
        for key, mult in self.lr_mult.items():
            if not (math.isfinite(mult) and mult > 0):
                raise ValueError(f"lr_mult[{key!r}] must be a positive number; got {mult}")
        self.freeze_names = list(freeze or [])
        self.max_bad_steps = max_bad_steps
        self.bad_steps_in_a_row = 0
        self.bad_steps_total = 0
        self._step_was_bad = False
        self._contract_checked = False
        self.model = self.build_model()
        self.configure_metrics()
        self.init_report: dict[str, Any] | None = None
        if init_from:
            self.init_report = load_shared_weights(
                self.model, init_from, prefix_map=init_prefix_map, strict=init_strict
            )
        if self.freeze_names:
            self.freeze_parameters(self.freeze_names)
        # regional torch.compile of the repeated blocks (models/compile.py); parameter names unchanged
        self.compiled_blocks: list[str] = compile_blocks(self.model) if compile else []
        self.feature_cache: FeatureCache | None = self.cache_frozen_trunk() if cache_frozen else None

    def cache_frozen_trunk(self) -> FeatureCache:
        """Memoise the frozen video trunk's tokens of whole clips (``cache_frozen: true``,
        :mod:`iv2_lightning.models.feature_cache`): later epochs read them instead of recomputing.
        Its attention pool (``clip_projector``) may train; every other trunk parameter must be frozen."""
        encoder = getattr(self.model, "video_encoder", None)
        if not isinstance(encoder, VideoEncoder):
            raise ValueError(
                f"cache_frozen: {type(self.model).__name__} has no VideoEncoder at video_encoder"
            )
        training = [f"video_encoder.{n}" for n, p in trunk_parameters(encoder) if p.requires_grad]
        if training:
            raise ValueError(
                f"cache_frozen: the video trunk trains ({training[0]} and {len(training) - 1} more "
                "parameters), so its tokens change every step; freeze it (freeze: [video_encoder] or its "
                "patch_embed, pos_embed, cls_token and blocks) or set cache_frozen: false"
            )
        return cache_video_trunk(encoder)

    # -- hooks for subclasses ------------------------------------------------------------------

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """Build and return the stage's torch model (kept as ``self.model``)."""

    def configure_metrics(self) -> None:
        """Build the stage's evaluation metrics (torchmetrics ``Metric`` attributes); none by default."""

    @abc.abstractmethod
    def compute_loss(self, batch: VideoBatch) -> dict[str, torch.Tensor]:
        """The training objective of one batch: ``{"loss": tensor, **scalars_to_log}``."""

    def batch_contract(self) -> Mapping[str, Iterable[str]]:
        """``{loss term: batch fields it needs}`` for the terms switched on (names in
        :data:`BATCH_FIELDS`); checked when a fit starts. Nothing by default."""
        return {}

    # -- construction helpers ------------------------------------------------------------------

    def build_video_encoder(self) -> VideoEncoder:
        return VideoEncoder(**self.encoder_config)

    def build_text_encoder(
        self,
        config: dict[str, Any] | None = None,
        model: str = "scratch",
        fusion_width: int | None = None,
        mlm_head: bool = False,
    ) -> nn.Module:
        """``model="scratch"``: a :class:`TextEncoder` over this stage's tokenizer vocabulary with
        ``config`` overrides; ``"bert"``: a :class:`BertTextEncoder` built randomly (``config``: ``preset``
        (a :data:`BERT_PRESETS` name, default ``bert-base``), ``fusion_layer`` and BERT config fields);
        otherwise a local Hugging Face folder: a :class:`BertTextEncoder` when ``fusion_width`` is given
        (BERT fusion layers taking tokens that wide; ``config`` may set ``fusion_layer``), else any encoder
        (:class:`HFTextEncoder`)."""
        if model == "bert" or (model != "scratch" and fusion_width is not None):
            cfg = dict(config or {})
            fusion_layer = cfg.pop("fusion_layer", None) if fusion_width is not None else None
            known = {f.name for f in fields(BertConfig)} | ({"preset"} if model == "bert" else set())
            unknown = sorted(set(cfg) - known)
            if unknown:
                raise ValueError(
                    f"text: unknown BERT setting(s) {unknown}; expected fusion_layer"
                    f"{', preset' if model == 'bert' else ''} or BertConfig fields {sorted(known - {'preset'})}"
                )
            if model != "bert":
                bert, _ = BertTextEncoder.from_pretrained(
                    model, fusion_layer=fusion_layer, encoder_width=fusion_width, mlm_head=mlm_head, **cfg
                )
                return bert
            preset = cfg.pop("preset", "bert-base")
            if preset not in BERT_PRESETS:
                raise ValueError(
                    f"text.preset: unknown BERT preset {preset!r}; expected one of {sorted(BERT_PRESETS)}"
                )
            cfg.setdefault("vocab_size", self.tokenizer.vocab_size)
            cfg.setdefault("pad_token_id", self.tokenizer.pad_id)
            bert_config = BertConfig.from_dict({**asdict(BERT_PRESETS[preset]), **cfg}, source="text")
            return BertTextEncoder(bert_config, fusion_layer, fusion_width, mlm_head)
        if model != "scratch":
            return HFTextEncoder(model, **(config or {}))
        cfg = {"vocab_size": self.tokenizer.vocab_size, "pad_id": self.tokenizer.pad_id, **(config or {})}
        return TextEncoder(**cfg)

    def build_audio_encoder(self, config: dict[str, Any] | None = None) -> nn.Module:
        """The audio encoder ``config`` describes; its ``max_frames`` follows the data's
        ``max_audio_frames`` unless ``config`` sets it.

        ``encoder: patch`` (default): our trainable :class:`AudioEncoder` (the other keys are its
        arguments). ``encoder: beats``: InternVideo2's :class:`~iv2_lightning.models.beats.BEATsEncoder`,
        from ``checkpoint`` (a released BEATs ``.pt``) or randomly from ``preset`` (``beats-iter3``,
        ``tiny``); ``frozen`` (default true, as the official ``freeze_audio``); any other key is a
        ``BEATsConfig`` field (e.g. ``num_mel_bins: 64``, InternVideo2's loader)."""
        cfg = dict(config or {})
        if self.max_audio_frames is not None:
            cfg.setdefault("max_frames", self.max_audio_frames)
        kind = cfg.pop("encoder", "patch")
        if kind == "patch":
            return AudioEncoder(**cfg)
        if kind != "beats":
            raise ValueError(f"model.init_args.audio.encoder must be 'patch' or 'beats'; got {kind!r}")
        from iv2_lightning.models.beats import BEATS_PRESETS, BEATsConfig, BEATsEncoder

        checkpoint, preset = cfg.pop("checkpoint", None), cfg.pop("preset", None)
        frozen, max_frames = bool(cfg.pop("frozen", True)), cfg.pop("max_frames", None)
        if checkpoint is not None:
            if preset is not None:
                raise ValueError("model.init_args.audio: give a BEATs checkpoint or a preset, not both")
            model, report = BEATsEncoder.from_checkpoint(
                checkpoint, frozen=frozen, max_frames=max_frames, **cfg
            )
            log.info(
                "BEATs from %s: %d tensors loaded, unused %s", checkpoint, len(report.loaded), report.unused
            )
            return model
        base = preset or "beats-iter3"
        if base not in BEATS_PRESETS:
            raise ValueError(
                f"model.init_args.audio.preset: unknown BEATs preset {base!r}; known: {sorted(BEATS_PRESETS)}"
            )
        values = {**asdict(BEATS_PRESETS[base]), **cfg}
        return BEATsEncoder(
            BEATsConfig.from_dict(values, source="model.init_args.audio"),
            frozen=frozen,
            max_frames=max_frames,
        )

    def hparams_for(self, model_class: type, **given: Any) -> dict[str, Any]:
        """``model_class``'s constructor arguments: ``given`` ones, and the rest this stage recorded
        under the same names (the stage repeats the model's arguments in its own typed signature,
        which is what configs are checked against, and forwards them here by name)."""
        names = inspect.signature(model_class).parameters
        recorded = {k: self.hparams[k] for k in names if k in self.hparams and k not in given}
        return {**recorded, **given}

    def shared_modules(self) -> dict[str, nn.Module]:
        return shared_modules_of(self.model)

    def architecture(self) -> dict[str, Any]:
        """The shared modules' classes and the video encoder's configuration (for the manifest;
        ``init_from`` checks the tensors themselves, name by name and shape by shape)."""
        arch: dict[str, Any] = architecture_of(self.model)
        arch["video_encoder_config"] = self.encoder_config
        return json.loads(json.dumps(arch, default=str))

    def freeze_parameters(self, names: Iterable[str]) -> list[str]:
        """Stop the model's parameters named ``names`` (or under those prefixes) from training."""
        names = list(names)
        frozen = []
        matched = dict.fromkeys(names, False)
        for pname, p in self.model.named_parameters():
            for n in names:
                if pname == n or pname.startswith(n.rstrip(".") + "."):
                    p.requires_grad_(False)
                    frozen.append(pname)
                    matched[n] = True
        unmatched = [n for n, ok in matched.items() if not ok]
        if unmatched:
            top = sorted({k.split(".")[0] for k, _ in self.model.named_parameters()})
            raise ValueError(f"freeze: no parameter matches {unmatched}; top-level modules are {top}")
        return frozen

    def frozen_modules(self) -> list[str]:
        """Top-level children of the model whose parameters are all frozen."""
        out = []
        for name, child in self.model.named_children():
            params = list(child.parameters())
            if params and not any(p.requires_grad for p in params):
                out.append(name)
        return out

    # -- checkpoints ---------------------------------------------------------------------------

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints written before the stages held a separate torch model name its tensors without
        the ``model.`` prefix: add it, so they still load."""
        state = checkpoint.get("state_dict")
        if isinstance(state, dict) and state and not any(k.startswith(STAGE_MODEL_PREFIX) for k in state):
            checkpoint["state_dict"] = {STAGE_MODEL_PREFIX + k: v for k, v in state.items()}

    # -- the batch contract --------------------------------------------------------------------

    def check_batch_contract(self, provided: Iterable[str], source: str) -> None:
        """Fail naming the term and the field when a switched-on loss term needs a field that
        ``provided`` lacks."""
        provided = set(provided)
        missing = {
            term: sorted(set(fields) - provided)
            for term, fields in self.batch_contract().items()
            if not set(fields) <= provided
        }
        if missing:
            what = "; ".join(f"term {t!r} needs {', '.join(f)}" for t, f in missing.items())
            raise ValueError(
                f"{type(self).__name__}: {what}, which {source} does not provide (it provides "
                f"{sorted(provided)}). Set those terms' weights to 0, or add the fields to the data."
            )

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        fields = getattr(datamodule, "batch_fields", None)
        if fields is not None:
            self.check_batch_contract(fields, f"the data ({type(datamodule).__name__})")
            self._contract_checked = True
        elif self.data_fields is not None:
            self.check_batch_contract(self.data_fields, "the data (data_fields)")
            self._contract_checked = True

    def on_train_epoch_start(self) -> None:
        for name in self.frozen_modules():
            getattr(self.model, name).eval()  # no dropout / drop-path / batch statistics in frozen parts

    def on_train_epoch_end(self) -> None:
        cache = self.feature_cache
        if cache is not None and cache.hits + cache.misses:
            # share of trunk rows read from the cache so far (epoch 1: 0, later epochs of fixed clips: ~1)
            self.log("train/feature_cache_hit_rate", cache.hits / (cache.hits + cache.misses))

    # -- optimisation --------------------------------------------------------------------------

    def parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: weight decay except on norms, biases and position tables, and a learning
        rate of ``lr * lr_mult[prefix]`` for parameters under a prefix of ``lr_mult`` (the longest
        matching prefix wins; e.g. ``{video_encoder.blocks: 0.1}`` fine-tunes a pretrained trunk
        gently while new heads learn at ``lr``)."""
        prefixes = sorted(self.lr_mult, key=len, reverse=True)
        used: set[str] = set()
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, False): [], (1.0, True): []}
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            no_decay = p.ndim <= 1 or any(k in leaf for k in _NO_DECAY_NAMES) or name.endswith(".bias")
            prefix = next((k for k in prefixes if name == k or name.startswith(k + ".")), None)
            if prefix is not None:
                used.add(prefix)
            mult = self.lr_mult[prefix] if prefix is not None else 1.0
            groups.setdefault((mult, no_decay), []).append(p)
        unused = sorted(set(self.lr_mult) - used)
        if unused:
            raise ValueError(
                f"lr_mult names {unused}, which match no trainable parameter of {type(self).__name__} "
                "(a frozen module, or a typo: use module names such as video_encoder.blocks)"
            )
        out = []
        # decayed groups first (the order before lr_mult existed), each by decreasing rate
        for (mult, nd), params in sorted(groups.items(), key=lambda kv: (kv[0][1], -kv[0][0])):
            group: dict[str, Any] = {"params": params, "weight_decay": 0.0 if nd else self.weight_decay}
            if mult != 1.0:
                group["lr"] = self.lr * mult
            out.append(group)
        return out

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameter_groups(), lr=self.lr, betas=self.betas, eps=self.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1000
        if not math.isfinite(total):
            total = 1000
        warmup = int(self.warmup * total) if self.warmup < 1 else int(self.warmup)
        warmup = min(max(warmup, 0), total - 1)
        floor, span = self.min_lr_ratio, max(1, total - warmup)

        def factor(step: int) -> float:
            """Linear warmup from lr / (warmup + 1) to lr, then cosine to lr * min_lr_ratio; as a
            factor, so every group (see ``lr_mult``) follows the curve in proportion."""
            if step < warmup:
                start = 1 / (warmup + 1)
                return start + (1 - start) * step / warmup
            return floor + (1 - floor) * (1 + math.cos(math.pi * min(step - warmup, span) / span)) / 2

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Norm clipping under FSDP goes through the wrapper, which knows the whole (sharded) gradient.

        Lightning's ``FSDPPrecision`` refuses ``gradient_clip_algorithm="norm"`` outright, so every
        stage config (they all set ``gradient_clip_val``) would stop at its first step under
        ``configs/strategy/fsdp.yaml``; ``FullyShardedDataParallel.clip_grad_norm_`` reduces the norm
        over the shards of every rank, which is what clipping a sharded model needs."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        wrapped = getattr(self._trainer.strategy, "model", None) if self._trainer is not None else None
        if (
            gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
            and isinstance(wrapped, FullyShardedDataParallel)
        ):
            wrapped.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log the gradient norm; a non-finite one drops the gradients, so the optimizer leaves every
        parameter as it is (AdamW skips parameters without a gradient), and counts a bad step.

        Under fp16 mixed precision the GradScaler finds overflowing steps and skips them itself (it
        expects a few while it calibrates its scale), so they are not counted here."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.log("train/grad_norm", norm, on_step=True, on_epoch=False)
        trainer = self._trainer
        if trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        if not bool(torch.isfinite(norm)):
            for p in self.parameters():
                p.grad = None
            self._bad(f"a non-finite gradient norm ({norm.item()})")

    # -- steps ---------------------------------------------------------------------------------

    def _bad(self, why: str) -> None:
        self._step_was_bad = True
        self.bad_steps_in_a_row += 1
        self.bad_steps_total += 1
        self.log("train/bad_steps", float(self.bad_steps_total), on_step=True, on_epoch=False)
        log.warning("step %d skipped: %s (%d in a row)", self.global_step, why, self.bad_steps_in_a_row)
        if self.bad_steps_in_a_row >= self.max_bad_steps:
            raise FloatingPointError(
                f"{self.bad_steps_in_a_row} training steps in a row had {why}; stopping "
                f"(max_bad_steps={self.max_bad_steps}). Lower the learning rate or check the data."
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_was_bad = False
        if not self._contract_checked and isinstance(batch, VideoBatch):
            # data that declares nothing: the first batch shows which fields it carries
            self.check_batch_contract(batch_fields_of(batch), "the first training batch")
            self._contract_checked = True

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # after the optimizer step: only a step whose input, loss and gradients were all finite
        # ends a run of bad steps
        if not self._step_was_bad:
            self.bad_steps_in_a_row = 0

    @staticmethod
    def non_finite_input(batch: VideoBatch) -> str | None:
        """Which input of the batch holds NaN or Inf (None when all are finite)."""
        if not bool(torch.isfinite(batch.video).all()):
            return "non-finite values in the input video"
        audio = getattr(batch, "audio", None)
        if (
            isinstance(audio, torch.Tensor)
            and audio.is_floating_point()
            and not bool(torch.isfinite(audio).all())
        ):
            return "non-finite values in the input audio"
        return None

    def training_step(self, batch: VideoBatch, batch_idx: int):
        why = self.non_finite_input(batch)
        if why is not None:
            self._bad(why)
            return None
        out = self.compute_loss(batch)
        loss = out["loss"]
        if not bool(torch.isfinite(loss)):
            self._bad(f"a non-finite loss ({loss.item()})")
            return None
        bs = len(batch)
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                self.log(
                    f"train/{k}", v.detach(), on_step=True, on_epoch=True, prog_bar=k == "loss", batch_size=bs
                )
        return loss
