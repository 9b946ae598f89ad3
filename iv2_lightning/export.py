"""``iv2 export CKPT OUT``: a training checkpoint → the shared weights that ``init_from`` loads.

Reads a Lightning checkpoint (``.ckpt``), a DeepSpeed ZeRO checkpoint folder (what Lightning's
``DeepSpeedStrategy`` writes in place of a ``.ckpt`` file: ``latest`` + ``<tag>/*_model_states.pt``
+ ``<tag>/*_optim_states.pt``, any stage, any number of ranks) or an existing export, and writes
the tensors of the shared modules (``video_encoder``, ``text_encoder``, ...) in fp32 without any
optimizer state: to ``OUT.safetensors`` (one file) or to a folder (``weights.safetensors`` +
``manifest.json``, the layout of ``StageTransition``). Both are what ``init_from`` accepts.

From a ZeRO checkpoint the fp32 *master* weights are taken (DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint`` merges the partitions of every rank), not the bf16
copies the model computes with.

No file is unpickled unless it is known to be harmless: ``.ckpt`` files are read with
``torch.load(weights_only=True)``; the ``.pt`` files of a ZeRO folder, which DeepSpeed must
unpickle itself, are first scanned (``torch.serialization.get_unsafe_globals_in_checkpoint``) and
refused if they name any class beyond the few plain data classes DeepSpeed stores
(:data:`DEEPSPEED_SAFE_GLOBALS`), unless ``--trust-checkpoint`` is given.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from iv2_lightning.files import verify_file
from iv2_lightning.models.weights import (
    MANIFEST_FILE,
    SHARED_MODULES,
    WEIGHTS_FILE,
    export_shared_weights,
    unwrap_stage_keys,
)

#: classes a DeepSpeed ZeRO checkpoint pickles besides tensors and builtins (seen with DeepSpeed 0.19):
#: the loss scaler's state, the ZeRO stage enum and the (start, numel) address of a tensor fragment.
DEEPSPEED_SAFE_GLOBALS = frozenset(
    {
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
    }
)


class CheckpointError(ValueError):
    """The checkpoint cannot be exported (unreadable, unsafe, or holds no shared weights)."""


# -- reading ---------------------------------------------------------------------------------------


def zero_checkpoint_dir(path: Path) -> tuple[Path, str] | None:
    """``(checkpoint_dir, tag)`` when ``path`` is a DeepSpeed ZeRO checkpoint folder (or one of its tag
    folders), else None."""
    if not path.is_dir():
        return None
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        if (path / tag).is_dir():
            return path, tag
    if any(path.glob("*_model_states.pt")) and any(path.glob("*_optim_states.pt")):
        return path.parent, path.name
    tags = [d for d in sorted(path.iterdir()) if d.is_dir() and any(d.glob("*_optim_states.pt"))]
    if len(tags) == 1:
        return path, tags[0].name
    return None


def check_pickles(files: list[Path], allowed: frozenset[str] = DEEPSPEED_SAFE_GLOBALS) -> None:
    """Refuse files whose pickle names a global outside torch's weights-only set and ``allowed``."""
    for f in files:
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(f)))
        except Exception as err:
            raise CheckpointError(
                f"{f} is not a readable torch checkpoint ({type(err).__name__}: {err})"
            ) from err
        unknown = sorted(unsafe - allowed)
        if unknown:
            raise CheckpointError(
                f"{f} would run code from {unknown} when unpickled; refusing it. If you trust where the "
                "checkpoint comes from, pass --trust-checkpoint."
            )


def _client_state(tag_dir: Path, trust: bool) -> dict[str, Any]:
    """Lightning's part of a ZeRO checkpoint (global step, hyperparameters) from the rank-0 model file."""
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        f = tag_dir / name
        if f.is_file():
            try:
                return torch.load(f, map_location="cpu", weights_only=not trust, mmap=True)
            except Exception:  # the metadata is a nicety; the weights come from DeepSpeed's reader
                return {}
    return {}


def read_zero_checkpoint(
    checkpoint_dir: Path, tag: str, trust: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """fp32 master weights of a ZeRO checkpoint (every rank's partition merged) and its client state."""
    tag_dir = checkpoint_dir / tag
    files = sorted(tag_dir.glob("*.pt"))
    if not trust:
        check_pickles(files)
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise CheckpointError(
            f"{checkpoint_dir} is a DeepSpeed ZeRO checkpoint; reading it needs DeepSpeed "
            "(pip install 'iv2-lightning[deepspeed]')"
        ) from err
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    # checkpoints of Lightning < 2.1 prefix every key with the wrapper's attribute name
    state = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    return state, _client_state(tag_dir, trust)


def read_lightning_checkpoint(
    path: Path, trust: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    status, message = verify_file(path)
    if status == "damaged":
        raise CheckpointError(f"{message}; refusing to export it")
    if status == "unverified":
        print(f"note: {message}", file=sys.stderr)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust, mmap=True)
    except Exception as err:
        raise CheckpointError(
            f"{path} could not be loaded as a weights-only checkpoint ({type(err).__name__}: {err}); "
            "if you trust where it comes from, pass --trust-checkpoint"
        ) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint dictionary")
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state_dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}, ckpt


def read_checkpoint(
    source: str | os.PathLike, trust: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """(tensors, checkpoint metadata, format) of a .ckpt, a ZeRO folder or an export."""
    from iv2_lightning.models.weights import read_state_dict

    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    zero = zero_checkpoint_dir(path)
    if zero is not None:
        state, client = read_zero_checkpoint(*zero, trust=trust)
        stage = client.get("ds_config", {}).get("zero_optimization", {}).get("stage", "?")
        return state, client, f"deepspeed_zero{stage}"
    if path.is_dir() or path.suffix == ".safetensors":
        try:
            state, manifest = read_state_dict(path)
        except (FileNotFoundError, ValueError) as err:
            raise CheckpointError(
                f"{path} is neither a Lightning checkpoint, a DeepSpeed ZeRO checkpoint folder "
                f"(latest + <tag>/*_model_states.pt) nor an export ({err})"
            ) from err
        return state, {"manifest": manifest}, "export"
    state, ckpt = read_lightning_checkpoint(path, trust=trust)
    return state, ckpt, "lightning"


# -- writing ---------------------------------------------------------------------------------------


class _Tensors:
    """A state dict behind the one method :func:`export_shared_weights` calls."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors


def shared_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of the shared modules, as separate fp32 CPU tensors (a ZeRO reader may hand out
    views into one flat buffer, which safetensors refuses to write)."""
    out = {
        k: v.detach().to("cpu", torch.float32).clone().contiguous()
        for k, v in unwrap_stage_keys(state).items()
        if k.split(".", 1)[0] in SHARED_MODULES and v.is_floating_point()
    }
    if not out:
        tops = sorted({k.split(".", 1)[0] for k in state})[:10]
        raise CheckpointError(
            f"no tensor of the shared modules {list(SHARED_MODULES)} in the checkpoint (its keys start with {tops})"
        )
    return out


def build_manifest(meta: dict[str, Any], fmt: str, source: Path) -> dict[str, Any]:
    if fmt == "export":
        return {**meta.get("manifest", {}), "source": str(source)}
    hparams = dict(meta.get("hyper_parameters") or {})
    class_path = hparams.get("_class_path")
    stage = None
    if isinstance(class_path, str) and class_path.startswith("iv2_lightning."):
        module, _, name = class_path.rpartition(".")
        try:
            stage = getattr(getattr(importlib.import_module(module), name), "stage_name", None)
        except (ImportError, AttributeError, ValueError):
            stage = None
    return {
        "stage": stage,
        "class": class_path,
        "preset": hparams.get("preset"),
        "global_step": meta.get("global_step"),
        "epochs": meta.get("epoch"),
        "source": str(source),
        "source_format": fmt,
        "exported_by": "iv2 export",
        "dtype": "float32",
        "complete": True,
    }


def export_checkpoint(
    source: str | os.PathLike, out: str | os.PathLike, trust: bool = False
) -> tuple[Path, dict[str, Any]]:
    """Export the shared weights of ``source`` to ``out`` (``*.safetensors`` file or folder);
    returns the written path and the manifest."""
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    state, meta, fmt = read_checkpoint(source, trust=trust)
    tensors = shared_tensors(state)
    manifest = build_manifest(meta, fmt, source)
    if out.suffix == ".safetensors":
        out.parent.mkdir(parents=True, exist_ok=True)
        manifest = {
            **manifest,
            "num_tensors": len(tensors),
            "num_parameters": int(sum(t.numel() for t in tensors.values())),
        }
        tmp = out.with_name(f".{out.name}.partial")
        save_file(
            tensors,
            str(tmp),
            metadata={"format": "iv2_lightning", "manifest": json.dumps(manifest, default=str)},
        )
        os.replace(tmp, out)
        return out, manifest
    folder = export_shared_weights(_Tensors(tensors), out, manifest)  # type: ignore[arg-type]
    return folder, json.loads((folder / MANIFEST_FILE).read_text())


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="iv2 export",
        description="Lightning .ckpt or DeepSpeed ZeRO checkpoint folder -> fp32 shared weights for init_from "
        f"(OUT.safetensors, or a folder with {WEIGHTS_FILE} + {MANIFEST_FILE}); no optimizer state.",
    )
    parser.add_argument("checkpoint", help="a .ckpt file, a DeepSpeed checkpoint folder, or an export")
    parser.add_argument("out", help="OUT.safetensors, or a folder")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the checkpoint even if it names classes beyond plain data (only for files you trust)",
    )
    args = parser.parse_args(argv)
    try:
        path, manifest = export_checkpoint(args.checkpoint, args.out, trust=args.trust_checkpoint)
    except CheckpointError as err:
        print(f"iv2 export: {err}", file=sys.stderr)
        return 2
    print(
        f"iv2 export: {manifest['num_tensors']} tensors, {manifest['num_parameters'] / 1e6:,.1f}M parameters "
        f"(fp32) from {manifest.get('source_format', 'export')} {args.checkpoint} -> {path}"
    )
    return 0


__all__ = [
    "DEEPSPEED_SAFE_GLOBALS",
    "CheckpointError",
    "check_pickles",
    "export_checkpoint",
    "export_main",
    "read_checkpoint",
    "zero_checkpoint_dir",
]
