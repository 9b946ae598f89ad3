"""Section 4: divided against joint space-time attention, time and peak memory against frames.

InternVideo2 (arXiv 2403.15377) uses joint attention; TimeSformer's divided attention (Bertasius et
al. 2021) is the alternative this library also builds. Joint attention costs the square of all
tokens, divided attention the square of one frame's tokens plus one of the frames: the section finds
the frame count where the two cross, in time, FLOPs and peak memory.
"""

from __future__ import annotations

import torch

from benchmarks.config import PATCH, Settings
from benchmarks.measure import count_flops, crossing, interleave, log, med, paired
from benchmarks.memory import run_children
from benchmarks.workloads import ours_step, s14_encoder


def run_divjoint(s: Settings, out: dict, meta: dict) -> None:
    torch.manual_seed(0)
    steps = {}
    for f in s.dj_frames:
        video = torch.randn(1, 3, f, s.dj_image, s.dj_image)
        for att in ("joint", "divided"):
            steps[f"{att}_f{f}"] = ours_step(
                s14_encoder(s.dj_depth, att, num_frames=f, image_size=s.dj_image), video
            )
    log(f"divided vs joint: {len(steps)} models, {s.dj_depth} blocks, {s.dj_image}^2")
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
    rows = _rows(s, times, flops, peak, out)
    _crossings(s, rows, out)
    meta["divjoint"] = {
        "depth": s.dj_depth,
        "image": s.dj_image,
        "rounds": s.dj_rounds,
        "rows": rows,
        "times": times,
        "memory": mem,
    }


def _rows(s: Settings, times: dict, flops: dict, peak: dict, out: dict) -> list[dict]:
    """One row per frame count (time, FLOPs, peak memory of both), its figures written to ``out``."""
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
    return rows


def _crossings(s: Settings, rows: list[dict], out: dict) -> None:
    """Where joint starts to cost more than divided: time, peak memory, FLOPs."""
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
