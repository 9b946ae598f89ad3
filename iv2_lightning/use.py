"""Use a trained model from the command line: ``iv2 embed | search | caption | chat``.

* ``iv2 embed --ckpt CKPT --videos DIR_OR_ANNOTATIONS --out FILE``: the contrastive stage's
  normalised clip embedding of every video (a folder searched for video files, or an annotation
  file whose ``start``/``end`` spans become separate clips), in batches, with a progress bar, into
  a safetensors file (``embeddings [N, E]``, the paths and the settings in its metadata) or, when
  ``FILE`` ends in ``.npy``, a ``.npy`` array with a ``.json`` sidecar. Rerunning skips what ``FILE``
  already holds (it is also saved every ``--save-every`` batches, so an interrupted run resumes); a
  file that cannot be decoded is reported with the reason and skipped. With ``--num-frames``
  above the model's training frames (or an explicit ``--window``), every clip is cut into windows
  of ``--window`` frames as the :class:`~iv2_lightning.models.temporal.HierarchicalTemporalEncoder`
  splits long videos; the window embeddings are stored too (``windows [N, W, E]``) and the clip
  embedding is their normalised mean.
* ``iv2 search --index FILE "a red circle moving left"`` or ``--video query.mp4``: the top-k
  videos of the index by cosine similarity, with scores; the text (or video) is encoded by the
  checkpoint the index records (or ``--ckpt``), the video exactly as the index's clips were.
* ``iv2 caption --ckpt CKPT video...`` and ``iv2 chat --ckpt CKPT video``: the next-token stage's
  captions, and a multi-turn dialogue about one clip (``--question`` repeatable, else read from
  stdin line by line; ``/reset`` forgets the conversation). Greedy by default, ``--top-p`` samples.

``CKPT`` is a Lightning checkpoint of the right stage (``ContrastiveStage`` for embed/search,
``NextTokenStage`` for caption/chat), read with ``torch.load(weights_only=True)``; the stage is
rebuilt from the arguments the checkpoint records. A stage folder (``runs/x/stage2``) means its
``checkpoints/last.ckpt``; a ``StageTransition`` export folder means the checkpoint next to it,
because an export holds only the shared modules (no projection heads, no language model) and its
manifest only the architecture, not the stage's arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch.utils.data import DataLoader, Dataset

from iv2_lightning.data.annotations import load_annotations
from iv2_lightning.data.batch import VideoBatch, VideoCollate, VideoSample
from iv2_lightning.data.transforms import VideoTransform
from iv2_lightning.data.video_io import VideoDecodeError, read_clip
from iv2_lightning.stages.base import BaseStage
from iv2_lightning.stages.weights import MANIFEST_FILE

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")
ANNOTATION_SUFFIXES = (".jsonl", ".json", ".csv")
INDEX_FORMAT = "iv2-embeddings/1"
STAGES_PACKAGE = "iv2_lightning.stages."

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class UseError(RuntimeError):
    """A problem with the user's input that the command reports in one line (no traceback)."""


# --------------------------------------------------------------------------- loading a stage


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The Lightning checkpoint that ``path`` names: the file itself, ``<stage>/checkpoints/last.ckpt``
    for a stage folder, or the checkpoint beside a ``StageTransition`` export folder."""
    p = Path(path)
    if not p.exists():
        raise UseError(f"checkpoint {p} does not exist")
    if p.is_file():
        if p.suffix == ".safetensors":
            return resolve_checkpoint(p.parent)
        return p
    if (p / "checkpoints" / "last.ckpt").is_file():
        return p / "checkpoints" / "last.ckpt"
    if (p / MANIFEST_FILE).is_file():
        beside = p.parent / "checkpoints" / "last.ckpt"
        if beside.is_file():
            return beside
        try:
            modules = json.loads((p / MANIFEST_FILE).read_text()).get("architecture", {})
        except json.JSONDecodeError:
            modules = {}
        shared = sorted(k for k in modules if not k.endswith("_config"))
        raise UseError(
            f"{p} is a StageTransition export: it holds only the shared modules {shared or '?'} (no "
            "projection heads, no language model) and its manifest records the architecture, not the "
            "stage's arguments, so the stage cannot be rebuilt from it; pass the stage's Lightning "
            f"checkpoint instead (no {beside} was found beside it)"
        )
    raise UseError(
        f"{p} is neither a checkpoint file, a stage folder with checkpoints/last.ckpt nor an export"
    )


def load_stage(path: str | os.PathLike, kind: type[BaseStage]) -> tuple[BaseStage, Path]:
    """Rebuild the stage saved in a Lightning checkpoint (weights-only read, strict load, eval mode)."""
    ckpt_path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UseError(
            f"{ckpt_path} is not a readable weights-only checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UseError(f"{ckpt_path} holds no state_dict (is it a Lightning checkpoint?)")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    cls: type = kind
    class_path = hparams.get("_class_path")
    if class_path:
        if not str(class_path).startswith(STAGES_PACKAGE):  # import nothing a file names elsewhere
            raise UseError(f"{ckpt_path} was saved by {class_path}, which is not an iv2_lightning stage")
        module, _, name = str(class_path).rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, kind)):
        raise UseError(
            f"{ckpt_path} holds a {class_path or 'stage'} checkpoint; this command needs a {kind.__name__} "
            f"({kind.stage_name}) checkpoint"
        )
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    kwargs["init_from"] = None  # the checkpoint has every weight; do not read the original source again
    model = cls(**kwargs)
    model.on_load_checkpoint(ckpt)  # as Lightning's own loading does
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise UseError(
            f"{ckpt_path}: the weights do not fit the stage its arguments describe ({err})"
        ) from err
    model.eval()
    model.loaded_step = int(ckpt.get("global_step", 0))
    return model, ckpt_path


# --------------------------------------------------------------------------- videos


@dataclass
class VideoItem:
    """One clip to read: ``key`` names it in an index (the path, plus ``#start-end`` for a span)."""

    key: str
    path: str
    start: float | None = None
    end: float | None = None
    caption: str | None = None


def list_videos(source: str | os.PathLike, root: str | os.PathLike | None = None) -> list[VideoItem]:
    """Video files under a folder (sorted), or the rows of an annotation file (JSONL/JSON/CSV, video
    paths relative to ``root``, default the file's folder), or one video file."""
    src = Path(source)
    if src.is_dir():
        files = sorted(f for f in src.rglob("*") if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        return [VideoItem(str(f), str(f)) for f in files]
    if src.is_file() and src.suffix.lower() in ANNOTATION_SUFFIXES:
        rows, errors = load_annotations(src, on_error="skip")
        for e in errors:
            err_console.print(f"[yellow]skipped row[/yellow] {e}")
        base = Path(root) if root is not None else src.parent
        items = []
        for r in rows:
            path = Path(r.video) if Path(r.video).is_absolute() else base / r.video
            span = f"#{r.start:g}-{r.end:g}" if r.start is not None and r.end is not None else ""
            items.append(
                VideoItem(f"{path}{span}", str(path), r.start, r.end, r.caption[0] if r.caption else None)
            )
        return items
    if src.is_file():
        return [VideoItem(str(src), str(src))]
    raise UseError(f"{src} does not exist")


def load_video(
    path: str | os.PathLike,
    num_frames: int,
    image_size: int,
    start: float | None = None,
    end: float | None = None,
) -> torch.Tensor:
    """Normalised ``[3, num_frames, image_size, image_size]`` as the evaluation data reads a clip:
    sparse segment sampling at segment middles, short side resized, centre crop, ImageNet mean/std."""
    return load_clip(path, num_frames, image_size, start, end)[0]


def load_clip(
    path: str | os.PathLike,
    num_frames: int,
    image_size: int,
    start: float | None = None,
    end: float | None = None,
    audio: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(video, audio)``: the video as :func:`load_video` reads it and, with ``audio=True``, the
    file's sound track as kaldi fbank ``[F, 128]`` (None when the file has none)."""
    clip = read_clip(
        path, num_frames=num_frames, sampling="middle", size=image_size, start=start, end=end, audio=audio
    )
    return VideoTransform(image_size, train=False)(clip.video), clip.audio


class _Clips(Dataset):
    """Decodes in DataLoader workers; a file that fails gives ``(key, None, reason)``."""

    def __init__(self, items: Sequence[VideoItem], num_frames: int, image_size: int) -> None:
        self.items, self.num_frames, self.image_size = list(items), num_frames, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str | None]:
        it = self.items[i]
        try:
            return it.key, load_video(it.path, self.num_frames, self.image_size, it.start, it.end), None
        except (VideoDecodeError, OSError, ValueError, RuntimeError) as err:
            reason = err.reason if isinstance(err, VideoDecodeError) else f"{type(err).__name__}: {err}"
            return it.key, None, reason


# --------------------------------------------------------------------------- the index


@dataclass
class EmbeddingIndex:
    """Clip embeddings with their keys and how they were made (``meta``: ckpt, num_frames, window,
    image_size, embed_dim). ``windows [N, W, E]`` when clips were embedded window by window."""

    keys: list[str] = field(default_factory=list)
    embeddings: torch.Tensor | None = None
    windows: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def sidecar(path: Path) -> Path:
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | os.PathLike) -> EmbeddingIndex:
        path = Path(path)
        if path.suffix == ".npy":
            side = cls.sidecar(path)
            if not side.is_file():
                raise UseError(f"{path} has no sidecar {side} with its paths")
            info = json.loads(side.read_text())
            emb = torch.from_numpy(np.load(path, allow_pickle=False))
            windows_file = path.with_suffix(".windows.npy")
            windows = (
                torch.from_numpy(np.load(windows_file, allow_pickle=False)) if info.get("windows") else None
            )
            keys = list(info.pop("paths"))
            info.pop("windows", None)
            # the arrays are written before the sidecar: after an interrupted save they may hold rows
            # the sidecar does not list yet (appended last), which the next run embeds again
            emb = emb[: len(keys)]
            windows = None if windows is None else windows[: len(keys)]
        else:
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = dict(f.metadata() or {})
                    emb = f.get_tensor("embeddings")
                    windows = f.get_tensor("windows") if "windows" in f.keys() else None  # noqa: SIM118
            except Exception as err:
                raise UseError(
                    f"{path} is not a readable embedding index ({type(err).__name__}: {err})"
                ) from err
            fmt = meta.pop("format", None)
            if fmt != INDEX_FORMAT or "paths" not in meta:
                raise UseError(f"{path} is not an `iv2 embed` index (format {fmt!r})")
            keys = json.loads(meta.pop("paths"))
            info = {k: json.loads(v) for k, v in meta.items()}
        if emb.shape[0] != len(keys):
            raise UseError(f"{path}: {emb.shape[0]} embeddings for {len(keys)} paths")
        if not keys:
            emb = None
        return cls(keys, emb, windows, info)

    def save(self, path: str | os.PathLike) -> None:
        """Atomic (temporary file + rename); for ``.npy`` the sidecar is written last."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        emb = (
            self.embeddings
            if self.embeddings is not None
            else torch.zeros(0, int(self.meta.get("embed_dim", 0)))
        )
        meta = {**self.meta, "format": INDEX_FORMAT}
        if path.suffix == ".npy":
            arrays = {path: emb}
            if self.windows is not None:
                arrays[path.with_suffix(".windows.npy")] = self.windows
            for target, array in arrays.items():
                tmp = target.with_name(f".{target.name}.partial")
                with open(tmp, "wb") as f:
                    np.save(f, array.float().numpy())
                os.replace(tmp, target)
            side = self.sidecar(path)
            tmp = side.with_name(f".{side.name}.partial")
            tmp.write_text(
                json.dumps({**meta, "paths": self.keys, "windows": self.windows is not None}, indent=1)
            )
            os.replace(tmp, side)
            return
        from safetensors.torch import save_file

        tensors = {"embeddings": emb.float().contiguous()}
        if self.windows is not None:
            tensors["windows"] = self.windows.float().contiguous()
        tmp = path.with_name(f".{path.name}.partial")
        strings = {k: json.dumps(v) for k, v in meta.items() if k != "format"}
        save_file(
            tensors, str(tmp), metadata={"format": INDEX_FORMAT, "paths": json.dumps(self.keys), **strings}
        )
        os.replace(tmp, path)

    def add(self, keys: list[str], emb: torch.Tensor, windows: torch.Tensor | None) -> None:
        self.keys += keys
        self.embeddings = emb if self.embeddings is None else torch.cat([self.embeddings, emb])
        if windows is not None:
            self.windows = windows if self.windows is None else torch.cat([self.windows, windows])


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


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------- iv2 embed


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
    _threads(args.threads)
    try:
        return _embed(args)
    except UseError as err:
        err_console.print(f"[red]iv2 embed: error:[/red] {err}")
        return 2


def _embed(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from iv2_lightning.stages.contrastive import ContrastiveStage

    items = list_videos(args.videos, args.root)
    if not items:
        raise UseError(f"no video found in {args.videos} (looked for {', '.join(VIDEO_SUFFIXES)})")
    model, ckpt_path = load_stage(args.ckpt, ContrastiveStage)
    out = Path(args.out)
    index = EmbeddingIndex.load(out) if out.is_file() else None
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
    settings = {
        "ckpt": str(ckpt_path.resolve()),
        "num_frames": num_frames,
        "window": window,
        "image_size": model.video_encoder.image_size,
        "embed_dim": model.embed_dim,
    }
    if index is None:
        index = EmbeddingIndex(meta=dict(settings))
    else:
        differ = _settings_differ(index.meta, settings)
        if differ:
            raise UseError(f"{out} was made with other settings ({'; '.join(differ)}); choose another --out")
        index.meta.update(settings)
    done = set(index.keys)
    todo = [it for it in items if it.key not in done]
    err_console.print(
        f"iv2 embed: {len(items)} clip(s), {len(items) - len(todo)} already in {out}; "
        f"{model.__class__.__name__} from {ckpt_path} (step {model.loaded_step}); {num_frames} frames"
        + (f" in windows of {window}" if window else "")
    )
    failed: list[tuple[str, str]] = []
    added = 0
    started = time.perf_counter()
    loader = DataLoader(
        _Clips(todo, num_frames, settings["image_size"]),
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
                clip, windows = embed_clips(model, torch.stack([v for _, v in good]), window)
                index.add([k for k, _ in good], clip, windows)
                added += len(good)
            bar.advance(task, len(batch))
            if n % args.save_every == 0:
                index.save(out)
    if added or not out.is_file():
        index.save(out)
    seconds = time.perf_counter() - started
    rate = f" ({added / seconds:.1f} clips/s)" if added and seconds > 0 else ""
    print(
        f"embedded {added} new clip(s){rate}, skipped {len(items) - len(todo)} already in the index and "
        f"{len(failed)} unreadable; {len(index)} clip(s) in {out}"
    )
    return 1 if failed and not added and not done else 0


# --------------------------------------------------------------------------- iv2 search


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
    _threads(args.threads)
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
    model, _ = load_stage(ckpt, ContrastiveStage)
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


# --------------------------------------------------------------------------- iv2 caption / chat


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt", required=True, help="NextTokenStage .ckpt, its stage folder or its export folder"
    )
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --top-p)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the stage's max_new_tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (with --top-p)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UseError(f"--top-p must be in (0, 1]; got {args.top_p}")
    generator = torch.Generator().manual_seed(args.seed) if args.top_p is not None else None
    return {
        "top_p": args.top_p,
        "temperature": args.temperature,
        "max_new_tokens": args.max_new_tokens,
        "generator": generator,
    }


def _load_next_token(ckpt: str):
    from iv2_lightning.stages.next_token import NextTokenStage

    model, path = load_stage(ckpt, NextTokenStage)
    err_console.print(f"{model.__class__.__name__} from {path} (step {model.loaded_step})")
    return model


def _read_for(model: Any, path: str) -> torch.Tensor | VideoSample:
    """The clip as ``model`` reads it: the video tensor, or, for a stage that fuses audio, a sample
    with the file's audio track as fbank features (a file without one leaves the audio gated off)."""
    enc = model.video_encoder
    try:
        if not getattr(model, "use_audio", False):
            return load_video(path, enc.num_frames, enc.image_size)
        video, audio = load_clip(path, enc.num_frames, enc.image_size, audio=True)
        return VideoSample(video=video, sample_id=0, audio=audio, meta={"path": path})
    except (VideoDecodeError, OSError, ValueError) as err:
        raise UseError(str(err)) from err


def _model_input(clips: list[torch.Tensor | VideoSample]) -> torch.Tensor | VideoBatch:
    if isinstance(clips[0], VideoSample):
        return VideoCollate()(clips)
    return torch.stack(clips)


def caption_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="iv2 caption", description="Captions of videos with a stage-3 (NextTokenStage) checkpoint."
    )
    p.add_argument("videos", nargs="+", help="video files")
    p.add_argument("--batch-size", type=int, default=8)
    _generation_args(p)
    args = p.parse_args(argv)
    _threads(args.threads)
    try:
        sampling = _sampling(args)
        model = _load_next_token(args.ckpt)
    except UseError as err:
        err_console.print(f"[red]iv2 caption: error:[/red] {err}")
        return 2
    failed = 0
    for start in range(0, len(args.videos), max(1, args.batch_size)):
        paths, clips = [], []
        for path in args.videos[start : start + args.batch_size]:
            try:
                clips.append(_read_for(model, path))
                paths.append(path)
            except UseError as err:
                failed += 1
                err_console.print(f"[yellow]skipped[/yellow] {err}")
        if clips:
            for path, caption in zip(paths, model.caption(_model_input(clips), **sampling)):
                print(f"{path}: {caption}")
    return 1 if failed else 0


def _questions(args: argparse.Namespace) -> Iterator[str]:
    if args.question:
        yield from args.question
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            err_console.print("[bold]you>[/bold] ", end="")
        line = sys.stdin.readline()
        if not line:
            return
        line = line.strip()
        if line in ("/quit", "/exit"):
            return
        if line:
            yield line


def chat_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="iv2 chat",
        description="Talk about one video with a stage-3 (NextTokenStage) checkpoint: --question Q (repeatable) "
        "or one question per line on stdin; /reset forgets the conversation, /quit or end of input stops.",
    )
    p.add_argument("video", help="a video file")
    p.add_argument("--question", action="append", default=None, help="a question (repeat for several turns)")
    _generation_args(p)
    args = p.parse_args(argv)
    _threads(args.threads)
    try:
        sampling = _sampling(args)
        model = _load_next_token(args.ckpt)
        video = _model_input([_read_for(model, args.video)])
    except UseError as err:
        err_console.print(f"[red]iv2 chat: error:[/red] {err}")
        return 2
    if not args.question and sys.stdin.isatty():
        err_console.print(
            f"chatting about {args.video}; /reset forgets the conversation, /quit or Ctrl-D ends"
        )
    echo = bool(args.question) or not sys.stdin.isatty()
    history: list[tuple[str, str]] = []
    for question in _questions(args):
        if question == "/reset":
            history = []
            print("(conversation reset)")
            continue
        answer = model.chat(video, question, history=history, **sampling)
        if echo:
            print(f"Q: {question}")
        print(f"A: {answer}", flush=True)
        history.append((question, answer))
    return 0


__all__ = [
    "EmbeddingIndex",
    "UseError",
    "VideoItem",
    "caption_main",
    "chat_main",
    "embed_clips",
    "embed_main",
    "list_videos",
    "load_stage",
    "load_video",
    "resolve_checkpoint",
    "search_main",
]
