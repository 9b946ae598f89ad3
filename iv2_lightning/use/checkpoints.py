"""Which checkpoint a command means, and the torch model inside it.

``--ckpt`` names a Lightning checkpoint of the right stage, a stage folder (``runs/x/stage2``: its
``checkpoints/last.ckpt``), the ``default_root_dir`` of a plain ``iv2 fit`` (its newest checkpoint), or a
``StageTransition`` export folder (the checkpoint next to it: an export holds only the shared modules,
no projection heads and no language model, and its manifest only the architecture).

:func:`load_model` checks the file against the size and sha256 recorded beside it when it was written
(a damaged file is refused, naming what differs; a file without a record loads with a note), reads it
with ``torch.load(weights_only=True)``, lets the stage class named in
the checkpoint rebuild its torch model from the arguments it recorded (``init_from`` switched off: the
checkpoint holds every weight) and hands back only that model, in eval mode: the commands drive
``VideoTextAligner`` / ``VideoCaptioner``, never the Lightning shell.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from iv2_lightning.files import verify_file
from iv2_lightning.models.weights import MANIFEST_FILE
from iv2_lightning.use.common import UseError

STAGES_PACKAGE = "iv2_lightning.stages."


class LoadedModel(NamedTuple):
    """A torch model rebuilt from a stage checkpoint, with where it came from."""

    model: nn.Module
    path: Path
    stage: str  # the stage class that trained it
    step: int  # the checkpoint's global step


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The Lightning checkpoint that ``path`` names.

    A file is itself (a ``.safetensors`` file: its export folder). A folder is searched for the
    checkpoints a run leaves, so a stage folder of ``iv2 curriculum`` and the ``default_root_dir`` of
    a plain ``iv2 fit`` both work: ``checkpoints/last.ckpt`` if there is one, else the newest
    (last written) ``*.ckpt`` in ``checkpoints/`` or in a logger's ``*/version_*/checkpoints/``
    (``lightning_logs/version_0/checkpoints/`` is where a fit with the default logger keeps them).
    A ``StageTransition`` export folder means the checkpoint found the same way in the folder
    above it. The error says which places were searched.
    """
    p = Path(path)
    if not p.exists():
        raise UseError(f"checkpoint {p} does not exist")
    if p.is_file():
        if p.suffix == ".safetensors":
            return resolve_checkpoint(p.parent)
        return p

    def newest_under(folder: Path) -> Path | None:
        if (folder / "checkpoints" / "last.ckpt").is_file():
            return folder / "checkpoints" / "last.ckpt"
        found = [
            f
            for pattern in ("checkpoints/*.ckpt", "*/version_*/checkpoints/*.ckpt")
            for f in folder.glob(pattern)
            if f.is_file() and not f.name.startswith(".")  # .x.ckpt.partial: a write in progress
        ]
        # the last written; equal times (a coarse clock) pick by path, so the choice is repeatable
        return max(found, key=lambda f: (f.stat().st_mtime_ns, str(f)), default=None)

    searched = f"{p}/checkpoints/*.ckpt and {p}/*/version_*/checkpoints/*.ckpt"
    found = newest_under(p)
    if found is not None:
        return found
    if (p / MANIFEST_FILE).is_file():
        beside = newest_under(p.parent)
        if beside is not None:
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
            f"checkpoint instead (none was found beside it: searched {p.parent}/checkpoints/*.ckpt "
            f"and {p.parent}/*/version_*/checkpoints/*.ckpt)"
        )
    raise UseError(
        f"{p} is a folder without a checkpoint: searched {searched} (a stage folder or the "
        f"default_root_dir of `iv2 fit`), and it is no StageTransition export ({MANIFEST_FILE}); "
        "pass a .ckpt file, or the folder of a run that saved one"
    )


def _stage_class(ckpt_path: Path, hparams: dict[str, Any], kind: type) -> type:
    """The stage class the checkpoint records, which must be ``kind`` or a subclass; nothing outside
    :mod:`iv2_lightning.stages` is imported on a file's word."""
    cls: Any = kind
    class_path = hparams.get("_class_path")
    if class_path:
        if not str(class_path).startswith(STAGES_PACKAGE):
            raise UseError(f"{ckpt_path} was saved by {class_path}, which is not an iv2_lightning stage")
        module, _, name = str(class_path).rpartition(".")
        cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, kind)):
        raise UseError(
            f"{ckpt_path} holds a {class_path or 'stage'} checkpoint; this command needs a {kind.__name__} "
            f"({kind.stage_name}) checkpoint"
        )
    return cls


def load_model(path: str | os.PathLike, kind: type) -> LoadedModel:
    """The torch model of the ``kind`` stage checkpoint that ``path`` names (weights-only read, strict
    load, eval mode). ``kind`` is a stage class such as ``ContrastiveStage``: the checkpoint's own class
    (``kind`` or a subclass) builds the model from its recorded arguments; the shell is dropped."""
    ckpt_path = resolve_checkpoint(path)
    status, message = verify_file(ckpt_path)
    if status == "damaged":
        raise UseError(f"{message}; refusing to use it")
    if status == "unverified":
        print(f"note: {message}", file=sys.stderr)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UseError(
            f"{ckpt_path} is not a readable weights-only checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise UseError(f"{ckpt_path} holds no state_dict (is it a Lightning checkpoint?)")
    hparams = dict(ckpt.get("hyper_parameters") or {})
    cls = _stage_class(ckpt_path, hparams, kind)
    kwargs = {k: v for k, v in hparams.items() if not k.startswith("_")}
    kwargs["init_from"] = None  # the checkpoint has every weight; do not read the original source again
    kwargs["cache_frozen"] = False  # use embeds each clip once: a feature cache would only hold memory
    stage = cls(**kwargs)
    stage.on_load_checkpoint(ckpt)  # as Lightning's own loading does (old layouts, frame counts)
    try:
        stage.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise UseError(
            f"{ckpt_path}: the weights do not fit the stage its arguments describe ({err})"
        ) from err
    return LoadedModel(stage.model.eval(), ckpt_path, cls.__name__, int(ckpt.get("global_step", 0)))
