"""StageTransition: hand the shared weights of one curriculum stage to the next.

At the end of a successful ``fit`` (rank 0 only) it writes ``weights.safetensors`` (the shared
modules: backbone, temporal encoder, text / audio encoders, fusion, fp32) and ``manifest.json``
(stage, preset, architecture, a hash of the stage's configuration, final metrics, global step) into
``export_dir``; the next stage's ``init_from: <export_dir>`` reads them and checks every tensor.
At the start of ``fit`` it logs which modules are frozen and which train.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import lightning as L

from iv2_lightning.models.weights import export_shared_weights

log = logging.getLogger(__name__)


def config_hash(hparams: dict) -> str:
    return hashlib.sha256(json.dumps(hparams, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageTransition(L.Callback):
    def __init__(self, export_dir: str | None = None) -> None:
        self.export_dir = export_dir
        self.started = time.time()

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.export_dir) if self.export_dir else Path(trainer.default_root_dir) / "export"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.time()
        frozen = getattr(pl_module, "frozen_modules", lambda: [])()
        model = getattr(pl_module, "model", pl_module)  # a stage keeps its torch model under `model`
        training = [
            n for n, c in model.named_children() if n not in frozen and any(True for _ in c.parameters())
        ]
        if trainer.is_global_zero:
            log.info(
                "stage %s: frozen modules %s; training %s",
                getattr(pl_module, "stage_name", "?"),
                frozen or "none",
                training,
            )

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.interrupted:
            return
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1
        }
        manifest = {
            "stage": getattr(pl_module, "stage_name", type(pl_module).__name__),
            "class": f"{type(pl_module).__module__}.{type(pl_module).__name__}",
            "preset": getattr(pl_module, "preset", None),
            "architecture": pl_module.architecture() if hasattr(pl_module, "architecture") else {},
            "config_hash": config_hash(dict(pl_module.hparams)),
            "metrics": metrics,
            "global_step": trainer.global_step,
            "epochs": trainer.current_epoch,
            "seconds": round(time.time() - self.started, 1),
            "complete": True,
        }
        model = getattr(pl_module, "model", pl_module)
        folder = export_shared_weights(model, self.resolve_dir(trainer), manifest)
        log.info("stage %s: exported shared weights to %s", manifest["stage"], folder)
