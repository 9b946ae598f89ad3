"""What ``iv2 test --config configs/eval/<task>.yaml`` adds to a stage's own test loop: the results file.

The evaluations themselves are the stages' test loops (``ContrastiveStage``: zero-shot retrieval
R@1/5/10, median and mean rank with cosine, dual-softmax and, with ``rerank_k``, matching-head
scores, plus zero-shot classification; ``ActionStage``: the attentive probe's accuracy), run on a
checkpoint (``ckpt_path``) over any DataModule. :class:`EvalResults` writes what they logged as JSON
(``<default_root_dir>/results.json`` unless ``path`` says otherwise) and as a text card in
TensorBoard, next to the scalars and pictures the stage logs there itself.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L

log = logging.getLogger(__name__)


def _class_path(obj: Any) -> str | None:
    return None if obj is None else f"{type(obj).__module__}.{type(obj).__qualname__}"


class EvalResults(L.Callback):
    """Write the metrics of a ``test`` (or ``validate``) run to JSON, rank 0 only.

    The file holds ``metrics`` (every scalar the run logged under the split's prefix, ``test/``
    or ``val/``, without the prefix, as floats; NaN becomes null), ``split``, ``ckpt_path``,
    ``model``/``data`` (class paths), ``stage`` and ``seconds``.
    ``path``: the JSON file (default ``<trainer.default_root_dir>/results.json``).
    """

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self.started = time.time()

    def resolve_path(self, trainer: L.Trainer) -> Path:
        return Path(self.path) if self.path else Path(trainer.default_root_dir) / "results.json"

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.time()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.started = time.time()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, pl_module, "test")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # only a stand-alone `validate` run: inside `fit` the checkpoint callbacks own the results
        if trainer.state.fn == "validate" and not trainer.sanity_checking:
            self.write(trainer, pl_module, "val")

    def results(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> dict[str, Any]:
        metrics: dict[str, float | None] = {}
        for key, value in sorted(trainer.callback_metrics.items()):
            if not key.startswith(f"{split}/") or getattr(value, "numel", lambda: 1)() != 1:
                continue
            number = float(value)
            metrics[key[len(split) + 1 :]] = number if math.isfinite(number) else None
        datamodule = getattr(trainer, "datamodule", None)
        return {
            "split": split,
            "metrics": metrics,
            "ckpt_path": None if trainer.ckpt_path is None else os.fspath(trainer.ckpt_path),
            "model": _class_path(pl_module),
            "data": _class_path(datamodule),
            "stage": getattr(pl_module, "stage_name", None),
            "seconds": round(time.time() - self.started, 1),
        }

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, split: str) -> Path | None:
        if not trainer.is_global_zero:
            return None
        results = self.results(trainer, pl_module, split)
        path = self.resolve_path(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, path)
        for logger in trainer.loggers:
            add_text = getattr(getattr(logger, "experiment", None), "add_text", None)
            if callable(add_text):
                add_text(
                    f"{split}/results", "```\n" + json.dumps(results, indent=2) + "\n```", trainer.global_step
                )
        log.info("%s results written to %s", split, path)
        print(f"{split} results written to {path}")
        return path


__all__ = ["EvalResults"]
