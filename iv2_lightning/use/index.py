"""The embedding index that ``iv2 embed`` writes and ``iv2 search`` reads.

A safetensors file (``embeddings [N, E]``, optional ``windows [N, W, E]``; the keys and the settings in
its metadata) or, for a ``.npy`` name, a ``.npy`` array with a ``.json`` sidecar.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iv2_lightning.use.common import UseError

INDEX_FORMAT = "iv2-embeddings/1"


@dataclass
class EmbeddingIndex:
    """Clip embeddings with their keys and how they were made (``meta``: ckpt, num_frames, window,
    image_size, embed_dim). ``windows [N, W, E]`` when clips were embedded window by window."""

    keys: list[str] = field(default_factory=list)
    embeddings: torch.Tensor | None = None
    windows: torch.Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def sidecar(path: Path) -> Path:
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | os.PathLike) -> EmbeddingIndex:
        path = Path(path)
        if path.suffix == ".npy":
            side = cls.sidecar(path)
            if not side.is_file():
                raise UseError(f"{path} has no sidecar {side} with its paths")
            info = json.loads(side.read_text())
            emb = torch.from_numpy(np.load(path, allow_pickle=False))
            windows_file = path.with_suffix(".windows.npy")
            windows = (
                torch.from_numpy(np.load(windows_file, allow_pickle=False)) if info.get("windows") else None
            )
            keys = list(info.pop("paths"))
            info.pop("windows", None)
            # the arrays are written before the sidecar: after an interrupted save they may hold rows
            # the sidecar does not list yet (appended last), which the next run embeds again
            emb = emb[: len(keys)]
            windows = None if windows is None else windows[: len(keys)]
        else:
            from safetensors import safe_open

            try:
                with safe_open(str(path), framework="pt") as f:
                    meta = dict(f.metadata() or {})
                    emb = f.get_tensor("embeddings")
                    windows = f.get_tensor("windows") if "windows" in f.keys() else None  # noqa: SIM118
            except Exception as err:
                raise UseError(
                    f"{path} is not a readable embedding index ({type(err).__name__}: {err})"
                ) from err
            fmt = meta.pop("format", None)
            if fmt != INDEX_FORMAT or "paths" not in meta:
                raise UseError(f"{path} is not an `iv2 embed` index (format {fmt!r})")
            keys = json.loads(meta.pop("paths"))
            info = {k: json.loads(v) for k, v in meta.items()}
        if emb.shape[0] != len(keys):
            raise UseError(f"{path}: {emb.shape[0]} embeddings for {len(keys)} paths")
        if not keys:
            emb = None
        return cls(keys, emb, windows, info)

    def save(self, path: str | os.PathLike) -> None:
        """Atomic (temporary file + rename); for ``.npy`` the sidecar is written last."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        emb = (
            self.embeddings
            if self.embeddings is not None
            else torch.zeros(0, int(self.meta.get("embed_dim", 0)))
        )
        meta = {**self.meta, "format": INDEX_FORMAT}
        if path.suffix == ".npy":
            arrays = {path: emb}
            if self.windows is not None:
                arrays[path.with_suffix(".windows.npy")] = self.windows
            for target, array in arrays.items():
                tmp = target.with_name(f".{target.name}.partial")
                with open(tmp, "wb") as f:
                    np.save(f, array.float().numpy())
                os.replace(tmp, target)
            side = self.sidecar(path)
            tmp = side.with_name(f".{side.name}.partial")
            tmp.write_text(
                json.dumps({**meta, "paths": self.keys, "windows": self.windows is not None}, indent=1)
            )
            os.replace(tmp, side)
            return
        from safetensors.torch import save_file

        tensors = {"embeddings": emb.float().contiguous()}
        if self.windows is not None:
            tensors["windows"] = self.windows.float().contiguous()
        tmp = path.with_name(f".{path.name}.partial")
        strings = {k: json.dumps(v) for k, v in meta.items() if k != "format"}
        save_file(
            tensors, str(tmp), metadata={"format": INDEX_FORMAT, "paths": json.dumps(self.keys), **strings}
        )
        os.replace(tmp, path)

    def add(self, keys: list[str], emb: torch.Tensor, windows: torch.Tensor | None) -> None:
        self.keys += keys
        self.embeddings = emb if self.embeddings is None else torch.cat([self.embeddings, emb])
        if windows is not None:
            self.windows = windows if self.windows is None else torch.cat([self.windows, windows])
