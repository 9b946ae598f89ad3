"""Section 5: peak memory of the :class:`HierarchicalTemporalEncoder` against video length, with a
linear fit, against one flat joint attention over the whole clip (SDPA and math attention).

InternVideo2 (arXiv 2403.15377) encodes long videos window by window and models time over the window
tokens; the claim measured here is that memory then grows linearly with the number of frames.
"""

from __future__ import annotations

from benchmarks.config import Settings
from benchmarks.measure import linear_fit, log
from benchmarks.memory import run_children

HTE_GEOMETRY = {"image": 32, "patch": 8, "window": 8}


def run_hte(s: Settings, out: dict, meta: dict) -> None:
    specs = [{"kind": "hte", "frames": f, **HTE_GEOMETRY} for f in s.hte_frames]
    specs += [{"kind": "flat", "frames": f, "backend": "sdpa", **HTE_GEOMETRY} for f in s.flat_frames]
    specs += [{"kind": "flat", "frames": f, "backend": "math", **HTE_GEOMETRY} for f in s.flat_math_frames]
    log(f"HTE memory: {len(specs)} child processes")
    mem = run_children(specs, s.mem_parallel, s.threads)
    series = {
        "hte": [m for m in mem if m["kind"] == "hte"],
        "flat_joint": [m for m in mem if m["kind"] == "flat" and m["backend"] == "sdpa"],
        "flat_joint_math": [m for m in mem if m["kind"] == "flat" and m["backend"] == "math"],
    }
    fits = {}
    for name, rows in series.items():
        rows = [r for r in rows if r.get("peak_mb")]
        rows.sort(key=lambda r: r["frames"])
        if len(rows) >= 3:
            xs = [r["frames"] for r in rows]
            slope, icpt, r2 = linear_fit(xs, [r["peak_mb"] for r in rows])
            # a quadratic term shows where memory grows faster than linearly
            fits[name] = {"slope_mb_per_frame": slope, "intercept_mb": icpt, "r2": r2}
            out[f"{name}_peak_mb_per_frame"] = slope
            out[f"{name}_peak_r2"] = r2
            # growth of the step's own memory (peak minus the high-water mark before the step)
            inc = [r["peak_mb"] - r["before_mb"] for r in rows]
            s2, _, r2b = linear_fit(xs, inc)
            ys = [r["peak_mb"] for r in rows]
            fits[name].update(
                step_slope_mb_per_frame=s2,
                step_r2=r2b,
                first_interval_mb_per_frame=(ys[1] - ys[0]) / (xs[1] - xs[0]),
                last_interval_mb_per_frame=(ys[-1] - ys[-2]) / (xs[-1] - xs[-2]),
            )
        for r in rows:
            out[f"{name}_peak_mb_f{r['frames']}"] = r["peak_mb"]
    meta["hte"] = {"geometry": HTE_GEOMETRY, "rows": mem, "fits": fits}
