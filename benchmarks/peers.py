"""Sections 1-3, timed in the same rounds: our backbone against its peers, CPU MFU against the
machine's own matmul rate, and the speedup of masked encoding (stage 1).

1. Forward+backward seconds per clip of our ``VideoEncoder`` against Hugging Face ``VideoMAEModel``
   (joint attention, SDPA) and ``TimesformerModel`` (divided), at the InternVideo2-S/14 sizes.
2. FLOP/s of those steps over the measured rate of a 2048^3 fp32 (and bf16) matmul of the same round.
3. The stage-1 step (``MaskedVideoStage``, pixel targets, tube masks) and the encoder alone at mask
   ratio 0, 0.75 and 0.9, against the ideal 1 / (1 - r): InternVideo2 (arXiv 2403.15377 Sec. 3.1)
   encodes only the unmasked tokens, as VideoMAE does, and this is the saving it buys.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch

from benchmarks.config import FRAMES, IMAGE, MASK_RATIOS, PATCH, Settings, rname
from benchmarks.measure import count_flops, interleave, log, med, paired
from benchmarks.workloads import (
    before_rmsnorm,
    hf_step,
    ours_step,
    s14_encoder,
    stage1,
    stage_step,
    timesformer,
    video_batch,
    videomae,
)


def run_peers(s: Settings, out: dict, meta: dict) -> None:
    torch.manual_seed(0)
    d = s.peer_depth
    video = torch.randn(1, 3, FRAMES, IMAGE, IMAGE)
    grid = (FRAMES, IMAGE // PATCH, IMAGE // PATCH)
    n_tokens = math.prod(grid)

    log(f"peers: building s14-sized models with {d} blocks")
    steps, stages = _steps(s, video, grid)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the r=0 stage-1 loss is a mean over no masked token
        flops = _warm_up_and_count(steps)
        times = interleave(steps, s.rounds, warmup=False, label="peers")

    t = {k: med(v) for k, v in times.items()}
    out["peer_depth"] = d
    out["peer_tokens"] = n_tokens
    _peer_figures(s, times, t, flops, out)
    _mfu_figures(times, t, flops, out)
    _masked_figures(times, t, flops, out)
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


def _steps(
    s: Settings, video: torch.Tensor, grid: tuple[int, int, int]
) -> tuple[dict[str, Callable[[], None]], dict]:
    """Every contender of the section's rounds (and the stages, kept alive until the end)."""
    from iv2_lightning.models import tube_mask
    from iv2_lightning.models.compile import compile_blocks

    d = s.peer_depth
    hf_video = video.transpose(1, 2).contiguous()  # Hugging Face video models take [B, T, C, H, W]
    ours_j, ours_d = s14_encoder(d, "joint"), s14_encoder(d, "divided")
    vmae, tsf = videomae(d), timesformer(d)
    # the same encoders with their blocks compiled (regional torch.compile, `compile: true`)
    ours_jc, ours_dc = s14_encoder(d, "joint"), s14_encoder(d, "divided")
    compile_blocks(ours_jc)
    compile_blocks(ours_dc)
    steps = {
        "ours_joint": ours_step(ours_j, video),
        "videomae": hf_step(vmae, hf_video),
        "ours_divided": ours_step(ours_d, video),
        "timesformer": hf_step(tsf, hf_video),
        "ours_joint_compiled": ours_step(ours_jc, video),
        "ours_divided_compiled": ours_step(ours_dc, video),
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
    return steps, stages


def _warm_up_and_count(steps: dict[str, Callable[[], None]]) -> dict[str, float]:
    """FLOPs of one call each (this call is also the warm-up)."""
    flops = {}
    for name, fn in steps.items():
        if name.startswith("matmul"):
            fn()
            flops[name] = 3 * 2.0 * 2048**3
        elif name == "ours_joint_torch_rmsnorm" or name.endswith("_compiled"):
            fn()  # the same model work as eager (this first call also compiles)
            flops[name] = flops[name.removesuffix("_compiled").removesuffix("_torch_rmsnorm")]
        else:
            flops[name] = count_flops(fn)
        log(f"  peers warm-up + FLOPs {name}: {flops[name] / 1e9:.1f} GFLOP")
    return flops


def _peer_figures(s: Settings, times: dict, t: dict, flops: dict, out: dict) -> None:
    """1. peers"""
    for k in ("ours_joint", "videomae", "ours_divided", "timesformer"):
        out[f"{k}_s_per_clip"] = t[k]
        out[f"{k}_step_gflop"] = flops[k] / 1e9
    out["ratio_vs_videomae"] = paired(times["videomae"], times["ours_joint"])
    out["ratio_vs_timesformer"] = paired(times["timesformer"], times["ours_divided"])
    out["ratio_divided_vs_joint_s14"] = paired(times["ours_joint"], times["ours_divided"])
    for k in ("ours_joint_compiled", "ours_divided_compiled"):
        out[f"{k}_s_per_clip"] = t[k]
    out["ratio_vs_videomae_compiled"] = paired(times["videomae"], times["ours_joint_compiled"])
    out["ratio_vs_timesformer_compiled"] = paired(times["timesformer"], times["ours_divided_compiled"])
    if s.rmsnorm_before_after:
        out["ours_joint_torch_rmsnorm_s_per_clip"] = t["ours_joint_torch_rmsnorm"]
        out["rmsnorm_fix_speedup"] = paired(times["ours_joint_torch_rmsnorm"], times["ours_joint"])


def _mfu_figures(times: dict, t: dict, flops: dict, out: dict) -> None:
    """2. MFU against the matmul of the same round"""
    peak32 = [flops["matmul_fp32"] / x for x in times["matmul_fp32"]]
    peak16 = [flops["matmul_bf16"] / x for x in times["matmul_bf16"]]
    out["matmul_peak_gflops_fp32"] = med(peak32) / 1e9
    out["matmul_peak_gflops_bf16"] = med(peak16) / 1e9
    for k, key in (
        ("ours_joint", "cpu_mfu_fp32"),
        ("ours_divided", "cpu_mfu_fp32_ours_divided"),
        ("videomae", "cpu_mfu_fp32_videomae"),
        ("timesformer", "cpu_mfu_fp32_timesformer"),
        ("ours_joint_compiled", "cpu_mfu_fp32_compiled"),
        ("ours_divided_compiled", "cpu_mfu_fp32_ours_divided_compiled"),
    ):
        out[key] = med([flops[k] / tt / p for tt, p in zip(times[k], peak32, strict=True)])
        out[f"{k}_gflops"] = flops[k] / t[k] / 1e9
    out["cpu_mfu_fp32_best_peer"] = max(out["cpu_mfu_fp32_videomae"], out["cpu_mfu_fp32_timesformer"])


def _masked_figures(times: dict, t: dict, flops: dict, out: dict) -> None:
    """3. masking"""
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
