"""Section 8 (``--gpu``, needs CUDA): MFU of the ``l14`` stage-2 step in bf16 against a measured
bf16 matmul peak on the same GPU.

The step is ``ContrastiveStage`` at the configs/stage2/l14.yaml sizes (InternVideo2's stage-2
multimodal alignment, arXiv 2403.15377 Sec. 3.2) with bf16 autocast and activation checkpointing;
model FLOPs are counted once without checkpointing (its recomputation is not model work), the MFU
definition of the PaLM paper. ``--gpu-dry-run`` runs the same code on the CPU with the tiny preset.
"""

from __future__ import annotations

import contextlib
import importlib
import time
from collections.abc import Callable

import torch

from benchmarks.config import IMAGE, Settings
from benchmarks.measure import count_flops


def run_gpu(s: Settings, out: dict, meta: dict, dry_run: bool = False) -> None:
    """MFU of the l14 stage-2 step in bf16 against a measured bf16 matmul peak (CUDA).

    ``dry_run`` runs the same code on the CPU with the tiny preset, so the path can be checked on a
    machine without a GPU; its numbers are not reported."""
    if not dry_run and not torch.cuda.is_available():
        meta["gpu"] = {"status": "not run: no GPU lent"}
        return
    device = torch.device("cpu" if dry_run else "cuda")
    batch_size, n, steps = (2, 512, 2) if dry_run else (8, 8192, 10)
    v = run_variant(False, "auto", dry_run, steps, batch_size)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    peak = _bf16_matmul_peak(n, device, sync)
    res = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
        "batch": batch_size,
        "step_s": v["step_s"],
        "step_tflop": v["step_tflop"],
        "matmul_peak_tflops_bf16": peak / 1e12,
        "mfu_bf16": v["step_tflop"] * 1e12 / v["step_s"] / peak,
    }
    meta["gpu"] = {"status": "dry run on CPU (tiny)" if dry_run else "run", **res}
    if not dry_run:
        out["gpu_mfu_bf16_l14_stage2"] = res["mfu_bf16"]
        out["gpu_matmul_peak_tflops_bf16"] = res["matmul_peak_tflops_bf16"]
        out["gpu_l14_stage2_step_s"] = v["step_s"]


@contextlib.contextmanager
def attention_backend(name: str):
    """``sdpa``: flash-attn switched off for the duration; ``flash``: the default ``auto`` dispatch."""
    module = importlib.import_module("iv2_lightning.models.attention")
    can_run = module._flash_can_run
    if name == "sdpa":
        module._flash_can_run = lambda *a: False
    try:
        yield
    finally:
        module._flash_can_run = can_run


def run_variant(compiled: bool, backend: str, dry_run: bool, steps: int, batch_size: int) -> dict:
    """One variant of the stage-2 step: first-step seconds (compilation included), steady step time,
    peak memory, MFU."""
    from iv2_lightning.models.compile import compile_blocks

    device = torch.device("cpu" if dry_run else "cuda")
    preset = "tiny" if dry_run else "l14"
    torch.manual_seed(0)
    stage, opt, batch = _stage_and_batch(dry_run, device, preset, batch_size)
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        with amp:
            loss = stage.compute_loss(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    with attention_backend(backend):
        flops = _model_flops(stage, step)  # eager, before compiling
        names = compile_blocks(stage.model) if compiled else []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        first_loss = step()
        sync()
        first_s = time.perf_counter() - t0
        step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        step_s = (time.perf_counter() - t0) / steps
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {
        "compiled": compiled,
        "backend": backend,
        "blocks_compiled": len(names),
        "batch": batch_size,
        "first_step_s": first_s,
        "step_s": step_s,
        "clips_per_s": batch_size / step_s,
        "step_tflop": flops / 1e12,
        "achieved_tflops": flops / step_s / 1e12,
        "peak_mem_gb": peak_gb,
        "first_loss": first_loss,
    }


def _stage_and_batch(dry_run: bool, device: torch.device, preset: str, batch_size: int):
    """The stage-2 stage (configs/stage2/l14.yaml without init_from; small towers for the dry run),
    its optimiser, and one synthetic batch with every modality, on ``device``."""
    from iv2_lightning.data import SyntheticVideoDataModule
    from iv2_lightning.stages import ContrastiveStage

    big = dict(dim=768, depth=12, num_heads=12)
    kw = (
        dict(
            text=dict(dim=128, depth=2, num_heads=4, max_length=64),
            audio=dict(dim=128, depth=2, num_heads=4),
            fusion=dict(dim=128, depth=1, num_heads=4),
            embed_dim=128,
        )
        if dry_run
        else dict(
            text=dict(big, max_length=64),
            audio=big,
            fusion=dict(dim=768, depth=2, num_heads=12),
            embed_dim=512,
        )
    )  # configs/stage2/l14.yaml without init_from
    image = 64 if dry_run else IMAGE
    stage = (
        ContrastiveStage(
            preset=preset,
            encoder={"drop_path_rate": 0.1, "grad_checkpointing": True},
            video_mask_ratio=0.8,
            image_size=image,
            num_frames=8,
            gather_distributed=False,
            **kw,
        )
        .to(device)
        .train()
    )
    opt = stage.configure_optimizers()["optimizer"]
    dm = SyntheticVideoDataModule(
        num_frames=8,
        image_size=image,
        batch_size=batch_size,
        modalities=["audio", "caption", "speech", "label"],
        train_size=batch_size,
        val_size=0,
        test_size=0,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader())).to(device)
    return stage, opt, batch


def _model_flops(stage, step: Callable[[], None]) -> float:
    """FLOPs of one step, counted without activation checkpointing and through SDPA."""
    # model FLOPs: one step without activation checkpointing (its recomputation is not model work)
    # (and through SDPA: the counter knows torch's attention kernels, not flash-attn's)
    # the module itself: `iv2_lightning.models.attention` as an attribute of the package is the
    # `attention()` function the package re-exports, so `import ... as` would bind the function
    attention_module = importlib.import_module("iv2_lightning.models.attention")

    enc = stage.model.video_encoder
    ckpt, enc.grad_checkpointing = enc.grad_checkpointing, False
    can_run, attention_module._flash_can_run = attention_module._flash_can_run, lambda *a: False
    try:
        flops = count_flops(step)
    finally:
        enc.grad_checkpointing = ckpt
        attention_module._flash_can_run = can_run
    return flops


def _bf16_matmul_peak(n: int, device: torch.device, sync: Callable[[], None]) -> float:
    """FLOP/s of ten n^3 bf16 matmuls after three warm-up ones."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    peak = 2 * n**3 * 10 / (time.perf_counter() - t0)
    return peak
