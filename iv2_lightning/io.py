"""Files that survive a kill: atomic writes, checkpoints that are safe to load, resuming.

* :func:`atomic_write` (and :func:`write_bytes_atomic` / :func:`write_text_atomic`): the bytes go to
  ``.<name>.partial`` in the destination's own folder, are flushed to disk, and the file is renamed
  over the destination (``os.replace``, atomic within one filesystem). A reader finds the old file or
  the new one, never half of one; a kill leaves at most the ``.partial`` file, which the next write
  replaces.
* :class:`AtomicCheckpointIO`: Lightning's checkpoint writer with that guarantee. Lightning's own
  ``TorchCheckpointIO`` (2.6) serialises into memory and writes through an fsspec transaction whose
  temporary file lives in the system temp folder: when that folder is on another filesystem than the
  checkpoint (a local ``/tmp``, checkpoints on a network disk) the final move is a copy, and a kill
  during the copy leaves a truncated checkpoint under the real name (and the temporary file behind).
  It also loads checkpoints with ``weights_only=True`` unless told otherwise, and names the file and
  the reason when it cannot.
* :func:`checkpoint_problem` / :func:`newest_readable_checkpoint`: what resuming uses to pass over a
  damaged checkpoint with a warning; a checkpoint that would run code when unpickled is refused
  (:class:`UnsafeCheckpointError`), never skipped silently nor loaded.
* :class:`RngState`: a callback that stores the random number generators (torch, numpy, python)
  in each checkpoint and restores them on resume, so that a resumed run draws the same masks,
  dropout and shuffles as an uninterrupted one.
* :class:`ResumeCheckpoint`: the ``ModelCheckpoint`` that ``iv2 curriculum`` and
  ``iv2 fit --ckpt_path last`` add: ``<dir>/last.ckpt`` rewritten at the end of every epoch.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from iv2_lightning.files import (  # noqa: F401 (re-exported: the Lightning side imports them from here)
    PARTIAL_SUFFIX,
    DamagedCheckpointError,
    UnreadableCheckpointError,
    UnsafeCheckpointError,
    atomic_path,
    atomic_write,
    check_file,
    checkpoint_problem,
    checkpoints_in,
    load_checkpoint_file,
    newest_readable_checkpoint,
    partial_path,
    remove_file_and_record,
    save_checkpoint_file,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``.<name>.partial`` beside the checkpoint, syncs it and renames
    it into place with its record (``<name>.sha256.json``: size and sha256), and loads with
    ``weights_only=True`` unless the caller passes ``weights_only=False``, after checking the file
    against its record (a damaged file raises :class:`DamagedCheckpointError`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: fsspec's own writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_checkpoint_file(checkpoint, path)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        if "://" not in str(path):
            remove_file_and_record(path)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage, weights_only=None):
        if weights_only is False or "://" in str(path):  # a trusted file (explicit), or remote storage
            trusted = weights_only is False
            if "://" not in str(path):
                check_file(path)
            return super().load_checkpoint(path, map_location=map_location, weights_only=not trusted)
        return load_checkpoint_file(path, map_location=map_location)


def install_atomic_checkpoint_io(trainer: L.Trainer) -> bool:
    """Use :class:`AtomicCheckpointIO` where the strategy would use Lightning's plain
    ``TorchCheckpointIO`` (single device, DDP); a custom CheckpointIO is left alone. (DeepSpeed and
    FSDP write their sharded checkpoints themselves, not through it.)"""
    strategy = trainer.strategy
    current = getattr(strategy, "_checkpoint_io", None)
    if current is None:
        current = strategy.checkpoint_io
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    return False


class ResumeCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``, rewritten at the end of every epoch (and every ``every_n_train_steps``
    optimizer steps when given): the checkpoint that resuming starts from.

    ``ModelCheckpoint(save_last=True, save_top_k=0)`` does not do this: since Lightning 2.6 it writes
    ``last.ckpt`` only in a step where a top-k checkpoint was written too, i.e. once, at the end of
    training. Its state is kept under its own key, so it never mixes with another ``ModelCheckpoint``
    of the same settings."""

    def __init__(self, dirpath: str, every_n_train_steps: int | None = None) -> None:
        super().__init__(
            dirpath=dirpath,
            filename="last",
            save_top_k=1,
            enable_version_counter=False,
            every_n_train_steps=every_n_train_steps,
            # at every epoch's end even when validation runs only every N epochs (None would save
            # after validation then, so a stage validating every 8th epoch could resume only from those)
            save_on_train_epoch_end=True,
        )
        if every_n_train_steps:
            self._every_n_epochs = 1  # and at the end of every epoch

    @property
    def state_key(self) -> str:
        return f"ResumeCheckpoint[{self.dirpath}]"


# -- random number generators -------------------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    """The global generators as tensors and plain data (loadable with ``weights_only=True``)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global one is what we restore)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        kind, key, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class RngState(L.Callback):
    """Save the global random generators in every checkpoint and restore them on resume.

    Lightning restores the model, optimizer, schedulers and loop counters, but not the generators:
    a resumed run would draw other masks, dropout and (through the sampler's seed) another order of
    the data than the run it continues. The states are taken when the checkpoint is written and set
    back where the uninterrupted run stood when it wrote them: for a checkpoint written at the end of
    an epoch, before the next epoch's data loader draws its seeds (which the resumed run does too);
    for one written mid-epoch, when the resumed run has fetched its first batch, just before the
    training step (the uninterrupted run had created its loader, and drawn its seeds, before the
    checkpoint). In a multi-process run every rank gets rank 0's generators back (the ranks start
    from the same seed anyway)."""

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "iv2_rng_state"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _mid_epoch(self) -> bool:
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":  # (also while validating inside fit)
            return False
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        total = trainer.num_training_batches
        return 0 < done < total if total != float("inf") else done > 0

    def state_dict(self) -> dict[str, Any]:
        return {**rng_states(), "mid_epoch": self._mid_epoch()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if state_dict.get("mid_epoch"):
            self._pending = state_dict
        else:
            set_rng_states(state_dict)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


__all__ = [
    "AtomicCheckpointIO",
    "DamagedCheckpointError",
    "ResumeCheckpoint",
    "RngState",
    "UnreadableCheckpointError",
    "UnsafeCheckpointError",
    "atomic_path",
    "atomic_write",
    "checkpoint_problem",
    "checkpoints_in",
    "install_atomic_checkpoint_io",
    "load_checkpoint_file",
    "newest_readable_checkpoint",
    "partial_path",
    "rng_states",
    "set_rng_states",
    "sha256_file",
    "write_bytes_atomic",
    "write_json_atomic",
    "write_text_atomic",
]
