"""CaptionSamples: the first generated captions of an evaluation epoch, as a table for TensorBoard."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from iv2_lightning.callbacks.text_samples import CaptionSamples, clip_name


class Experiment:
    def __init__(self) -> None:
        self.texts: list[tuple[str, str, int]] = []

    def add_text(self, tag: str, text: str, global_step: int | None = None) -> None:
        self.texts.append((tag, text, global_step))


def fake_trainer(sanity: bool = False, rank_zero: bool = True):
    logger = SimpleNamespace(experiment=Experiment())
    trainer = SimpleNamespace(
        sanity_checking=sanity, is_global_zero=rank_zero, global_step=7, loggers=[logger]
    )
    return trainer, logger.experiment


def fake_batch(start: int, n: int):
    return SimpleNamespace(
        meta=[{"split": "val", "index": start + i} for i in range(n)],
        sample_id=torch.arange(start, start + n),
        captions=[f"reference | {start + i}" for i in range(n)],
    )


def test_first_rows_of_the_epoch_become_one_table():
    cb = CaptionSamples(rows=3)
    trainer, experiment = fake_trainer()
    cb.on_validation_epoch_start(trainer, None)
    cb.on_validation_batch_end(trainer, None, {"captions": ["a\nb", "c"]}, fake_batch(0, 2), 0)
    cb.on_validation_batch_end(trainer, None, None, fake_batch(2, 2), 1)  # a batch that generated nothing
    cb.on_validation_batch_end(trainer, None, {"captions": ["d", "e"]}, fake_batch(4, 2), 2)
    cb.on_validation_epoch_end(trainer, None)
    [(tag, table, step)] = experiment.texts
    assert tag == "val/captions" and step == 7
    lines = table.splitlines()
    assert lines[0] == "| clip | generated | reference |" and len(lines) == 2 + 3
    # newlines and pipes would break the markdown table
    assert lines[2] == "| val:0 | a b | reference \\| 0 |" and lines[4].startswith("| val:4 | d |")


@pytest.mark.parametrize("sanity, rank_zero", [(True, True), (False, False)])
def test_nothing_is_written_in_the_sanity_check_or_off_rank_zero(sanity, rank_zero):
    cb = CaptionSamples()
    trainer, experiment = fake_trainer(sanity, rank_zero)
    cb.on_test_epoch_start(trainer, None)
    cb.on_test_batch_end(trainer, None, {"captions": ["x"]}, fake_batch(0, 1), 0)
    cb.on_test_epoch_end(trainer, None)
    assert experiment.texts == []


def test_clip_name():
    assert clip_name({"path": "a.mp4", "index": 3}, 9) == "a.mp4"
    assert clip_name({"split": "test", "index": 3}, 9) == "test:3"
    assert clip_name({}, 9) == clip_name(None, 9) == "9"
    with pytest.raises(ValueError, match="rows"):
        CaptionSamples(rows=0)
