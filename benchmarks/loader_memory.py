"""Loader memory over a long epoch: does the resident memory of the training loader stay flat?

``python -m benchmarks.loader_memory [--clips 20000] [--workers 2]`` (from the repository root)
iterates one epoch of ``SyntheticVideoDataModule``'s training loader (the tiny geometry: 8 frames of
64 x 64 with sound, captions, speech and labels, batch 32), with ``cache: false`` and ``cache: true``,
and samples the resident memory (RSS) of the main process and of every loader worker every 10 batches.
A loader that keeps something per batch grows linearly; a flat one only wobbles. It reports the RSS
after the first 10% of the epoch, at its end, the growth per 1,000 clips over the last 90% (a least
squares slope) and the peak. Writes ``benchmarks/results_loader_memory.json`` and the section of
``docs/benchmarks.md`` between its markers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import psutil
import torch

from benchmarks.config import ROOT
from benchmarks.measure import cpu_name, log
from benchmarks.stages import write_docs

RESULTS = ROOT / "benchmarks" / "results_loader_memory.json"
START, END = "<!-- loader_memory:start -->", "<!-- loader_memory:end -->"


def rss_mb(proc: psutil.Process) -> tuple[float, float]:
    """(main process RSS, sum of its children's RSS) in MB."""
    main = proc.memory_info().rss
    children = 0
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            children += child.memory_info().rss
    return main / 2**20, children / 2**20


def one_epoch(clips: int, workers: int, cache: bool) -> dict:
    from iv2_lightning.data import SyntheticVideoDataModule

    dm = SyntheticVideoDataModule(
        num_frames=8,
        image_size=64,
        batch_size=32,
        num_workers=workers,
        train_size=clips,
        val_size=0,
        test_size=0,
        cache=cache,
        modalities=["audio", "caption", "speech", "label"],
        max_audio_frames=256,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    proc = psutil.Process()
    samples = []  # (clips seen, main MB, workers MB)
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        if i % 10 == 0:
            samples.append(((i + 1) * len(batch), *rss_mb(proc)))
    seconds = time.perf_counter() - t0
    samples.append((clips, *rss_mb(proc)))
    del loader  # shuts the workers down
    tail = [s for s in samples if s[0] >= clips // 10]
    xs = torch.tensor([s[0] for s in tail], dtype=torch.float64)
    total = torch.tensor([s[1] + s[2] for s in tail], dtype=torch.float64)
    slope = float(((xs - xs.mean()) * (total - total.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
    return {
        "clips": clips,
        "workers": workers,
        "cache": cache,
        "seconds": seconds,
        "clips_per_s": clips / seconds,
        "start_mb": tail[0][1] + tail[0][2],
        "end_mb": samples[-1][1] + samples[-1][2],
        "peak_mb": max(s[1] + s[2] for s in samples),
        "growth_mb_per_1k_clips": slope * 1000,
        "samples": samples,
    }


def markdown(res: dict) -> str:
    lines = [
        START,
        "## Loader memory over a long epoch",
        "",
        f"`python -m benchmarks.loader_memory`, {res['date']}, {res['cpu']}: one epoch of "
        f"`SyntheticVideoDataModule` ({res['runs'][0]['clips']:,} clips, 8 x 64² with sound, batch 32, "
        f"{res['runs'][0]['workers']} loader workers); resident memory of the main process plus its workers, "
        "sampled every 10 batches. Start: after the first 10% of the epoch; growth: least-squares slope over "
        "the last 90%.",
        "",
        "| cache | clips/s | RSS at 10% (MB) | RSS at the end (MB) | peak (MB) | growth per 1,000 clips (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["runs"]:
        lines.append(
            f"| {'on' if r['cache'] else 'off'} | {r['clips_per_s']:.0f} | {r['start_mb']:.0f} | {r['end_mb']:.0f} | "
            f"{r['peak_mb']:.0f} | {r['growth_mb_per_1k_clips']:.1f} |"
        )
    lines += [
        "",
        "`cache: false` is flat: the loader keeps nothing per batch. `cache: true` keeps every rendered clip "
        "(uint8 frames, fbank and its parameters) for the later epochs by design, in the copy of the dataset "
        "of the worker that rendered it, so it grows through the first epoch; the DataModule warns when it is "
        "combined with workers. Use it where the whole set fits (the tiny configs: 4,096 clips, no workers).",
        END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=20_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-cache-run", action="store_true", help="only the cache: false epoch")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name(), "runs": []}
    for cache in (False,) if args.no_cache_run else (False, True):
        log(f"epoch of {args.clips} clips, {args.workers} workers, cache={cache}")
        run = one_epoch(args.clips, args.workers, cache)
        log(
            f"  {run['seconds']:.0f} s; {run['start_mb']:.0f} -> {run['end_mb']:.0f} MB, "
            f"{run['growth_mb_per_1k_clips']:.1f} MB per 1,000 clips"
        )
        res["runs"].append(run)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    section = markdown(res)
    write_docs(section, START, END)
    print(section)


if __name__ == "__main__":
    main()
