"""The machine figure printed beside every total: the fp32 matmul rate on the threads torch uses.

Machines that run the same job differ 2x (and a shared host's load moves within the hour), so a
time means little without it. ``benchmarks/`` uses the same probe.
"""

from __future__ import annotations

import time

import torch


def matmul_rates(n: int = 1024, reps: int = 5, dtype: torch.dtype = torch.float32) -> list[float]:
    """GFLOP/s of ``reps`` timed ``n``³ matmuls (after one untimed), on torch's current threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        out.append(2 * n**3 / (time.perf_counter() - t0) / 1e9)
    return out


__all__ = ["matmul_rates"]
