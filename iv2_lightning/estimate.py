"""``iv2 estimate``: the GPU memory a training config needs, per GPU, under DDP and DeepSpeed ZeRO.

The model of the config is built on the ``meta`` device (shapes only, nothing allocated, so the
``1b`` and ``6b`` presets take a fraction of a second), its trainable, frozen and teacher parameters
are counted, and the memory of one GPU is added up for each strategy and GPU count:

* **model states** (bytes per parameter; ``P`` all parameters, ``T`` the trainable ones, ``N`` the
  data-parallel GPUs, ``L`` the largest layer's parameters) in mixed precision with AdamW, counted
  the way the ZeRO paper does (Rajbhandari et al. 2020, Sec. 3-5) and DeepSpeed's own estimator:

  ==============  ==============  ======================  ================================
  strategy        weights         gradients               optimizer (fp32 master + 2 moments)
  ==============  ==============  ======================  ================================
  ddp             4 P (fp32)      4 T (fp32)              8 T (the weights are the master)
  zero0           2 P (bf16)      2 T + 4 T (bf16, fp32)  12 T
  zero1           2 P             2 T + 4 T / N           12 T / N
  zero2           2 P             6 T / N                 12 T / N
  zero3           2 P / N + 2 L   6 T / N + 2 L           12 T / N
  zero3_offload   2 L             2 L                     0 (host: 18 P / nodes)
  ==============  ==============  ======================  ================================

  The 4-byte gradient is the fp32 copy of the gradient partition that DeepSpeed's ZeRO optimizer
  steps on; ``2 L`` is one gathered layer. At stage 2 this is exactly DeepSpeed's
  ``estimate_zero2_model_states_mem_needs`` (``2 P + 18 P / N``); at stage 3 DeepSpeed's estimator
  counts 18 bytes per parameter where this counts 20 (the bf16 gradient partition and its fp32
  copy both live during the step; DeepSpeed's ``sub_group_size`` bounds the second).
  A teacher (stage 1) is not part of the trained model: it sits whole, in fp32, on every GPU.

* **activations** of the video encoder, analytic: the tensors autograd keeps per token and block
  (``E``: width, ``M``: MLP width, ``H``: heads), with a fused attention kernel (flash / SDPA
  memory-efficient: no ``tokens x tokens`` score matrix is kept, only the output and a per-head
  log-sum-exp)::

      joint block   8 E + 2 M  + 2 E (QK-norm) + 2 E (LayerScale)           elements
      divided block joint + 6 E + 2 E (QK-norm) + 1 E (LayerScale)         (temporal attention)

  times ``tokens x micro-batch``, at 2 bytes per element (bf16), plus the input clip. A checkpointed
  block keeps only its input (``E`` per token) and, in the backward pass, one block is recomputed
  whole at a time. Tokens are the visible ones (``1 + (1 - mask ratio) x T' H' W'``). A frozen video
  encoder keeps nothing. The formula matches the bytes autograd saves for a small encoder in fp32
  (``tests/test_scale.py``); in bf16 a composite RMSNorm kernel (the CPU one) keeps fp32
  intermediates and saves more (measured here: 68 instead of 40 bytes x E per token and block), a
  fused one (CUDA) saves its input. Activations of the other modules (text / audio encoders, the
  stage-1 pixel decoder, heads) are not included.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

GIB = 1024**3
#: rows of the tables, in order
STRATEGIES = ("ddp", "zero0", "zero1", "zero2", "zero3", "zero3_offload")


# -- building a model without memory ----------------------------------------------------------------


def _tensor_factories() -> set:
    try:  # the list torch's own `with torch.device(...)` uses
        from torch.utils._device import _device_constructors

        factories = set(_device_constructors())
    except ImportError:  # pragma: no cover - older/newer torch
        factories = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.arange}
    # schedules such as `torch.linspace(0, rate, depth).tolist()` read values back to the host
    return factories - {torch.linspace, torch.logspace}


class MetaInit(TorchFunctionMode):
    """Like ``with torch.device("meta")``, except ``linspace``/``logspace``, which stay on the CPU
    because construction code reads them back (``.tolist()``) as Python numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.factories = _tensor_factories()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.factories and kwargs.get("device") is None:
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


def parse_config(configs: Sequence[str], extra: Sequence[str] = ()) -> Any:
    """The merged config of ``iv2 fit --config ...`` (links applied), without instantiating anything."""
    from iv2_lightning.data.datamodules import VideoDataModuleBase
    from iv2_lightning.lightning_cli import IV2CLI
    from iv2_lightning.stages.base import BaseStage

    class _ParseOnly(IV2CLI):
        def instantiate_classes(self) -> None:
            pass

    args: list[str] = []
    for c in configs:
        args += ["--config", str(c)]
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it also sees a command line
    try:
        cli = _ParseOnly(
            BaseStage,
            VideoDataModuleBase,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=[*args, *extra],
            run=False,
            seed_everything_default=False,
            auto_configure_optimizers=False,
            parser_kwargs={"allow_abbrev": False},
        )
    finally:
        sys.argv = argv
    return cli.config


def _as_dict(ns: Any) -> dict[str, Any]:
    return ns.as_dict() if hasattr(ns, "as_dict") else dict(ns or {})


def _import(path: str) -> Any:
    module, _, name = path.replace(":", ".").rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_meta_model(class_path: str, init_args: dict[str, Any]) -> tuple[nn.Module, nn.Module | None]:
    """The torch model of a config's stage with meta tensors, and its teachers (or None).

    ``init_from`` is dropped (the shapes do not depend on it); a teacher given as a weights path is
    built as the ``VideoEncoder`` of its ``teacher_kwargs`` (what :func:`build_teacher` does before
    loading the file), so no checkpoint is read.
    """
    args = dict(init_args)
    args["init_from"] = None
    teacher = args.get("teacher")
    if teacher and teacher != "random":  # "random" is built from the student's config, no file to read
        try:
            _import(teacher)
        except (ImportError, AttributeError, ValueError):  # a weights path: the same VideoEncoder, unloaded
            from iv2_lightning.models.backbone import preset_config

            kw = dict(args.get("teacher_kwargs") or {})
            args["teacher"] = "iv2_lightning.models.backbone.VideoEncoder"
            args["teacher_kwargs"] = preset_config(kw.pop("preset", "tiny"), **kw)
    cls = _import(class_path)
    with MetaInit():
        stage = cls(**args)
    # a stage keeps its torch model under `model`; stage 1's frozen teachers sit beside it, outside
    # the module tree (each one whole on every GPU)
    model = getattr(stage, "model", stage)
    teachers = list(getattr(model, "teachers", ()))
    return model, nn.ModuleList(teachers) if teachers else None


# -- counting --------------------------------------------------------------------------------------


def count_params(model: nn.Module) -> tuple[int, int, int, str]:
    """(trainable, frozen, largest layer, its name): a layer is one module's own parameters,
    DeepSpeed's ``model_to_params`` definition; shared tensors are counted once."""
    seen: set[int] = set()
    trainable = frozen = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    largest, largest_name = 0, ""
    for name, m in model.named_modules():
        n = sum(p.numel() for p in m.parameters(recurse=False))
        if n > largest:
            largest, largest_name = n, name
    return trainable, frozen, largest, largest_name


@dataclasses.dataclass
class ActivationShape:
    """What the activation formula needs to know about the video encoder and the batch."""

    batch: int
    tokens: int  # per clip, visible patches + prefix
    patches: int  # per clip, before masking
    width: int
    mlp: int
    heads: int
    depth: int
    attention: str
    qk_norm: bool
    layerscale: bool
    checkpointed: int  # how many blocks (the first ones) are checkpointed
    clip_elements: int  # 3 * T * H * W
    trains: bool  # False when the whole video encoder is frozen

    @classmethod
    def of(cls, encoder: nn.Module, batch: int, mask_ratio: float) -> ActivationShape:
        t, h, w = encoder.grid_size
        n = t * h * w
        visible = n - round(n * mask_ratio)  # the masks drop exactly round(ratio * n)
        blk = encoder.blocks[0]
        attn = blk.attn
        ckpt = encoder.grad_checkpointing
        checkpointed = (
            encoder.depth if ckpt is True else (0 if ckpt is False else min(int(ckpt), encoder.depth))
        )
        return cls(
            batch=batch,
            tokens=visible + encoder.num_prefix,
            patches=n,
            width=encoder.embed_dim,
            mlp=blk.mlp.fc1.out_features,
            heads=attn.num_heads,
            depth=encoder.depth,
            attention=encoder.attention,
            qk_norm=not isinstance(attn.q_norm, nn.Identity),
            layerscale=not isinstance(blk.ls1, nn.Identity),
            checkpointed=checkpointed,
            clip_elements=encoder.patch_embed.in_chans * encoder.num_frames * encoder.image_size**2,
            trains=any(p.requires_grad for p in encoder.parameters()),
        )


def block_elements_per_token(s: ActivationShape) -> float:
    """Elements autograd keeps per token for one block (see the module docstring).

    The per-head log-sum-exp of each attention is fp32 (2 bf16 elements per head)."""
    e, m = s.width, s.mlp
    attn = 6 * e + 2 * e * s.qk_norm + e * s.layerscale + 2 * s.heads
    mlp = 2 * e + 2 * m + e * s.layerscale
    n_attn = 2 if s.attention == "divided" else 1
    return n_attn * attn + mlp


def activation_bytes(
    s: ActivationShape, checkpointed: int | None = None, bytes_per_element: int = 2
) -> float:
    """Bytes of activations kept for the backward pass of one micro-batch of the video encoder.

    ``checkpointed``: how many blocks are checkpointed (default: as configured)."""
    if not s.trains:
        return 0.0
    k = s.checkpointed if checkpointed is None else checkpointed
    tokens = s.batch * s.tokens
    full = block_elements_per_token(s) * tokens
    kept = (s.depth - k) * full + k * s.width * tokens
    if k:
        kept += full  # one checkpointed block recomputed whole during the backward pass
    kept += s.batch * s.clip_elements  # the clip, kept by the patch projection
    return kept * bytes_per_element


# -- model states ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    strategy: str
    weights: float
    grads: float
    optimizer: float
    host_per_node: float = 0.0

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer


def model_state_bytes(
    strategy: str, trainable: int, frozen: int, largest: int, gpus: int, nodes: int = 1, teacher: int = 0
) -> Row:
    """Bytes per GPU of weights, gradients and optimizer state (the table in the module docstring).

    ``teacher`` parameters are added to the weights, fp32, whole on every GPU."""
    t, p, n, big = trainable, trainable + frozen, gpus, largest
    if strategy == "ddp":
        row = Row(strategy, 4 * p, 4 * t, 8 * t)
    elif strategy == "zero0":
        row = Row(strategy, 2 * p, 6 * t, 12 * t)
    elif strategy == "zero1":
        row = Row(strategy, 2 * p, 2 * t + 4 * t / n, 12 * t / n)
    elif strategy == "zero2":
        row = Row(strategy, 2 * p, 6 * t / n, 12 * t / n)
    elif strategy == "zero3":
        row = Row(strategy, 2 * p / n + 2 * big, 6 * t / n + 2 * big, 12 * t / n)
    elif strategy == "zero3_offload":
        # host: bf16 weight partition + fp32 gradient, master and moments of every GPU of the node
        row = Row(strategy, 2 * big, 2 * big, 0.0, host_per_node=(2 * p + 16 * t) / nodes)
    else:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    row.weights += 4 * teacher
    return row


# -- the command -------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConfigEstimate:
    configs: list[str]
    model_class: str
    preset: str
    trainable: int
    frozen: int
    teacher: int
    largest: int
    largest_name: str
    by_module: dict[str, tuple[int, int]]
    act: ActivationShape | None
    mask_ratio: float
    configured_strategy: str | None

    def rows(self, gpus: int, nodes: int) -> list[Row]:
        return [
            model_state_bytes(s, self.trainable, self.frozen, self.largest, gpus, nodes, self.teacher)
            for s in STRATEGIES
        ]

    def activations(self, checkpointed: int | None = None) -> float:
        return activation_bytes(self.act, checkpointed) if self.act is not None else 0.0


def _configured_strategy(trainer_cfg: Any) -> str | None:
    strategy = trainer_cfg.get("strategy") if trainer_cfg is not None else None
    if strategy is None or isinstance(strategy, str):
        return {"ddp": "ddp", "deepspeed_stage_1": "zero1", "deepspeed_stage_2": "zero2"}.get(strategy or "")
    cls = str(strategy.get("class_path", ""))
    init = _as_dict(strategy.get("init_args"))
    if cls.endswith("DDPStrategy"):
        return "ddp"
    if cls.endswith("DeepSpeedStrategy"):
        stage = int(init.get("stage", 2))
        if stage == 3 and init.get("offload_parameters"):
            return "zero3_offload"
        return f"zero{stage}"
    return None


def estimate_config(configs: Sequence[str], batch_size: int | None = None) -> ConfigEstimate:
    cfg = parse_config(configs)
    model_cfg = cfg["model"]
    init_args = _as_dict(model_cfg["init_args"])
    model, teacher = build_meta_model(model_cfg["class_path"], init_args)
    trainable, frozen, largest, largest_name = count_params(model)
    by_module = {}
    for name, child in model.named_children():
        ps = list(child.parameters())
        if ps:
            by_module[name] = (
                sum(p.numel() for p in ps if p.requires_grad),
                sum(p.numel() for p in ps if not p.requires_grad),
            )
    teacher_n = sum(p.numel() for p in teacher.parameters()) if teacher is not None else 0
    mask_ratio = float(getattr(model, "mask_ratio", None) or getattr(model, "video_mask_ratio", 0.0) or 0.0)
    batch = batch_size or int(_as_dict(cfg["data"]["init_args"]).get("batch_size", 1))
    encoder = getattr(model, "video_encoder", None)
    act = ActivationShape.of(encoder, batch, mask_ratio) if encoder is not None else None
    return ConfigEstimate(
        configs=[str(c) for c in configs],
        model_class=str(model_cfg["class_path"]).rpartition(".")[2],
        preset=str(init_args.get("preset")),
        trainable=trainable,
        frozen=frozen,
        teacher=teacher_n,
        largest=largest,
        largest_name=largest_name,
        by_module=by_module,
        act=act,
        mask_ratio=mask_ratio,
        configured_strategy=_configured_strategy(cfg.get("trainer")),
    )


def _gib(x: float) -> str:
    g = x / GIB
    return f"{g:,.2f}" if g < 10 else f"{g:,.1f}"


def _m(n: int) -> str:
    return f"{n / 1e6:,.1f}M"


def _nodes_for(gpus: int, nodes: int | None, per_node: int) -> int:
    return nodes if nodes else max(1, math.ceil(gpus / per_node))


def render(est: ConfigEstimate, gpu_counts: Iterable[int], nodes: int | None, per_node: int, console) -> None:
    from rich.table import Table

    a = est.act
    console.print(
        f"[bold]{' + '.join(est.configs)}[/bold]: {est.model_class}, preset {est.preset}\n"
        f"  parameters: {_m(est.trainable)} trainable, {_m(est.frozen)} frozen"
        + (f", teacher {_m(est.teacher)} (fp32, outside the optimizer)" if est.teacher else "")
        + f"; largest layer {_m(est.largest)} ({est.largest_name})\n  by module: "
        + ", ".join(f"{k} {_m(t)}{f' (+{_m(f)} frozen)' if f else ''}" for k, (t, f) in est.by_module.items())
    )
    if a is not None:
        ckpt = f"{a.checkpointed} of {a.depth} blocks checkpointed" if a.checkpointed else "no checkpointing"
        console.print(
            f"  activations (video encoder, bf16): micro-batch {a.batch} x {a.tokens} tokens "
            f"({a.patches} patches, mask ratio {est.mask_ratio:g}), width {a.width}, MLP {a.mlp}, "
            f"{a.depth} {a.attention} blocks, {ckpt}" + ("" if a.trains else " (frozen: nothing kept)")
        )
    act_cfg, act_all, act_none = est.activations(), est.activations(a.depth if a else 0), est.activations(0)
    for g in gpu_counts:
        n_nodes = _nodes_for(g, nodes, per_node)
        table = Table(
            title=f"{g} GPU{'s' if g > 1 else ''} ({n_nodes} node{'s' if n_nodes > 1 else ''}): GiB per GPU",
            title_justify="left",
        )
        for col in (
            "strategy",
            "weights",
            "grads",
            "optimizer",
            "states",
            "act (ckpt)",
            "act (none)",
            "total",
            "host/node",
        ):
            table.add_column(col, justify="left" if col == "strategy" else "right")
        for row in est.rows(g, n_nodes):
            mark = " *" if row.strategy == est.configured_strategy else ""
            table.add_row(
                row.strategy + mark,
                _gib(row.weights),
                _gib(row.grads),
                _gib(row.optimizer),
                _gib(row.states),
                _gib(act_all),
                _gib(act_none),
                _gib(row.states + act_cfg),
                _gib(row.host_per_node) if row.host_per_node else "-",
            )
        console.print(table)
    console.print(
        "  states = weights + grads + optimizer (bf16 weights, fp32 master + 2 AdamW moments; ddp: fp32 "
        "weights); act (ckpt) / act (none): activations with every / no block checkpointed; total = states + "
        "activations as configured; host/node: CPU memory of the offloaded states; * = the config's strategy. "
        "How each number is computed: `pydoc iv2_lightning.estimate`. Not counted: the CUDA context "
        "(~0.5-1 GiB), communication buckets, activations outside the video encoder (text/audio encoders, "
        "decoders, heads), allocator fragmentation."
    )


def estimate_main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    parser = argparse.ArgumentParser(
        prog="iv2 estimate",
        description="Per-GPU memory of a training config (weights, gradients, optimizer state, activations) "
        "under DDP and DeepSpeed ZeRO 0-3 (+offload), from the model built on the meta device.",
    )
    parser.add_argument(
        "--config", action="append", required=True, help="a config as for `iv2 fit` (repeat to compose)"
    )
    parser.add_argument(
        "--gpus", default="1,8,64", help="GPU counts (data-parallel world sizes), comma-separated"
    )
    parser.add_argument("--nodes", type=int, default=None, help="spread every GPU count over this many nodes")
    parser.add_argument(
        "--gpus-per-node", type=int, default=8, help="without --nodes: nodes = ceil(GPUs / this) (default 8)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="micro-batch per GPU (default: the config's)"
    )
    args = parser.parse_args(argv)
    try:
        gpus = [int(g) for g in args.gpus.split(",") if g.strip()]
    except ValueError:
        parser.error(f"--gpus must be comma-separated integers; got {args.gpus!r}")
    if not gpus or min(gpus) < 1:
        parser.error(f"--gpus must name at least one count >= 1; got {args.gpus!r}")
    if args.nodes is not None and args.nodes < 1:
        parser.error("--nodes must be >= 1")
    for c in args.config:
        if not Path(c).is_file():
            print(f"iv2 estimate: config {c} does not exist", file=sys.stderr)
            return 2
    est = estimate_config(args.config, batch_size=args.batch_size)
    console = Console(width=max(shutil.get_terminal_size().columns, 130))
    render(est, gpus, args.nodes, args.gpus_per_node, console)
    return 0


__all__ = [
    "STRATEGIES",
    "ActivationShape",
    "ConfigEstimate",
    "MetaInit",
    "activation_bytes",
    "build_meta_model",
    "count_params",
    "estimate_config",
    "estimate_main",
    "model_state_bytes",
    "parse_config",
]
