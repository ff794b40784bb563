"""The order of an epoch: which sample indices make batch b of a rank.

``distributed_order`` reproduces ``torch.utils.data.DistributedSampler``
exactly (same generator, same padding, same striding), vectorised so that a
request for a dataset of millions of samples costs milliseconds. A batch plan
is a pure function of ``(length, seed, epoch, rank, world_size, shuffle)``:
resuming at batch b needs no state but b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def distributed_order(
    length: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int
) -> np.ndarray:
    """The indices ``DistributedSampler(..., shuffle, seed)`` yields after ``set_epoch(epoch)``."""
    if length == 0:
        return np.empty(0, dtype=np.int64)
    if shuffle:
        generator = torch.Generator()
        generator.manual_seed(seed + epoch)
        order = torch.randperm(length, generator=generator).numpy()
    else:
        order = np.arange(length, dtype=np.int64)
    per_rank = math.ceil(length / world_size)
    total = per_rank * world_size
    if total > length:  # pad by repeating from the start, as DistributedSampler does
        order = np.concatenate([order, np.resize(order, total - length)])
    return order[rank:total:world_size]


@dataclass(frozen=True)
class BatchPlan:
    """The batches of one rank's epoch: ``plan[b]`` is batch b's sample indices."""

    indices: np.ndarray
    batch_size: int
    drop_last: bool

    def __len__(self) -> int:
        return num_batches(len(self.indices), self.batch_size, self.drop_last)

    def __getitem__(self, batch: int) -> np.ndarray:
        if not 0 <= batch < len(self):
            raise IndexError(f"batch {batch} out of range for {len(self)} batches")
        return self.indices[batch * self.batch_size : (batch + 1) * self.batch_size]


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)


def samples_per_rank(length: int, world_size: int) -> int:
    return math.ceil(length / world_size) if length else 0
