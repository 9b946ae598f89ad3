"""Speed and memory of the library against its peers and against the machine's own limits.

``python benchmarks/run.py --quick`` (a few minutes on 2 shared cores) or ``--full`` (longer: the
real depths, more repeats, more points). Prints rich tables, writes ``benchmarks/results.json``
(every figure under a stable flat name, plus ``_meta``) and ``docs/benchmarks.md`` (keeping the
clip-decoding section that ``benchmarks/data_throughput.py`` writes between its markers).

What it measures (the doc says the settings of the run it comes from):

1. ``peers``: forward+backward seconds per clip of our ``VideoEncoder`` against Hugging Face
   ``VideoMAEModel`` (joint attention, SDPA) and ``TimesformerModel`` (divided), randomly
   initialised from configs at the s14 sizes (384 wide, 6 heads, MLP 1536, patch 14, tubelet 1,
   8 x 224 x 224, batch 1, fp32).
2. ``mfu``: FLOP/s of those training steps over the measured peak of a 2048^3 fp32 (and bf16)
   matmul, timed in the same rounds. FLOPs are counted with ``torch.utils.flop_counter`` for the
   matmuls and convolutions, plus the CPU SDPA kernel counted analytically from its shapes
   (4 B H Nq Nk Dh forward, twice that backward, no recomputation), which the counter does not see.
3. ``masked``: the stage-1 step (``MaskedVideoStage``, pixel targets, tube masks) and the encoder
   alone at mask ratio 0, 0.75 and 0.9: speedup against the ideal 1 / (1 - r).
4. ``divjoint``: divided against joint attention, time and peak memory against frames.
5. ``hte``: peak memory of the ``HierarchicalTemporalEncoder`` against video length, with a linear
   fit, against one flat joint attention over the whole clip (SDPA and math attention).
6. ``data``: clips/s the ``SyntheticVideoDataModule`` delivers with 0..N workers against the clips/s
   the ``tiny`` and ``s14`` stage-1 steps consume, and a training loop fed by the loader.
7. ``profile``: torch.profiler of our step, and each performance fix against the code before it.
8. ``gpu`` (``--gpu``, needs CUDA): MFU of the ``l14`` stage-2 step in bf16 against a measured
   bf16 matmul peak.

Timing on a shared machine: the contenders of a section take turns, round after round (the order
reversed every other round), and every ratio is the median of the per-round ratios, so load that
changes during the run slows the contenders alike. Peak memory is the RSS high-water mark of a fresh
child process per point (``os.wait4`` returns the child's ``ru_maxrss``), not tracemalloc.

``--threads auto`` (default) measures a matmul with 1 thread and with every core: when all the
cores give less than 1.5x one core, other jobs hold the cores and the run uses 1 thread (two OpenMP
threads then wait for each other at every parallel region); otherwise every core.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.json"
DATA_RESULTS = ROOT / "benchmarks" / "results_data.json"
DOCS = ROOT / "docs" / "benchmarks.md"
DATA_START, DATA_END = "<!-- data_throughput:start -->", "<!-- data_throughput:end -->"
SECTIONS = ("peers", "divjoint", "hte", "data", "profile", "gpu")  # peers also holds mfu and masked
#: which section writes a figure, by the start of its name (a rerun section replaces all of its figures)
FIGURE_PREFIXES = {
    "peers": (
        "peer_",
        "ours_",
        "videomae_",
        "timesformer_",
        "ratio_",
        "cpu_mfu",
        "matmul_peak",
        "masked_",
        "rmsnorm_fix",
    ),
    "divjoint": ("divjoint_",),
    "hte": ("hte_", "flat_joint"),
    "data": ("data_", "model_clips", "decode_", "loop_", "tiny_step_threads"),
    "profile": ("profile_", "pixel_target", "tiny_stage1_step"),
    "gpu": ("gpu_",),
}


def section_of(figure: str) -> str | None:
    return next((sec for sec, pre in FIGURE_PREFIXES.items() if figure.startswith(pre)), None)


# s14: the official InternVideo2-S/14 vision encoder sizes
WIDTH, HEADS, MLP, PATCH, FRAMES, IMAGE = 384, 6, 1536, 14, 8, 224
MASK_RATIOS = (0.0, 0.75, 0.9)


def rname(r: float) -> str:
    """0 -> "0", 0.75 -> "0.75": the suffix of the masking figures (``masked_speedup_r0.9``)."""
    return "0" if r == 0 else f"{r:g}"


GOAL_MFU = 0.70
GOAL_MASKED = 0.20  # the encoder's speedup at least (1 - 0.2) x the ideal 1 / (1 - r)


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    mode: str
    threads: int
    peer_depth: int
    rounds: int
    dj_depth: int
    dj_image: int
    dj_frames: tuple[int, ...]
    dj_rounds: int
    dj_mem_frames: tuple[int, ...]
    dj_count_flops: bool
    hte_frames: tuple[int, ...]
    flat_frames: tuple[int, ...]
    flat_math_frames: tuple[int, ...]
    mem_parallel: int
    data_batches: int
    loop_steps: int
    s14_consumer_depth: int = 12
    rmsnorm_before_after: bool = True
    threads_ab: bool = True
    notes: list[str] = field(default_factory=list)


def make_settings(quick: bool, threads: int) -> Settings:
    if quick:
        return Settings(
            mode="quick",
            threads=threads,
            peer_depth=2,
            rounds=3,
            dj_depth=2,
            dj_image=112,
            dj_frames=(8, 16, 32, 64),
            dj_rounds=2,
            dj_mem_frames=(8, 32, 64),
            dj_count_flops=False,
            hte_frames=(32, 64, 128, 256, 512),
            flat_frames=(32, 128, 256),
            flat_math_frames=(32, 64, 128),
            mem_parallel=2,
            data_batches=3,
            loop_steps=4,
            rmsnorm_before_after=False,
            threads_ab=False,
            notes=[
                "--quick: the s14 encoders of the peer, MFU and masking sections have 2 blocks instead of "
                "12 (every contender alike), 3 timed rounds after one warm-up call, no RMSNorm before/after "
                "row; divided vs joint at 2 blocks, 2 rounds, no FLOP count, memory at 8/32/64 frames; "
                "fewer memory points and data batches; no thread A/B row.",
            ],
        )
    return Settings(
        mode="full",
        threads=threads,
        peer_depth=12,
        rounds=5,
        dj_depth=4,
        dj_image=112,
        dj_frames=(8, 16, 24, 32, 48, 64),
        dj_rounds=3,
        dj_mem_frames=(8, 16, 24, 32, 48, 64),
        dj_count_flops=True,
        hte_frames=(32, 64, 96, 128, 192, 256, 384, 512),
        flat_frames=(32, 64, 128, 192, 256),
        flat_math_frames=(32, 64, 96, 128, 192),
        mem_parallel=2,
        data_batches=8,
        loop_steps=8,
        notes=[
            "--full: the s14 encoders at their real depth (12 blocks), 5 timed rounds; divided vs joint at 4 blocks."
        ],
    )


# --------------------------------------------------------------------------- environment


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_avg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "lightning", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed
            out[name] = None
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return out


def matmul_rate(n: int, dtype: torch.dtype, threads: int, reps: int) -> list[float]:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        out.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return out


def pick_threads(arg: str) -> tuple[int, dict]:
    """``auto``: 1 thread when using every core does not pay (the cores are shared), else every core."""
    n = cores()
    probe: dict = {"cores": n, "requested": arg}
    if n > 1:  # measured whatever was asked, for the record
        one, many = [], []
        for _ in range(3):  # interleaved, so both see the same load
            one += matmul_rate(1024, torch.float32, 1, 3)
            many += matmul_rate(1024, torch.float32, n, 3)
        probe["matmul_gflops_1_thread"] = statistics.median(one)
        probe[f"matmul_gflops_{n}_threads"] = statistics.median(many)
        probe["scaling"] = statistics.median(many) / statistics.median(one)
    if arg != "auto":
        threads = max(1, int(arg))
    else:
        threads = n if probe.get("scaling", 0.0) >= 1.5 else 1
    torch.set_num_threads(threads)
    probe["threads"] = threads
    return threads, probe


# --------------------------------------------------------------------------- timing and counting


def interleave(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: bool = True,
    label: str = "",
    verbose: bool = True,
) -> dict[str, list[float]]:
    """Seconds per call of each function, taking turns round after round (order reversed every
    other round). ``warmup``: one untimed call each first."""
    if warmup:
        for name, fn in fns.items():
            fn()
            if verbose:
                _log(f"  {label} warm-up {name}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(list(fns)))
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        if verbose:
            _log(f"  {label} round {r + 1}/{rounds}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in fns))
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def paired(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def count_flops(fn: Callable[[], object]) -> float:
    """Model FLOPs of one call: torch's counter (matmuls, convolutions, bmm) plus the CPU SDPA
    kernels, which it does not count, analytically from their shapes: 4 B H Nq Nk Dh forward (two
    matmuls) and twice that backward (four matmuls). The recomputation of the scores that a fused
    kernel does in its backward pass is not model work and is not counted (torch's own formula for
    the CUDA kernels counts it; eager attention, as in TimeSformer, has none to count)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        b, h, nq, dq = query
        return 2 * b * h * nq * key[2] * dq + 2 * b * h * nq * key[2] * value[3]

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return 2 * fwd(query, key, value)

    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return float(counter.get_total_flops())


_LOG_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"[{time.perf_counter() - _LOG_T0:6.0f}s] {msg}", flush=True)


# --------------------------------------------------------------------------- models


def s14_encoder(depth: int, attention: str = "joint", **kw):
    from iv2_lightning.models import build_video_encoder

    return build_video_encoder("s14", depth=depth, attention=attention, **kw).train()


def videomae(depth: int):
    from transformers import VideoMAEConfig, VideoMAEModel

    cfg = VideoMAEConfig(
        hidden_size=WIDTH,
        num_hidden_layers=depth,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        patch_size=PATCH,
        tubelet_size=1,
        num_frames=FRAMES,
        image_size=IMAGE,
        attn_implementation="sdpa",
    )
    return VideoMAEModel(cfg).train()


def timesformer(depth: int):
    from transformers import TimesformerConfig, TimesformerModel

    cfg = TimesformerConfig(
        hidden_size=WIDTH,
        num_hidden_layers=depth,
        num_attention_heads=HEADS,
        intermediate_size=MLP,
        patch_size=PATCH,
        num_frames=FRAMES,
        image_size=IMAGE,
        attention_type="divided_space_time",
    )
    return TimesformerModel(cfg).train()


def ours_step(model, video, mask=None) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        out = model(video, mask=mask)
        (out.tokens.square().mean() + out.pooled.square().mean()).backward()

    return step


def hf_step(model, pixel_values) -> Callable[[], None]:
    def step():
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixel_values).last_hidden_state.square().mean().backward()

    return step


@contextlib.contextmanager
def torch_rmsnorm():
    """The code before the fix: torch's composite CPU RMSNorm."""
    from iv2_lightning.models.layers import RMSNorm

    old = RMSNorm.fast
    RMSNorm.fast = False
    try:
        yield
    finally:
        RMSNorm.fast = old


def before_rmsnorm(step: Callable[[], None]) -> Callable[[], None]:
    def call():
        with torch_rmsnorm():
            step()

    return call


def stage1(preset: str, mask_ratio: float, **kw):
    from iv2_lightning.stages import MaskedVideoStage

    stage = MaskedVideoStage(
        preset=preset, target="pixels", mask_type="tube", mask_ratio=mask_ratio, log_images=False, **kw
    ).train()
    opt = stage.configure_optimizers()["optimizer"]
    return stage, opt


def stage_step(stage, opt, batch) -> Callable[[], None]:
    def step():
        out = stage.compute_loss(batch)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def video_batch(video: torch.Tensor):
    from iv2_lightning.data.batch import VideoBatch

    return VideoBatch(video=video, sample_id=torch.arange(video.shape[0]))


# --------------------------------------------------------------------------- 1-3: peers, MFU, masking


def run_peers(s: Settings, out: dict, meta: dict) -> None:
    from iv2_lightning.models import tube_mask

    torch.manual_seed(0)
    d = s.peer_depth
    video = torch.randn(1, 3, FRAMES, IMAGE, IMAGE)
    hf_video = video.transpose(1, 2).contiguous()  # Hugging Face video models take [B, T, C, H, W]
    grid = (FRAMES, IMAGE // PATCH, IMAGE // PATCH)
    n_tokens = math.prod(grid)

    _log(f"peers: building s14-sized models with {d} blocks")
    ours_j, ours_d = s14_encoder(d, "joint"), s14_encoder(d, "divided")
    vmae, tsf = videomae(d), timesformer(d)
    steps = {
        "ours_joint": ours_step(ours_j, video),
        "videomae": hf_step(vmae, hf_video),
        "ours_divided": ours_step(ours_d, video),
        "timesformer": hf_step(tsf, hf_video),
    }
    if s.rmsnorm_before_after:
        steps["ours_joint_torch_rmsnorm"] = before_rmsnorm(steps["ours_joint"])

    masks = {}
    for r in MASK_RATIOS[1:]:
        g = torch.Generator().manual_seed(0)
        masks[r] = tube_mask(1, grid[0], grid[1] * grid[2], r, generator=g)
        steps[f"encoder_r{rname(r)}"] = ours_step(ours_j, video, masks[r])

    stages = {}
    batch = video_batch(video)
    for r in MASK_RATIOS:
        stage, opt = stage1("s14", r, encoder={"depth": d})
        stages[r] = stage
        steps[f"stage1_r{rname(r)}"] = stage_step(stage, opt, batch)

    mm = {
        "matmul_fp32": (torch.randn(2048, 2048), torch.randn(2048, 2048)),
        "matmul_bf16": (torch.randn(2048, 2048).bfloat16(), torch.randn(2048, 2048).bfloat16()),
    }
    for name, (a, b) in mm.items():  # three in a row: a rate averaged over ~a second, like the steps

        def three(a=a, b=b):
            for _ in range(3):
                torch.mm(a, b)

        steps[name] = three

    # FLOPs of one call each (this call is also the warm-up)
    flops = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the r=0 stage-1 loss is a mean over no masked token
        for name, fn in steps.items():
            if name.startswith("matmul"):
                fn()
                flops[name] = 3 * 2.0 * 2048**3
            elif name == "ours_joint_torch_rmsnorm":
                fn()
                flops[name] = flops["ours_joint"]
            else:
                flops[name] = count_flops(fn)
            _log(f"  peers warm-up + FLOPs {name}: {flops[name] / 1e9:.1f} GFLOP")
        times = interleave(steps, s.rounds, warmup=False, label="peers")

    # 1. peers
    t = {k: med(v) for k, v in times.items()}
    out["peer_depth"] = d
    out["peer_tokens"] = n_tokens
    for k in ("ours_joint", "videomae", "ours_divided", "timesformer"):
        out[f"{k}_s_per_clip"] = t[k]
        out[f"{k}_step_gflop"] = flops[k] / 1e9
    out["ratio_vs_videomae"] = paired(times["videomae"], times["ours_joint"])
    out["ratio_vs_timesformer"] = paired(times["timesformer"], times["ours_divided"])
    out["ratio_divided_vs_joint_s14"] = paired(times["ours_joint"], times["ours_divided"])
    if s.rmsnorm_before_after:
        out["ours_joint_torch_rmsnorm_s_per_clip"] = t["ours_joint_torch_rmsnorm"]
        out["rmsnorm_fix_speedup"] = paired(times["ours_joint_torch_rmsnorm"], times["ours_joint"])

    # 2. MFU against the matmul of the same round
    peak32 = [flops["matmul_fp32"] / x for x in times["matmul_fp32"]]
    peak16 = [flops["matmul_bf16"] / x for x in times["matmul_bf16"]]
    out["matmul_peak_gflops_fp32"] = med(peak32) / 1e9
    out["matmul_peak_gflops_bf16"] = med(peak16) / 1e9
    for k, key in (
        ("ours_joint", "cpu_mfu_fp32"),
        ("ours_divided", "cpu_mfu_fp32_ours_divided"),
        ("videomae", "cpu_mfu_fp32_videomae"),
        ("timesformer", "cpu_mfu_fp32_timesformer"),
    ):
        out[key] = med([flops[k] / tt / p for tt, p in zip(times[k], peak32, strict=True)])
        out[f"{k}_gflops"] = flops[k] / t[k] / 1e9
    out["cpu_mfu_fp32_best_peer"] = max(out["cpu_mfu_fp32_videomae"], out["cpu_mfu_fp32_timesformer"])

    # 3. masking
    out["masked_encoder_s_r0"] = t["ours_joint"]
    for r in MASK_RATIOS:
        out[f"masked_step_s_r{rname(r)}"] = t[f"stage1_r{rname(r)}"]
    for r in MASK_RATIOS[1:]:
        k = rname(r)
        out[f"masked_encoder_s_r{k}"] = t[f"encoder_r{k}"]
        out[f"masked_speedup_r{k}"] = paired(times["ours_joint"], times[f"encoder_r{k}"])
        out[f"masked_ideal_r{k}"] = 1.0 / (1.0 - r)
        out[f"masked_step_speedup_r{k}"] = paired(times["stage1_r0"], times[f"stage1_r{k}"])
        out[f"masked_flop_ratio_r{k}"] = flops["ours_joint"] / flops[f"encoder_r{k}"]
    meta["peers"] = {
        "depth": d,
        "rounds": s.rounds,
        "threads": s.threads,
        "tokens": n_tokens,
        "decoder": "MaskedVideoStage defaults (dim 128, depth 2, 4 heads), AdamW step included",
        "times": times,
        "flops": flops,
    }
    del stages


def run_profile(s: Settings, out: dict, meta: dict) -> None:
    """torch.profiler of our joint step (the peer section's size): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    video = torch.randn(1, 3, FRAMES, IMAGE, IMAGE)
    model = s14_encoder(s.peer_depth, "joint")
    step = ours_step(model, video)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    top = [
        {
            "op": e.key,
            "self_ms": e.self_cpu_time_total / 1000,
            "share": e.self_cpu_time_total / total,
            "calls": e.count,
        }
        for e in events[:12]
    ]

    def share(pred) -> float:
        return sum(e.self_cpu_time_total for e in events if pred(e.key)) / total

    out["profile_share_sdpa"] = share(lambda k: "scaled_dot_product" in k)
    out["profile_share_matmul"] = share(lambda k: k in ("aten::mm", "aten::addmm", "aten::bmm"))
    out["profile_share_other"] = 1.0 - out["profile_share_sdpa"] - out["profile_share_matmul"]
    meta["profile"] = {"depth": s.peer_depth, "top": top, "threads": s.threads}

    # the RMSNorm fix at the op level: one norm forward + backward on s14 activations, before/after,
    # on a contiguous input (norm1, norm2) and on a column slice of the qkv output (q_norm, k_norm)
    from iv2_lightning.models.layers import RMSNorm

    norm = RMSNorm(WIDTH, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    n_tok = 1 + FRAMES * (IMAGE // PATCH) ** 2
    plain, qkv = torch.randn(1, n_tok, WIDTH), torch.randn(1, n_tok, 3 * WIDTH)
    grad = torch.randn(1, n_tok, WIDTH)

    def norm_call(fast: bool, src: torch.Tensor):
        def call():
            x = src.clone().requires_grad_()
            with contextlib.nullcontext() if fast else torch_rmsnorm():
                norm(x[..., :WIDTH]).backward(grad)

        return call

    ab = {
        "plain_after": norm_call(True, plain),
        "plain_before": norm_call(False, plain),
        "slice_after": norm_call(True, qkv),
        "slice_before": norm_call(False, qkv),
    }
    times = interleave(ab, 31, label="rmsnorm op", verbose=False)
    out["rmsnorm_op_speedup"] = paired(times["plain_before"], times["plain_after"])
    out["rmsnorm_op_speedup_qk_slice"] = paired(times["slice_before"], times["slice_after"])
    meta["profile"]["rmsnorm_op_ms"] = {k: med(v) * 1000 for k, v in times.items()}

    # the stage-1 pixel target before/after (see the doc): tiny stage-1 step, configs/stage1/tiny.yaml
    before = _pixel_loss_before()
    if True:
        import iv2_lightning.stages.masked as masked_module

        stage, opt = stage1(
            "tiny",
            0.75,
            encoder={"patch_size": 16, "tubelet_size": 2, "layerscale_init": None},
            decoder_dim=96,
            decoder_depth=1,
            decoder_heads=4,
            lr=2e-3,
        )
        batch = video_batch(_tiny_clips(32))
        after_fn = stage_step(stage, opt, batch)
        current = masked_module.pixel_reconstruction_loss

        def before_fn():
            masked_module.pixel_reconstruction_loss = before
            try:
                after_fn()
            finally:
                masked_module.pixel_reconstruction_loss = current

        times = interleave(
            {"after": after_fn, "before": before_fn}, max(s.rounds, 5), label="pixel-target fix"
        )
        out["pixel_target_fix_speedup"] = paired(times["before"], times["after"])
        out["tiny_stage1_step_s"] = med(times["after"])
        meta["profile"]["pixel_target_times"] = times


def _pixel_loss_before():
    """``pixel_reconstruction_loss`` as it was before the fix (targets for every token through
    ``norm_pixel_targets``, then indexed), for the before/after row."""
    import torch.nn.functional as F

    from iv2_lightning.models.heads import norm_pixel_targets

    def loss(pred, video, mask, tubelet, patch, normalize=True, eps=1e-6):
        target = norm_pixel_targets(video, tubelet, patch, normalize=normalize, eps=eps)
        b, _, dim = target.shape
        n_masked = int(mask[0].sum())
        target = target[mask].reshape(b, n_masked, dim)
        return F.mse_loss(pred.float(), target.detach())

    return loss


def _tiny_clips(n: int) -> torch.Tensor:
    """A batch of the embedded synthetic clips at the tiny geometry (8 x 64 x 64), normalised."""
    from iv2_lightning.data import SyntheticVideoDataModule

    dm = SyntheticVideoDataModule(
        num_frames=8, image_size=64, batch_size=n, modalities=[], train_size=n, val_size=0, test_size=0
    )
    dm.setup("fit")
    return next(iter(dm.train_dataloader())).video


# --------------------------------------------------------------------------- memory children


def child_main(spec: dict) -> None:
    """One memory point in a fresh process: build, one forward+backward, report."""
    import resource

    torch.set_num_threads(int(spec.get("threads", 1)))
    torch.manual_seed(0)
    from iv2_lightning.models import HierarchicalTemporalEncoder, build_video_encoder

    if spec["kind"] == "threads":
        print(json.dumps({"rss_before": True, **_tiny_step_child(int(spec["steps"]))}), flush=True)
        return
    kind, frames = spec["kind"], int(spec["frames"])
    if kind == "encoder":
        model = build_video_encoder(
            "s14",
            depth=spec["depth"],
            attention=spec["attention"],
            num_frames=frames,
            image_size=spec["image"],
        ).train()
        video = torch.randn(1, 3, frames, spec["image"], spec["image"])

        def loss():
            o = model(video)
            return o.tokens.square().mean() + o.pooled.square().mean()

    else:
        geo = {"attention": "joint", "image_size": spec["image"], "patch_size": spec["patch"]}
        video = torch.randn(1, 3, frames, spec["image"], spec["image"])
        if kind == "hte":
            enc = build_video_encoder("tiny", num_frames=spec["window"], **geo)
            model = HierarchicalTemporalEncoder(
                enc, window=spec["window"], tokens_per_window=4, depth=2, num_heads=4
            ).train()

            def loss():
                return model(video).embedding.square().mean()

        else:  # flat joint attention over every frame at once
            model = build_video_encoder("tiny", num_frames=frames, backend=spec["backend"], **geo).train()

            def loss():
                o = model(video)
                return o.tokens.square().mean() + o.pooled.square().mean()

    before = _vm_hwm_kb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss().backward()
    seconds = time.perf_counter() - t0
    report = {"rss_before": True, "hwm_before_kb": before, "hwm_after_kb": _vm_hwm_kb(), "step_s": seconds}
    print(json.dumps(report), flush=True)


# A fresh interpreter per point, started by a small launcher that waits for it with os.wait4: on
# Linux a child's ru_maxrss starts at the RSS of the process it was forked from (the copied address
# space counts until exec), so a child forked from this benchmark (gigabytes) would report at least
# that; a bare launcher is ~10 MB. The child also reports VmHWM (its own address space's high-water
# mark) from /proc, as a cross-check. The child ends with os._exit: the interpreter's teardown
# would raise the high-water mark after the measured step.
_LAUNCHER = """
import json, os, subprocess, sys
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
out = p.stdout.read()
_, status, usage = os.wait4(p.pid, 0)
sys.stdout.write(out)
print(json.dumps({"maxrss_kb": usage.ru_maxrss, "exit": os.waitstatus_to_exitcode(status)}))
"""


def _vm_hwm_kb() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def _tiny_step_child(steps: int) -> dict:
    """The model side of the tiny stage-1 step (configs/stage1/tiny.yaml: encoder, pixel decoder,
    norm-pixel loss, AdamW) on a random batch of 32, with the thread count this process was given:
    median seconds of ``steps`` steps after two warm-up steps."""
    from iv2_lightning.models import PixelDecoder, build_video_encoder, pixel_reconstruction_loss, tube_mask

    enc = build_video_encoder("tiny", patch_size=16, tubelet_size=2, layerscale_init=None).train()
    dec = PixelDecoder(enc.embed_dim, 2 * 16 * 16 * 3, enc.grid_size, dim=96, depth=1, num_heads=4)
    params = [*enc.parameters(), *dec.parameters()]
    opt = torch.optim.AdamW(params, lr=2e-3, betas=(0.9, 0.98), weight_decay=0.05)
    video = torch.randn(32, 3, 8, 64, 64)
    t, h, w = enc.grid_size

    def step():
        mask = tube_mask(32, t, h * w, 0.75)
        loss = pixel_reconstruction_loss(dec(enc(video, mask=mask).tokens, mask), video, mask, 2, 16)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"hwm_before_kb": 0, "hwm_after_kb": 0, "step_s": statistics.median(times)}


def run_thread_ab(s: Settings, n_cores: int) -> dict:
    """The tiny step in fresh processes with this run's thread count and the other one, one after
    the other (A B A B): a process keeps its thread count, as a training run does (switching
    ``torch.set_num_threads`` back and forth inside one process leaves the extra OpenMP threads asleep
    and makes every parallel region wait for them to wake: 10x slower again here)."""
    other = n_cores if s.threads == 1 else 1
    out: dict = {"threads": s.threads, "other_threads": other, "this": [], "other": []}
    for _ in range(2):
        for key, n in (("this", s.threads), ("other", other)):
            row = run_children([{"kind": "threads", "steps": 5}], 1, n)[0]
            out[key].append(row.get("step_s") or float("nan"))
    _log(f"  threads A/B: {out}")
    return out


def run_children(specs: list[dict], parallel: int, threads: int) -> list[dict]:
    """Each spec in a fresh interpreter; returns the specs with ``peak_mb`` (the child's
    ``ru_maxrss`` from ``os.wait4``), ``before_mb`` (its high-water mark before the step),
    ``vm_hwm_mb`` (the same peak read by the child from /proc) and ``step_s``."""
    results: list[dict | None] = [None] * len(specs)
    lock = threading.Semaphore(parallel)

    def one(i: int, spec: dict) -> None:
        with lock:
            child = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--child",
                json.dumps({**spec, "threads": threads}),
            ]
            proc = subprocess.run(
                [sys.executable, "-c", _LAUNCHER, *child], capture_output=True, text=True, check=False
            )
            lines = proc.stdout.splitlines()
            rep = next((json.loads(ln) for ln in reversed(lines) if ln.startswith('{"rss')), None)
            usage = next((json.loads(ln) for ln in reversed(lines) if ln.startswith('{"maxrss')), None)
            row = dict(spec)
            if rep is None or usage is None or usage["exit"] != 0:
                tail = [ln for ln in lines if not ln.startswith("{")] or [proc.stderr.strip() or "no output"]
                row.update(error=tail[-1][:300], peak_mb=None)
            else:
                row.update(
                    peak_mb=usage["maxrss_kb"] / 1024,
                    before_mb=rep["hwm_before_kb"] / 1024,
                    vm_hwm_mb=(rep["hwm_after_kb"] or 0) / 1024,
                    step_s=rep["step_s"],
                )
            results[i] = row
            _log(
                f"  memory {spec}: {fmt(row.get('peak_mb'), '.0f') if row.get('peak_mb') else row.get('error')} MB"
            )

    workers = [threading.Thread(target=one, args=(i, sp)) for i, sp in enumerate(specs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [r for r in results if r is not None]


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x: (slope b, intercept a, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    icpt = my - slope * mx
    ss_res = sum((y - icpt - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, icpt, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def crossing(xs: list[float], a: list[float], b: list[float]) -> float | None:
    """The first x where a - b changes sign (linear interpolation), or None."""
    for i in range(1, len(xs)):
        d0, d1 = a[i - 1] - b[i - 1], a[i] - b[i]
        if d0 == 0:
            return xs[i - 1]
        if (d0 < 0) != (d1 < 0):
            return xs[i - 1] + (xs[i] - xs[i - 1]) * d0 / (d0 - d1)
    return None


# --------------------------------------------------------------------------- 4: divided vs joint


def run_divjoint(s: Settings, out: dict, meta: dict) -> None:
    torch.manual_seed(0)
    steps = {}
    for f in s.dj_frames:
        video = torch.randn(1, 3, f, s.dj_image, s.dj_image)
        for att in ("joint", "divided"):
            steps[f"{att}_f{f}"] = ours_step(
                s14_encoder(s.dj_depth, att, num_frames=f, image_size=s.dj_image), video
            )
    _log(f"divided vs joint: {len(steps)} models, {s.dj_depth} blocks, {s.dj_image}^2")
    flops: dict[str, float | None] = dict.fromkeys(steps)
    if s.dj_count_flops:
        for name, fn in steps.items():  # the counting call is the warm-up
            flops[name] = count_flops(fn)
    else:  # --quick: one warm-up call of the smallest pair only
        steps[f"joint_f{s.dj_frames[0]}"]()
        steps[f"divided_f{s.dj_frames[0]}"]()
    times = interleave(steps, s.dj_rounds, warmup=False, label="divjoint")
    specs = [
        {"kind": "encoder", "attention": att, "frames": f, "image": s.dj_image, "depth": s.dj_depth}
        for f in s.dj_mem_frames
        for att in ("joint", "divided")
    ]
    mem = run_children(specs, s.mem_parallel, s.threads)
    peak = {(m["attention"], m["frames"]): m.get("peak_mb") for m in mem}
    rows = []
    for f in s.dj_frames:
        row = {
            "frames": f,
            "tokens": f * (s.dj_image // PATCH) ** 2,
            "joint_s": med(times[f"joint_f{f}"]),
            "divided_s": med(times[f"divided_f{f}"]),
            "joint_over_divided_time": paired(times[f"joint_f{f}"], times[f"divided_f{f}"]),
            "joint_gflop": flops[f"joint_f{f}"] / 1e9 if flops[f"joint_f{f}"] else None,
            "divided_gflop": flops[f"divided_f{f}"] / 1e9 if flops[f"divided_f{f}"] else None,
            "joint_peak_mb": peak.get(("joint", f)),
            "divided_peak_mb": peak.get(("divided", f)),
        }
        rows.append(row)
        out[f"divjoint_time_ratio_f{f}"] = row["joint_over_divided_time"]
        out[f"divjoint_joint_s_f{f}"] = row["joint_s"]
        out[f"divjoint_divided_s_f{f}"] = row["divided_s"]
        if row["joint_peak_mb"] and row["divided_peak_mb"]:
            out[f"divjoint_joint_peak_mb_f{f}"] = row["joint_peak_mb"]
            out[f"divjoint_divided_peak_mb_f{f}"] = row["divided_peak_mb"]
    xs = [r["frames"] for r in rows]
    cross_t = crossing(xs, [r["joint_over_divided_time"] for r in rows], [1.0] * len(rows))
    out["divjoint_time_cross_frames"] = cross_t
    mem_rows = [r for r in rows if r["joint_peak_mb"] and r["divided_peak_mb"]]
    if len(mem_rows) >= 2:
        out["divjoint_mem_cross_frames"] = crossing(
            [r["frames"] for r in mem_rows],
            [r["joint_peak_mb"] for r in mem_rows],
            [r["divided_peak_mb"] for r in mem_rows],
        )
    if s.dj_count_flops:
        cross_f = crossing(xs, [r["joint_gflop"] for r in rows], [r["divided_gflop"] for r in rows])
        out["divjoint_flop_cross_frames"] = cross_f
    meta["divjoint"] = {
        "depth": s.dj_depth,
        "image": s.dj_image,
        "rounds": s.dj_rounds,
        "rows": rows,
        "times": times,
        "memory": mem,
    }


# --------------------------------------------------------------------------- 5: HTE memory


HTE_GEOMETRY = {"image": 32, "patch": 8, "window": 8}


def run_hte(s: Settings, out: dict, meta: dict) -> None:
    specs = [{"kind": "hte", "frames": f, **HTE_GEOMETRY} for f in s.hte_frames]
    specs += [{"kind": "flat", "frames": f, "backend": "sdpa", **HTE_GEOMETRY} for f in s.flat_frames]
    specs += [{"kind": "flat", "frames": f, "backend": "math", **HTE_GEOMETRY} for f in s.flat_math_frames]
    _log(f"HTE memory: {len(specs)} child processes")
    mem = run_children(specs, s.mem_parallel, s.threads)
    series = {
        "hte": [m for m in mem if m["kind"] == "hte"],
        "flat_joint": [m for m in mem if m["kind"] == "flat" and m["backend"] == "sdpa"],
        "flat_joint_math": [m for m in mem if m["kind"] == "flat" and m["backend"] == "math"],
    }
    fits = {}
    for name, rows in series.items():
        rows = [r for r in rows if r.get("peak_mb")]
        rows.sort(key=lambda r: r["frames"])
        if len(rows) >= 3:
            xs = [r["frames"] for r in rows]
            slope, icpt, r2 = linear_fit(xs, [r["peak_mb"] for r in rows])
            # a quadratic term shows where memory grows faster than linearly
            fits[name] = {"slope_mb_per_frame": slope, "intercept_mb": icpt, "r2": r2}
            out[f"{name}_peak_mb_per_frame"] = slope
            out[f"{name}_peak_r2"] = r2
            # growth of the step's own memory (peak minus the high-water mark before the step)
            inc = [r["peak_mb"] - r["before_mb"] for r in rows]
            s2, _, r2b = linear_fit(xs, inc)
            ys = [r["peak_mb"] for r in rows]
            fits[name].update(
                step_slope_mb_per_frame=s2,
                step_r2=r2b,
                first_interval_mb_per_frame=(ys[1] - ys[0]) / (xs[1] - xs[0]),
                last_interval_mb_per_frame=(ys[-1] - ys[-2]) / (xs[-1] - xs[-2]),
            )
        for r in rows:
            out[f"{name}_peak_mb_f{r['frames']}"] = r["peak_mb"]
    meta["hte"] = {"geometry": HTE_GEOMETRY, "rows": mem, "fits": fits}


# --------------------------------------------------------------------------- 6: data vs model


def loader_rate(image: int, batch: int, workers: int, batches: int) -> float:
    """Clips/s the SyntheticVideoDataModule's train loader delivers once its workers are running."""
    from iv2_lightning.data import SyntheticVideoDataModule

    dm = SyntheticVideoDataModule(
        num_frames=8,
        image_size=image,
        batch_size=batch,
        num_workers=workers,
        modalities=[],
        train_size=batch * (batches + 2),
        val_size=0,
        test_size=0,
    )
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # worker start-up
    t0 = time.perf_counter()
    n = sum(len(next(it)) for _ in range(batches))
    rate = n / (time.perf_counter() - t0)
    del it
    return rate


def run_data(s: Settings, out: dict, meta: dict) -> None:
    torch.manual_seed(0)
    n_cores = cores()
    rows = []
    # what the loader delivers (no model running)
    for image, batch in ((64, 32), (224, 4)):
        for w in sorted({0, 1, n_cores}):
            rate = loader_rate(image, batch, w, s.data_batches)
            rows.append({"image": image, "batch": batch, "workers": w, "clips_per_s": rate})
            out[f"data_clips_per_s_{image}px_w{w}"] = rate
            _log(f"  data {image}px workers={w}: {rate:.1f} clips/s")
    out["data_clips_per_s"] = max(r["clips_per_s"] for r in rows if r["image"] == 64)
    out["data_clips_per_s_224px"] = max(r["clips_per_s"] for r in rows if r["image"] == 224)

    # what the stage-1 steps consume (no loader): tiny (configs/stage1/tiny.yaml) and s14
    tiny_stage, tiny_opt = stage1(
        "tiny",
        0.75,
        encoder={"patch_size": 16, "tubelet_size": 2, "layerscale_init": None},
        decoder_dim=96,
        decoder_depth=1,
        decoder_heads=4,
        lr=2e-3,
    )
    tiny_batch = video_batch(_tiny_clips(32))
    s14_stage, s14_opt = stage1("s14", 0.9, encoder={"depth": s.s14_consumer_depth})
    s14_batch = video_batch(torch.randn(1, 3, FRAMES, IMAGE, IMAGE))
    steps = {
        "tiny_stage1": stage_step(tiny_stage, tiny_opt, tiny_batch),
        "s14_stage1": stage_step(s14_stage, s14_opt, s14_batch),
    }
    times = interleave(steps, max(3, s.rounds), label="data")
    out["model_clips_per_s_tiny"] = 32 / med(times["tiny_stage1"])
    out["model_clips_per_s_s14"] = 1 / med(times["s14_stage1"])
    out["data_over_model_tiny"] = out["data_clips_per_s"] / out["model_clips_per_s_tiny"]
    out["data_over_model_s14_synthetic"] = out["data_clips_per_s_224px"] / out["model_clips_per_s_s14"]
    thread_times = None
    if n_cores > 1 and s.threads_ab:
        thread_times = run_thread_ab(s, n_cores)
        out["tiny_step_threads_ratio"] = paired(thread_times["other"], thread_times["this"])

    # a training loop fed by the loader (1 worker) against the same steps on a batch in memory
    from iv2_lightning.data import SyntheticVideoDataModule

    dm = SyntheticVideoDataModule(
        num_frames=8,
        image_size=64,
        batch_size=32,
        num_workers=1,
        modalities=[],
        train_size=32 * (2 * s.loop_steps + 4),
        val_size=0,
        test_size=0,
    )
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)
    fed = stage_step(tiny_stage, tiny_opt, tiny_batch)
    loop = {"loader": [], "cached": []}
    for _ in range(2):
        t0 = time.perf_counter()
        for _ in range(s.loop_steps):
            b = next(it)
            stage_step(tiny_stage, tiny_opt, b)()
        loop["loader"].append((time.perf_counter() - t0) / s.loop_steps)
        t0 = time.perf_counter()
        for _ in range(s.loop_steps):
            fed()
        loop["cached"].append((time.perf_counter() - t0) / s.loop_steps)
    del it
    out["loop_loader_over_cached_tiny"] = paired(loop["loader"], loop["cached"])

    # the decode rates of real files, from benchmarks/data_throughput.py
    decode = None
    if DATA_RESULTS.exists():
        data = json.loads(DATA_RESULTS.read_text())
        dl = data.get("dataloader") or []
        if dl:
            best = max(dl, key=lambda r: r["clips_per_s"])
            decode = {"date": data.get("date"), "files": data.get("dataloader_files"), **best}
            out["decode_clips_per_s_224px_files"] = best["clips_per_s"]
            out["decode_over_model_s14"] = best["clips_per_s"] / out["model_clips_per_s_s14"]
            out["decode_over_model_tiny"] = best["clips_per_s"] / out["model_clips_per_s_tiny"]
    meta["data"] = {
        "rows": rows,
        "times": times,
        "thread_times": thread_times,
        "loop": loop,
        "loop_workers": 1,
        "s14_consumer": f"MaskedVideoStage s14 ({s.s14_consumer_depth} blocks), tube mask 0.9, batch 1, AdamW",
        "tiny_consumer": "MaskedVideoStage tiny with the pixel target (patch 16, tubelet 2, mask 0.75, decoder 96x1; the tiny config now distils a random teacher), batch 32, AdamW",
        "decode": decode,
    }


# --------------------------------------------------------------------------- 7: GPU


def run_gpu(s: Settings, out: dict, meta: dict, dry_run: bool = False) -> None:
    """MFU of the l14 stage-2 step in bf16 against a measured bf16 matmul peak (CUDA).

    ``dry_run`` runs the same code on the CPU with the tiny preset, so the path can be checked on a
    machine without a GPU; its numbers are not reported."""
    if not dry_run and not torch.cuda.is_available():
        meta["gpu"] = {"status": "not run: no GPU lent"}
        return
    from iv2_lightning.data import SyntheticVideoDataModule
    from iv2_lightning.stages import ContrastiveStage

    device = torch.device("cpu" if dry_run else "cuda")
    preset, batch_size, n, steps = ("tiny", 2, 512, 2) if dry_run else ("l14", 8, 8192, 10)
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
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        with amp:
            loss = stage.compute_loss(batch)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # model FLOPs: one step without activation checkpointing (its recomputation is not model work)
    # (and through SDPA: the counter knows torch's attention kernels, not flash-attn's)
    import iv2_lightning.models.attention as attention_module

    enc = stage.video_encoder
    ckpt, enc.grad_checkpointing = enc.grad_checkpointing, False
    can_run, attention_module._flash_can_run = attention_module._flash_can_run, lambda *a: False
    try:
        flops = count_flops(step)
    finally:
        enc.grad_checkpointing = ckpt
        attention_module._flash_can_run = can_run
    for _ in range(2):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    step_s = (time.perf_counter() - t0) / steps
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
    res = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
        "batch": batch_size,
        "step_s": step_s,
        "step_tflop": flops / 1e12,
        "matmul_peak_tflops_bf16": peak / 1e12,
        "mfu_bf16": flops / step_s / peak,
    }
    meta["gpu"] = {"status": "dry run on CPU (tiny)" if dry_run else "run", **res}
    if not dry_run:
        out["gpu_mfu_bf16_l14_stage2"] = res["mfu_bf16"]
        out["gpu_matmul_peak_tflops_bf16"] = res["matmul_peak_tflops_bf16"]
        out["gpu_l14_stage2_step_s"] = step_s


# --------------------------------------------------------------------------- report


def fmt(x, spec: str = ".2f", none: str = "–") -> str:
    return none if x is None else format(x, spec)


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**met**" if ok else "**not met**")


def goals(f: dict) -> list[tuple[str, bool | None, str]]:
    """(goal, met, the number) for every goal of issue 8 that this run has data for."""
    rows = []
    if "ratio_vs_videomae" in f:
        rows.append(
            (
                "1. ours (joint) faster than VideoMAE: ratio > 1.0",
                f["ratio_vs_videomae"] > 1.0,
                f"{f['ratio_vs_videomae']:.3f}",
            )
        )
        rows.append(
            (
                "1. ours (divided) faster than TimeSformer: ratio > 1.0",
                f["ratio_vs_timesformer"] > 1.0,
                f"{f['ratio_vs_timesformer']:.3f}",
            )
        )
        rows.append(
            (
                f"2. CPU MFU (fp32) of our joint step >= {GOAL_MFU:.0%}",
                f["cpu_mfu_fp32"] >= GOAL_MFU,
                f"{f['cpu_mfu_fp32']:.1%}",
            )
        )
        rows.append(
            (
                "2. CPU MFU of our joint step above the best peer's in the same run",
                f["cpu_mfu_fp32"] > f["cpu_mfu_fp32_best_peer"],
                f"{f['cpu_mfu_fp32']:.1%} vs {f['cpu_mfu_fp32_best_peer']:.1%}",
            )
        )
        for r in MASK_RATIOS[1:]:
            sp, ideal = f[f"masked_speedup_r{rname(r)}"], f[f"masked_ideal_r{rname(r)}"]
            rows.append(
                (
                    f"3. encoder speedup at r={r} within 20% of the ideal {ideal:.1f}x (>= {(1 - GOAL_MASKED) * ideal:.1f}x)",
                    sp >= (1 - GOAL_MASKED) * ideal,
                    f"{sp:.2f}x",
                )
            )
    if "hte_peak_r2" in f:
        rows.append(
            (
                "5. HTE peak memory linear in frames (R^2 >= 0.99)",
                f["hte_peak_r2"] >= 0.99,
                f"{f['hte_peak_mb_per_frame']:.2f} MB/frame, R^2 {f['hte_peak_r2']:.4f}",
            )
        )
    return rows


def markdown(res: dict) -> str:
    f, meta = res, res["_meta"]
    env, s = meta["env"], meta["settings"]
    L = [
        "# Benchmarks",
        "",
        "Written by `python benchmarks/run.py --quick|--full` (figures: `benchmarks/results.json`, one flat name per "
        "figure) and, for the clip-decoding section at the end, `python benchmarks/data_throughput.py`.",
        "",
        f"Last invocation: **{s['mode']}** (sections {', '.join(meta['sections_run'])}), {meta['date']}, "
        f"{meta['runtime_s']:.0f} s. Machine: {env['cpu']}, {env['cores']} cores, "
        f"{env['platform']}; 1-min load average at start {fmt(env['load_avg_start'], '.1f')}, at end "
        f"{fmt(env['load_avg_end'], '.1f')} (other jobs shared the cores). "
        f"Python {env['versions']['python']}, torch {env['versions']['torch']} ({env['versions']['cpu_capability']}), "
        f"transformers {env['versions']['transformers']}, lightning {env['versions']['lightning']}.",
        "",
        _threads_line(meta),
        "",
        _sections_line(meta),
        "",
        "How to read: contenders of a table ran in the same process, taking turns round after round; each "
        "ratio is the median of the per-round ratios and each time a median, so compare within a table, not "
        "absolute seconds across runs. " + " ".join(s["notes"]),
        "",
    ]
    g = goals(f)
    if g:
        L += ["## Goals", "", "| goal | result | number |", "|---|---|---|"]
        L += [f"| {name} | {verdict(ok)} | {num} |" for name, ok, num in g]
        L.append("")
    if "ratio_vs_videomae" in f:
        L += _md_peers(f, meta)
    if "divjoint_time_ratio_f8" in f or "divjoint" in meta:
        L += _md_divjoint(f, meta)
    if "hte" in meta:
        L += _md_hte(f, meta)
    if "data" in meta:
        L += _md_data(f, meta)
    L += _md_profile(f, meta)
    L += _md_gpu(meta)
    return "\n".join(L) + "\n"


def _sections_line(meta: dict) -> str:
    rows = []
    for name in SECTIONS:
        m = meta.get(name) or {}
        if "date" in m:
            rows.append(
                f"{name} ({m['mode']}, {m['threads']} thread(s), {m['date']}, {m.get('seconds', 0):.0f} s)"
            )
    return "Sections in this file and the run each comes from: " + "; ".join(rows) + "."


def _threads_line(meta: dict) -> str:
    p = meta["threads_probe"]
    n = p["cores"]
    why = (
        "`--threads auto` takes every core when they give at least 1.5x one core on this probe, else 1 (the "
        "cores are taken by other jobs, and OpenMP threads would wait for each other at every parallel region: "
        "see the thread row of the data section)"
    )
    if p["requested"] != "auto":
        why = (
            f"set by hand; {why}. The probe is taken once, and the load on this machine came and went within "
            "minutes (a --full run started on idle cores with 2 threads slowed 3-4x when the other jobs came back), "
            "so the long run was pinned to 1 thread"
        )
    if "scaling" in p:
        return (
            f"Threads: **{p['threads']}** (`--threads {p['requested']}`). A 1024³ fp32 matmul ran at "
            f"{p['matmul_gflops_1_thread']:.0f} GFLOP/s on 1 thread and {p[f'matmul_gflops_{n}_threads']:.0f} on {n} "
            f"({p['scaling']:.2f}x) at the start of the run; {why}."
        )
    return f"Threads: **{p['threads']}** (`--threads {p['requested']}`: {why})."


def _md_peers(f: dict, meta: dict) -> list[str]:
    m = meta["peers"]
    d = m["depth"]
    L = [
        "## 1. Backbone against peers (CPU, fp32)",
        "",
        f"Forward + backward of one clip (batch 1, {FRAMES} x {IMAGE} x {IMAGE}, patch {PATCH}, tubelet 1 → "
        f"{f['peer_tokens']} patch tokens), width {WIDTH}, {HEADS} heads, MLP {MLP}, **{d} blocks**, randomly "
        "initialised; loss = mean square of the last hidden states (+ our attention-pooled embedding, so our "
        "`clip_projector` is timed too). Ours: `build_video_encoder('s14', depth=...)` (RMSNorm, QK-norm, "
        "LayerScale, attention pool: the official block); Hugging Face `VideoMAEModel` "
        "(`attn_implementation='sdpa'`) and `TimesformerModel` (divided space-time, eager attention). "
        f"{m['rounds']} rounds, {m['threads']} thread(s).",
        "",
        "| model | attention | s / clip | GFLOP / step | GFLOP/s | MFU (fp32) | peer time / ours |",
        "|---|---|---|---|---|---|---|",
        f"| ours | joint | {f['ours_joint_s_per_clip']:.2f} | {f['ours_joint_step_gflop']:.0f} | {f['ours_joint_gflops']:.1f} | {f['cpu_mfu_fp32']:.1%} | |",
        f"| VideoMAE | joint | {f['videomae_s_per_clip']:.2f} | {f['videomae_step_gflop']:.0f} | {f['videomae_gflops']:.1f} | {f['cpu_mfu_fp32_videomae']:.1%} | **{f['ratio_vs_videomae']:.3f}** |",
        f"| ours | divided | {f['ours_divided_s_per_clip']:.2f} | {f['ours_divided_step_gflop']:.0f} | {f['ours_divided_gflops']:.1f} | {f['cpu_mfu_fp32_ours_divided']:.1%} | |",
        f"| TimeSformer | divided | {f['timesformer_s_per_clip']:.2f} | {f['timesformer_step_gflop']:.0f} | {f['timesformer_gflops']:.1f} | {f['cpu_mfu_fp32_timesformer']:.1%} | **{f['ratio_vs_timesformer']:.3f}** |",
        "",
        f"Ratio > 1: ours is faster (`ratio_vs_videomae`, `ratio_vs_timesformer`). At {FRAMES} x {IMAGE}² our divided "
        f"encoder takes {1 / f['ratio_divided_vs_joint_s14']:.2f}x the time of our joint one.",
        "",
        "## 2. The machine's limit (CPU MFU)",
        "",
        f"Three 2048³ matmuls in a row, timed in the same rounds: **{f['matmul_peak_gflops_fp32']:.0f} GFLOP/s fp32**, "
        f"{f['matmul_peak_gflops_bf16']:.0f} GFLOP/s bf16 (`matmul_peak_gflops_fp32`, `..._bf16`). MFU = FLOPs of "
        "the step / step time / the fp32 matmul rate of the same round (median over rounds). FLOPs: "
        "`torch.utils.flop_counter` for matmuls and convolutions, plus the CPU SDPA kernels counted from their "
        "shapes (4·B·H·Nq·Nk·Dh forward, 8·B·H·Nq·Nk·Dh backward: model FLOPs, without the recomputation of the "
        "scores inside the fused backward), which the counter leaves out (it counts TimeSformer's eager attention "
        "itself). "
        f"Ours (joint): **{f['cpu_mfu_fp32']:.1%}** (`cpu_mfu_fp32`); best peer "
        f"{f['cpu_mfu_fp32_best_peer']:.1%}.",
        "",
        "## 3. Masked encoding (stage 1)",
        "",
        "Our joint encoder (the sizes above) with a tube mask, forward + backward, and the whole stage-1 step "
        "(`MaskedVideoStage`, pixel targets, decoder dim 128 x 2 blocks over all tokens, norm-pixel loss, AdamW "
        "step). At r = 0 no token is masked (the loss is empty; time only).",
        "",
        "| mask ratio | visible tokens | encoder s | encoder speedup | ideal 1/(1-r) | FLOP ratio | stage-1 step s | step speedup |",
        "|---|---|---|---|---|---|---|---|",
        f"| 0 | {f['peer_tokens']} | {f['masked_encoder_s_r0']:.2f} | 1 | 1 | 1 | {f['masked_step_s_r0']:.2f} | 1 |",
    ]
    for r in MASK_RATIOS[1:]:
        k = rname(r)
        vis = f["peer_tokens"] - round(r * f["peer_tokens"])
        L.append(
            f"| {k} | {vis} | {f[f'masked_encoder_s_r{k}']:.3f} | **{f[f'masked_speedup_r{k}']:.2f}x** | "
            f"{f[f'masked_ideal_r{k}']:.1f}x | {f[f'masked_flop_ratio_r{k}']:.1f}x | {f[f'masked_step_s_r{k}']:.2f} | "
            f"{f[f'masked_step_speedup_r{k}']:.2f}x |"
        )
    L += [
        "",
        "`masked_speedup_r0.75`, `masked_speedup_r0.9` (encoder), `masked_step_speedup_r...` (whole step). The "
        "encoder's FLOPs fall faster than 1/(1-r) because joint attention is quadratic in the visible tokens; "
        "the step's speedup is lower because the decoder always sees every token.",
        "",
    ]
    return L


def _md_divjoint(f: dict, meta: dict) -> list[str]:
    m = meta["divjoint"]
    L = [
        "## 4. Divided against joint attention, by frames",
        "",
        f"Our encoder at s14 width, **{m['depth']} blocks**, {m['image']}² frames ({(m['image'] // PATCH) ** 2} tokens "
        f"per frame, chosen so the crossing lies inside 8–64 frames; at 224² joint attention already costs "
        f"more at 8 frames, section 1), batch 1, forward + backward; {m['rounds']} rounds. Peak memory: RSS "
        "high-water mark of a fresh process per point (interpreter + torch + model + one step).",
        "",
        "| frames | tokens | joint s | divided s | joint / divided time | joint GFLOP | divided GFLOP | joint peak MB | divided peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in m["rows"]:
        L.append(
            f"| {r['frames']} | {r['tokens']} | {r['joint_s']:.2f} | {r['divided_s']:.2f} | {r['joint_over_divided_time']:.2f} | "
            f"{fmt(r['joint_gflop'], '.0f')} | {fmt(r['divided_gflop'], '.0f')} | {fmt(r['joint_peak_mb'], '.0f')} | {fmt(r['divided_peak_mb'], '.0f')} |"
        )
    ct, cm, cf = (
        f.get("divjoint_time_cross_frames"),
        f.get("divjoint_mem_cross_frames"),
        f.get("divjoint_flop_cross_frames"),
    )
    L += [
        "",
        f"Crossings (linear interpolation between measured points): time at **{fmt(ct, '.0f', 'none in range')}** frames "
        f"(`divjoint_time_cross_frames`), FLOPs at {fmt(cf, '.0f', 'none in range')}, peak memory at "
        f"{fmt(cm, '.0f', 'none in range')} (`divjoint_mem_cross_frames`). Joint attention's FLOPs grow with the "
        "square of the tokens; with the fused SDPA kernel its memory does not (no score matrix is kept), so "
        "memory differs only by the extra temporal attention layer of the divided block.",
        "",
    ]
    return L


def _md_hte(f: dict, meta: dict) -> list[str]:
    m = meta["hte"]
    geo = m["geometry"]
    fits = m["fits"]
    by = {}
    for r in m["rows"]:
        key = "hte" if r["kind"] == "hte" else ("flat_joint" if r["backend"] == "sdpa" else "flat_joint_math")
        by.setdefault(r["frames"], {})[key] = r
    L = [
        "## 5. Hierarchical temporal encoder: memory against video length",
        "",
        f"Forward + backward of one video of T frames at {geo['image']}² (patch {geo['patch']}: "
        f"{(geo['image'] // geo['patch']) ** 2} tokens per frame), `tiny` width (128, 4 blocks, joint attention). "
        f"HTE: windows of {geo['window']} frames through the encoder, 4 tokens per window, a 2-block temporal "
        "transformer. Flat: the same encoder over all T frames at once (one joint attention over T x 16 tokens), "
        "with the SDPA kernel and with the math attention (the official code without flash-attn). Peak RSS of "
        "a fresh process per point; `step` = peak minus the high-water mark before the step.",
        "",
        "| frames | HTE peak MB | flat joint (SDPA) peak MB | flat joint (math) peak MB | HTE step s | flat SDPA step s |",
        "|---|---|---|---|---|---|",
    ]
    for fr in sorted(by):
        row = by[fr]

        def g(k, key="peak_mb", spec=".0f", row=row):
            return fmt(row.get(k, {}).get(key), spec)

        L.append(
            f"| {fr} | {g('hte')} | {g('flat_joint')} | {g('flat_joint_math')} | {g('hte', 'step_s', '.2f')} | {g('flat_joint', 'step_s', '.2f')} |"
        )
    L += [
        "",
        "Linear fits of peak MB against frames:",
        "",
        "| series | MB / frame (fit) | R² | step MB / frame | step R² | MB / frame, first interval | MB / frame, last interval |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ("hte", "flat_joint", "flat_joint_math"):
        if name in fits:
            ft = fits[name]
            L.append(
                f"| {name} | **{ft['slope_mb_per_frame']:.3f}** | {ft['r2']:.4f} | {ft['step_slope_mb_per_frame']:.3f} | "
                f"{ft['step_r2']:.4f} | {ft.get('first_interval_mb_per_frame', float('nan')):.2f} | "
                f"{ft.get('last_interval_mb_per_frame', float('nan')):.2f} |"
            )
    L += [
        "",
        "`hte_peak_mb_per_frame`, `hte_peak_r2`, `flat_joint_peak_mb_per_frame`, `flat_joint_math_peak_r2`, ... "
        "Step times are indicative only (separate processes, not interleaved). Linear growth shows as equal "
        "first- and last-interval slopes; the math series' slope grows with length (it keeps T² x 256 "
        "attention scores per head and block). The SDPA series is linear too, because the fused kernel keeps "
        "no score matrix: against it, what the HTE saves is time (quadratic in the tokens), not memory.",
        "",
    ]
    return L


def _md_data(f: dict, meta: dict) -> list[str]:
    m = meta["data"]
    L = [
        "## 6. Data against model",
        "",
        "`SyntheticVideoDataModule` train loader (8 frames, no other modality), clips/s once its workers run, "
        "nothing else running in this process:",
        "",
        "| frame size | batch | workers | clips/s |",
        "|---|---|---|---|",
    ]
    for r in m["rows"]:
        L.append(f"| {r['image']}² | {r['batch']} | {r['workers']} | {r['clips_per_s']:.1f} |")
    L += [
        "",
        "What the stage-1 steps consume (fixed batch, no loader):",
        "",
        f"- tiny ({m['tiny_consumer']}): **{f['model_clips_per_s_tiny']:.1f} clips/s** "
        f"(`model_clips_per_s_tiny`); the best loader delivers {f['data_over_model_tiny']:.1f}x that (`data_over_model_tiny`).",
        f"- s14 ({m['s14_consumer']}): **{f['model_clips_per_s_s14']:.2f} clips/s** (`model_clips_per_s_s14`); "
        f"synthetic 224² clips come {f['data_over_model_s14_synthetic']:.0f}x faster.",
    ]
    if m.get("decode"):
        d = m["decode"]
        L.append(
            f"- Real files (`benchmarks/data_throughput.py`, {d['date']}: `read_clip` through a DataLoader with "
            f"{d['workers']} worker(s) over {', '.join(d['files'] or [])}, 8 frames at short side 224): "
            f"**{d['clips_per_s']:.1f} clips/s** (`decode_clips_per_s_224px_files`) = "
            f"{f['decode_over_model_s14']:.1f}x what s14 consumes (`decode_over_model_s14`) and "
            f"{f['decode_over_model_tiny']:.2f}x what tiny consumes (`decode_over_model_tiny`)."
        )
    L.append(
        f"- A tiny training loop fed by the loader (1 worker, so the worker and the step share the cores) takes "
        f"{f['loop_loader_over_cached_tiny']:.2f}x the time of the same steps on a batch already in memory "
        "(`loop_loader_over_cached_tiny`)."
    )
    if "tiny_step_threads_ratio" in f and m.get("thread_times"):
        tt = m["thread_times"]
        L.append(
            f"- Threads: the tiny step with {tt['other_threads']} thread(s) takes **{f['tiny_step_threads_ratio']:.2f}x** the "
            f"time it takes with {tt['threads']} (`tiny_step_threads_ratio`; the model side of the step, 5 steps in "
            "each of 4 fresh processes, A B A B): with other jobs on the cores, OpenMP threads wait for each other "
            "at every parallel region."
        )

    def bound(ratio: float) -> str:
        return "**data-bound**" if ratio < 1 else "**not data-bound**"

    parts = [
        f"tiny on the synthetic clips is {bound(f['data_over_model_tiny'])} (the loader delivers "
        f"{f['data_over_model_tiny']:.1f}x what the step consumes)"
    ]
    if "decode_over_model_tiny" in f:
        parts.append(
            f"tiny on decoded files would be {bound(f['decode_over_model_tiny'])} "
            f"({f['decode_over_model_tiny']:.2f}x)"
        )
        parts.append(
            f"s14 on decoded files is {bound(f['decode_over_model_s14'])} ({f['decode_over_model_s14']:.1f}x)"
        )
    L += ["", "Verdict on this machine: " + "; ".join(parts) + ".", ""]
    return L


def _md_profile(f: dict, meta: dict) -> list[str]:
    L = ["## 7. Profile and fixes", ""]
    p = meta.get("profile")
    if p:
        L += [
            f"`torch.profiler` of one forward + backward of our joint s14 encoder ({p['depth']} blocks, "
            f"{p['threads']} thread(s)), self CPU time: SDPA kernels {f['profile_share_sdpa']:.0%}, matmuls "
            f"{f['profile_share_matmul']:.0%}, everything else {f['profile_share_other']:.0%}.",
            "",
            "| op | self ms | share | calls |",
            "|---|---|---|---|",
        ]
        L += [
            f"| `{t['op'][:70]}` | {t['self_ms']:.0f} | {t['share']:.1%} | {t['calls']} |" for t in p["top"]
        ]
        L.append("")
    L += ["Fixes (each timed against the code before it, interleaved in the same rounds):", ""]
    L.append(
        "- `models/layers.py` `RMSNorm`: torch has no fused RMSNorm kernel on the CPU; its composite one runs "
        "about a dozen full-size elementwise passes per call forward and backward (each a parallel region) and "
        "keeps two width-sized tensors per call. A hand-written autograd function (one `vector_norm` and two "
        "multiplies forward, seven passes backward; it keeps only its input, as a fused kernel does) replaces it "
        "for fp32/fp64 CPU tensors: 4 norms per block (norm1, q_norm, k_norm, norm2)."
        + (
            f" One norm, forward + backward on s14 activations ({1 + FRAMES * (IMAGE // PATCH) ** 2} x {WIDTH}), before the "
            f"fix takes **{f['rmsnorm_op_speedup']:.2f}x** the time after it (`rmsnorm_op_speedup`), "
            f"{f['rmsnorm_op_speedup_qk_slice']:.2f}x on the q/k column slices of the qkv output "
            "(`rmsnorm_op_speedup_qk_slice`; 31 interleaved repeats)."
            if "rmsnorm_op_speedup" in f
            else ""
        )
        + (
            f" The whole joint step with torch's RMSNorm takes {f['rmsnorm_fix_speedup']:.3f}x the time of the fixed "
            f"one (`rmsnorm_fix_speedup`, section-1 rounds): {_rmsnorm_saving(f, meta)}, inside the rounds' "
            "noise on one thread; the fix pays where every parallel region costs a wait (several threads on "
            "shared cores) and in memory (one saved tensor per norm instead of two)."
            if "rmsnorm_fix_speedup" in f
            else " (Whole-step before/after row: `--full` only.)"
        )
    )
    if "pixel_target_fix_speedup" in f:
        L.append(
            "- `models/heads.py` `pixel_reconstruction_loss`: the norm-pixel targets were computed for every token "
            "with a strided reduction over the channel-interleaved patch and then indexed; now the masked tokens "
            "are picked first and each (token, channel) is standardised over a contiguous row with one "
            f"`var_mean`. The tiny stage-1 step before the fix takes **{f['pixel_target_fix_speedup']:.3f}x** the time "
            f"after it (`pixel_target_fix_speedup`; step {f['tiny_stage1_step_s']:.2f} s)."
        )
    L.append("")
    return L


def _rmsnorm_saving(f: dict, meta: dict) -> str:
    ms = (meta.get("profile") or {}).get("rmsnorm_op_ms")
    depth = (meta.get("peers") or {}).get("depth")
    if not ms or not depth:
        return "the norms are a small part of the step"
    # per block: norm1 and norm2 on contiguous rows, q_norm and k_norm on column slices
    saved = (
        depth
        * 2
        * ((ms["plain_before"] - ms["plain_after"]) + (ms["slice_before"] - ms["slice_after"]))
        / 1000
    )
    return (
        f"the op-level saving, {depth} blocks x 4 norms, is {saved * 1000:.0f} ms, "
        f"{saved / f['ours_joint_s_per_clip']:.1%} of the step"
    )


def _md_gpu(meta: dict) -> list[str]:
    g = meta.get("gpu") or {"status": "not run: no GPU lent"}
    L = ["## 8. GPU: l14 stage-2 MFU (bf16)", ""]
    if g.get("status") == "run":
        L += [
            f"{g['device']}: `ContrastiveStage` l14 (configs/stage2/l14.yaml sizes, no init_from), batch {g['batch']}, "
            f"bf16 autocast, activation checkpointing on: {g['step_s']:.3f} s / step, {g['step_tflop']:.1f} TFLOP model "
            f"work (counted without checkpointing) → {g['step_tflop'] / g['step_s']:.0f} TFLOP/s against a measured "
            f"bf16 matmul peak of {g['matmul_peak_tflops_bf16']:.0f} TFLOP/s: **MFU {g['mfu_bf16']:.1%}** "
            "(`gpu_mfu_bf16_l14_stage2`).",
            "",
        ]
    else:
        L += [
            "**Not run: no GPU lent** to this task. `python benchmarks/run.py --gpu` runs it where CUDA is available: "
            "the l14 stage-2 step (`ContrastiveStage`, configs/stage2/l14.yaml sizes, batch 8, bf16 autocast, "
            "activation checkpointing) timed over 10 steps, FLOPs counted with `torch.utils.flop_counter` in one "
            "step without checkpointing, against an 8192³ bf16 matmul measured on the same GPU; figures "
            "`gpu_mfu_bf16_l14_stage2`, `gpu_matmul_peak_tflops_bf16`, `gpu_l14_stage2_step_s`. "
            "(`--gpu-dry-run` runs the same code path on the CPU with the tiny preset.)",
            "",
        ]
    return L


def data_section() -> str:
    """The clip-decoding section written by benchmarks/data_throughput.py, kept as it is."""
    if DOCS.exists():
        text = DOCS.read_text(encoding="utf-8")
        if DATA_START in text and DATA_END in text:
            return DATA_START + text.split(DATA_START, 1)[1].split(DATA_END, 1)[0] + DATA_END
    return ""


def write_docs(res: dict) -> None:
    body = markdown(res)
    kept = data_section()
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(body + ("\n" + kept + "\n" if kept else ""), encoding="utf-8")


def print_tables(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    f, meta = res, res["_meta"]
    g = goals(f)
    if g:
        t = Table(title="Goals (issue 8)")
        t.add_column("goal")
        t.add_column("result")
        t.add_column("number", justify="right")
        for name, ok, num in g:
            t.add_row(name, "met" if ok else "NOT met", num)
        console.print(t)
    if "ratio_vs_videomae" in f:
        t = Table(title=f"Forward+backward per clip, s14 sizes, {meta['peers']['depth']} blocks, fp32")
        for c in ("model", "s/clip", "GFLOP", "MFU", "peer/ours"):
            t.add_column(c, justify="right" if c != "model" else "left")
        t.add_row(
            "ours joint",
            f"{f['ours_joint_s_per_clip']:.2f}",
            f"{f['ours_joint_step_gflop']:.0f}",
            f"{f['cpu_mfu_fp32']:.1%}",
            "",
        )
        t.add_row(
            "VideoMAE",
            f"{f['videomae_s_per_clip']:.2f}",
            f"{f['videomae_step_gflop']:.0f}",
            f"{f['cpu_mfu_fp32_videomae']:.1%}",
            f"{f['ratio_vs_videomae']:.3f}",
        )
        t.add_row(
            "ours divided",
            f"{f['ours_divided_s_per_clip']:.2f}",
            f"{f['ours_divided_step_gflop']:.0f}",
            f"{f['cpu_mfu_fp32_ours_divided']:.1%}",
            "",
        )
        t.add_row(
            "TimeSformer",
            f"{f['timesformer_s_per_clip']:.2f}",
            f"{f['timesformer_step_gflop']:.0f}",
            f"{f['cpu_mfu_fp32_timesformer']:.1%}",
            f"{f['ratio_vs_timesformer']:.3f}",
        )
        if "ours_joint_torch_rmsnorm_s_per_clip" in f:
            t.add_row(
                "ours joint, torch RMSNorm", f"{f['ours_joint_torch_rmsnorm_s_per_clip']:.2f}", "", "", ""
            )
        console.print(t)
        t = Table(title="Masked encoding")
        for c in ("r", "encoder s", "speedup", "ideal", "step s", "step speedup"):
            t.add_column(c, justify="right")
        t.add_row("0", f"{f['masked_encoder_s_r0']:.2f}", "1", "1", f"{f['masked_step_s_r0']:.2f}", "1")
        for k in (rname(r) for r in MASK_RATIOS[1:]):
            t.add_row(
                k,
                f"{f[f'masked_encoder_s_r{k}']:.3f}",
                f"{f[f'masked_speedup_r{k}']:.2f}",
                f"{f[f'masked_ideal_r{k}']:.1f}",
                f"{f[f'masked_step_s_r{k}']:.2f}",
                f"{f[f'masked_step_speedup_r{k}']:.2f}",
            )
        console.print(t)
    if "divjoint" in meta:
        t = Table(title="Divided vs joint by frames")
        for c in ("frames", "joint s", "divided s", "joint/divided", "joint MB", "divided MB"):
            t.add_column(c, justify="right")
        for r in meta["divjoint"]["rows"]:
            t.add_row(
                str(r["frames"]),
                f"{r['joint_s']:.2f}",
                f"{r['divided_s']:.2f}",
                f"{r['joint_over_divided_time']:.2f}",
                fmt(r["joint_peak_mb"], ".0f"),
                fmt(r["divided_peak_mb"], ".0f"),
            )
        console.print(t)
    if "hte" in meta:
        t = Table(title="Peak memory against frames (fits)")
        for c in ("series", "MB/frame", "R^2"):
            t.add_column(c, justify="right")
        for name, ft in meta["hte"]["fits"].items():
            t.add_row(name, f"{ft['slope_mb_per_frame']:.3f}", f"{ft['r2']:.4f}")
        console.print(t)
    if "data" in meta:
        t = Table(title="Data against model (clips/s)")
        t.add_column("what")
        t.add_column("clips/s", justify="right")
        for r in meta["data"]["rows"]:
            t.add_row(f"loader {r['image']}px, {r['workers']} workers", f"{r['clips_per_s']:.1f}")
        t.add_row("tiny stage-1 step", f"{f['model_clips_per_s_tiny']:.1f}")
        t.add_row("s14 stage-1 step (mask 0.9)", f"{f['model_clips_per_s_s14']:.2f}")
        if "decode_clips_per_s_224px_files" in f:
            t.add_row(
                "real files, read_clip (data_throughput.py)", f"{f['decode_clips_per_s_224px_files']:.1f}"
            )
        console.print(t)
    gpu = meta.get("gpu", {})
    console.print(f"GPU section: {gpu.get('status', 'not run: no GPU lent')}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer blocks, repeats and points (default)")
    mode.add_argument("--full", action="store_true", help="real depths, more repeats and points")
    parser.add_argument("--threads", default="auto", help="'auto' (default) or a number of threads")
    parser.add_argument(
        "--sections",
        default=",".join(s for s in SECTIONS if s != "gpu"),
        help=f"comma-separated subset of {','.join(SECTIONS)}; results of the others are kept from "
        "the last results.json",
    )
    parser.add_argument("--gpu", action="store_true", help="also run the GPU section (needs CUDA)")
    parser.add_argument(
        "--gpu-dry-run", action="store_true", help="run the GPU code path on the CPU (tiny), report nothing"
    )
    parser.add_argument("--no-docs", action="store_true", help="do not rewrite docs/benchmarks.md")
    parser.add_argument(
        "--docs-only",
        action="store_true",
        help="rewrite docs/benchmarks.md from benchmarks/results.json, measure nothing",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
        sys.stdout.flush()
        # no interpreter teardown: it raises the RSS high-water mark (~120 MB here) after the step
        os._exit(0)

    if args.docs_only:
        res = json.loads(RESULTS.read_text())
        flat = {**res, "_meta": {**res["_meta"], **res["_meta"]["sections"]}}
        print_tables(flat)
        write_docs(flat)
        return 0

    t_start = time.perf_counter()
    load_start = load_avg()
    threads, probe = pick_threads(args.threads)
    s = make_settings(not args.full, threads)
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    if args.gpu and "gpu" not in sections:
        sections.append("gpu")
    _log(f"mode {s.mode}, threads {threads} ({probe}), sections {sections}")

    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    out: dict = {}
    meta: dict = {}
    runners = {
        "peers": run_peers,
        "divjoint": run_divjoint,
        "hte": run_hte,
        "data": run_data,
        "profile": run_profile,
    }
    for name in sections:
        if name == "gpu":
            run_gpu(s, out, meta)
            continue
        _log(f"section {name}")
        t0 = time.perf_counter()
        runners[name](s, out, meta)
        meta.setdefault(name, {})["seconds"] = time.perf_counter() - t0
        _log(f"section {name} done in {meta[name]['seconds']:.0f} s")
    if args.gpu_dry_run:
        dry: dict = {}
        run_gpu(s, {}, dry, dry_run=True)
        _log(f"GPU dry run: {dry['gpu']}")

    # keep what this run did not measure from the previous results (their own settings are in _meta)
    figures = {k: v for k, v in previous.items() if k != "_meta" and section_of(k) not in sections}
    prev_meta = previous.get("_meta", {})
    stale = {sec for sec in SECTIONS if sec not in sections}
    figures.update(out)
    merged_meta = {k: v for k, v in prev_meta.get("sections", {}).items() if k in stale}
    for name in sections:
        if name in meta:
            merged_meta[name] = {**meta[name], "mode": s.mode, "threads": threads, "date": _now()}
    if "gpu" not in merged_meta:
        merged_meta["gpu"] = {"status": "not run: no GPU lent"}
    runtime = time.perf_counter() - t_start
    env = {
        "cpu": cpu_name(),
        "cores": cores(),
        "platform": platform.platform(),
        "load_avg_start": load_start,
        "load_avg_end": load_avg(),
        "versions": versions(),
    }
    res = {
        **dict(sorted(figures.items())),
        "_meta": {
            "date": _now(),
            "runtime_s": runtime,
            "sections_run": sections,
            "env": env,
            "threads_probe": probe,
            "settings": asdict(s),
            "sections": merged_meta,
        },
    }
    RESULTS.write_text(json.dumps(res, indent=1, default=_json_default) + "\n", encoding="utf-8")
    flat = {**res, "_meta": {**res["_meta"], **merged_meta}}
    print_tables(flat)
    if not args.no_docs:
        write_docs(flat)
    _log(
        f"wrote {RESULTS.relative_to(ROOT)}"
        + ("" if args.no_docs else f" and {DOCS.relative_to(ROOT)}")
        + f"; runtime {runtime:.0f} s"
    )
    return 0


def _now() -> str:
    return dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    return str(o)


if __name__ == "__main__":
    raise SystemExit(main())
