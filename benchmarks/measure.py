"""How the benchmarks measure: the machine (CPU, cores, load, versions), the thread count, timing
contenders in turns, FLOP counting, fits and crossings, and the log line.

Contenders take turns round after round (the order reversed every other round) and every ratio is
the median of the per-round ratios, so load that changes during the run slows the contenders alike;
FLOPs come from ``torch.utils.flop_counter`` plus the CPU SDPA kernels counted from their shapes, as
the MFU accounting of the PaLM paper (model FLOPs, no recomputation) asks.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from iv2_lightning.machine import matmul_rates


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_avg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "lightning", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # not installed
            out[name] = None
    out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return out


def matmul_rate(n: int, dtype: torch.dtype, threads: int, reps: int) -> list[float]:
    """``reps`` GFLOP/s figures of an ``n``³ matmul on ``threads`` (which stay set afterwards)."""
    torch.set_num_threads(threads)
    return matmul_rates(n, reps, dtype)


def pick_threads(arg: str) -> tuple[int, dict]:
    """``auto``: 1 thread when using every core does not pay (the cores are shared), else every core."""
    n = cores()
    probe: dict = {"cores": n, "requested": arg}
    if n > 1:  # measured whatever was asked, for the record
        one, many = [], []
        for _ in range(3):  # interleaved, so both see the same load
            one += matmul_rate(1024, torch.float32, 1, 3)
            many += matmul_rate(1024, torch.float32, n, 3)
        probe["matmul_gflops_1_thread"] = statistics.median(one)
        probe[f"matmul_gflops_{n}_threads"] = statistics.median(many)
        probe["scaling"] = statistics.median(many) / statistics.median(one)
    if arg != "auto":
        threads = max(1, int(arg))
    else:
        threads = n if probe.get("scaling", 0.0) >= 1.5 else 1
    torch.set_num_threads(threads)
    probe["threads"] = threads
    return threads, probe


def interleave(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: bool = True,
    label: str = "",
    verbose: bool = True,
) -> dict[str, list[float]]:
    """Seconds per call of each function, taking turns round after round (order reversed every
    other round). ``warmup``: one untimed call each first."""
    if warmup:
        for name, fn in fns.items():
            fn()
            if verbose:
                log(f"  {label} warm-up {name}")
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(list(fns)))
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        if verbose:
            log(f"  {label} round {r + 1}/{rounds}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in fns))
    return times


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def paired(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[i] / den[i]."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def count_flops(fn: Callable[[], object]) -> float:
    """Model FLOPs of one call: torch's counter (matmuls, convolutions, bmm) plus the CPU SDPA
    kernels, which it does not count, analytically from their shapes: 4 B H Nq Nk Dh forward (two
    matmuls) and twice that backward (four matmuls). The recomputation of the scores that a fused
    kernel does in its backward pass is not model work and is not counted (torch's own formula for
    the CUDA kernels counts it; eager attention, as in TimeSformer, has none to count)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_shape=None, **kwargs):
        b, h, nq, dq = query
        return 2 * b * h * nq * key[2] * dq + 2 * b * h * nq * key[2] * value[3]

    def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return 2 * fwd(query, key, value)

    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd,
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return float(counter.get_total_flops())


_LOG_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _LOG_T0:6.0f}s] {msg}", flush=True)


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x: (slope b, intercept a, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    icpt = my - slope * mx
    ss_res = sum((y - icpt - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return slope, icpt, 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0


def crossing(xs: list[float], a: list[float], b: list[float]) -> float | None:
    """The first x where a - b changes sign (linear interpolation), or None."""
    for i in range(1, len(xs)):
        d0, d1 = a[i - 1] - b[i - 1], a[i] - b[i]
        if d0 == 0:
            return xs[i - 1]
        if (d0 < 0) != (d1 < 0):
            return xs[i - 1] + (xs[i] - xs[i - 1]) * d0 / (d0 - d1)
    return None


def fmt(x, spec: str = ".2f", none: str = "–") -> str:
    return none if x is None else format(x, spec)
