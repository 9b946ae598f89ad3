"""ResumableLoader (data/resumable.py): the order of a plain shuffled DataLoader, continued exactly
from a recorded position, with the epoch reaching every worker's copy of the dataset."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from iv2_lightning.data.resumable import ResumableLoader


class Numbers(Dataset):
    """Item = (epoch the worker's copy was told, index): shows what reached the worker."""

    def __init__(self, n: int = 23) -> None:
        self.n, self.epoch = n, -1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.tensor([self.epoch, i])


def _batches(loader) -> list[list[list[int]]]:
    return [b.tolist() for b in loader]


def test_uninterrupted_order_is_the_plain_shuffled_loaders():
    torch.manual_seed(5)
    plain = [b[:, 1].tolist() for b in DataLoader(Numbers(), batch_size=4, shuffle=True, drop_last=True)]
    torch.manual_seed(5)
    ours = [[i for _, i in b] for b in _batches(ResumableLoader(Numbers(), 4, shuffle=True, drop_last=True))]
    assert ours == plain


@pytest.mark.parametrize("workers", [0, 2])
def test_resumes_mid_epoch_with_the_rest_of_the_same_batches_and_the_epoch_in_every_worker(workers):
    # spawned, not persistent workers: nothing of them outlives the test (a worker process or queue
    # thread left alive in the test process made a later test's forked loader worker hang in CI)
    kw = dict(num_workers=workers, persistent_workers=False, drop_last=True)
    if workers:
        kw["multiprocessing_context"] = "spawn"
    epochs = iter([0, 1, 1])
    torch.manual_seed(0)
    whole = ResumableLoader(Numbers(), 4, shuffle=True, epoch_fn=lambda: next(epochs), **kw)
    first, second = _batches(whole), _batches(whole)
    assert all(e == 0 for b in first for e, _ in b) and all(e == 1 for b in second for e, _ in b)
    assert sorted(i for b in second for _, i in b) != [i for b in second for _, i in b]  # shuffled
    # a checkpoint after 3 batches of epoch 1, then a fresh process: the next epoch-1 iteration continues
    position = whole.position(3)
    torch.manual_seed(123)  # the resumed process's generator is elsewhere: the saved seed decides
    resumed = ResumableLoader(Numbers(), 4, shuffle=True, epoch_fn=lambda: 1, **kw)
    resumed.resume_at(position)
    assert _batches(resumed) == second[3:]
    assert len(resumed) == len(second)  # the trainer's batch count does not change
    assert _batches(resumed) != second[3:]  # the position is used once; the next epoch is whole
