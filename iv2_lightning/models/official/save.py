"""Writing converted weights where ``init_from`` reads them: tensors prefixed ``video_encoder.`` in
one safetensors file, or a folder with ``weights.safetensors`` and ``manifest.json`` (the layout of
a stage export), with the encoder configuration kept in the safetensors header.

Safetensors rather than pickles, as the product's exported weights always are; files are written
under temporary names and renamed so that an interrupted write never leaves a partial file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from iv2_lightning.models.backbone import VideoEncoder
from iv2_lightning.models.official.load import ConversionReport


def _tensors_to_write(encoder: VideoEncoder, report: ConversionReport) -> dict[str, torch.Tensor]:
    out = {f"video_encoder.{k}": v.detach().float().contiguous() for k, v in encoder.state_dict().items()}
    if report.classifier is not None:
        out.update(
            {
                f"classifier.{k}": v.detach().float().contiguous()
                for k, v in report.classifier.state_dict().items()
            }
        )
    out.update({k: v.contiguous() for k, v in report.head_state.items()})
    return out


def save_converted(encoder: VideoEncoder, report: ConversionReport, dst: str | os.PathLike) -> Path:
    """Write the converted weights where ``init_from`` reads them.

    ``dst`` ending in ``.safetensors``: one file. Otherwise a folder with ``weights.safetensors`` and
    ``manifest.json`` (the layout of a stage export). Encoder tensors are prefixed ``video_encoder.``;
    a fine-tune's classifier is stored as ``classifier.fc_norm.*`` / ``classifier.head.*`` and the
    stage-1 heads under MaskedVideoStage's names (``init_from`` loads only the encoder). The encoder
    configuration is kept in the safetensors header. Files are written under temporary names and
    renamed.
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    tensors = _tensors_to_write(encoder, report)
    meta = {
        "format": "iv2_lightning",
        "converted_from": report.source,
        "layout": report.layout,
        "preset": report.preset,
        "video_encoder_config": json.dumps(report.config, default=str),
    }
    if dst.suffix == ".safetensors":
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.partial")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, dst)
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / ".weights.safetensors.partial"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, dst / "weights.safetensors")
    manifest = {
        "stage": "official",
        "preset": report.preset,
        "source": report.source,
        "layout": report.layout,
        "architecture": {"video_encoder": "VideoEncoder", "video_encoder_config": report.config},
        "interpolated": report.interpolated,
        "num_tensors": len(tensors),
        "num_parameters": int(sum(t.numel() for t in tensors.values())),
    }
    tmp = dst / ".manifest.json.partial"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, dst / "manifest.json")
    return dst


def read_converted(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a file or folder written by :func:`save_converted`."""
    from safetensors.torch import load_file

    return load_file(str(path if path.suffix == ".safetensors" else path / "weights.safetensors"))


__all__ = ["read_converted", "save_converted"]
