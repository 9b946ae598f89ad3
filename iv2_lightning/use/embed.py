"""``iv2 embed`` and ``iv2 search``: clip embeddings of a stage-2 model, and top-k retrieval over them.

* ``iv2 embed --ckpt CKPT --videos DIR_OR_ANNOTATIONS --out FILE``: the normalised clip embedding of
  every video, in batches, with a progress bar, into an :class:`~iv2_lightning.use.index.EmbeddingIndex`.
  Rerunning skips what ``FILE`` already holds (it is also saved every ``--save-every`` batches, so an
  interrupted run resumes); a file that cannot be decoded is reported with the reason and skipped.
  With ``--num-frames`` above the model's training frames (or an explicit ``--window``), every clip
  is cut into windows of ``--window`` frames as the
  :class:`~iv2_lightning.models.temporal.HierarchicalTemporalEncoder` splits long videos; the window
  embeddings are stored too and the clip embedding is their normalised mean.
* ``iv2 search --index FILE "a red circle moving left"`` or ``--video query.mp4``: the top-k videos of
  the index by cosine similarity; the query is encoded by the checkpoint the index records (or
  ``--ckpt``), a video exactly as the index's clips were.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from iv2_lightning.data.video_io import VideoDecodeError
from iv2_lightning.use.checkpoints import load_model
from iv2_lightning.use.clips import VIDEO_SUFFIXES, VideoItem, _Clips, list_videos, load_video
from iv2_lightning.use.common import UseError, err_console, set_threads
from iv2_lightning.use.index import EmbeddingIndex


def _settings_differ(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} in the file, {new[k]!r} now" for k in new if k in old and old[k] != new[k]]


@torch.no_grad()
def embed_clips(
    model: Any, video: torch.Tensor, window: int | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clip embeddings ``[B, E]`` and, with ``window``, window embeddings ``[B, W, E]``."""
    video = video.to(model.device)
    if window is None:
        return model.encode_video(video).cpu(), None
    clip, windows, _ = model.encode_video_windows(video, window)
    return clip.cpu(), windows.cpu()


def build_embed_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iv2 embed",
        description="Clip embeddings of videos with a stage-2 (ContrastiveStage) checkpoint, resumable.",
    )
    p.add_argument(
        "--ckpt", required=True, help="ContrastiveStage .ckpt, its stage folder or its export folder"
    )
    p.add_argument("--videos", required=True, help="a folder of videos, an annotation file or one video")
    p.add_argument("--out", required=True, help="FILE.safetensors, or FILE.npy (+ FILE.json with the paths)")
    p.add_argument("--root", default=None, help="folder the annotation file's video paths are relative to")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--num-frames",
        type=int,
        default=None,
        help="frames read per clip (default: the model's training frames)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="embed windows of this many frames and pool them (default when --num-frames is larger than "
        "the training frames: the training frames); stores the window embeddings too",
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers that decode the videos")
    p.add_argument(
        "--save-every", type=int, default=20, help="write OUT every this many batches (resume point)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def embed_main(argv: list[str] | None = None) -> int:
    parser = build_embed_parser()
    args = parser.parse_args(argv)
    for name in ("batch_size", "save_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    set_threads(args.threads)
    try:
        return _embed(args)
    except UseError as err:
        err_console.print(f"[red]iv2 embed: error:[/red] {err}")
        return 2


def _embed(args: argparse.Namespace) -> int:
    from iv2_lightning.stages.contrastive import ContrastiveStage

    items = list_videos(args.videos, args.root)
    if not items:
        raise UseError(f"no video found in {args.videos} (looked for {', '.join(VIDEO_SUFFIXES)})")
    loaded = load_model(args.ckpt, ContrastiveStage)
    model, ckpt_path = loaded.model, loaded.path  # the VideoTextAligner: its encoders and embedding size
    out = Path(args.out)
    index = EmbeddingIndex.load(out) if out.is_file() else None
    num_frames, window = _clip_settings(args, model, index)
    settings = {
        "ckpt": str(ckpt_path.resolve()),
        "num_frames": num_frames,
        "window": window,
        "image_size": model.video_encoder.image_size,
        "embed_dim": model.embed_dim,
    }
    index = _index_for(out, index, settings)
    done = set(index.keys)
    todo = [it for it in items if it.key not in done]
    err_console.print(
        f"iv2 embed: {len(items)} clip(s), {len(items) - len(todo)} already in {out}; "
        f"{loaded.stage} from {ckpt_path} (step {loaded.step}); {num_frames} frames"
        + (f" in windows of {window}" if window else "")
    )
    started = time.perf_counter()
    added, failed = _embed_todo(model, index, todo, out, args, settings)
    if added or not out.is_file():
        index.save(out)
    seconds = time.perf_counter() - started
    rate = f" ({added / seconds:.1f} clips/s)" if added and seconds > 0 else ""
    print(
        f"embedded {added} new clip(s){rate}, skipped {len(items) - len(todo)} already in the index and "
        f"{len(failed)} unreadable; {len(index)} clip(s) in {out}"
    )
    return 1 if failed and not added and not done else 0


def _clip_settings(
    args: argparse.Namespace, model: Any, index: EmbeddingIndex | None
) -> tuple[int, int | None]:
    """The frames per clip and the window (None: whole clips) this run embeds with."""
    trained = model.video_encoder.num_frames
    if index is not None and args.num_frames is None and args.window is None:
        # a rerun without the clip settings continues with those of the file
        num_frames, window = index.meta.get("num_frames", trained), index.meta.get("window")
    else:
        num_frames = args.num_frames or trained
        window = args.window or (trained if num_frames > trained else None)
    tubelet = model.video_encoder.tubelet_size
    for what, n in (("--num-frames", num_frames), ("--window", window)):
        if n is not None and (n < 1 or n % tubelet):
            raise UseError(f"{what} {n} must be a positive multiple of the model's tubelet size {tubelet}")
    return num_frames, window


def _index_for(out: Path, index: EmbeddingIndex | None, settings: dict[str, Any]) -> EmbeddingIndex:
    """A new index with these settings, or the file's own when it was made with the same ones."""
    if index is None:
        return EmbeddingIndex(meta=dict(settings))
    differ = _settings_differ(index.meta, settings)
    if differ:
        raise UseError(f"{out} was made with other settings ({'; '.join(differ)}); choose another --out")
    index.meta.update(settings)
    return index


def _embed_todo(
    model: Any,
    index: EmbeddingIndex,
    todo: list[VideoItem],
    out: Path,
    args: argparse.Namespace,
    settings: dict[str, Any],
) -> tuple[int, list[tuple[str, str]]]:
    """Embed ``todo`` into ``index`` in batches with a progress bar, saving ``out`` every
    ``--save-every`` batches (the resume point); returns how many were added and the clips that
    could not be read, with the reason."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    failed: list[tuple[str, str]] = []
    added = 0
    loader = DataLoader(
        _Clips(todo, settings["num_frames"], settings["image_size"]),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        collate_fn=list,
    )
    columns = (TextColumn("[bold]embed"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console) as bar:
        task = bar.add_task("clips", total=len(todo))
        for n, batch in enumerate(loader, start=1):
            good = [(k, v) for k, v, _ in batch if v is not None]
            for key, _, reason in batch:
                if reason is not None:
                    failed.append((key, reason))
                    bar.console.print(f"[yellow]skipped[/yellow] {key}: {reason}")
            if good:
                clip, windows = embed_clips(model, torch.stack([v for _, v in good]), settings["window"])
                index.add([k for k, _ in good], clip, windows)
                added += len(good)
            bar.advance(task, len(batch))
            if n % args.save_every == 0:
                index.save(out)
    return added, failed


def build_search_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="iv2 search", description="Top-k videos of an `iv2 embed` index for a text or a video."
    )
    p.add_argument("query", nargs="?", default=None, help="the text to search for")
    p.add_argument("--index", required=True, help="the file `iv2 embed` wrote")
    p.add_argument("--video", default=None, help="search with this video instead of a text")
    p.add_argument("--k", type=int, default=5, help="how many results")
    p.add_argument("--ckpt", default=None, help="checkpoint to encode the query with (default: the index's)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def search_main(argv: list[str] | None = None) -> int:
    parser = build_search_parser()
    args = parser.parse_args(argv)
    if (args.query is None) == (args.video is None):
        parser.error("give a text query or --video (one of them)")
    if args.k < 1:
        parser.error("--k must be >= 1")
    set_threads(args.threads)
    try:
        return _search(args)
    except UseError as err:
        err_console.print(f"[red]iv2 search: error:[/red] {err}")
        return 2


@torch.no_grad()
def _search(args: argparse.Namespace) -> int:
    from iv2_lightning.stages.contrastive import ContrastiveStage

    index = EmbeddingIndex.load(args.index)
    if not len(index):
        raise UseError(f"{args.index} holds no embeddings")
    ckpt = args.ckpt or index.meta.get("ckpt")
    if not ckpt:
        raise UseError(f"{args.index} records no checkpoint; pass --ckpt")
    model = load_model(ckpt, ContrastiveStage).model  # the VideoTextAligner
    if model.embed_dim != index.embeddings.shape[1]:
        raise UseError(
            f"the checkpoint embeds into {model.embed_dim} dimensions, the index holds {index.embeddings.shape[1]}"
        )
    if args.video is not None:
        try:
            video = load_video(args.video, index.meta["num_frames"], index.meta["image_size"])
        except VideoDecodeError as err:
            raise UseError(str(err)) from err
        query, query_windows = embed_clips(model, video[None], index.meta.get("window"))
        what = f"video {args.video}"
    else:
        query, query_windows = model.encode_text([args.query]).cpu(), None
        what = f"text {args.query!r}"
    scores = index.embeddings.float() @ query[0].float()
    k = min(args.k, len(index))
    top = scores.topk(k)
    results = []
    for rank, (score, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        row: dict[str, Any] = {"rank": rank, "score": round(score, 4), "path": index.keys[i]}
        if index.windows is not None:
            # the window of the hit that best matches the query (for a long video: where to look)
            q = query_windows[0] if query_windows is not None else query
            best = int((index.windows[i].float() @ q.float().T).max(dim=-1).values.argmax())
            row["window"] = best
        results.append(row)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"top {k} of {len(index)} clips for {what}:")
    for r in results:
        extra = f"  (best window {r['window']})" if "window" in r else ""
        print(f"{r['rank']:>3}  {r['score']:+.4f}  {r['path']}{extra}")
    return 0
