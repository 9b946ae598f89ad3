"""``iv2 synth``: write synthetic clips out as real media files (video + 16 kHz audio track) with an
``annotations.jsonl`` that :class:`~iv2_lightning.data.VideoTextDataModule` reads.

The rows carry what InternVideo2's stage-2 and stage-3 annotations carry (arXiv 2403.15377 Sec. 3.2-3.3:
caption, ASR transcript, audio caption, question/answer turns) plus the label and attributes, so the
file-based data path can be exercised end to end without a download. The annotation file is written
under a temporary name and renamed, so an interrupted run never leaves a half-written one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from iv2_lightning.data.synthetic.dataset import generate_clip
from iv2_lightning.data.synthetic.scene import DIRECTIONS, check_geometry


def build_synth_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iv2 synth",
        description="Write synthetic clips (video + audio track) and an annotations.jsonl with captions, "
        "ASR transcripts, audio captions, labels and question/answer turns.",
    )
    p.add_argument("--out", required=True, help="output folder (videos/ and annotations.jsonl go there)")
    p.add_argument("--num-clips", type=int, required=True, help="number of clips to write")
    p.add_argument("--split", default="train", help="stream to draw from (train, val, test, ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--image-size", type=int, default=128, help="frame side in pixels (even)")
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--max-objects", type=int, default=1, choices=(1, 2))
    p.add_argument("--format", default="mp4", choices=("mp4", "webm", "mkv"), help="container")
    p.add_argument("--overwrite", action="store_true", help="replace an existing annotations.jsonl")
    return p


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_synth_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.num_clips < 1:
        parser.error(f"--num-clips must be >= 1; got {args.num_clips}")
    if args.image_size % 2:
        parser.error(f"--image-size must be even for yuv420p video; got {args.image_size}")
    if args.fps <= 0:
        parser.error(f"--fps must be positive; got {args.fps}")
    try:
        check_geometry(args.num_frames, args.image_size, args.max_objects)
    except ValueError as err:
        parser.error(str(err))
    return args


def _write_clips(args: argparse.Namespace, out: Path, console: Any) -> tuple[list[dict], Counter[str]]:
    """Render and write every clip with a progress bar; the annotation rows and the label counts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from iv2_lightning.data.writer import write_video

    rows = []
    labels: Counter[str] = Counter()
    columns = (TextColumn("[bold]synth"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("clips", total=args.num_clips)
        for i in range(args.num_clips):
            clip = generate_clip(
                i, args.split, args.seed, args.num_frames, args.image_size, args.fps, args.max_objects
            )
            rel = f"videos/{args.split}_{i:06d}.{args.format}"
            write_video(
                out / rel, clip.frames, fps=args.fps, audio=clip.waveform, sample_rate=clip.sample_rate
            )
            rows.append(
                {
                    "video": rel,
                    "caption": clip.caption,
                    "asr": clip.speech,
                    "audio_caption": clip.audio_caption,
                    "label": clip.label,
                    "qa": [list(turn) for turn in clip.qa],
                    "attributes": clip.attributes,
                    "sample_id": clip.sample_id,
                    "split": args.split,
                    "index": i,
                }
            )
            labels[DIRECTIONS[clip.label]] += 1
            progress.advance(task)
    return rows, labels


def _print_summary(args: argparse.Namespace, labels: Counter[str], ann: Path, elapsed: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="iv2 synth", show_header=False)
    table.add_row("clips", f"{args.num_clips} ({args.split}, seed {args.seed})")
    table.add_row(
        "video",
        f"{args.num_frames} frames x {args.image_size}x{args.image_size} at {args.fps:g} fps "
        f"({args.num_frames / args.fps:.2f} s), {args.format}, 16 kHz mono audio",
    )
    table.add_row("labels", ", ".join(f"{d} {labels[d]}" for d in DIRECTIONS))
    table.add_row("annotations", str(ann))
    table.add_row("time", f"{elapsed:.1f} s ({1000 * elapsed / args.num_clips:.0f} ms/clip)")
    Console().print(table)


def synth_main(argv: list[str] | None = None) -> int:
    """``iv2 synth``: render clips to ``OUT/videos/<split>_<index>.<format>`` and ``OUT/annotations.jsonl``."""
    from rich.console import Console

    args = _parse(argv)
    out = Path(args.out)
    ann = out / "annotations.jsonl"
    if ann.exists() and ann.stat().st_size > 0 and not args.overwrite:
        print(
            f"iv2 synth: error: {ann} exists and is not empty; pass --overwrite to replace it",
            file=sys.stderr,
        )
        return 1
    (out / "videos").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, labels = _write_clips(args, out, Console(stderr=True))
    tmp = ann.with_name(".annotations.jsonl.partial")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, ann)
    _print_summary(args, labels, ann, time.perf_counter() - start)
    return 0


__all__ = ["build_synth_parser", "synth_main"]
