"""Section 7: where the time of our joint step goes (``torch.profiler``), and each performance fix
timed against the code before it, interleaved in the same rounds.

The fixes measured: the hand-written CPU RMSNorm in ``models/layers.py`` (InternVideo2's block uses
RMSNorm and QK-norm, arXiv 2403.15377; torch's composite CPU kernel makes a dozen passes) and the
stage-1 pixel target in ``models/heads.py`` (masked tokens picked before the norm-pixel statistics,
as VideoMAE's target is defined).
"""

from __future__ import annotations

import contextlib

import torch

from benchmarks.config import FRAMES, IMAGE, PATCH, WIDTH, Settings
from benchmarks.measure import interleave, med, paired
from benchmarks.workloads import (
    ours_step,
    s14_encoder,
    stage_step,
    tiny_clips,
    tiny_stage1,
    torch_rmsnorm,
    video_batch,
)


def run_profile(s: Settings, out: dict, meta: dict) -> None:
    """torch.profiler of our joint step (the peer section's size): where the time goes."""
    _profile_step(s, out, meta)
    _rmsnorm_op(out, meta)
    _pixel_target_fix(s, out, meta)


def _profile_step(s: Settings, out: dict, meta: dict) -> None:
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


def _rmsnorm_op(out: dict, meta: dict) -> None:
    """The RMSNorm fix at the op level: one norm forward + backward on s14 activations, before/after,
    on a contiguous input (norm1, norm2) and on a column slice of the qkv output (q_norm, k_norm)."""
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


def _pixel_target_fix(s: Settings, out: dict, meta: dict) -> None:
    """The stage-1 pixel target before/after (see the doc): tiny stage-1 step, configs/stage1/tiny.yaml."""
    before = _pixel_loss_before()
    import iv2_lightning.models.masked_video as masked_module

    stage, opt = tiny_stage1()
    batch = video_batch(tiny_clips(32))
    after_fn = stage_step(stage, opt, batch)
    current = masked_module.pixel_reconstruction_loss

    def before_fn():
        masked_module.pixel_reconstruction_loss = before
        try:
            after_fn()
        finally:
            masked_module.pixel_reconstruction_loss = current

    times = interleave({"after": after_fn, "before": before_fn}, max(s.rounds, 5), label="pixel-target fix")
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
