"""What the ``iv2 embed | search | caption | chat`` commands share: the one-line error and the console."""

import torch
from rich.console import Console

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class UseError(RuntimeError):
    """A problem with the user's input that the command reports in one line (no traceback)."""


def set_threads(n: int | None) -> None:
    """``--threads N``: the intra-op threads torch uses (none given: torch's default)."""
    if n:
        torch.set_num_threads(n)
