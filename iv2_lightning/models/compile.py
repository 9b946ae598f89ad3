"""Regional compilation: ``torch.compile`` each repeated block of a model, not the model as a whole.

A stage's forward has data-dependent control flow around its blocks (which modalities a batch has,
how many VTM rows have a negative, masks checked with ``bool()``), so a whole-model compile breaks
into many graphs and recompiles as batch shapes change. The transformer blocks themselves are
straight-line tensor code, and identical blocks share one compiled graph (PyTorch's "regional
compilation" recipe), so compiling only them costs one compile per block *class* and keeps the
module tree, its parameter names and the checkpoints exactly as in eager mode.

A block is an element of an ``nn.ModuleList`` whose elements all share one class (a backbone's
``blocks``, the fusion ``layers``); lists nested inside an already-chosen block are left to it.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def repeated_blocks(model: nn.Module) -> list[str]:
    """Names of the modules :func:`compile_blocks` would compile, outermost first."""
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if any(name == c or name.startswith(c + ".") for c in chosen):
            continue  # a list inside a block already chosen: compiled as part of it
        chosen.extend(f"{name}.{i}" if name else str(i) for i in range(len(module)))
    return chosen


def compile_blocks(model: nn.Module, **options: Any) -> list[str]:
    """``module.compile(**options)`` on every repeated block of ``model`` (in place; the state dict
    keeps its names); returns the names compiled. Compilation itself happens at the first call."""
    names = repeated_blocks(model)
    for name in names:
        model.get_submodule(name).compile(**options)
    return names


__all__ = ["compile_blocks", "repeated_blocks"]
