"""Whole-stage throughput of the tiny stages against the code of a baseline commit, and the MFU of
each tiny stage's bare training step. Each tree's stage runs with the config files that tree's main job
(``configs/curriculum/tiny.yaml``) gives it, so a stage the curriculum reconfigured (stage 2 on BERT
fusion) is timed as the main job runs it.

``python -m benchmarks.stages [--baseline REF] [--full]`` (from the repository root). For each tiny
stage config (stage 1, 2, 3) it runs ``iv2 fit`` of the baseline commit (its own code and configs,
from a git worktree) and of the working tree, alternating, each in a fresh process, and times the
whole process: start-up, data, training, validation, checkpoints. Throughput is training clips per
wall-second (epochs x batches x batch size / seconds). By default stages 2 and 3 run 2 of their
epochs (validation after each epoch as in the full run); ``--full`` runs every config as written.

The step section builds each stage from its config (the CLI's links included), takes one batch and
times the bare step (``compute_loss`` + backward + AdamW, no Lightning): FLOPs with
``torch.utils.flop_counter`` plus the CPU SDPA kernels counted from their shapes
(``benchmarks.measure.count_flops``), MFU against a 1024^3 fp32 matmul timed on the same threads.

Writes ``benchmarks/results_stages.json`` and the section of ``docs/benchmarks.md`` between its
markers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.config import DOCS, ROOT
from benchmarks.measure import count_flops, cpu_name, log, matmul_rate
from benchmarks.workloads import stage_step

RESULTS = ROOT / "benchmarks" / "results_stages.json"
START, END = "<!-- stages:start -->", "<!-- stages:end -->"
STAGES = ("stage1", "stage2", "stage3")
SHORT_EPOCHS = {"stage2": 2, "stage3": 2}  # stage 1 runs whole: its 48 epochs are 8 steps each
STEP_GOAL = 0.60


def training_clips(config: Path, epochs: int | None) -> tuple[int, int]:
    """(training clips, epochs) of a fit of ``config`` with ``epochs`` (None: the config's own)."""
    cfg = yaml.safe_load(config.read_text())
    data, trainer = cfg["data"]["init_args"], cfg.get("trainer", {})
    epochs = epochs or trainer.get("max_epochs", 1)
    batches = -(-data["train_size"] // data["batch_size"])
    limit = trainer.get("limit_train_batches")
    if isinstance(limit, int) and limit > 0:
        batches = min(batches, limit)
    return epochs * batches * data["batch_size"], epochs


def baseline_tree(ref: str) -> Path:
    """A detached git worktree of ``ref`` (made once, reused)."""
    sha = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"iv2_baseline_{sha}"
    if not (path / "iv2_lightning").is_dir():
        subprocess.run(
            ["git", "worktree", "add", "--detach", "--force", str(path), sha], cwd=ROOT, check=True
        )
    return path


def stage_configs(tree: Path, stage: str) -> list[Path]:
    """The config files ``tree``'s main job (``configs/curriculum/tiny.yaml``) fits ``stage`` with
    (stage 2 adds the BERT-fusion overlay since the curriculum adopted it); ``configs/<stage>/tiny.yaml``
    when the curriculum does not name the stage."""
    curriculum = tree / "configs" / "curriculum" / "tiny.yaml"
    if curriculum.is_file():
        for entry in yaml.safe_load(curriculum.read_text()).get("stages", []):
            if entry.get("name") == stage:
                return [(curriculum.parent / c).resolve() for c in entry["configs"]]
    return [tree / "configs" / stage / "tiny.yaml"]


def time_fit(tree: Path, stage: str, epochs: int | None, threads: int) -> dict:
    """Wall seconds of one ``iv2 fit`` of ``tree``'s main-job configs of ``stage`` in a fresh process."""
    configs = stage_configs(tree, stage)
    clips, epochs = training_clips(configs[0], epochs)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "iv2_lightning", "fit"] + [
            a for c in configs for a in ("--config", str(c))
        ]
        cmd += ["--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", out]
        cmd += ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{stage} fit in {tree} failed:\n{proc.stderr[-3000:]}")
    return {"seconds": seconds, "clips": clips, "epochs": epochs, "clips_per_s": clips / seconds}


def run_fits(baseline: Path, full: bool, rounds: int, threads: int, stages: tuple[str, ...] = STAGES) -> dict:
    res: dict = {}
    for stage in stages:
        epochs = None if full else SHORT_EPOCHS.get(stage)
        runs: dict[str, list[dict]] = {"baseline": [], "current": []}
        for r in range(rounds):
            order = [("baseline", baseline), ("current", ROOT)]
            for name, tree in order if r % 2 == 0 else order[::-1]:
                log(f"{stage} fit ({name}, round {r + 1}/{rounds})")
                runs[name].append(time_fit(tree, stage, epochs, threads))
                log(f"  {runs[name][-1]['seconds']:.1f} s, {runs[name][-1]['clips_per_s']:.1f} clips/s")
        speedups = [b["seconds"] / c["seconds"] for b, c in zip(runs["baseline"], runs["current"])]
        res[stage] = {**runs, "speedup": statistics.median(speedups), "speedups": speedups}
    return res


def config_step(configs: list[Path]):
    """``(step, batch, stage)``: the bare training step (``compute_loss`` + backward + AdamW, no
    Lightning) of the stage the ``configs`` build (the CLI's links included), on their first batch."""
    from iv2_lightning.lightning_cli import make_cli

    torch.manual_seed(0)
    args = [a for c in configs for a in ("--config", str(c))] + ["--data.init_args.train_size", "64"]
    cli = make_cli(args, run=False)
    model, dm = cli.model, cli.datamodule
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    model.train()
    return stage_step(model, opt, batch), batch, model


def step_mfu(stage: str, threads: int, reps: int = 5) -> dict:
    """FLOPs, time and MFU of the bare step of ``stage`` as the main job configures it (one batch, no Lightning)."""
    step, batch, model = config_step(stage_configs(ROOT, stage))
    step()  # with cache_frozen this first call fills the trunk cache: the timed steps are those of epochs 2+
    flops = count_flops(step)
    times, rates = [], []
    for _ in range(reps):  # the matmul probe in the same rounds as the step
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        rates.append(statistics.median(matmul_rate(1024, torch.float32, threads, 3)) * 1e9)
    step_s, rate = statistics.median(times), statistics.median(rates)
    return {
        "batch": len(batch),
        "gflop": flops / 1e9,
        "step_s": step_s,
        "gflops": flops / step_s / 1e9,
        "matmul_gflops_fp32": rate / 1e9,
        "mfu": flops / step_s / rate,
        "cached_trunk": getattr(model, "feature_cache", None) is not None,
    }


def markdown(res: dict) -> str:
    fits, steps = res["fits"], res["steps"]
    lines = [
        START,
        "## Tiny stages: whole `iv2 fit` against the baseline code, and the bare step's MFU",
        "",
        f"`python -m benchmarks.stages` ({res['mode']}), {res['date']}, {res['cpu']}, {res['threads']} threads; "
        f"fp32 1024³ matmul {res['matmul_gflops_fp32']:.0f} GFLOP/s at the start. Baseline: commit "
        f"`{res['baseline']}` (its own code and configs, from a git worktree); current: the working tree; each "
        "with the stage configs of its own main job (`configs/curriculum/tiny.yaml`: stage 2 now adds the "
        "BERT-fusion overlay). "
        "Each fit is a fresh process (start-up, data, training, validation, checkpoints all counted), the two "
        "alternating; clips/s = training clips / wall seconds; speedup: median of the per-round ratios, "
        "with the range when a stage ran more than one round.",
        "",
        "| stage | measured (matmul GFLOP/s) | rounds | epochs | clips | baseline s | current s | baseline clips/s | current clips/s | speedup | goal 2x |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage, r in fits.items():
        b = statistics.median(x["seconds"] for x in r["baseline"])
        c = statistics.median(x["seconds"] for x in r["current"])
        clips = r["current"][0]["clips"]
        spread = f" ({min(r['speedups']):.2f}–{max(r['speedups']):.2f})" if len(r["speedups"]) > 1 else ""
        lines.append(
            f"| {stage} | {r.get('date', res['date'])} ({r.get('matmul_gflops_fp32', res['matmul_gflops_fp32']):.0f}) "
            f"| {len(r['speedups'])} | {r['current'][0]['epochs']} | {clips} | {b:.1f} | {c:.1f} | "
            f"{clips / b:.1f} | {clips / c:.1f} | **{r['speedup']:.2f}x**{spread} | "
            f"{'met' if r['speedup'] >= 2 else 'not met'} |"
        )
    lines += [
        "",
        "Bare training step of each tiny config (one batch, `compute_loss` + backward + AdamW, no Lightning), "
        f"FLOPs with the CPU SDPA kernels counted analytically; goal MFU >= {STEP_GOAL:.0%}. A stage "
        "whose config sets `cache_frozen` is timed as in its epochs after the first (its frozen trunk's "
        "tokens read from the cache; the FLOPs count only the work done).",
        "",
        "| stage | batch | GFLOP / step | step s | GFLOP/s | matmul GFLOP/s | MFU | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for stage, s in steps.items():
        lines.append(
            f"| {stage}{' (trunk cached)' if s.get('cached_trunk') else ''} | {s['batch']} | {s['gflop']:.1f} | {s['step_s']:.3f} | {s['gflops']:.0f} | "
            f"{s['matmul_gflops_fp32']:.0f} | **{s['mfu']:.0%}** | {'met' if s['mfu'] >= STEP_GOAL else 'not met'} |"
        )
    lines.append(END)
    return "\n".join(lines)


def write_docs(section: str, start: str = START, end: str = END) -> None:
    """Replace the part of ``docs/benchmarks.md`` between ``start`` and ``end`` (or append it)."""
    text = DOCS.read_text()
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    DOCS.write_text(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="5c39392", help="git ref of the code to compare against")
    p.add_argument("--full", action="store_true", help="every stage for its configured epochs")
    p.add_argument("--rounds", type=int, default=1, help="baseline/current pairs per stage")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--skip-fits", action="store_true", help="only the step section (keeps the fit figures)")
    p.add_argument(
        "--stages", default=",".join(STAGES), help="stages to fit (the others keep their previous figures)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    res = {
        "mode": "full" if args.full else "short",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": cpu_name(),
        "threads": args.threads,
        "rounds": args.rounds,
        "baseline": args.baseline,
        "matmul_gflops_fp32": statistics.median(matmul_rate(1024, torch.float32, args.threads, 5)),
    }
    if args.skip_fits and "fits" in previous:
        res.update({k: previous[k] for k in ("fits", "mode", "rounds", "baseline") if k in previous})
    else:
        chosen = tuple(x for x in args.stages.split(",") if x)
        unknown = sorted(set(chosen) - set(STAGES))
        if unknown:
            p.error(f"--stages: unknown {unknown}; choose from {list(STAGES)}")
        kept = {k: v for k, v in previous.get("fits", {}).items() if k not in chosen}
        fresh = run_fits(baseline_tree(args.baseline), args.full, args.rounds, args.threads, chosen)
        for r in fresh.values():  # a stage not rerun keeps its own date and machine figure
            r.update(date=res["date"], matmul_gflops_fp32=res["matmul_gflops_fp32"])
        res["fits"] = {k: {**kept, **fresh}[k] for k in STAGES if k in {**kept, **fresh}}
    res["steps"] = {}
    for stage in STAGES:
        log(f"{stage} bare step")
        res["steps"][stage] = step_mfu(stage, args.threads)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    section = markdown(res)
    write_docs(section)
    print(section)


if __name__ == "__main__":
    main()
