"""The ``iv2`` command line.

``iv2 COMMAND ...`` dispatches on the first word:

* ``fit | validate | test | predict``: a LightningCLI (subclass mode for model and data, so a config
  names ``model.class_path`` and ``data.class_path``; the data's ``num_frames``, ``image_size``,
  ``tokenizer`` and ``max_audio_frames`` are linked into the model, and its ``modalities`` become
  the model's ``data_fields`` (:mod:`iv2_lightning.lightning_cli`); TensorBoard logger, Rich progress
  bar, seed 0 by default);
* ``curriculum``: stage 1 → 2 → 3 → action probe, each a ``fit`` in its own folder
  (:mod:`iv2_lightning.curriculum`);
* tool commands (presets, synth, prepare, segment, embed, search, caption, chat,
  estimate, export, convert): plain argparse programs that live next to the
  code they drive and are imported only when run, so ``iv2 --help`` stays fast.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from iv2_lightning import __version__

LIGHTNING_COMMANDS = {
    "fit": "train a stage (iv2 fit --config configs/stage2/tiny.yaml)",
    "validate": "run the validation loop of a stage on a checkpoint",
    "test": "run the test loop (e.g. iv2 test --config configs/eval/retrieval.yaml)",
    "predict": "run the predict loop",
}

#: command → ("module:function", one-line help). Each function takes the remaining argv.
TOOLS: dict[str, tuple[str, str]] = {
    "curriculum": (
        "iv2_lightning.curriculum:curriculum_main",
        "run stage 1 -> 2 -> 3 -> action probe from one YAML",
    ),
    "presets": (
        "iv2_lightning.cli:presets_main",
        "print the video encoder presets and their parameter counts",
    ),
    "synth": (
        "iv2_lightning.data.synthetic:synth_main",
        "write synthetic clips as mp4 files + annotations.jsonl",
    ),
    "prepare": (
        "iv2_lightning.data.tools:prepare_main",
        "annotation file + media -> LitData streaming shards",
    ),
    "segment": (
        "iv2_lightning.data.tools:segment_main",
        "split long videos into scene clips (annotation rows)",
    ),
    "embed": (
        "iv2_lightning.use:embed_main",
        "clip embeddings of videos with a stage-2 checkpoint (resumable)",
    ),
    "search": (
        "iv2_lightning.use:search_main",
        "top-k videos of an `iv2 embed` index for a text or a video",
    ),
    "caption": ("iv2_lightning.use:caption_main", "caption videos with a stage-3 checkpoint"),
    "chat": (
        "iv2_lightning.use:chat_main",
        "talk about a video with a stage-3 checkpoint (multi-turn)",
    ),
    "estimate": (
        "iv2_lightning.estimate:estimate_main",
        "per-GPU memory of a config under DDP / DeepSpeed ZeRO 0-3 (+offload)",
    ),
    "export": (
        "iv2_lightning.export:export_main",
        "Lightning .ckpt or DeepSpeed ZeRO folder -> fp32 shared weights for init_from",
    ),
    "convert": (
        "iv2_lightning.convert:convert_main",
        "official InternVideo2 checkpoint -> iv2 weights for init_from (--verify checks parity)",
    ),
}


def presets_main(argv: list[str] | None = None) -> int:
    import argparse
    import shutil

    from rich.console import Console
    from rich.table import Table

    from iv2_lightning.models import OFFICIAL_PARAM_COUNTS, PRESETS, count_parameters

    argparse.ArgumentParser(prog="iv2 presets", description=TOOLS["presets"][1]).parse_args(argv)
    table = Table(title="VideoEncoder presets (parameters counted on the meta device)")
    for col in (
        "preset",
        "attention",
        "width",
        "depth",
        "heads",
        "mlp",
        "patch",
        "frames x size",
        "params",
        "official",
    ):
        table.add_column(col, justify="right" if col not in ("preset", "attention") else "left")
    for name, cfg in PRESETS.items():
        n = count_parameters(name)
        ref = OFFICIAL_PARAM_COUNTS.get(name)
        table.add_row(
            name,
            cfg["attention"],
            str(cfg["embed_dim"]),
            str(cfg["depth"]),
            str(cfg["num_heads"]),
            str(cfg["mlp_dim"]),
            str(cfg["patch_size"]),
            f"{cfg['num_frames']} x {cfg['image_size']}",
            f"{n / 1e6:,.1f}M",
            f"{ref / 1e6:,.1f}M" if ref else "-",
        )
    Console(width=max(shutil.get_terminal_size().columns, 120)).print(table)
    return 0


def _resolve(target: str) -> Callable[[list[str]], int]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _ckpt_path_arg(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--ckpt_path="):
            return arg.split("=", 1)[1]
        if arg == "--ckpt_path" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def lightning_main(argv: list[str]) -> int:
    from iv2_lightning.files import UnreadableCheckpointError, verify_file
    from iv2_lightning.lightning_cli import run_lightning_cli

    ckpt = _ckpt_path_arg(argv)
    if ckpt and os.path.isfile(ckpt):
        # before LightningCLI reads the checkpoint's hyperparameters from it
        status, message = verify_file(ckpt)
        if status == "damaged":
            print(f"iv2 {argv[0]}: error: {message}; refusing to use it", file=sys.stderr)
            return 2
    try:
        run_lightning_cli(argv)
    except UnreadableCheckpointError as err:  # damaged, unsafe or unreadable: one line, exit code 2
        print(f"iv2 {argv[0]}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if not _lost_peer(err):
            raise
        rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
        first = str(err).strip().splitlines()[0][:300]
        print(
            f"iv2 {argv[0]}: error: rank {rank} lost contact with another process of this run ({first}); it "
            "stopped instead of waiting for it. Rerun the same command with --ckpt_path last to resume "
            "from the last checkpoint.",
            file=sys.stderr,
        )
        return 3
    return 0


#: what gloo and NCCL say when a peer process of the group has died
_PEER_LOST = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "NCCL communicator was aborted",
)


def _lost_peer(err: BaseException) -> bool:
    seen = 0
    while err is not None and seen < 8:
        if any(s in str(err) for s in _PEER_LOST):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


def usage() -> str:
    width = max(len(c) for c in [*TOOLS, *LIGHTNING_COMMANDS])
    lines = [
        "usage: iv2 COMMAND [ARGS...]   (iv2 COMMAND --help for the arguments of one command)",
        "",
        "iv2_lightning: InternVideo2 video foundation model components on PyTorch Lightning.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, help_ in LIGHTNING_COMMANDS.items()]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in TOOLS.items()]
    lines += ["", "options:", "  -h, --help     show this message", "  --version      print the version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"iv2-lightning {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command in LIGHTNING_COMMANDS:
        return lightning_main(argv)
    if command in TOOLS:
        return int(_resolve(TOOLS[command][0])(rest) or 0)
    print(f"iv2: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
