"""``iv2 caption`` and ``iv2 chat``: captions and a multi-turn dialogue from a stage-3 model.

``iv2 caption --ckpt CKPT video...`` captions each file; ``iv2 chat --ckpt CKPT video`` answers
``--question`` (repeatable) or, without it, questions read from stdin line by line (``/reset`` forgets
the conversation). Greedy by default, ``--top-p`` samples. A model that fuses audio reads each file's
sound track too, cropped to the audio encoder's frames.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any

import torch

from iv2_lightning.data.batch import VideoBatch, VideoCollate, VideoSample
from iv2_lightning.data.video_io import VideoDecodeError
from iv2_lightning.use.checkpoints import load_model
from iv2_lightning.use.clips import load_clip, load_video
from iv2_lightning.use.common import UseError, err_console, set_threads


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
    """The torch model (``VideoCaptioner``) of a stage-3 checkpoint: it captions and chats itself."""
    from iv2_lightning.stages.next_token import NextTokenStage

    loaded = load_model(ckpt, NextTokenStage)
    err_console.print(f"{loaded.stage} from {loaded.path} (step {loaded.step})")
    return loaded.model


def _read_for(model: Any, path: str) -> torch.Tensor | VideoSample:
    """The clip as ``model`` reads it: the video tensor, or, for a stage that fuses audio, a sample
    with the file's audio track as fbank features (a file without one leaves the audio gated off)."""
    enc = model.video_encoder
    try:
        if not getattr(model, "use_audio", False):
            return load_video(path, enc.num_frames, enc.image_size)
        # as long a stretch of sound as the audio encoder takes, around the sampled frames
        limit = model.audio_encoder.max_frames
        video, audio = load_clip(path, enc.num_frames, enc.image_size, audio=True, max_audio_frames=limit)
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
    set_threads(args.threads)
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
    set_threads(args.threads)
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
