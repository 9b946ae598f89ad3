"""Reading a checkpoint file without running code from it: ``torch.load(weights_only=True)``
(memory-mapped where the format allows) or safetensors.

A file that pickles Python objects besides tensors (the official 6B stage-2 checkpoint stores an
EasyDict config) is refused with :class:`UnsafeCheckpointError` and the recipe to re-save its
tensors once in a trusted environment, as the product must never unpickle an untrusted file.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from iv2_lightning.models.official.errors import OfficialCheckpointError, UnsafeCheckpointError


def _resave_message(path: Path, err: Exception) -> str:
    found = re.findall(r"GLOBAL ([\w.]+)", str(err))
    what = f" ({', '.join(dict.fromkeys(found))})" if found else ""
    return (
        f"{path} cannot be read with torch.load(weights_only=True): besides tensors it pickles a Python "
        f"object{what}, and unpickling that could run arbitrary code, which iv2 never does. The official "
        "InternVideo2-6B stage-2 checkpoint is such a file (it stores its EasyDict config next to the weights). "
        "If you trust the file, re-save its tensors alone once, in an environment where that class can be "
        "imported:\n\n"
        "    import torch\n"
        f"    ckpt = torch.load({str(path)!r}, map_location='cpu', weights_only=False)  # trusted files only\n"
        "    state = ckpt.get('module', ckpt.get('model', ckpt))  # the state dict\n"
        "    torch.save({k: v for k, v in state.items() if torch.is_tensor(v)}, 'weights_only.pt')\n\n"
        "(or safetensors.torch.save_file(...) with the same dict, contiguous tensors), then convert "
        f"that file. Original error: {str(err).splitlines()[0][:200]}"
    )


def _torch_load(path: Path) -> Any:
    def load(mmap: bool) -> Any:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            if "GLOBAL" in str(err):  # a Python object (class or function) the file wants built
                raise UnsafeCheckpointError(_resave_message(path, err)) from err
            detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
            raise OfficialCheckpointError(
                f"{path} is not a readable torch checkpoint ({detail.group(1) if detail else err})"
            ) from err
        except RuntimeError:
            raise
        except Exception as err:  # e.g. KeyError / EOFError from a file that is not a checkpoint
            raise OfficialCheckpointError(
                f"{path} is not a readable torch checkpoint ({type(err).__name__}: {err})"
            ) from err

    try:
        return load(mmap=True)  # zip-format files are mapped, not copied into memory
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise OfficialCheckpointError(f"{path}: torch.load failed ({err})") from err
        return load(mmap=False)  # the legacy (pre-1.6) format cannot be mapped


def _stored_grid(meta: Mapping[str, str] | None) -> tuple[int, int, int] | None:
    """The token grid recorded by :func:`save_converted` in a safetensors header, if any."""
    if not meta or "video_encoder_config" not in meta:
        return None
    try:
        cfg = json.loads(meta["video_encoder_config"])
        side = cfg["image_size"] // cfg["patch_size"]
        return (cfg["num_frames"] // cfg["tubelet_size"], side, side)
    except (ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def read_checkpoint(
    source: str | os.PathLike | Mapping[str, Any],
) -> tuple[str, Any, tuple[int, int, int] | None]:
    if isinstance(source, Mapping):
        return "<state dict>", source, None
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata()
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        except Exception as err:
            raise OfficialCheckpointError(f"{path} is not a readable safetensors file ({err})") from err
        return str(path), tensors, _stored_grid(meta)
    return str(path), _torch_load(path), None


__all__ = ["read_checkpoint"]
