"""Generated captions next to their references, as a table in TensorBoard, once per evaluation epoch.

A stage that generates text in ``validation_step``/``test_step`` returns ``{"captions": [str, ...]}``
(one per clip of the batch); this callback keeps the first rows of the epoch (clip, generated,
reference) and writes them as a markdown table with the logger's ``add_text`` (TensorBoard's text
tab), under ``val/captions`` / ``test/captions``. Pictures and text are callbacks, apart from the
stage's objective and metrics, as anomalib's visualizer is (``configure_callbacks``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L

__all__ = ["CaptionSamples", "clip_name"]


def clip_name(meta: Mapping[str, Any] | None, sample_id: int) -> str:
    """How a clip is named to a person: its file, else ``split:index`` (synthetic clips), else its id."""
    meta = meta or {}
    if meta.get("path"):
        return str(meta["path"])
    if "index" in meta:
        return f"{meta.get('split', 'clip')}:{meta['index']}"
    return str(sample_id)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


class CaptionSamples(L.Callback):
    """Writes ``rows`` (clip, generated, reference) rows per validation/test epoch to every logger
    that has ``add_text``; only on global rank 0, never during the sanity check."""

    def __init__(self, rows: int = 4, key: str = "captions") -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1; got {rows}")
        self.rows = rows
        self.key = key
        self.samples: dict[str, list[tuple[str, str, str]]] = {"val": [], "test": []}

    def _collect(self, split: str, outputs: Any, batch: Any) -> None:
        samples = self.samples[split]
        generated = outputs.get(self.key) if isinstance(outputs, Mapping) else None
        if not generated or len(samples) >= self.rows:
            return
        metas = batch.meta or []
        for i, text in enumerate(generated[: self.rows - len(samples)]):
            meta = metas[i] if i < len(metas) else {}
            samples.append((clip_name(meta, int(batch.sample_id[i])), text, batch.captions[i]))

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> None:
        samples = self.samples[split]
        if not samples or trainer.sanity_checking or not trainer.is_global_zero:
            return
        table = "| clip | generated | reference |\n|---|---|---|\n" + "\n".join(
            f"| {_cell(n)} | {_cell(g)} | {_cell(r)} |" for n, g, r in samples
        )
        for logger in trainer.loggers:
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if callable(add_text):
                add_text(f"{split}/{self.key}", table, global_step=trainer.global_step)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples["val"] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.samples["test"] = []

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect("val", outputs, batch)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._collect("test", outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "test")
