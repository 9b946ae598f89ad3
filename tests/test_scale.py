"""Scale and interop: strategy configs, `iv2 estimate`, frozen parts and the optimizer, ZeRO-3,
`iv2 export` from Lightning and DeepSpeed ZeRO checkpoints.

Lightning refuses DeepSpeed without CUDA (``DeepSpeedStrategy.setup_environment``), but DeepSpeed
itself runs on the CPU with gloo. The tests that need a real DeepSpeed engine run it in a
subprocess (it initialises a process group and global DeepSpeed state) with a test-only subclass
that skips that one check, so the strategy built from ``configs/strategy/*.yaml`` really trains,
saves a ZeRO checkpoint and is exported.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from gloo_helpers import free_port
from safetensors.torch import load_file

from iv2_lightning.estimate import (
    STRATEGIES,
    ActivationShape,
    activation_bytes,
    build_meta_model,
    count_params,
    estimate_config,
    estimate_main,
    model_state_bytes,
    parse_config,
)
from iv2_lightning.export import export_main
from iv2_lightning.lightning_cli import make_cli
from iv2_lightning.models.backbone import build_video_encoder, count_parameters
from iv2_lightning.models.weights import SHARED_MODULES, unwrap_stage_keys
from iv2_lightning.stages.base import deepspeed_zero_stage

ROOT = Path(__file__).resolve().parents[1]
STRATEGY_DIR = ROOT / "configs" / "strategy"
STRATEGY_CONFIGS = sorted(STRATEGY_DIR.glob("*.yaml"))
TINY_ENCODER = {"image_size": 32, "num_frames": 4, "depth": 1, "patch_size": 8}
#: video-text contrast only: no audio encoder and no fusion, so two bf16 steps on the CPU stay short
VIDEO_TEXT_ONLY = (
    "--data.init_args.modalities=[caption]",
    "--model.init_args.atc=0",
    "--model.init_args.vac=0",
    "--model.init_args.avtc=0",
    "--model.init_args.vsc=0",
    "--model.init_args.vtm=0",
)


def _as_dict(ns):
    return ns.as_dict() if hasattr(ns, "as_dict") else dict(ns)


def _run_script(code: str, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# ------------------------------------------------------------------------------ strategy configs

EXPECTED = {
    "ddp": ("DDPStrategy", None),
    "fsdp": ("FSDPStrategy", None),
    "deepspeed_zero1": ("DeepSpeedStrategy", 1),
    "deepspeed_zero2": ("DeepSpeedStrategy", 2),
    "deepspeed_zero3": ("DeepSpeedStrategy", 3),
    "deepspeed_zero3_offload": ("DeepSpeedStrategy", 3),
}


def test_every_strategy_config_is_tested():
    assert sorted(p.stem for p in STRATEGY_CONFIGS) == sorted(EXPECTED)


@pytest.mark.parametrize("config", STRATEGY_CONFIGS, ids=lambda p: p.stem)
def test_strategy_config_composes_with_a_stage_config_and_resolves(config):
    cfg = parse_config([ROOT / "configs/stage2/1b.yaml", config])
    trainer = cfg["trainer"]
    assert trainer["accelerator"] == "gpu" and trainer["precision"] == "bf16-mixed"
    assert trainer["gradient_clip_val"] == 3.0  # from the stage config, untouched by the fragment
    assert set(yaml.safe_load(config.read_text())) == {"trainer"}  # a fragment of trainer keys only
    assert cfg["model"]["init_args"]["preset"] == "1b"
    class_path = trainer["strategy"]["class_path"]
    init_args = _as_dict(trainer["strategy"]["init_args"])
    cls_name, zero_stage = EXPECTED[config.stem]
    assert class_path == f"lightning.pytorch.strategies.{cls_name}"

    import lightning as L
    from lightning.pytorch import strategies

    if zero_stage is not None:
        pytest.importorskip("deepspeed")
    strategy = getattr(strategies, cls_name)(**init_args)
    if cls_name == "DDPStrategy":
        assert strategy._ddp_kwargs["find_unused_parameters"] is False
        assert strategy._ddp_kwargs["gradient_as_bucket_view"] is True
        return
    if cls_name == "FSDPStrategy":
        from iv2_lightning.models.backbone import DividedBlock
        from iv2_lightning.models.layers import Block

        assert strategy.sharding_strategy.name == "FULL_SHARD"
        assert strategy._state_dict_type == "full"
        policy = strategy.kwargs["auto_wrap_policy"]
        assert {Block, DividedBlock} <= set(policy._module_classes)
        return
    # DeepSpeed: a Trainer (on the CPU: the YAML's accelerator is `gpu`) picks the precision plugin
    # and Lightning formats the config dict DeepSpeed will receive
    assert deepspeed_zero_stage(strategy) == zero_stage
    trainer_obj = L.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=strategy,
        precision=trainer["precision"],
        gradient_clip_val=trainer["gradient_clip_val"],
        logger=False,
        enable_checkpointing=False,
    )
    module = L.LightningModule()
    module.trainer = trainer_obj
    strategy.connect(module)
    strategy._format_config()
    ds = strategy.config
    zero = ds["zero_optimization"]
    assert zero["stage"] == zero_stage
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["gradient_clipping"] == 3.0
    assert ds["train_micro_batch_size_per_gpu"] == 8 and isinstance(ds["train_micro_batch_size_per_gpu"], int)
    assert zero["reduce_bucket_size"] == init_args["reduce_bucket_size"] >= 1e8
    assert zero["allgather_bucket_size"] == init_args["allgather_bucket_size"] >= 1e8
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True
    if config.stem == "deepspeed_zero3_offload":
        assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
        assert zero["offload_param"]["pin_memory"] is True
    else:
        assert "offload_optimizer" not in zero and "offload_param" not in zero


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
@pytest.mark.parametrize("preset", ["1b", "6b"])
def test_large_configs_checkpoint_every_block(stage, preset):
    cfg = parse_config([ROOT / "configs" / stage / f"{preset}.yaml"])
    args = _as_dict(cfg["model"]["init_args"])
    assert args["preset"] == preset and args["encoder"]["grad_checkpointing"] is True


# -------------------------------------------------------------------------------- iv2 estimate


def _saved_bytes(encoder, video) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in encoder.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encoder(video)
    return sum(kept.values())


@pytest.mark.parametrize(
    "kw",
    [
        {"attention": "joint", "norm": "layernorm", "qk_norm": True, "layerscale_init": 1e-5},
        {"attention": "joint", "norm": "layernorm", "qk_norm": False, "layerscale_init": None},
        {"attention": "divided", "norm": "layernorm", "qk_norm": True, "layerscale_init": 0.1},
        {"attention": "joint", "norm": "layernorm", "qk_norm": True, "grad_checkpointing": True},
        {"attention": "joint", "norm": "rmsnorm", "qk_norm": True, "layerscale_init": 1e-5},
    ],
    ids=["joint", "joint-plain", "divided", "checkpointed", "joint-rmsnorm"],
)
def test_activation_formula_matches_what_autograd_keeps(kw):
    """Per block, in fp32 (4 bytes per element): the difference between 4 and 2 blocks."""
    torch.manual_seed(0)
    batch, width = 2, 96
    video = torch.randn(batch, 3, 4, 32, 32)
    measured, predicted = [], []
    for depth in (2, 4):
        enc = build_video_encoder(
            "tiny",
            embed_dim=width,
            mlp_dim=4 * width,
            num_heads=4,
            depth=depth,
            num_frames=4,
            image_size=32,
            patch_size=8,
            clip_embed_dim=64,
            **kw,
        ).train()
        measured.append(_saved_bytes(enc, video))
        predicted.append(
            activation_bytes(ActivationShape.of(enc, batch, mask_ratio=0.0), bytes_per_element=4)
        )
    per_block_measured = (measured[1] - measured[0]) / 2
    per_block_predicted = (predicted[1] - predicted[0]) / 2
    assert per_block_predicted == pytest.approx(per_block_measured, rel=0.03)


def test_activations_follow_masking_checkpointing_and_freezing():
    enc = build_video_encoder("tiny", **{**TINY_ENCODER, "depth": 4})
    full = ActivationShape.of(enc, batch=4, mask_ratio=0.0)
    masked = ActivationShape.of(enc, batch=4, mask_ratio=0.75)
    assert full.tokens == 1 + 64 and masked.tokens == 1 + 16
    assert activation_bytes(masked) < activation_bytes(full)
    assert (
        activation_bytes(full, checkpointed=4)
        < activation_bytes(full, checkpointed=2)
        < activation_bytes(full)
    )
    enc.requires_grad_(False)
    assert activation_bytes(ActivationShape.of(enc, batch=4, mask_ratio=0.0)) == 0.0


def test_meta_build_counts_like_deepspeed_on_the_real_model():
    """The meta-device build gives the parameter count and largest layer that DeepSpeed's own
    ``model_to_params`` reads from the allocated model."""
    deepspeed_stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    cfg = parse_config([ROOT / "configs/stage2/tiny.yaml"])
    class_path, args = cfg["model"]["class_path"], _as_dict(cfg["model"]["init_args"])
    meta, _ = build_meta_model(class_path, args)
    assert all(p.is_meta for p in meta.parameters() if p.numel() > 1)
    trainable, frozen, largest, _ = count_params(meta)
    real = make_cli(["--config", str(ROOT / "configs/stage2/tiny.yaml")], run=False).model
    assert deepspeed_stage3.model_to_params(real) == (trainable + frozen, largest)
    assert frozen == sum(p.numel() for p in real.parameters() if not p.requires_grad) > 0


@pytest.mark.parametrize("preset", ["1b", "6b"])
def test_model_states_agree_with_deepspeeds_estimators(preset):
    ds12 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    ds3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    est = estimate_config([ROOT / f"configs/stage2/{preset}.yaml"])
    p, big = est.trainable, est.largest
    # 6b: the frozen BEATs (90.3M parameters; the BEATs paper gives 90M)
    assert est.frozen == {"1b": 0, "6b": 90_311_792}[preset] and p > 1e9
    for gpus, nodes in ((1, 1), (8, 1), (64, 8)):
        per_node = gpus // nodes

        def ours(strategy, gpus=gpus, nodes=nodes):
            return model_state_bytes(strategy, p, 0, big, gpus, nodes)

        _, gpu2 = ds12.estimate_zero2_model_states_mem_needs(p, per_node, nodes, cpu_offload=False)
        assert ours("zero2").states == pytest.approx(gpu2, abs=1)
        _, gpu3, _ = ds3.estimate_zero3_model_states_mem_needs(
            p, big, per_node, nodes, cpu_offload=False, cpu_offload_params=False
        )
        # DeepSpeed's stage-3 estimator counts 18 bytes per parameter, ours 20 (see estimate.py)
        assert ours("zero3").states - gpu3 == pytest.approx(2 * p / gpus, abs=1)
        cpu_off, gpu_off, _ = ds3.estimate_zero3_model_states_mem_needs(
            p, big, per_node, nodes, cpu_offload=True, cpu_offload_params=True, zero_init=True
        )
        offload = ours("zero3_offload")
        assert offload.states == gpu_off == 4 * big
        assert offload.host_per_node * 1.5 == pytest.approx(cpu_off, rel=1e-9)  # DeepSpeed adds a 1.5 margin


def test_model_states_by_hand_and_with_frozen_parameters():
    t, f, big = 1_000_000, 500_000, 10_000
    rows = {s: model_state_bytes(s, t, f, big, gpus=4) for s in STRATEGIES}
    assert (
        rows["ddp"].states == 4 * (t + f) + 16 * t - 4 * t
    )  # fp32 weights of all, grads + 2 moments of trainable
    assert rows["zero0"].states == 2 * (t + f) + 18 * t
    assert rows["zero1"].states == 2 * (t + f) + 2 * t + 16 * t / 4
    assert rows["zero2"].states == 2 * (t + f) + 18 * t / 4
    assert rows["zero3"].states == 2 * (t + f) / 4 + 18 * t / 4 + 4 * big
    one_gpu = {s: model_state_bytes(s, t, f, big, gpus=1).states for s in ("zero0", "zero1", "zero2")}
    assert len(set(one_gpu.values())) == 1  # nothing to shard over one GPU
    teacher = model_state_bytes("zero2", t, f, big, gpus=4, teacher=1000)
    assert teacher.weights - rows["zero2"].weights == 4000  # an fp32 teacher on every GPU


def test_estimate_prints_the_tables_for_1b_and_6b(capsys):
    assert (
        estimate_main(
            [
                "--config",
                "configs/stage2/1b.yaml",
                "--config",
                "configs/strategy/deepspeed_zero1.yaml",
                "--gpus",
                "8,64",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    est = estimate_config([ROOT / "configs/stage2/1b.yaml"])
    assert f"{est.trainable / 1e6:,.1f}M trainable" in out
    assert "8 GPUs (1 node)" in out and "64 GPUs (8 nodes)" in out
    assert "zero1 *" in out  # the strategy of the composed config is marked
    assert estimate_main(["--config", "configs/stage1/6b.yaml", "--gpus", "256"]) == 0
    out = capsys.readouterr().out
    assert "256 GPUs (32 nodes)" in out and "MaskedVideoStage, preset 6b" in out


def test_6b_at_the_official_scale_fits_with_zero1_not_with_ddp():
    """The official 6B stage 1 ran bf16 ZeRO-1 on 256 GPUs x 8 clips; the estimate must agree that it
    fits an 80 GB GPU, and that plain DDP (16 bytes per parameter) does not."""
    est = estimate_config([ROOT / "configs/stage1/6b.yaml"])
    assert est.by_module["video_encoder"][0] == count_parameters("6b")
    assert count_parameters("6b") == pytest.approx(5.94e9, rel=2e-3)  # the official encoder's size
    rows = {r.strategy: r for r in est.rows(256, 32)}
    act = est.activations()
    assert rows["zero1"].states + act < 80e9 < rows["ddp"].states + act


def test_estimate_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        estimate_main(["--config", "configs/stage2/1b.yaml", "--gpus", "eight"])
    assert "--gpus must be comma-separated integers" in capsys.readouterr().err
    assert estimate_main(["--config", "configs/stage2/missing.yaml"]) == 2


# ------------------------------------------------------------------- frozen parts and ZeRO-3


def test_frozen_modules_and_the_teacher_stay_out_of_the_optimizer():
    from iv2_lightning.stages import ContrastiveStage, MaskedVideoStage

    stage = ContrastiveStage(
        encoder=dict(TINY_ENCODER),
        text={"dim": 64, "depth": 1, "num_heads": 2},
        audio={"dim": 64, "depth": 1, "num_heads": 2},
        fusion={"dim": 64, "depth": 1, "num_heads": 2},
        embed_dim=32,
        freeze=["video_encoder.blocks", "text_encoder"],
    )
    in_optimizer = {
        id(p) for g in stage.configure_optimizers()["optimizer"].param_groups for p in g["params"]
    }
    frozen = {
        id(p)
        for n, p in stage.model.named_parameters()
        if n.startswith(("video_encoder.blocks", "text_encoder"))
    }
    trainable = {id(p) for p in stage.parameters() if p.requires_grad}
    assert frozen and not frozen & in_optimizer and in_optimizer == trainable

    stage1 = MaskedVideoStage(
        encoder=dict(TINY_ENCODER),
        target="teacher",
        teacher="iv2_lightning.models.backbone.VideoEncoder",
        teacher_kwargs=_tiny_encoder_kwargs(),
    )
    teacher_params = {id(p) for p in stage1.model.teacher.parameters()}
    in_optimizer = {
        id(p) for g in stage1.configure_optimizers()["optimizer"].param_groups for p in g["params"]
    }
    assert teacher_params and not teacher_params & in_optimizer
    assert not any("teacher" in k for k in stage1.state_dict())  # never exported or checkpointed


def _tiny_encoder_kwargs() -> dict:
    from iv2_lightning.models.backbone import preset_config

    return preset_config("tiny", **TINY_ENCODER)


def test_the_temperature_is_a_1_element_parameter_and_old_0d_checkpoints_still_load():
    """DeepSpeed (0.19) broadcasts every parameter as ``p.data.view(torch.uint8)`` when it starts,
    which fails for a 0-d tensor; the stage-2 temperature therefore has shape [1] (the DeepSpeed run
    below trains ContrastiveStage), and a checkpoint with the former 0-d value still loads."""
    from iv2_lightning.models.losses import InfoNCELoss

    loss = InfoNCELoss(temperature=0.07)
    assert loss.temp.shape == (1,) and loss.temperature.shape == ()
    loss.load_state_dict({"temp": torch.tensor(0.05)})
    assert loss.temp.shape == (1,) and loss.temperature.item() == pytest.approx(0.05)


@dataclass
class _Out:
    y: torch.Tensor


def test_every_encoder_output_shows_its_tensors_to_zero3():
    """DeepSpeed ZeRO-3 gathers a module's partitioned parameters again for the backward pass through
    hooks on the tensors the module returns, found by ``apply_to_tensors_only`` (tensors, tuples,
    named ones included, lists and dicts). Every model output is a NamedTuple, so it sees them all;
    a dataclass hides them (the engine run below shows what that breaks)."""
    zero_utils = pytest.importorskip("deepspeed.runtime.zero.utils")
    from iv2_lightning.models import (
        AudioEncoder,
        CrossModalFusion,
        HierarchicalTemporalEncoder,
        TextEncoder,
        build_video_encoder,
    )

    def tensors_seen(out) -> list[torch.Tensor]:
        seen: list[torch.Tensor] = []
        zero_utils.apply_to_tensors_only(lambda t: seen.append(t) or t, out)
        return seen

    def tensors_in(out) -> list[torch.Tensor]:
        found: list[torch.Tensor] = []
        stack = [getattr(out, f) for f in out._fields]
        while stack:
            x = stack.pop()
            if isinstance(x, torch.Tensor):
                found.append(x)
            elif isinstance(x, dict):
                stack.extend(x.values())
            elif isinstance(x, (list, tuple)):
                stack.extend(x)
        return found

    torch.manual_seed(0)
    video_encoder = build_video_encoder("tiny", **TINY_ENCODER)
    video = torch.randn(2, 3, 4, 32, 32)
    text_out = TextEncoder(dim=32, depth=1, num_heads=2, max_length=8)(torch.randint(4, 260, (2, 8)))
    outputs = {
        "video": video_encoder(video, return_hidden=1),
        "text": text_out,
        "audio": AudioEncoder(dim=32, depth=1, num_heads=2)(torch.randn(2, 32, 128)),
        "fusion": CrossModalFusion({"video": 128, "text": 32}, dim=32, depth=2, num_heads=2)(
            {"video": video_encoder(video).tokens, "text": text_out.tokens}
        ),
        "temporal": HierarchicalTemporalEncoder(video_encoder, window=4, depth=1, num_heads=2)(
            torch.randn(1, 3, 8, 32, 32)
        ),
    }
    for name, out in outputs.items():
        found, seen = tensors_in(out), tensors_seen(out)
        assert len(found) >= 3 and len(seen) == len(found), name  # every field, list and dict walked
        assert {id(t) for t in seen} == {id(t) for t in found}, name
    assert tensors_seen(_Out(torch.zeros(2))) == []  # what a dataclass output hid


DEEPSPEED_SCRIPT = """
# -- part 1: configs/strategy/deepspeed_zero2.yaml and deepspeed_zero3.yaml through Lightning --------
import json
import os
import sys
import time
import torch
import deepspeed
import deepspeed.comm.torch as dct
dct.build_shm_op = lambda: None  # a shared-memory all-reduce op for CPU ranks: one rank needs none, building it takes a minute
import lightning as L
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy
from iv2_lightning.lightning_cli import make_cli

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])

class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    # test only: Lightning allows DeepSpeed on CUDA only; DeepSpeed itself runs on the CPU with gloo
    @property
    def root_device(self):
        return torch.device("cpu", 0)
    def setup_environment(self):
        super(DeepSpeedStrategy, self).setup_environment()
    def setup_distributed(self):
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

class Losses(L.Callback):
    def __init__(self):
        self.seen = []
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(float(outputs["loss"]))

def fit(strategy_yaml, out, extra, zero_config):
    start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    cli = make_cli(["--config", "configs/stage2/tiny.yaml", "--config", strategy_yaml, "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.max_steps=2", "--trainer.max_epochs=1", "--trainer.limit_val_batches=0",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={out}",
        "--data.init_args.batch_size=2", "--data.init_args.num_workers=0", "--data.init_args.image_size=32",
        "--data.init_args.train_size=8", *extra], run=False)
    torch.save({k: v.detach().clone() for k, v in cli.model.state_dict().items()}, f"{out}/initial.pt")
    cli.trainer.strategy.__class__ = CPUDeepSpeedStrategy  # the strategy object built from the YAML
    # ZeRO-3 keeps parameters under stage3_param_persistence_threshold (1e5 elements) whole; 0 releases
    # every one after use, so every module's output must carry the hooks that gather its weights again
    cli.trainer.strategy.config["zero_optimization"].update(zero_config)
    losses = Losses()
    cli.trainer.callbacks.append(losses)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2
    cli.trainer.save_checkpoint(f"{out}/zero.ckpt")
    params = list(cli.model.parameters())
    # ZeRO-3 keeps only this rank's partition of a released parameter outside the forward pass
    released = sum(p.numel() == 0 for p in params)
    with deepspeed.zero.GatheredParameters(params):  # gathers under ZeRO-3, a no-op under ZeRO-2
        trained = {k: v.detach().clone() for k, v in cli.model.state_dict().items()}
    torch.save(trained, f"{out}/trained.pt")
    info = {"losses": losses.seen, "released": released, "params": len(params),
            "seconds": time.perf_counter() - start}
    json.dump(info, open(f"{out}/run.json", "w"))

out, extra = sys.argv[1], json.loads(sys.argv[3])
fit("configs/strategy/deepspeed_zero2.yaml", out, extra["zero2"], {})
fit("configs/strategy/deepspeed_zero3.yaml", f"{out}/zero3", extra["zero3"], {"stage3_param_persistence_threshold": 0})

# -- part 2: ZeRO-3 with the raw engine --------------------------------------------------------
import dataclasses
from torch import nn
from iv2_lightning.models.backbone import build_video_encoder

deepspeed.init_distributed(dist_backend="gloo")  # a no-op when Lightning's process group is still up
CFG = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "bf16": {"enabled": True},
       "zero_allow_untested_optimizer": True}
TINY = dict(image_size=32, num_frames=4, depth=1, patch_size=8)
x = torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
results = {}

def step(module):
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=CFG)
    try:
        engine.backward(engine(x))
        engine.step()
        return "ok"
    except RuntimeError as err:
        return f"RuntimeError: {err}"

@dataclasses.dataclass
class Out:
    y: torch.Tensor

class Owner(nn.Module):  # owns a parameter directly, like VideoEncoder's cls_token / pos_embed
    def __init__(self, as_dataclass):
        super().__init__()
        self.proj = nn.Linear(3 * 4 * 32 * 32, 64)
        self.w = nn.Parameter(torch.randn(1, 64))
        self.as_dataclass = as_dataclass
    def forward(self, x):
        y = self.proj(x.flatten(1)) * self.w
        return Out(y) if self.as_dataclass else (y,)

class Top(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
    def forward(self, x):
        out = self.inner(x)
        y = out.y if isinstance(out, Out) else out.pooled if hasattr(out, "pooled") else out[0]
        return y.float().pow(2).mean()

results["dataclass"] = step(Top(Owner(True)))
results["tuple"] = step(Top(Owner(False)))
results["video_encoder"] = step(Top(build_video_encoder("tiny", **TINY)))

class WithTeacher(nn.Module):  # a frozen teacher outside the module tree, as MaskedVideoStage keeps it
    def __init__(self, teacher):
        super().__init__()
        self.head = nn.Linear(3 * 4 * 32 * 32, 128)
        self.__dict__["teacher"] = teacher
    def forward(self, x):
        with torch.no_grad():
            self.seen = self.teacher(x.float()).pooled
        return (self.head(x.flatten(1)).float() - self.seen).pow(2).mean()

teacher = build_video_encoder("tiny", **TINY).eval().requires_grad_(False)
with torch.no_grad():
    expected = teacher(x.float()).pooled
numel = sum(p.numel() for p in teacher.parameters())
module = WithTeacher(teacher)
results["teacher_step"] = step(module)
results["teacher_partitioned"] = any(hasattr(p, "ds_id") for p in teacher.parameters())
results["teacher_numel_kept"] = sum(p.numel() for p in teacher.parameters()) == numel
results["teacher_output_equal"] = bool(torch.equal(module.seen, expected))
results["head_partitioned"] = all(hasattr(p, "ds_id") for p in module.head.parameters())
json.dump(results, open(f"{out}/zero3.json", "w"))
"""


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory):
    """One subprocess for every DeepSpeed check (each start costs seconds of imports): the tiny stage 2
    trained two steps by configs/strategy/deepspeed_zero2.yaml (video-text only) and by
    deepspeed_zero3.yaml (every modality, in ``zero3/``), then ZeRO-3 with the raw engine."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    extra = {"zero2": list(VIDEO_TEXT_ONLY), "zero3": []}
    _run_script(DEEPSPEED_SCRIPT, str(out), str(free_port()), json.dumps(extra), timeout=600)
    return out


@pytest.mark.slow
def test_deepspeed_zero3_sees_namedtuples_not_dataclasses_and_leaves_the_teacher_whole(deepspeed_run):
    """With the real DeepSpeed engine: a module that owns a parameter and returns a dataclass fails in
    the backward pass (ZeRO-3 finds no tensor in it to hook, so the parameter is not gathered again),
    the same module returning a tuple trains, and so does the VideoEncoder, which returns a NamedTuple;
    a teacher kept outside the module tree is neither partitioned nor changed, so the stage-1 teacher
    is correct under ZeRO-3."""
    res = json.loads((deepspeed_run / "zero3.json").read_text())
    assert res["tuple"] == "ok"
    assert "must match the size" in res["dataclass"], res
    assert res["video_encoder"] == "ok", res
    assert res["teacher_step"] == "ok" and res["head_partitioned"]
    assert not res["teacher_partitioned"] and res["teacher_numel_kept"] and res["teacher_output_equal"]


# -------------------------------------------------------------------------------- iv2 export


def _stage2_tiny_cli(tmp_path, *extra):
    return make_cli(
        [
            "--config",
            str(ROOT / "configs/stage2/tiny.yaml"),
            "--trainer.fast_dev_run=2",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            "--data.init_args.image_size=32",
            *extra,
        ],
        run=False,
    )


def _shared(model) -> dict[str, torch.Tensor]:
    """The shared modules' tensors of a stage, named relative to its torch model (as exports are)."""
    state = unwrap_stage_keys(model.state_dict())
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in SHARED_MODULES}


def test_export_a_lightning_checkpoint_then_init_from_it(tmp_path, capsys):
    cli = _stage2_tiny_cli(tmp_path, *VIDEO_TEXT_ONLY)
    before = {k: v.clone() for k, v in _shared(cli.model).items()}
    cli.trainer.fit(cli.model, cli.datamodule)
    ckpt = tmp_path / "last.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    trained = _shared(cli.model)
    assert any(not torch.equal(before[k], v) for k, v in trained.items())  # it trained

    out = tmp_path / "weights.safetensors"
    assert export_main([str(ckpt), str(out)]) == 0
    assert "from lightning" in capsys.readouterr().out
    exported = load_file(str(out))
    assert set(exported) == set(trained) and all(v.dtype == torch.float32 for v in exported.values())
    assert all(torch.equal(exported[k], v) for k, v in trained.items())
    loaded = _stage2_tiny_cli(tmp_path, f"--model.init_args.init_from={out}", *VIDEO_TEXT_ONLY).model
    assert set(_shared(loaded)) == set(trained)
    for k, v in _shared(loaded).items():
        assert torch.equal(v, trained[k]), k

    folder = tmp_path / "export"  # the StageTransition layout
    assert export_main([str(ckpt), str(folder)]) == 0
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["stage"] == "stage2" and manifest["preset"] == "tiny" and manifest["global_step"] == 2
    assert manifest["num_tensors"] == len(trained)


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_export_a_deepspeed_zero_checkpoint_then_init_from_it(deepspeed_run, tmp_path, capsys, zero):
    """configs/strategy/deepspeed_zero{2,3}.yaml train the tiny stage 2 for two steps (DeepSpeed engine
    on the CPU), Lightning saves the ZeRO checkpoint folder, `iv2 export` merges it into fp32 weights
    that `init_from` loads unchanged. The ZeRO-3 run has every modality (video, audio, caption,
    speech, fusion, matching), so every encoder's output passes through ZeRO-3's re-gathering hooks."""
    run = deepspeed_run if zero == 2 else deepspeed_run / "zero3"
    cli_args = VIDEO_TEXT_ONLY if zero == 2 else ()
    info = json.loads((run / "run.json").read_text())
    assert len(info["losses"]) == 2 and all(math.isfinite(x) for x in info["losses"]), info
    # ZeRO-3 really partitioned the weights: every one is released (empty) outside the forward pass
    assert info["released"] == (info["params"] if zero == 3 else 0), info
    folder = run / "zero.ckpt"
    assert (folder / "latest").is_file() and list((folder / "checkpoint").glob("*_optim_states.pt"))
    out = tmp_path / "weights.safetensors"
    assert export_main([str(folder), str(out)]) == 0
    assert f"from deepspeed_zero{zero}" in capsys.readouterr().out
    exported = load_file(str(out))
    initial = unwrap_stage_keys(torch.load(run / "initial.pt", weights_only=True))
    trained = unwrap_stage_keys(torch.load(run / "trained.pt", weights_only=True))
    shared = {k for k in trained if k.split(".", 1)[0] in SHARED_MODULES}
    assert set(exported) == shared and all(v.dtype == torch.float32 for v in exported.values())
    if zero == 3:
        assert {k.split(".", 1)[0] for k in shared} >= {
            "video_encoder",
            "text_encoder",
            "audio_encoder",
            "fusion",
        }
    # what configs/stage2/tiny.yaml freezes (the trunk's blocks train at lr x 0.1)
    freeze = yaml.safe_load((ROOT / "configs" / "stage2" / "tiny.yaml").read_text())["model"]["init_args"][
        "freeze"
    ]
    frozen = {k for k in shared if any(k == f or k.startswith(f + ".") for f in freeze)}
    assert frozen and not any(k.startswith("video_encoder.blocks.") for k in frozen)
    for k in shared:
        assert trained[k].dtype == torch.bfloat16  # DeepSpeed computes with bf16 copies ...
        assert torch.equal(exported[k].to(torch.bfloat16), trained[k]), k  # ... of the exported weights
    # frozen weights have no fp32 master: DeepSpeed keeps (and saves) only their bf16 copy
    assert all(torch.equal(exported[k], initial[k].to(torch.bfloat16).float()) for k in frozen)
    trainable = shared - frozen
    assert any(not torch.equal(exported[k], initial[k]) for k in trainable)  # they trained
    # the fp32 master weights, not their bf16 copies: most trained tensors are not bf16-representable
    assert (
        sum(not torch.equal(exported[k], exported[k].bfloat16().float()) for k in trainable)
        > len(trainable) // 2
    )

    loaded = _stage2_tiny_cli(tmp_path, f"--model.init_args.init_from={out}", *cli_args).model
    assert set(_shared(loaded)) == set(exported)
    for k, v in _shared(loaded).items():
        assert torch.equal(v, exported[k]), k


class _Opens:
    """Pickles as a call to ``open``: a file that would run code when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_export_refuses_a_zero_folder_that_would_run_code(tmp_path, capsys):
    tag = tmp_path / "ckpt" / "checkpoint"
    tag.mkdir(parents=True)
    (tmp_path / "ckpt" / "latest").write_text("checkpoint")
    marker = tmp_path / "opened"
    torch.save({"module": {}, "x": _Opens(str(marker))}, tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": 2}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert export_main([str(tmp_path / "ckpt"), str(tmp_path / "w.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "mp_rank_00_model_states.pt would run code from ['io.open']" in err and "--trust-checkpoint" in err
    assert not marker.exists() and not (tmp_path / "w.safetensors").exists()


def test_export_errors_name_the_problem(tmp_path, capsys):
    assert export_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "w.safetensors")]) == 2
    assert "missing.ckpt does not exist" in capsys.readouterr().err
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"backbone.weight": torch.zeros(2)}}, ckpt)
    assert export_main([str(ckpt), str(tmp_path / "w.safetensors")]) == 2
    assert "its keys start with ['backbone']" in capsys.readouterr().err
