"""``iv2 curriculum``: the progressive InternVideo2 training as one command.

The curriculum YAML lists stages; each is an ordinary ``iv2 fit`` (its configs plus extra
arguments) run in its own folder ``<output_dir>/<name>``, with two callbacks added: ``ModelCheckpoint``
(``checkpoints/last.ckpt`` rewritten atomically at the end of every epoch, with the random generators,
for resuming) and :class:`~iv2_lightning.callbacks.StageTransition` (the shared weights and a
manifest in ``<name>/export``). A stage with ``init_from: <earlier stage>`` starts from that stage's
export; ``{export:<earlier stage>}`` inside a stage's ``args`` becomes that stage's export folder (a
teacher for stage 1 to distil: ``--model.init_args.teacher=[{export:teacher}, random]``). Rerunning the same command after a crash or a kill skips every stage whose export is complete
and matches its manifest (size and sha256 of the weights), and resumes an interrupted stage from the
newest checkpoint in its ``checkpoints/`` that loads (a damaged one is passed over with a warning;
one that would run code when unpickled stops the command, naming the file). With the same seed, on
CPU, the resumed stage ends with the weights an uninterrupted run would have.

At the end it prints a table of the metrics each stage reports, a table of the *claims* (each a
metric of the curriculum beside the same metric of its twin, e.g. stage 2 from the stage-1 export
against stage 2 from scratch, with the margin it must hold by), the machine's fp32 matmul rate beside
the total time, and writes all of it to ``<output_dir>/summary.json``.

Example (``configs/curriculum/tiny.yaml``)::

    output_dir: runs/curriculum_tiny
    seed: 0
    stages:
      - name: stage1
        configs: [../stage1/tiny.yaml]          # relative to this file
        report: {recon_loss_ratio: val/recon_loss_ratio}
      - name: stage2
        configs: [../stage2/tiny.yaml]
        init_from: stage1
        report: {zs_direction_acc: val/zs_acc, t2v_r5_attr: val/t2v_r5}
    targets:
      stage1.recon_loss_ratio: ["<=", 0.6]
    claims:
      - name: stage 1 helps stage 2
        ours: stage2.t2v_r1                     # section.metric of the summary
        baseline: stage2_scratch.t2v_r1         # the twin: same data, same budget, same seed
        margin: 10                              # ours - baseline must be >= margin
        context: text->video R@1 on 256 held-out clips
"""

from __future__ import annotations

import argparse
import json
import logging
import operator
import re
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from iv2_lightning.io import (
    UnreadableCheckpointError,
    checkpoints_in,
    newest_readable_checkpoint,
    write_json_atomic,
)
from iv2_lightning.models.weights import MANIFEST_FILE, export_problem

log = logging.getLogger(__name__)
console = Console()

STAGE_KEYS = {"name", "configs", "args", "init_from", "report", "summary_key"}
TOP_KEYS = {"output_dir", "seed", "stages", "targets", "claims"}
CLAIM_KEYS = {"name", "ours", "baseline", "margin", "higher_is_better", "context"}
OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


class CurriculumConfigError(ValueError):
    pass


EXPORT_REF = re.compile(r"\{export:([^{}]+)\}")


def _flatten(args: list[Any]) -> list[str]:
    """Stage args may nest lists (a YAML anchor reused inside a longer list)."""
    out: list[str] = []
    for a in args:
        out += _flatten(a) if isinstance(a, list) else [str(a)]
    return out


def load_curriculum(path: str | Path) -> dict[str, Any]:
    """Read and check a curriculum YAML; paths of stage configs become absolute."""
    path = Path(path)
    if not path.is_file():
        raise CurriculumConfigError(f"curriculum config not found: {path}")
    cfg = yaml.safe_load(path.read_text()) or {}
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise CurriculumConfigError(f"{path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    if not cfg.get("stages"):
        raise CurriculumConfigError(f"{path}: 'stages' must list at least one stage")
    names: list[str] = []
    for i, stage in enumerate(cfg["stages"]):
        where = f"{path}: stages[{i}]"
        if not isinstance(stage, dict) or "name" not in stage or "configs" not in stage:
            raise CurriculumConfigError(f"{where} needs 'name' and 'configs'")
        bad = set(stage) - STAGE_KEYS
        if bad:
            raise CurriculumConfigError(
                f"{where} ({stage['name']}): unknown key(s) {sorted(bad)}; allowed: {sorted(STAGE_KEYS)}"
            )
        if stage["name"] in names:
            raise CurriculumConfigError(f"{where}: duplicate stage name {stage['name']!r}")
        src = stage.get("init_from")
        if src is not None and src not in names:
            raise CurriculumConfigError(
                f"{where} ({stage['name']}): init_from {src!r} is not an earlier stage {names}"
            )
        configs = []
        for c in stage["configs"]:
            p = (path.parent / c).resolve()
            if not p.is_file():
                raise CurriculumConfigError(
                    f"{where} ({stage['name']}): config {c} not found (looked at {p})"
                )
            configs.append(str(p))
        stage["configs"] = configs
        stage["args"] = _flatten(stage.get("args") or [])
        # {export:<stage>} in an argument: that earlier stage's export folder (e.g. a teacher to distil)
        stage["exports"] = sorted({ref for a in stage["args"] for ref in EXPORT_REF.findall(a)})
        for ref in stage["exports"]:
            if ref not in names:
                raise CurriculumConfigError(
                    f"{where} ({stage['name']}): args refer to {{export:{ref}}}, which is not an "
                    f"earlier stage {names}"
                )
        stage.setdefault("report", {})
        names.append(stage["name"])
    for key, rule in (cfg.get("targets") or {}).items():
        if not (isinstance(rule, list) and len(rule) == 2 and rule[0] in OPS):
            raise CurriculumConfigError(
                f"{path}: target {key} must be [op, value] with op in {sorted(OPS)}; got {rule}"
            )
    cfg["claims"] = [_check_claim(path, i, c) for i, c in enumerate(cfg.get("claims") or [])]
    cfg.setdefault("output_dir", "runs/curriculum")
    cfg.setdefault("seed", 0)
    cfg.setdefault("targets", {})
    return cfg


def _check_claim(path: Path, i: int, claim: Any) -> dict[str, Any]:
    where = f"{path}: claims[{i}]"
    if not isinstance(claim, dict):
        raise CurriculumConfigError(f"{where} must be a mapping with keys {sorted(CLAIM_KEYS)}")
    where += f" ({claim.get('name', 'unnamed')})"
    bad = set(claim) - CLAIM_KEYS
    if bad:
        raise CurriculumConfigError(f"{where}: unknown key(s) {sorted(bad)}; allowed: {sorted(CLAIM_KEYS)}")
    missing = {"name", "ours", "baseline", "margin"} - set(claim)
    if missing:
        raise CurriculumConfigError(f"{where}: missing key(s) {sorted(missing)}")
    for key in ("ours", "baseline"):
        if not (isinstance(claim[key], str) and "." in claim[key]):
            raise CurriculumConfigError(f"{where}: {key} must be 'section.metric'; got {claim[key]!r}")
    if isinstance(claim["margin"], bool) or not isinstance(claim["margin"], (int, float)):
        raise CurriculumConfigError(f"{where}: margin must be a number; got {claim['margin']!r}")
    return {"higher_is_better": True, "context": "", **claim}


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    """The manifest of a finished stage's export, or None when the stage has to run (again): no
    export, an unreadable or incomplete manifest, or weights that do not match it."""
    f = stage_dir / "export" / MANIFEST_FILE
    if not f.is_file():
        return None
    try:
        manifest = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is unreadable; the stage will run again", f)
        return None
    if not isinstance(manifest, dict) or not manifest.get("complete"):
        return None
    problem = export_problem(f.parent, manifest)
    if problem:
        log.warning("%s; the stage will run again", problem)
        return None
    return manifest


def stage_args(stage: dict[str, Any], stage_dir: Path, seed: int, init_dir: Path | None) -> list[str]:
    args = ["fit"]
    for c in stage["configs"]:
        args += ["--config", c]
    out = stage_dir.parent
    args += [EXPORT_REF.sub(lambda m: str(out / m.group(1) / "export"), str(a)) for a in stage["args"]]
    args += [
        f"--trainer.default_root_dir={stage_dir}",
        f"--seed_everything={seed}",
        "--trainer.callbacks+=iv2_lightning.callbacks.StageTransition",
        f"--trainer.callbacks.export_dir={stage_dir / 'export'}",
        "--trainer.callbacks+=iv2_lightning.io.ResumeCheckpoint",  # last.ckpt at the end of every epoch
        f"--trainer.callbacks.dirpath={stage_dir / 'checkpoints'}",
    ]
    if init_dir is not None:
        args.append(f"--model.init_args.init_from={init_dir}")
    return args


def run_stage(stage: dict[str, Any], stage_dir: Path, seed: int, init_dir: Path | None) -> dict[str, Any]:
    from iv2_lightning.lightning_cli import make_cli

    stage_dir.mkdir(parents=True, exist_ok=True)
    # before building anything: a checkpoint that would run code stops here, naming the file
    ckpt = newest_readable_checkpoint(checkpoints_in(stage_dir / "checkpoints"))
    argv, sys.argv = sys.argv, sys.argv[:1]  # the stage's arguments come from the YAML, not our command line
    try:
        cli = make_cli(stage_args(stage, stage_dir, seed, init_dir)[1:], run=False)
    finally:
        sys.argv = argv
    if ckpt is not None:
        console.print(f"[cyan]{stage['name']}[/cyan]: resuming from {ckpt}")
    # the trainer's AtomicCheckpointIO loads it with weights_only=True
    cli.trainer.fit(
        cli.model, cli.datamodule, ckpt_path=None if ckpt is None else str(ckpt), weights_only=True
    )
    if cli.trainer.interrupted:
        raise KeyboardInterrupt(f"stage {stage['name']} was interrupted; rerun the command to resume")
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise RuntimeError(f"stage {stage['name']} finished without an export in {stage_dir / 'export'}")
    return manifest


def summarize(cfg: dict[str, Any], manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for stage in cfg["stages"]:
        manifest = manifests.get(stage["name"])
        if manifest is None:
            continue
        key = stage.get("summary_key") or stage["name"]
        entry = summary.setdefault(key, {})
        for out_name, metric in stage["report"].items():
            value = manifest["metrics"].get(metric)
            entry[out_name] = None if value is None else round(float(value), 4)
    summary["seconds"] = round(sum(m.get("seconds", 0.0) for m in manifests.values()), 1)
    return summary


def check_targets(cfg: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, Any, str, bool | None]]:
    rows = []
    for key, (op, bound) in cfg["targets"].items():
        section, _, name = key.partition(".")
        value = summary.get(section, {}).get(name) if name else summary.get(section)
        ok = None if value is None else OPS[op](value, bound)
        rows.append((key, value, f"{op} {bound}", ok))
    return rows


def _lookup(summary: dict[str, Any], key: str) -> float | None:
    section, _, name = key.partition(".")
    value = summary.get(section, {}).get(name)
    return None if value is None else float(value)


def check_claims(cfg: dict[str, Any], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each claim with both values, the gain of ours over the twin (sign-flipped where lower is
    better) and whether the gain reaches the margin (None when a value is missing)."""
    rows = []
    for claim in cfg.get("claims") or []:
        ours, base = _lookup(summary, claim["ours"]), _lookup(summary, claim["baseline"])
        gain = None
        if ours is not None and base is not None:
            gain = round((ours - base) if claim["higher_is_better"] else (base - ours), 4)
        rows.append(
            {
                "name": claim["name"],
                "ours_key": claim["ours"],
                "ours": ours,
                "baseline_key": claim["baseline"],
                "baseline": base,
                "gain": gain,
                "margin": claim["margin"],
                "holds": None if gain is None else gain >= claim["margin"],
                "context": claim["context"],
            }
        )
    return rows


def machine_figure(threads: int | None = None, n: int = 1024, reps: int = 5) -> dict[str, Any]:
    """The machine's fp32 ``n``³ matmul rate (median of ``reps``, GFLOP/s) on ``threads`` (default:
    the threads torch uses): printed beside every total, since machines that run the same job differ 2x."""
    import statistics

    import torch

    from iv2_lightning.machine import matmul_rates

    before = torch.get_num_threads()
    threads = threads or before
    torch.set_num_threads(threads)
    try:
        rates = matmul_rates(n, reps)
    finally:
        torch.set_num_threads(before)
    return {"matmul_fp32_gflops": round(statistics.median(rates), 1), "threads": threads}


def print_claims(rows: list[dict[str, Any]]) -> None:
    """One row per claim (the metric keys and the context follow as numbered notes, so the table
    stays readable in an 80-column log)."""
    if not rows:
        return
    table = Table(title="claims: the curriculum beside its twin (same data, budget, seed)")
    for col in ("#", "claim", "ours", "twin", "gain", "margin", "holds"):
        table.add_column(col, justify="right" if col in ("ours", "twin", "gain", "margin") else "left")

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.4g}"

    for i, r in enumerate(rows, 1):
        holds = "" if r["holds"] is None else ("[green]yes[/green]" if r["holds"] else "[red]no[/red]")
        table.add_row(
            str(i), r["name"], fmt(r["ours"]), fmt(r["baseline"]), fmt(r["gain"]), f">= {r['margin']}", holds
        )
    console.print(table)
    for i, r in enumerate(rows, 1):
        note = f" — {r['context']}" if r["context"] else ""
        console.print(f"  {i}. {r['ours_key']} vs {r['baseline_key']}{escape(note)}", highlight=False)


def print_summary(cfg: dict[str, Any], summary: dict[str, Any]) -> None:
    targets = {k: (v, t, ok) for k, v, t, ok in check_targets(cfg, summary)}
    machine = summary.get("machine") or {}
    rate = (
        f", fp32 matmul {machine['matmul_fp32_gflops']:.0f} GFLOP/s on {machine['threads']} threads"
        if machine
        else ""
    )
    table = Table(title=f"curriculum summary ({summary['seconds']:.0f} s of training{rate})")
    for col in ("stage", "metric", "value", "target", "met"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for section, values in summary.items():
        if not isinstance(values, dict) or section == "machine":
            continue
        for name, value in values.items():
            _, target, ok = targets.get(f"{section}.{name}", (None, "", None))
            met = "" if ok is None else ("[green]yes[/green]" if ok else "[red]no[/red]")
            table.add_row(section, name, "-" if value is None else f"{value:.4f}", target, met)
    console.print(table)
    print_claims(summary.get("claims") or [])


def curriculum_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="iv2 curriculum", description="Run the curriculum of a YAML file, stage by stage."
    )
    p.add_argument("--config", required=True, help="curriculum YAML (e.g. configs/curriculum/tiny.yaml)")
    p.add_argument("--output-dir", default=None, help="override output_dir of the YAML")
    p.add_argument(
        "--seed", type=int, default=None, help="override seed of the YAML (for the run-to-run spread)"
    )
    p.add_argument(
        "--stages", default=None, help="comma-separated subset of stage names to run (in YAML order)"
    )
    args = p.parse_args(argv)
    try:
        cfg = load_curriculum(args.config)
    except CurriculumConfigError as err:
        console.print(f"[red]{err}[/red]")
        return 2
    out = Path(args.output_dir or cfg["output_dir"])
    chosen = set(args.stages.split(",")) if args.stages else None
    if chosen is not None:
        unknown = chosen - {s["name"] for s in cfg["stages"]}
        if unknown:
            console.print(f"[red]--stages names unknown stage(s) {sorted(unknown)}[/red]")
            return 2
    if args.seed is not None:
        cfg["seed"] = args.seed
    started = time.time()
    machine = machine_figure()
    manifests: dict[str, dict[str, Any]] = {}
    for stage in cfg["stages"]:
        name = stage["name"]
        stage_dir = out / name
        done = read_manifest(stage_dir)
        if done is not None:
            console.print(f"[cyan]{name}[/cyan]: finished earlier ({stage_dir / 'export'}), skipping")
            manifests[name] = done
            continue
        if chosen is not None and name not in chosen:
            continue
        # every earlier export the stage reads: its init_from and the {export:<stage>} in its args
        needed = ([stage["init_from"]] if stage.get("init_from") else []) + stage.get("exports", [])
        waiting = [ref for ref in needed if read_manifest(out / ref) is None]
        if waiting:
            console.print(
                f"[red]{name} needs the export of {waiting[0]}, which has not finished "
                f"({out / waiting[0] / 'export'})[/red]"
            )
            return 1
        init_dir = out / stage["init_from"] / "export" if stage.get("init_from") else None
        console.rule(f"{name}")
        try:
            manifests[name] = run_stage(stage, stage_dir, int(cfg["seed"]), init_dir)
        except UnreadableCheckpointError as err:  # e.g. a checkpoint that would run code: refused
            console.print(f"[red]{name}: {escape(str(err))}[/red]")
            return 1
    summary = summarize(cfg, manifests)
    summary["wall_seconds_this_run"] = round(time.time() - started, 1)
    summary["seed"] = int(cfg["seed"])
    # the rate at the start and at the end: a shared machine's load changes during a long run
    summary["machine"] = {**machine, "matmul_fp32_gflops_end": machine_figure()["matmul_fp32_gflops"]}
    summary["claims"] = check_claims(cfg, summary)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "summary.json", summary)
    print_summary(cfg, summary)
    console.print(f"summary written to {out / 'summary.json'}")
    return 0
