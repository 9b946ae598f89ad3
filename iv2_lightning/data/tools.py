"""Data commands: ``iv2 prepare`` (annotation file + media → LitData shards) and ``iv2 segment``
(long raw videos → scene clips as annotation rows, with PySceneDetect).

InternVideo2 builds its training clips by cutting raw videos at scene boundaries before captioning
them (the paper's semantic video segmentation); ``iv2 segment`` does the cutting part and writes
rows with ``start``/``end`` that every DataModule here reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console

from iv2_lightning.data.annotations import AnnotationRow, load_annotations, write_annotations
from iv2_lightning.data.datamodules import shard_item

console = Console(stderr=True)


def prepare_main(argv: list[str] | None = None) -> int:
    args = _prepare_parser().parse_args(argv)
    ann = Path(args.annotations)
    root = Path(args.root) if args.root else ann.parent
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        console.print(f"[red]{out} is not empty; choose a new folder for the shards[/red]")
        return 2
    rows, errors = load_annotations(ann, on_error="skip")
    items, missing = _shard_items(rows, root)
    for e in errors:
        console.print(f"[yellow]skipped row[/yellow] {e}")
    for m in missing:
        console.print(f"[yellow]skipped file[/yellow] {m}")
    if not items:
        console.print(f"[red]{ann}: no usable row to write[/red]")
        return 1
    from litdata import optimize

    optimize(
        fn=shard_item,
        inputs=items,
        output_dir=str(out),
        chunk_bytes=args.chunk_bytes,
        num_workers=max(1, args.num_workers),
        verbose=False,
    )
    console.print(
        f"wrote {len(items)} clip(s) to {out} ({len(errors)} bad row(s), {len(missing)} missing file(s) skipped)"
    )
    return 0


def _prepare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iv2 prepare",
        description="Write LitData shards (encoded media bytes + text) from an annotation file, for "
        "StreamingVideoDataModule. Decoding happens at training time in the loader workers.",
    )
    p.add_argument("--annotations", required=True, help="JSONL / JSON / CSV annotation file")
    p.add_argument(
        "--root", default=None, help="folder the 'video' paths are relative to (default: the file's folder)"
    )
    p.add_argument("--out", required=True, help="output folder for the shards (must be empty or absent)")
    p.add_argument("--chunk-bytes", default="64MB", help="target shard size (LitData chunk_bytes), e.g. 64MB")
    p.add_argument("--num-workers", type=int, default=1, help="processes writing shards")
    return p


def _shard_items(rows: list[AnnotationRow], root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows whose video file exists and is not empty, as :func:`shard_item` inputs (the row's
    number is its ``index``); and for each other row, its file and why it is left out."""
    items, missing = [], []
    for i, row in enumerate(rows):
        path = Path(row.video) if Path(row.video).is_absolute() else root / row.video
        if not path.is_file() or path.stat().st_size == 0:
            missing.append(f"{path}: {'missing' if not path.is_file() else 'empty file'}")
            continue
        items.append(
            {
                "path": str(path),
                "video": row.video,
                "index": i,
                "caption": row.caption,
                "asr": row.asr,
                "audio_caption": row.audio_caption,
                "label": row.label,
                "start": row.start,
                "end": row.end,
                "qa": [list(pair) for pair in row.qa],
            }
        )
    return items, missing


def _scenedetect():
    try:
        from scenedetect import ContentDetector, detect
    except ImportError as err:
        raise ImportError("iv2 segment needs PySceneDetect: pip install 'iv2-lightning[segment]'") from err
    return ContentDetector, detect


def detect_scenes(
    path: str | Path, threshold: float = 27.0, min_scene_seconds: float = 1.0
) -> list[tuple[float, float]]:
    """Scene (start, end) seconds of one video by PySceneDetect's content detector."""
    ContentDetector, detect = _scenedetect()
    from iv2_lightning.data.video_io import probe_video

    info = probe_video(path)
    min_len = max(1, round(min_scene_seconds * float(info["fps"] or 25.0)))
    scenes = detect(str(path), ContentDetector(threshold=threshold, min_scene_len=min_len))
    if not scenes:  # no cut found: the whole video is one scene
        return [(0.0, float(info["duration"]))]
    return [(s.get_seconds(), e.get_seconds()) for s, e in scenes]


def segment_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="iv2 segment",
        description="Split long videos into scene clips (PySceneDetect) and write annotation rows with start/end.",
    )
    p.add_argument("videos", nargs="+", help="video files or folders (searched for mp4/mkv/webm/mov/avi)")
    p.add_argument("--out", required=True, help="annotation JSONL to write")
    p.add_argument(
        "--root", default=None, help="write 'video' relative to this folder (default: the --out folder)"
    )
    p.add_argument(
        "--threshold", type=float, default=27.0, help="content detector threshold (lower = more cuts)"
    )
    p.add_argument("--min-scene", type=float, default=1.0, help="shortest scene in seconds")
    args = p.parse_args(argv)

    suffixes = {".mp4", ".mkv", ".webm", ".mov", ".avi"}
    files: list[Path] = []
    for v in map(Path, args.videos):
        if v.is_dir():
            files += sorted(f for f in v.rglob("*") if f.suffix.lower() in suffixes)
        else:
            files.append(v)
    out = Path(args.out)
    root = Path(args.root) if args.root else out.parent
    rows, failed = [], 0
    _scenedetect()  # fail before any work when the extra is missing
    from rich.progress import Progress

    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("segmenting", total=len(files))
        for f in files:
            try:
                scenes = detect_scenes(f, args.threshold, args.min_scene)
            except Exception as err:  # one broken file must not stop the others
                console.print(f"[yellow]skipped[/yellow] {f}: {type(err).__name__}: {err}")
                failed += 1
                bar.advance(task)
                continue
            try:
                name = str(f.resolve().relative_to(root.resolve()))
            except ValueError:
                name = str(f.resolve())
            rows += [{"video": name, "start": round(s, 3), "end": round(e, 3)} for s, e in scenes]
            bar.advance(task)
    write_annotations(out, rows)
    console.print(f"wrote {len(rows)} scene clip(s) from {len(files) - failed} video(s) to {out}")
    return 0 if rows or not files else 1
