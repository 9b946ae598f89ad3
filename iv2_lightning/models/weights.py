"""Moving shared weights between stages: export as safetensors + manifest, load into a stage.

An export is a folder holding ``weights.safetensors`` (fp32 tensors of the shared modules, keys
prefixed by the module name: ``video_encoder.blocks.0.attn.qkv.weight``) and ``manifest.json``
(stage, preset, architecture, metrics, global step, and the size and sha256 of the weights file).
``init_from`` accepts such a folder, the ``.safetensors`` file itself, or a Lightning ``.ckpt`` (read
with ``weights_only=True``: a checkpoint never runs code when it is loaded).

Both files are written under temporary names and renamed, the manifest last; a weights file that
does not match its manifest (cut short, replaced) is refused naming the file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from iv2_lightning.files import (
    DamagedCheckpointError,
    atomic_path,
    check_file,
    sha256_file,
    write_json_atomic,
)

log = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"

#: attribute names of the modules that pass from one stage to the next: every stage's torch model
#: keeps them under these names, so an export of one stage loads into the next by name
SHARED_MODULES = ("video_encoder", "temporal_encoder", "text_encoder", "audio_encoder", "fusion")

#: the attribute under which a Lightning stage holds its torch model (checkpoint keys ``model.*``)
STAGE_MODEL_PREFIX = "model."


def unwrap_stage_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a stage checkpoint's ``state_dict`` relative to the torch model.

    A stage keeps its torch model under ``model``, so its checkpoint names ``model.video_encoder.*``;
    exports and ``init_from`` use the model's own names (``video_encoder.*``). Checkpoints written
    before the stages held a separate model have no prefix and are returned as they are."""
    if not any(k.startswith(STAGE_MODEL_PREFIX) for k in state):
        return state
    n = len(STAGE_MODEL_PREFIX)
    return {k[n:]: v for k, v in state.items() if k.startswith(STAGE_MODEL_PREFIX)}


class WeightsMismatchError(ValueError):
    """``init_from`` found tensors whose shapes differ from the model's (or, when strict, missing ones)."""


def shared_modules_of(model: nn.Module) -> dict[str, nn.Module]:
    """The shared modules a torch model holds, by their shared names."""
    return {n: m for n in SHARED_MODULES if isinstance(m := getattr(model, n, None), nn.Module)}


def architecture_of(model: nn.Module) -> dict[str, str]:
    """``{shared module name: class name}``: what an export's manifest records of a model."""
    return {n: type(m).__name__ for n, m in shared_modules_of(model).items()}


def export_problem(folder: str | os.PathLike, manifest: dict[str, Any]) -> str | None:
    """Why the ``weights.safetensors`` of an export folder does not match its manifest (None when it
    does, or when the manifest records neither size nor hash, as exports before these fields)."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if "weights_bytes" in manifest and size != manifest["weights_bytes"]:
        return (
            f"{path} is {size} bytes but its manifest records {manifest['weights_bytes']}: "
            "the file was cut short or replaced"
        )
    if "weights_sha256" in manifest and sha256_file(path) != manifest["weights_sha256"]:
        return f"{path} does not match the sha256 in its manifest: the file is damaged or was replaced"
    return None


def read_state_dict(source: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and manifest (empty for a bare file) from an export folder, .safetensors or .ckpt."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"init_from: {path} does not exist")
    manifest: dict[str, Any] = {}
    if path.is_dir():
        if (path / MANIFEST_FILE).is_file():
            try:
                manifest = json.loads((path / MANIFEST_FILE).read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"init_from: {path / MANIFEST_FILE} is not readable JSON ({err})") from err
            if not isinstance(manifest, dict):
                raise ValueError(f"init_from: {path / MANIFEST_FILE} does not hold a JSON object")
        if not (path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"init_from: {path} holds no {WEIGHTS_FILE}")
        problem = export_problem(path, manifest)
        if problem:
            raise ValueError(f"init_from: {problem}; export the weights again")
        path = path / WEIGHTS_FILE
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path)), manifest
        except Exception as err:
            raise ValueError(f"init_from: {path} is not a readable safetensors file ({err})") from err
    try:
        check_file(path)  # a damaged checkpoint is refused; one without a record is loaded with a note
    except DamagedCheckpointError as err:
        raise ValueError(f"init_from: {err}") from err
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"init_from: {path} could not be loaded as a weights-only checkpoint ({type(err).__name__}: {err})"
        ) from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"init_from: {path} holds no state_dict")
    return unwrap_stage_keys({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}), manifest


def load_shared_weights(
    model: nn.Module,
    source: str | os.PathLike,
    prefix_map: dict[str, str] | None = None,
    strict: bool = False,
    modules: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Copy the shared-module tensors of ``source`` into ``model``.

    ``prefix_map`` renames key prefixes of the source first (``{"student.": "video_encoder."}``).
    Only keys under the model's shared modules are considered. Shapes must match (otherwise
    :class:`WeightsMismatchError` names every mismatched tensor); with ``strict`` every shared
    tensor of the model must be present in the source. Tensors that differ only in their time extent
    are adapted first by the module that owns them (``VideoEncoder.adapt_state_dict``: another
    tubelet size or frame count). Returns a report with the loaded, missing, unexpected and adapted
    keys, which is also logged.
    """
    state, manifest = read_state_dict(source)
    for old, new in (prefix_map or {}).items():
        state = {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in state.items()}
    names = modules or tuple(n for n in SHARED_MODULES if isinstance(getattr(model, n, None), nn.Module))
    own = {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in names}
    incoming = {k: v for k, v in state.items() if k.split(".", 1)[0] in names}
    adapted = []
    for name, module in model.named_modules():
        if name and name.split(".", 1)[0] in names and hasattr(module, "adapt_state_dict"):
            adapted += module.adapt_state_dict(incoming, prefix=f"{name}.")
    missing = sorted(set(own) - set(incoming))
    unexpected = sorted(set(incoming) - set(own))
    _check_incoming(source, manifest, own, incoming, missing, strict)
    loadable = {k: v for k, v in incoming.items() if k in own}
    if not loadable:
        raise WeightsMismatchError(
            f"init_from {source}: no tensor of the shared modules {list(names)} found "
            f"(file keys start with {sorted({k.split('.', 1)[0] for k in state})[:10]}; use init_prefix_map)"
        )
    with torch.no_grad():
        params = dict(model.named_parameters())
        params.update(dict(model.named_buffers()))
        for k, v in loadable.items():
            params[k].copy_(v.to(params[k].dtype))
    report = {
        "source": str(source),
        "loaded": len(loadable),
        "missing": missing,
        "unexpected": unexpected,
        "adapted": adapted,
        "from_stage": manifest.get("stage"),
    }
    _log_report(report)
    return report


def _check_incoming(
    source: str | os.PathLike,
    manifest: dict[str, Any],
    own: dict[str, torch.Tensor],
    incoming: dict[str, torch.Tensor],
    missing: list[str],
    strict: bool,
) -> None:
    """WeightsMismatchError naming the tensors whose shape differs from the model's and, when
    ``strict``, the model's tensors the source lacks."""
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in incoming.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise WeightsMismatchError(
            f"init_from {source}: {len(mismatched)} tensor(s) have another shape than this model "
            f"(the export came from preset {manifest.get('preset', '?')!r} with other sizes):\n  "
            + "\n  ".join(mismatched[:20])
        )
    if strict and missing:
        raise WeightsMismatchError(
            f"init_from {source} (strict): {len(missing)} tensor(s) of this model are missing from the file: "
            + ", ".join(missing[:20])
        )


def _log_report(report: dict[str, Any]) -> None:
    source, missing, unexpected = report["source"], report["missing"], report["unexpected"]
    for note in report["adapted"]:
        log.info("init_from %s: adapted %s", source, note)
    log.info(
        "init_from %s: loaded %d tensors; %d missing%s; %d unexpected%s",
        source,
        report["loaded"],
        len(missing),
        f" (e.g. {missing[:3]})" if missing else "",
        len(unexpected),
        f" (e.g. {unexpected[:3]})" if unexpected else "",
    )


def export_shared_weights(model: nn.Module, folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write the shared modules of ``model`` as fp32 safetensors + manifest into ``folder``.

    Both files are written under temporary names, synced and renamed, the manifest last, so a reader
    that finds a manifest finds complete weights; the manifest records the weights file's size and
    sha256, so a reader can also tell when the weights were damaged or replaced afterwards.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: v.detach().float().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.split(".", 1)[0] in SHARED_MODULES
    }
    weights = folder / WEIGHTS_FILE
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "iv2_lightning"})
    manifest = {
        **manifest,
        "num_tensors": len(tensors),
        "num_parameters": int(sum(t.numel() for t in tensors.values())),
        "weights_bytes": weights.stat().st_size,
        "weights_sha256": sha256_file(weights),
    }
    write_json_atomic(folder / MANIFEST_FILE, manifest)
    return folder
