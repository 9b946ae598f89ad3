"""The benchmark results on the console: one rich table per section that ran (goals, peers,
masked encoding, divided vs joint, memory fits, data against model) and the GPU section's status.
"""

from __future__ import annotations

from benchmarks.config import MASK_RATIOS, rname
from benchmarks.measure import fmt
from benchmarks.report import goals


def print_tables(res: dict) -> None:
    from rich.console import Console

    console = Console()
    f, meta = res, res["_meta"]
    _print_goals(console, f)
    if "ratio_vs_videomae" in f:
        _print_peers(console, f, meta)
        _print_masked(console, f)
    if "divjoint" in meta:
        _print_divjoint(console, meta)
    if "hte" in meta:
        _print_hte(console, meta)
    if "data" in meta:
        _print_data(console, f, meta)
    gpu = meta.get("gpu", {})
    console.print(f"GPU section: {gpu.get('status', 'not run: no GPU lent')}")


def _print_goals(console, f: dict) -> None:
    """The goals of issue 8 that this run has data for."""
    from rich.table import Table

    g = goals(f)
    if g:
        t = Table(title="Goals (issue 8)")
        t.add_column("goal")
        t.add_column("result")
        t.add_column("number", justify="right")
        for name, ok, num in g:
            t.add_row(name, "met" if ok else "NOT met", num)
        console.print(t)


def _print_peers(console, f: dict, meta: dict) -> None:
    """Section 1-2: seconds, FLOPs and MFU per clip of ours and the peers."""
    from rich.table import Table

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
        t.add_row("ours joint, torch RMSNorm", f"{f['ours_joint_torch_rmsnorm_s_per_clip']:.2f}", "", "", "")
    console.print(t)


def _print_masked(console, f: dict) -> None:
    """Section 3: masked encoding against the ideal speedup."""
    from rich.table import Table

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


def _print_divjoint(console, meta: dict) -> None:
    """Section 4: divided against joint attention by frames."""
    from rich.table import Table

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


def _print_hte(console, meta: dict) -> None:
    """Section 5: the linear fits of peak memory against frames."""
    from rich.table import Table

    t = Table(title="Peak memory against frames (fits)")
    for c in ("series", "MB/frame", "R^2"):
        t.add_column(c, justify="right")
    for name, ft in meta["hte"]["fits"].items():
        t.add_row(name, f"{ft['slope_mb_per_frame']:.3f}", f"{ft['r2']:.4f}")
    console.print(t)


def _print_data(console, f: dict, meta: dict) -> None:
    """Section 6: what the loader delivers against what the steps consume."""
    from rich.table import Table

    t = Table(title="Data against model (clips/s)")
    t.add_column("what")
    t.add_column("clips/s", justify="right")
    for r in meta["data"]["rows"]:
        t.add_row(f"loader {r['image']}px, {r['workers']} workers", f"{r['clips_per_s']:.1f}")
    t.add_row("tiny stage-1 step", f"{f['model_clips_per_s_tiny']:.1f}")
    t.add_row("s14 stage-1 step (mask 0.9)", f"{f['model_clips_per_s_s14']:.2f}")
    if "decode_clips_per_s_224px_files" in f:
        t.add_row("real files, read_clip (data_throughput.py)", f"{f['decode_clips_per_s_224px_files']:.1f}")
    console.print(t)
