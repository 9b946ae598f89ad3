"""Where the benchmark results go, which section writes which figure, the s14 sizes every section
shares, the goals, and the settings of a ``--quick`` or ``--full`` run.

The sizes are those of the official InternVideo2-S/14 vision encoder (arXiv 2403.15377; width 384,
6 heads, MLP 1536, patch 14, the ``s14`` preset), so the peers are compared at a size the recipe
actually ships.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results.json"
DATA_RESULTS = ROOT / "benchmarks" / "results_data.json"
DOCS = ROOT / "docs" / "benchmarks.md"
RUN_SCRIPT = ROOT / "benchmarks" / "run.py"  # the entry point, also started as the memory children
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
