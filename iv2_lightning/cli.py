"""The ``iv2`` command line.

For now it answers ``--help``, ``--version`` and ``presets`` (the table of video encoder sizes);
the Lightning subcommands (fit, validate, test, predict, curriculum) arrive with the curriculum.
"""

from __future__ import annotations

import argparse
import sys

from iv2_lightning import __version__


def _presets(_: argparse.Namespace) -> int:
    import shutil

    from rich.console import Console
    from rich.table import Table

    from iv2_lightning.models import OFFICIAL_PARAM_COUNTS, PRESETS, count_parameters

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iv2",
        description="iv2_lightning: InternVideo2 video foundation model components on PyTorch Lightning.",
    )
    parser.add_argument("--version", action="version", version=f"iv2-lightning {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("presets", help="print the video encoder presets and their parameter counts")
    p.set_defaults(func=_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
