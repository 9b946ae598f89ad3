"""Report the samples a DataModule skipped (bad files), once per epoch, in the log and the logger."""

from __future__ import annotations

import logging

import lightning as L

log = logging.getLogger(__name__)


class DataErrorReport(L.Callback):
    """At the end of each training and validation epoch: how many samples were replaced because
    their file could not be read, and the first offending paths with the reason (from the
    DataModule's ``skip_logs``, fed by the skipped records that travel inside the batches)."""

    def __init__(self, reset_each_epoch: bool = True) -> None:
        self.reset_each_epoch = reset_each_epoch

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, phase: str) -> None:
        logs = getattr(trainer.datamodule, "skip_logs", None)
        if logs is None:
            return
        skip_log = logs[phase]
        pl_module.log(f"data/skipped_{phase}", float(skip_log.count), rank_zero_only=True)
        if skip_log.count and trainer.is_global_zero:
            log.warning("epoch %d (%s): %s", trainer.current_epoch, phase, skip_log.summary())
        if self.reset_each_epoch:
            skip_log.reset()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "validate")
