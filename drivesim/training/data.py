"""Exactly reproducible, resumable, sharded data order.

Epoch `e` visits the dataset in the permutation `numpy.random.default_rng([seed, e]).permutation(n)`. The
permutation is cut into global micro-batches of `batch_size * num_processes` samples (an incomplete tail is
dropped); process `r` takes slots `[r * batch_size, (r + 1) * batch_size)` of each global micro-batch, so the
processes see disjoint shards and the union of one global micro-batch is the same set of samples whatever the
process count. The position is (epoch, samples of the permutation consumed), stored in every checkpoint.

The order never touches the global RNGs, and each epoch's DataLoader gets its own generator seeded from
(seed, epoch, rank), so worker seeds are reproducible and resuming does not shift the model's RNG streams.
Datasets with random augmentation should draw from the worker's torch RNG or derive randomness from the index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from drivesim.errors import DataError


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of sample indices in `epoch`: (num_samples,) int64."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


class ShardBatchSampler:
    """This process's batches of one epoch, starting at global sample `start` of the permutation.

    Yields lists of `batch_size` dataset indices.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int,
                 start: int = 0) -> None:
        self.num_samples, self.batch_size, self.seed, self.epoch = num_samples, batch_size, seed, epoch
        self.rank, self.world_size, self.start = rank, world_size, start
        self.global_batch = batch_size * world_size

    def __iter__(self) -> Iterator[list[int]]:
        perm = epoch_permutation(self.num_samples, self.seed, self.epoch)
        for begin in range(self.start, self.num_samples - self.global_batch + 1, self.global_batch):
            lo = begin + self.rank * self.batch_size
            yield perm[lo: lo + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, (self.num_samples - self.start) // self.global_batch)


class DataStream:
    """Endless iterator of this process's micro-batches, with a checkpointable position.

    Args:
        dataset: a map-style dataset (`__len__`, `__getitem__`).
        batch_size: samples per process per micro-batch.
        epoch / position: where to start (position = samples of the epoch's permutation already consumed).

    Raises:
        DataError: the dataset is smaller than one global micro-batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int, world_size: int,
                 collate_fn: Callable | None = None, num_workers: int = 0, epoch: int = 0, position: int = 0,
                 pin_memory: bool = False) -> None:
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.collate_fn, self.num_workers, self.pin_memory = collate_fn, num_workers, pin_memory
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        self.global_batch = batch_size * world_size
        if self.num_samples < self.global_batch:
            raise DataError(f"dataset: {self.num_samples} samples, fewer than one global batch "
                            f"({batch_size} per process x {world_size} processes)")
        self.epoch, self.position = epoch, position
        self._it: Iterator[Any] | None = None

    def _open(self) -> None:
        if self.position + self.global_batch > self.num_samples:
            self.epoch, self.position = self.epoch + 1, 0
        sampler = ShardBatchSampler(self.num_samples, self.batch_size, self.seed, self.epoch, self.rank,
                                    self.world_size, self.position)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, self.rank])
                                                .generate_state(1)[0]))
        loader = DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                            num_workers=self.num_workers, generator=gen, pin_memory=self.pin_memory)
        self._it = iter(loader)

    def next(self) -> Any:
        if self._it is None:
            self._open()
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._open()
            batch = next(self._it)
        self.position += self.global_batch
        return batch

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}
