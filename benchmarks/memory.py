"""Peak memory of one training step, each point in a fresh interpreter: the RSS high-water mark
that ``os.wait4`` reports for the child (``ru_maxrss``), not tracemalloc, so the figure is what the
operating system had to give the step (interpreter + torch + model + one forward/backward).

The launcher-per-point design follows the usual practice for RSS peaks (a forked child inherits its
parent's ``ru_maxrss``); the child also reads its own ``VmHWM`` from ``/proc`` as a cross-check.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.config import RUN_SCRIPT
from benchmarks.measure import fmt, log


def child_main(spec: dict) -> None:
    """One memory point in a fresh process: build, one forward+backward, report."""
    import resource

    torch.set_num_threads(int(spec.get("threads", 1)))
    torch.manual_seed(0)
    if spec["kind"] == "threads":
        print(json.dumps({"rss_before": True, **_tiny_step_child(int(spec["steps"]))}), flush=True)
        return
    loss = _child_loss(spec)
    before = _vm_hwm_kb() or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    loss().backward()
    seconds = time.perf_counter() - t0
    report = {"rss_before": True, "hwm_before_kb": before, "hwm_after_kb": _vm_hwm_kb(), "step_s": seconds}
    print(json.dumps(report), flush=True)


def _child_loss(spec: dict) -> Callable[[], torch.Tensor]:
    """Build the point's model and input; the loss of one forward pass."""
    from iv2_lightning.models import HierarchicalTemporalEncoder, build_video_encoder

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

    return loss


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
                str(RUN_SCRIPT),
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
            log(
                f"  memory {spec}: {fmt(row.get('peak_mb'), '.0f') if row.get('peak_mb') else row.get('error')} MB"
            )

    workers = [threading.Thread(target=one, args=(i, sp)) for i, sp in enumerate(specs)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [r for r in results if r is not None]
