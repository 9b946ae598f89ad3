"""The tiny stage-2 training step with the official BERT fusion beside the gated CMFM.

``python -m benchmarks.fusion [--rounds 5]`` (from the repository root) builds ``configs/stage2/tiny.yaml``
twice, as written (``fusion: cmfm``) and with ``configs/stage2/fusion/bert_tiny.yaml`` on top (``fusion: bert``),
takes the same batch and times the bare step of each (``compute_loss`` + backward + AdamW, no
Lightning) in alternating rounds, with its FLOPs (CPU SDPA counted from shapes) and MFU against a
1024^3 fp32 matmul timed in the same rounds. Writes ``benchmarks/results_fusion.json`` and the section
of ``docs/benchmarks.md`` between its markers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.config import ROOT
from benchmarks.measure import count_flops, cpu_name, log, matmul_rate
from benchmarks.stages import config_step, write_docs

RESULTS = ROOT / "benchmarks" / "results_fusion.json"
START, END = "<!-- fusion:start -->", "<!-- fusion:end -->"
VARIANTS = {
    "cmfm": [ROOT / "configs" / "stage2" / "tiny.yaml"],
    "bert": [
        ROOT / "configs" / "stage2" / "tiny.yaml",
        ROOT / "configs" / "stage2" / "fusion" / "bert_tiny.yaml",
    ],
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, res = {}, {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_name()}
    res["threads"], res["variants"] = args.threads, {}
    for name, configs in VARIANTS.items():
        step, batch, stage = config_step(configs)
        params = sum(p.numel() for p in stage.model.parameters())
        step()
        steps[name] = step
        res["variants"][name] = {
            "batch": len(batch),
            "params": params,
            "gflop": count_flops(step) / 1e9,
            "times": [],
        }
    rates = []
    for r in range(args.rounds):
        for name, step in steps.items() if r % 2 == 0 else reversed(list(steps.items())):
            t0 = time.perf_counter()
            step()
            res["variants"][name]["times"].append(time.perf_counter() - t0)
        rates.append(statistics.median(matmul_rate(1024, torch.float32, args.threads, 3)))
        log(f"round {r + 1}: " + ", ".join(f"{k} {v['times'][-1]:.3f} s" for k, v in res["variants"].items()))
    res["matmul_gflops_fp32"] = statistics.median(rates)
    for v in res["variants"].values():
        v["step_s"] = statistics.median(v["times"])
        v["mfu"] = v["gflop"] / v["step_s"] / res["matmul_gflops_fp32"]
    res["speedup"] = res["variants"]["cmfm"]["step_s"] / res["variants"]["bert"]["step_s"]
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    section = markdown(res)
    write_docs(section, START, END)
    print(section)


def markdown(res: dict) -> str:
    lines = [
        START,
        "## Tiny stage 2: BERT fusion (official) beside the gated CMFM",
        "",
        f"`python -m benchmarks.fusion`, {res['date']}, {res['cpu']}, {res['threads']} threads; fp32 1024³ "
        f"matmul {res['matmul_gflops_fp32']:.0f} GFLOP/s (median of the rounds). Bare step of "
        "`configs/stage2/tiny.yaml` (CMFM) and of the same with `configs/stage2/fusion/bert_tiny.yaml` (BERT fusion), "
        "one batch, alternating rounds; median step time, the range in brackets.",
        "",
        "| fusion | batch | parameters | GFLOP / step | step s | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in res["variants"].items():
        lines.append(
            f"| {name} | {v['batch']} | {v['params'] / 1e6:.2f}M | {v['gflop']:.1f} | {v['step_s']:.3f} "
            f"({min(v['times']):.3f}–{max(v['times']):.3f}) | {v['mfu']:.0%} |"
        )
    lines += ["", f"BERT fusion step: **{res['speedup']:.2f}x** the CMFM step's speed.", END]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
