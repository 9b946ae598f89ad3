"""Writing ``docs/benchmarks.md``: the header (machine, threads, which run each section comes
from), the goals of issue 8 with their verdicts, then one section per benchmark
(:mod:`benchmarks.report_sections`); the clip-decoding section that ``benchmarks/data_throughput.py``
writes between its markers is kept as it is.
"""

from __future__ import annotations

from benchmarks.config import DATA_END, DATA_START, DOCS, GOAL_MASKED, GOAL_MFU, MASK_RATIOS, SECTIONS, rname
from benchmarks.measure import fmt
from benchmarks.report_sections import md_data, md_divjoint, md_gpu, md_hte, md_peers, md_profile


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**met**" if ok else "**not met**")


def goals(f: dict) -> list[tuple[str, bool | None, str]]:
    """(goal, met, the number) for every goal of issue 8 that this run has data for."""
    rows = []
    if "ratio_vs_videomae" in f:
        for ours, peer, key in (
            ("joint", "VideoMAE", "ratio_vs_videomae"),
            ("divided", "TimeSformer", "ratio_vs_timesformer"),
        ):
            for suffix, how in (("", "eager"), ("_compiled", "compiled blocks")):
                if key + suffix in f:
                    rows.append(
                        (
                            f"1. ours ({ours}, {how}) >= 1.1x {peer} (issue 16)",
                            f[key + suffix] >= 1.1,
                            f"{f[key + suffix]:.3f}",
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
        L += md_peers(f, meta)
    if "divjoint_time_ratio_f8" in f or "divjoint" in meta:
        L += md_divjoint(f, meta)
    if "hte" in meta:
        L += md_hte(f, meta)
    if "data" in meta:
        L += md_data(f, meta)
    L += md_profile(f, meta)
    L += md_gpu(meta)
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


#: sections other scripts write between their markers, kept as they are when this file is rewritten:
#: clip decoding (benchmarks/data_throughput.py), tiny stages (benchmarks/stages.py), the GPU check
#: (benchmarks/gpu_check.py --record)
KEPT_SECTIONS = (
    (DATA_START, DATA_END),
    ("<!-- stages:start -->", "<!-- stages:end -->"),
    ("<!-- gpu_check:start -->", "<!-- gpu_check:end -->"),
)


def data_section() -> str:
    """The sections other scripts wrote between their markers (``KEPT_SECTIONS``), kept as they are."""
    if not DOCS.exists():
        return ""
    text = DOCS.read_text(encoding="utf-8")
    kept = [
        start + text.split(start, 1)[1].split(end, 1)[0] + end
        for start, end in KEPT_SECTIONS
        if start in text and end in text
    ]
    return "\n\n".join(kept)


def write_docs(res: dict) -> None:
    body = markdown(res)
    kept = data_section()
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(body + ("\n" + kept + "\n" if kept else ""), encoding="utf-8")
