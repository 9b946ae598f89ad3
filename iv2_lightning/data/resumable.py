"""A map-style training loader that can stop in the middle of an epoch and continue exactly there.

Lightning restores the model, the optimizer and the loop counters from a mid-epoch checkpoint, but a
plain ``DataLoader`` starts its epoch again from the first batch (and with another shuffle): the
resumed run trains on other samples than the run it continues. :class:`ResumableLoader` keeps what it
takes to continue: the epoch, the seed of the epoch's order and how many batches the training loop
has consumed. The DataModule puts that into the checkpoint (``state_dict``) and hands it back
(``load_state_dict``); the next epoch the loader starts then skips the consumed batches in the
*sampler* (no clip of them is decoded) and draws the rest in the order the uninterrupted run drew
them.

* The order is drawn as ``torch.utils.data.RandomSampler`` draws it (a seed from the global torch
  generator when the epoch's first batch is fetched, then ``randperm``), so a run that is never
  interrupted sees exactly the batches it saw with a plain ``DataLoader(shuffle=True)``.
* Each index travels with its epoch (``(epoch, index)`` keys, :class:`EpochKeyed`): a dataset with
  ``set_epoch`` learns the epoch inside every loader worker, where a ``set_epoch`` call in the main
  process would never arrive (persistent workers hold their own copy of the dataset). The datasets
  draw their per-clip randomness from ``(seed, epoch, index)``, so a clip is the same whichever worker
  loads it: with workers > 0 the resumed batches equal the uninterrupted ones.
* "Consumed" is counted by the trainer (the batches whose step ran), not by the loader, which runs
  ahead of the training loop (Lightning fetches one batch ahead; workers prefetch more).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochKeyed", "ResumableLoader", "ResumableSampler"]


class EpochKeyed(Dataset):
    """``dataset[(epoch, index)]`` → ``dataset.set_epoch(epoch)`` (when it has one) and ``dataset[index]``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        setter = getattr(self.dataset, "set_epoch", None)
        if setter is not None and getattr(self.dataset, "epoch", None) != epoch:
            setter(epoch)
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:  # the wrapped dataset's attributes (rows, skip logs, ...)
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class ResumableSampler(Sampler):
    """The indices of one epoch as ``(epoch, index)`` keys, from ``start`` on: a permutation drawn as
    ``RandomSampler`` draws it (``shuffle``) or ``0..n-1``. ``seed`` given (a resumed epoch) replaces the
    draw. ``len`` is always the whole epoch, so the trainer's batch count does not change on resume."""

    def __init__(self, n: int, shuffle: bool) -> None:
        self.n, self.shuffle = n, shuffle
        self.epoch, self.start, self.seed = 0, 0, None

    def begin(self, epoch: int, start: int = 0, seed: int | None = None) -> None:
        self.epoch, self.start, self.seed = epoch, start, seed

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            if self.seed is None:  # RandomSampler's own draw, at the same point of the generator stream
                self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
            generator = torch.Generator()
            generator.manual_seed(self.seed)
            order = torch.randperm(self.n, generator=generator).tolist()
        else:
            order = list(range(self.n))
        for index in order[self.start :]:
            yield self.epoch, index

    def __len__(self) -> int:
        return self.n


class ResumableLoader(DataLoader):
    """A ``DataLoader`` over :class:`EpochKeyed` ``dataset`` with a :class:`ResumableSampler`.

    ``epoch_fn`` gives the epoch a new iteration belongs to (the trainer's ``current_epoch``; default:
    count iterations). :meth:`position` is what a checkpoint stores, given the batches the training
    loop consumed; :meth:`resume_at` makes the next iteration of that epoch continue from there.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        epoch_fn: Callable[[], int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.resumable_sampler = ResumableSampler(len(dataset), shuffle)
        super().__init__(EpochKeyed(dataset), batch_size=batch_size, sampler=self.resumable_sampler, **kwargs)
        self.epoch_fn = epoch_fn
        self._iterations = 0
        self._pending: dict[str, int] | None = None

    def __iter__(self):
        epoch = self.epoch_fn() if self.epoch_fn is not None else self._iterations
        self._iterations += 1
        pending, self._pending = self._pending, None
        if pending is not None:
            # the first iteration after a restore is the interrupted epoch (Lightning creates the
            # iterator before it restores the loop counters, so the trainer's epoch is not known yet)
            self.resumable_sampler.begin(
                pending["epoch"], pending["batches"] * self.batch_size, pending["seed"]
            )
            self._iterations = pending["epoch"] + 1
        else:
            self.resumable_sampler.begin(epoch)
        return super().__iter__()

    # Lightning asks a loader for ``state_dict`` / ``load_state_dict`` to know it resumes mid-epoch (and
    # warns otherwise); the position itself is saved by the DataModule, because only the trainer knows
    # how many batches its loop consumed (the loader runs ahead of it)
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass

    def position(self, batches: int) -> dict[str, int] | None:
        """``{"epoch", "seed", "batches"}`` after ``batches`` consumed batches of the current epoch
        (None before its order was drawn)."""
        s = self.resumable_sampler
        if s.shuffle and s.seed is None:
            return None
        return {"epoch": s.epoch, "seed": -1 if s.seed is None else s.seed, "batches": int(batches)}

    def resume_at(self, position: dict[str, int]) -> None:
        self._pending = {**position, "seed": None if position["seed"] == -1 else position["seed"]}
