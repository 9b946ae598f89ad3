"""Section 6: data against model. Clips/s the ``SyntheticVideoDataModule`` delivers with 0..N
workers against the clips/s the ``tiny`` and ``s14`` stage-1 steps consume, a training loop fed by
the loader, the decode rates of real files (from ``benchmarks/data_throughput.py``), and the tiny
step with another thread count in fresh processes.

The question is the one every video-pretraining recipe (InternVideo2, arXiv 2403.15377, trains on
hundreds of millions of clips) must answer first: is the step waiting for data?
"""

from __future__ import annotations

import json
import time

import torch

from benchmarks.config import DATA_RESULTS, FRAMES, IMAGE, Settings
from benchmarks.measure import cores, interleave, log, med, paired
from benchmarks.memory import run_children
from benchmarks.workloads import stage1, stage_step, tiny_clips, tiny_stage1, video_batch


def run_data(s: Settings, out: dict, meta: dict) -> None:
    torch.manual_seed(0)
    n_cores = cores()
    rows = _loader_rows(s, n_cores, out)

    # what the stage-1 steps consume (no loader): tiny (configs/stage1/tiny.yaml) and s14
    tiny_stage, tiny_opt = tiny_stage1()
    tiny_batch = video_batch(tiny_clips(32))
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

    loop = _fed_loop(s, tiny_stage, tiny_opt, tiny_batch)
    out["loop_loader_over_cached_tiny"] = paired(loop["loader"], loop["cached"])
    decode = _decode_rates(out)
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


def _loader_rows(s: Settings, n_cores: int, out: dict) -> list[dict]:
    """What the loader delivers (no model running)."""
    rows = []
    for image, batch in ((64, 32), (224, 4)):
        for w in sorted({0, 1, n_cores}):
            rate = loader_rate(image, batch, w, s.data_batches)
            rows.append({"image": image, "batch": batch, "workers": w, "clips_per_s": rate})
            out[f"data_clips_per_s_{image}px_w{w}"] = rate
            log(f"  data {image}px workers={w}: {rate:.1f} clips/s")
    out["data_clips_per_s"] = max(r["clips_per_s"] for r in rows if r["image"] == 64)
    out["data_clips_per_s_224px"] = max(r["clips_per_s"] for r in rows if r["image"] == 224)
    return rows


def _fed_loop(s: Settings, tiny_stage, tiny_opt, tiny_batch) -> dict[str, list[float]]:
    """A training loop fed by the loader (1 worker) against the same steps on a batch in memory."""
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
    return loop


def _decode_rates(out: dict) -> dict | None:
    """The decode rates of real files, from benchmarks/data_throughput.py (None before its first run)."""
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
    return decode


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
    log(f"  threads A/B: {out}")
    return out
