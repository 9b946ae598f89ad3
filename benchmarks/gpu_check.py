"""The GPU-only checks in one process: the l14 stage-2 step in bf16, eager and compiled, through SDPA
and (when installed) flash-attn, with its MFU against the card's dense bf16 peak.

Run by ``benchmarks/gpu_check.sh`` (which adds a DeepSpeed ZeRO-2 tiny fit); writes a JSON of the
figures and a markdown table. ``--dry-run`` runs the same code on the CPU with the tiny preset so the
path is tested on machines without a GPU (its numbers mean nothing and are marked so).

MFU = model FLOPs of one step / step time / peak. Two peaks are given: the card's dense bf16 figure
from its data sheet (NVIDIA: H100 SXM and H200 989 TFLOP/s, H100 PCIe 756, A100 312) and a bf16
matmul measured on the same card in the same run. Model FLOPs are counted once per step without
activation checkpointing (its recomputation is not model work, the PaLM paper's definition); on CUDA
torch's counter includes its own formula for the fused attention kernels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.gpu import _bf16_matmul_peak, run_variant

#: dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, by name fragment
DENSE_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0))


def card_peak_tflops(name: str) -> float | None:
    """The data-sheet dense bf16 peak of a card by its name, or None when the card is not listed."""
    for fragment, tflops in DENSE_BF16_TFLOPS:
        if fragment in name:
            return tflops
    return None


def run(dry_run: bool, steps: int, batch_size: int) -> dict:
    from iv2_lightning.models.attention import flash_available

    device = torch.device("cpu" if dry_run else "cuda")
    name = "cpu (dry run, tiny preset)" if dry_run else torch.cuda.get_device_name(0)
    backends = ["sdpa"] + (["flash"] if flash_available() and not dry_run else [])
    variants = []
    for backend in backends:
        for compiled in (False, True):
            print(f"[gpu_check] stage-2 step: backend={backend} compiled={compiled}", flush=True)
            v = run_variant(compiled, backend, dry_run, steps, batch_size)
            print(f"[gpu_check]   {json.dumps(v)}", flush=True)
            variants.append(v)
    measured = _bf16_matmul_peak(
        512 if dry_run else 8192, device, torch.cuda.synchronize if not dry_run else (lambda: None)
    )
    sheet = None if dry_run else card_peak_tflops(name)
    for v in variants:
        v["mfu_vs_measured_matmul"] = v["achieved_tflops"] * 1e12 / measured
        v["mfu_vs_data_sheet"] = v["achieved_tflops"] / sheet if sheet else None
    return {
        "device": name,
        "dry_run": dry_run,
        "torch": torch.__version__,
        "flash_attn_installed": flash_available(),
        "matmul_bf16_tflops_measured": measured / 1e12,
        "dense_bf16_tflops_data_sheet": sheet,
        "variants": variants,
    }


def markdown(res: dict) -> str:
    sheet = res["dense_bf16_tflops_data_sheet"]
    lines = [
        f"Device: **{res['device']}**, torch {res['torch']}, flash-attn installed: {res['flash_attn_installed']}. "
        f"bf16 matmul measured {res['matmul_bf16_tflops_measured']:.0f} TFLOP/s; data-sheet dense bf16 peak "
        f"{sheet if sheet else 'unknown'} TFLOP/s.",
        "",
        "| attention | compiled | batch | first step s | step s | clips/s | TFLOP/step | TFLOP/s | MFU (data sheet) | MFU (measured matmul) | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in res["variants"]:
        mfu_sheet = f"{v['mfu_vs_data_sheet']:.1%}" if v["mfu_vs_data_sheet"] is not None else "–"
        mem = f"{v['peak_mem_gb']:.1f}" if v["peak_mem_gb"] is not None else "–"
        lines.append(
            f"| {v['backend']} | {'yes' if v['compiled'] else 'no'} | {v['batch']} | {v['first_step_s']:.1f} | "
            f"{v['step_s']:.3f} | {v['clips_per_s']:.1f} | {v['step_tflop']:.2f} | {v['achieved_tflops']:.0f} | "
            f"{mfu_sheet} | {v['mfu_vs_measured_matmul']:.1%} | {mem} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny preset on the CPU (tests the path)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument(
        "--batch", type=int, default=None, help="clips per step (default 64 on a GPU, 2 in a dry run)"
    )
    p.add_argument("--out", type=Path, default=Path("gpu_check"), help="folder for gpu_check.json/.md")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --dry-run to test the code path on the CPU")
    res = run(args.dry_run, args.steps, args.batch or (2 if args.dry_run else 64))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    table = markdown(res)
    (args.out / "gpu_check.md").write_text(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
