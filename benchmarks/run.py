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

This file is the entry point (the flags, the order of the sections, merging with the previous
``results.json``); each section lives in its own module of the ``benchmarks`` package (see its
``__init__``), which ``python -m benchmarks.run`` from the repository root also runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

if not __package__:  # run as a script: import the suite as the `benchmarks` package of the repository
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.config import DOCS, RESULTS, ROOT, SECTIONS, Settings, make_settings, section_of
from benchmarks.data_vs_model import run_data
from benchmarks.divjoint import run_divjoint
from benchmarks.gpu import run_gpu
from benchmarks.hte import run_hte
from benchmarks.measure import cores, cpu_name, load_avg, log, pick_threads, versions
from benchmarks.memory import child_main
from benchmarks.peers import run_peers
from benchmarks.profiling import run_profile
from benchmarks.report import write_docs
from benchmarks.tables import print_tables

RUNNERS = {
    "peers": run_peers,
    "divjoint": run_divjoint,
    "hte": run_hte,
    "data": run_data,
    "profile": run_profile,
}


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
    log(f"mode {s.mode}, threads {threads} ({probe}), sections {sections}")

    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    out, meta = _run_sections(s, sections, args.gpu_dry_run)
    res = _merge(previous, out, meta, s, sections, probe, t_start, load_start)
    RESULTS.write_text(json.dumps(res, indent=1, default=_json_default) + "\n", encoding="utf-8")
    flat = {**res, "_meta": {**res["_meta"], **res["_meta"]["sections"]}}
    print_tables(flat)
    if not args.no_docs:
        write_docs(flat)
    log(
        f"wrote {RESULTS.relative_to(ROOT)}"
        + ("" if args.no_docs else f" and {DOCS.relative_to(ROOT)}")
        + f"; runtime {res['_meta']['runtime_s']:.0f} s"
    )
    return 0


def _run_sections(s: Settings, sections: list[str], gpu_dry_run: bool) -> tuple[dict, dict]:
    """Run each section in turn: the figures measured and each section's ``_meta``."""
    out: dict = {}
    meta: dict = {}
    for name in sections:
        if name == "gpu":
            run_gpu(s, out, meta)
            continue
        log(f"section {name}")
        t0 = time.perf_counter()
        RUNNERS[name](s, out, meta)
        meta.setdefault(name, {})["seconds"] = time.perf_counter() - t0
        log(f"section {name} done in {meta[name]['seconds']:.0f} s")
    if gpu_dry_run:
        dry: dict = {}
        run_gpu(s, {}, dry, dry_run=True)
        log(f"GPU dry run: {dry['gpu']}")
    return out, meta


def _merge(
    previous: dict,
    out: dict,
    meta: dict,
    s: Settings,
    sections: list[str],
    probe: dict,
    t_start: float,
    load_start: float | None,
) -> dict:
    """This run's figures over the previous results: what this run did not measure is kept (its own
    settings are in ``_meta``)."""
    figures = {k: v for k, v in previous.items() if k != "_meta" and section_of(k) not in sections}
    prev_meta = previous.get("_meta", {})
    stale = {sec for sec in SECTIONS if sec not in sections}
    figures.update(out)
    merged_meta = {k: v for k, v in prev_meta.get("sections", {}).items() if k in stale}
    for name in sections:
        if name in meta:
            merged_meta[name] = {**meta[name], "mode": s.mode, "threads": s.threads, "date": _now()}
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
    return {
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


def _now() -> str:
    return dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    return str(o)


if __name__ == "__main__":
    raise SystemExit(main())
