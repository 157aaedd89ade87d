"""`PromptSampler`: the order prompts are drawn in, epoch by epoch, resumable at any position."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch


class PromptSampler:
    """Yields training rows one at a time, epoch after epoch, from a resumable position.

    A sized dataset (`datasets.Dataset`, a list of dicts) is read in a fresh permutation each
    epoch, drawn from its own generator seeded with `seed + epoch` (so the global RNG is not
    touched and a resumed run sees the same order). An `IterableDataset` is read in its own order
    (`set_epoch` is called when available); resuming skips the rows already consumed.
    """

    def __init__(self, dataset: Any, *, seed: int, shuffle: bool) -> None:
        self.dataset = dataset
        self.seed = seed
        self.shuffle = shuffle
        self.size: int | None = None
        if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
            self.size = len(dataset)
        self.epoch = 0
        self.index = 0
        self._order: list[int] | None = None
        self._iterator: Iterator[Any] | None = None

    def _epoch_order(self) -> list[int]:
        assert self.size is not None
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def _start_iterator(self) -> Iterator[Any]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        return itertools.islice(iter(self.dataset), self.index, None)

    def next(self) -> dict[str, Any]:
        """The next row as a dict; wraps into the next epoch at the end of the data."""
        if self.size is not None:
            if self.size == 0:
                raise ValueError("The dataset is empty; give at least one row with a 'prompt'.")
            if self.index >= self.size:
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
            if self._order is None:
                self._order = self._epoch_order()
            row = self.dataset[self._order[self.index]]
        else:
            if self._iterator is None:
                self._iterator = self._start_iterator()
            try:
                row = next(self._iterator)
            except StopIteration:
                if self.index == 0:
                    raise ValueError("The dataset is empty; give at least one row.") from None
                self.epoch, self.index = self.epoch + 1, 0
                self._iterator = self._start_iterator()
                row = next(self._iterator)
        self.index += 1
        if not isinstance(row, dict):
            raise TypeError(
                f"Dataset rows must be dicts with a 'prompt' key, got {type(row).__name__}."
            )
        return dict(row)

    def iterate_once(self) -> Iterator[dict[str, Any]]:
        """Every row once, in the dataset's order (for evaluation)."""
        for row in self.dataset:
            yield dict(row)

    @property
    def epochs_done(self) -> float:
        """Fractional passes over the data (0 for unsized datasets)."""
        return self.epoch + self.index / self.size if self.size else float(self.epoch)

    def restore(self, epoch: int, index: int) -> None:
        """Continue from a saved position."""
        self.epoch, self.index, self._order, self._iterator = epoch, index, None, None
