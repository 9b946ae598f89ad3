"""``iv2 convert SRC DST [--verify]``: an official InternVideo2 checkpoint → iv2 weights.

The command around :mod:`iv2_lightning.models.official` (OpenGVLab/InternVideo, ``InternVideo2/``;
arXiv 2403.15377). Two destinations:

* ``DST.safetensors`` or a folder: the vision encoder of any official checkpoint (stage 1, stage 2,
  distilled, classifier fine-tune) in the layout ``init_from`` reads (tensors prefixed
  ``video_encoder.``);
* ``DST.ckpt`` (with ``--tokenizer``): a whole official stage-2 checkpoint (vision encoder, BERT with
  its fusion layers and MLM head, ``vision_proj``, ``text_proj``, ``itm_head``, ``temp``) as a
  ContrastiveStage checkpoint that ``iv2 embed``, ``iv2 search`` and ``iv2 test`` load directly.

It prints what was mapped, resampled and left out. With ``--verify`` the result is written beside the
destination first, checked against the official equations on the file's own tensors (vision tokens and
pooled output; for ``.ckpt`` also the video-text similarity matrix and the matching-head scores), and
moved into place only if every check passes. Exit codes: 0 written, 1 verification failed (nothing
written), 2 the file cannot be converted.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from iv2_lightning.files import load_checkpoint_file, remove_file_and_record, save_checkpoint_file
from iv2_lightning.models.backbone import VideoEncoder
from iv2_lightning.models.official.errors import OfficialCheckpointError, PosEmbedInterpolationWarning
from iv2_lightning.models.official.load import LoadedCheckpoint, load_checkpoint
from iv2_lightning.models.official.mapping import OFFICIAL_PRESETS
from iv2_lightning.models.official.save import read_converted, save_converted
from iv2_lightning.models.official.stage2 import Stage2Report, load_stage2, read_stage2, verify_stage2
from iv2_lightning.models.official.verify import verify_loaded

STAGE_CLASS_PATH = "iv2_lightning.stages.contrastive.ContrastiveStage"


def build_convert_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iv2 convert",
        description="Convert the vision encoder of an official InternVideo2 checkpoint (stage-1 pretrain.pth, "
        "stage-2 .pt, distilled pytorch_model.bin, classifier fine-tune) into iv2 weights for init_from, "
        "or a whole stage-2 .pt (vision + BERT with fusion layers + heads) into a ContrastiveStage .ckpt.",
    )
    parser.add_argument(
        "src", help="the official checkpoint (.pth/.pt/.bin read weights-only, or .safetensors)"
    )
    parser.add_argument(
        "dst",
        help="DST.safetensors (one file) or a folder (weights.safetensors + manifest.json): the vision "
        "encoder; DST.ckpt: a whole stage-2 checkpoint as a ContrastiveStage checkpoint (needs --tokenizer)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="DST.ckpt only: the local folder of the BERT tokenizer the checkpoint was trained with "
        "(bert-large-uncased for the released stage-2 files)",
    )
    parser.add_argument(
        "--text-heads", type=int, default=None, help="DST.ckpt only: BERT attention heads (default hidden/64)"
    )
    parser.add_argument(
        "--preset",
        choices=OFFICIAL_PRESETS,
        default=None,
        help="official size (default: from the checkpoint)",
    )
    parser.add_argument("--num-frames", type=int, default=8, help="frames per clip of the converted encoder")
    parser.add_argument(
        "--image-size", type=int, default=224, help="frame size (px) of the converted encoder"
    )
    parser.add_argument(
        "--source-frames",
        type=int,
        default=None,
        help="frames the stored position table was trained with, when it cannot be told from its size",
    )
    parser.add_argument(
        "--num-heads", type=int, default=None, help="attention heads (sizes without a preset)"
    )
    parser.add_argument("--attn-pool-heads", type=int, default=None, help="attention-pool heads (default 16)")
    parser.add_argument(
        "--mlp-act",
        choices=("gelu", "gelu_tanh"),
        default=None,
        help="MLP activation (gelu_tanh = flash-attn FusedMLP's, used on the official fused training path)",
    )
    parser.add_argument(
        "--no-strict", action="store_true", help="allow encoder tensors missing from the file"
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="check the result against the official equations on the file's tensors; write DST only if it passes",
    )
    return parser


def convert_main(argv: list[str] | None = None) -> int:
    """``iv2 convert SRC DST [--preset l14] [--num-frames 8] [--image-size 224] [--verify]``."""
    args = build_convert_parser().parse_args(argv)
    overrides = {
        k: v
        for k, v in (
            ("num_heads", args.num_heads),
            ("attn_pool_heads", args.attn_pool_heads),
            ("mlp_act", args.mlp_act),
        )
        if v is not None
    }
    if Path(args.dst).suffix == ".ckpt":
        return _convert_stage2(args, overrides)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PosEmbedInterpolationWarning)  # the summary lists it
            encoder, loaded = load_checkpoint(
                args.src,
                args.preset,
                args.num_frames,
                args.image_size,
                args.source_frames,
                not args.no_strict,
                overrides,
            )
    except (OfficialCheckpointError, FileNotFoundError) as err:
        print(f"iv2 convert: error: {err}", file=sys.stderr)
        return 2
    print(loaded.report.summary())
    dst = Path(args.dst)
    if not args.verify:
        print(f"wrote {save_converted(encoder, loaded.report, dst)}")
        return 0
    return _write_verified(encoder, loaded, dst)


def convert_stage2(source, tokenizer: str, *args: Any, **kwargs: Any):
    """``(stage, loaded, report)``: a ContrastiveStage (eval mode) holding every tensor of the official
    stage-2 checkpoint ``source``; the other arguments are :func:`read_stage2`'s."""
    from iv2_lightning.stages.contrastive import ContrastiveStage

    encoder, loaded, report = read_stage2(source, tokenizer, *args, **kwargs)
    stage = ContrastiveStage(**report.hparams)
    load_stage2(stage.model, encoder, report)
    return stage.eval(), loaded, report


def save_stage2(stage, report: Stage2Report, dst: str | os.PathLike) -> Path:
    """A Lightning-style checkpoint (weights-only readable) that ``iv2 embed/search/test`` load, written
    atomically with its size+sha256 record (:func:`~iv2_lightning.files.save_checkpoint_file`)."""
    import lightning

    ckpt = {
        "state_dict": {k: v.detach().clone() for k, v in stage.state_dict().items()},
        "hyper_parameters": {**report.hparams, "_class_path": STAGE_CLASS_PATH},
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        "iv2_converted_from": report.vision.source,
    }
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint_file(ckpt, dst)


def _convert_stage2(args: argparse.Namespace, overrides: dict) -> int:
    """The whole stage-2 model → a ContrastiveStage checkpoint (verified before it is moved in place)."""
    if not args.tokenizer:
        print(
            "iv2 convert: error: a .ckpt destination needs --tokenizer FOLDER (the BERT tokenizer)",
            file=sys.stderr,
        )
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PosEmbedInterpolationWarning)
            stage, loaded, report = convert_stage2(
                args.src,
                args.tokenizer,
                args.num_frames,
                args.image_size,
                args.preset,
                args.source_frames,
                args.text_heads,
                overrides,
            )
    except (OfficialCheckpointError, FileNotFoundError, ValueError) as err:
        print(f"iv2 convert: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    dst = Path(args.dst)
    if args.verify:
        result = verify_stage2(stage.model, loaded, report)
        print(result.summary())
        if not result.ok:
            print(f"iv2 convert: verification failed; {dst} was not written", file=sys.stderr)
            return 1
        # the written file must hold the verified model: read it back as the commands do and compare
        save_stage2(stage, report, dst)
        written = load_checkpoint_file(dst)["state_dict"]
        own = stage.state_dict()
        if written.keys() != own.keys() or not all(torch.equal(written[k], own[k]) for k in own):
            remove_file_and_record(dst)
            print(f"iv2 convert: the written tensors differ; {dst} was removed", file=sys.stderr)
            return 1
        print(f"  ok: the written checkpoint holds the {len(own)} tensors of the verified model")
        print(f"wrote {dst}")
        return 0
    print(f"wrote {save_stage2(stage, report, dst)}")
    return 0


def _write_verified(encoder: VideoEncoder, loaded: LoadedCheckpoint, dst: Path) -> int:
    """Write beside the destination, verify the written tensors, then move into place."""
    staging = dst.with_name(f".{dst.name}.verify{dst.suffix}")
    save_converted(encoder, loaded.report, staging)
    try:
        result = verify_loaded(encoder, loaded, written=read_converted(staging))
        print(result.summary())
        if not result.ok:
            print(f"iv2 convert: verification failed; {dst} was not written", file=sys.stderr)
            return 1
        if staging.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            for name in ("weights.safetensors", "manifest.json"):  # weights first, manifest last
                os.replace(staging / name, dst / name)
        else:
            os.replace(staging, dst)
    finally:
        if staging.is_dir():
            for child in staging.iterdir():
                child.unlink()
            staging.rmdir()
        elif staging.exists():
            staging.unlink()
    print(f"wrote {dst}")
    return 0


__all__ = ["build_convert_parser", "convert_main", "convert_stage2", "save_stage2"]
