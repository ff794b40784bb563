"""The order of an epoch: which sample indices make batch b of a rank.

Every sampler is a pure function of ``(seed, epoch, rank, world_size)`` and the
dataset's configured data (weights, subset, lengths), so resuming at batch b
needs no state but b, and every server computes the same plan.

- ``distributed_order`` reproduces ``torch.utils.data.DistributedSampler``
  exactly (same generator, same padding, same striding), vectorised.
- ``random_order`` and ``weighted_order`` draw ``num_samples`` indices for the
  whole epoch from a generator seeded ``seed + epoch`` (``weighted_order`` is
  ``WeightedRandomSampler``'s ``torch.multinomial`` draw), then shard the draw
  across ranks as DistributedSampler shards its permutation.
- ``subset_order`` is DistributedSampler over a fixed list of indices.
- ``dynamic_plan`` fills batches up to a budget (tokens and/or items) in a
  (shuffled) order, then deals whole batches to ranks round-robin: every
  sample once per epoch, ranks disjoint.
- ``elastic_order`` cuts one global order of the epoch, independent of
  ``world_size`` and ``batch_size``, into global steps from a global sample
  position: the shape of the job may change between any two steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("distributed", "random", "weighted", "subset", "dynamic", "elastic")


def _generator(seed: int, epoch: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)  # DistributedSampler's choice, kept for every kind
    return generator


def shard(order: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s share: pad by repeating from the start, then stride (DistributedSampler).

    The share is a copy, so the epoch's full order can be freed once it is cut;
    it costs this rank's samples only (a huge ``world_size`` costs one).
    """
    length = len(order)
    if length == 0 or world_size == 1:
        return order
    count = -(-length // world_size)  # ceil: every rank gets as many
    mine = order[rank::world_size].copy()
    if len(mine) == count:
        return mine
    # The padding (fewer than world_size positions past the end) gives this rank at
    # most one sample: padded position p repeats order[p % length].
    last = rank + (count - 1) * world_size
    return np.append(mine, order[last % length])


def distributed_order(
    length: int, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int
) -> np.ndarray:
    """The indices ``DistributedSampler(..., shuffle, seed)`` yields after ``set_epoch(epoch)``."""
    if length == 0:
        return np.empty(0, dtype=np.int64)
    return shard(global_order(length, shuffle=shuffle, seed=seed, epoch=epoch), rank, world_size)


def random_order(
    length: int, *, num_samples: int, seed: int, epoch: int, rank: int, world_size: int
) -> np.ndarray:
    """``num_samples`` uniform draws with replacement over the epoch, sharded across ranks."""
    draw = torch.randint(
        length, (num_samples,), generator=_generator(seed, epoch), dtype=torch.int64
    )
    return shard(draw.numpy(), rank, world_size)


def weighted_order(
    weights: np.ndarray,
    *,
    num_samples: int,
    replacement: bool,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
) -> np.ndarray:
    """``WeightedRandomSampler(weights, num_samples, replacement)``'s draw, sharded across ranks."""
    probabilities = torch.as_tensor(weights, dtype=torch.double)
    draw = torch.multinomial(
        probabilities, num_samples, replacement, generator=_generator(seed, epoch)
    )
    return shard(draw.numpy(), rank, world_size)


def subset_order(
    subset: np.ndarray, *, shuffle: bool, seed: int, epoch: int, rank: int, world_size: int
) -> np.ndarray:
    """DistributedSampler over ``subset``: the positions are shuffled and sharded, then mapped."""
    positions = distributed_order(
        len(subset), shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size
    )
    return subset[positions]


def global_order(length: int, *, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """The epoch's order over all ranks: DistributedSampler's permutation before it is sharded."""
    if shuffle:
        return torch.randperm(length, generator=_generator(seed, epoch)).numpy()
    return np.arange(length, dtype=np.int64)


def elastic_order(
    order: np.ndarray, *, start: int, rank: int, world_size: int, batch_size: int, drop_last: bool
) -> np.ndarray:
    """Rank ``rank``'s samples of ``order`` from global position ``start``, step by step.

    Each global step takes the next ``world_size * batch_size`` samples of the
    order; the rank's batch is the ``rank``-th run of ``batch_size`` of them.
    A last, short step of ``R`` samples is dropped with ``drop_last``, else split
    in ``world_size`` consecutive runs as evenly as possible (``np.array_split``:
    the first ``R % world_size`` ranks get one more, a rank may get none).
    Cut into batches of ``batch_size``, the result is the rank's batches: all
    full but the last step's.
    """
    rest = order[min(start, len(order)) :]
    step = world_size * batch_size
    full = len(rest) // step
    mine = rest[: full * step].reshape(full, world_size, batch_size)[:, rank, :].reshape(-1)
    if drop_last or full * step == len(rest):
        return mine.copy()
    last = np.array_split(rest[full * step :], world_size)[rank]
    return np.concatenate([mine, last])


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Inverse class frequency per sample: every class is drawn equally often on average."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse].astype(np.float64)


class BudgetError(ValueError):
    """A sample alone is over the dynamic batch budget."""


def dynamic_batches(
    lengths: np.ndarray, order: np.ndarray, *, max_tokens: int, max_items: int
) -> np.ndarray:
    """Greedy packing of ``order``: returns batch offsets into ``order``.

    A batch closes when the next sample would take its summed length over
    ``max_tokens`` or its size over ``max_items`` (0: no limit of that kind).
    """
    token_limit = max_tokens or math.inf
    item_limit = max_items or math.inf
    offsets = [0]
    tokens = 0
    items = 0
    for position, length in enumerate(lengths[order].tolist()):
        if length > token_limit:
            raise BudgetError(
                f"sample {int(order[position])} has {length} tokens, more than max_tokens={max_tokens}"
            )
        if items and (tokens + length > token_limit or items + 1 > item_limit):
            offsets.append(position)
            tokens = items = 0
        tokens += length
        items += 1
    if items:
        offsets.append(len(order))
    return np.asarray(offsets, dtype=np.int64)


def dynamic_plan(
    lengths: np.ndarray,
    *,
    max_tokens: int,
    max_items: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    drop_last: bool,
) -> BatchPlan:
    """Budgeted batches of the whole epoch, dealt round-robin to ranks.

    Batch ``g`` of the epoch goes to rank ``g % world_size``: ranks are disjoint
    and together see every sample once. Ranks may differ by one batch; with
    ``drop_last`` the tail is dropped so that all ranks get the same count.
    """
    order = global_order(len(lengths), shuffle=shuffle, seed=seed, epoch=epoch)
    offsets = dynamic_batches(lengths, order, max_tokens=max_tokens, max_items=max_items)
    total = len(offsets) - 1
    if drop_last:
        total -= total % world_size
    mine = np.arange(rank, total, world_size)
    sizes = offsets[mine + 1] - offsets[mine]
    indices = (
        np.concatenate([order[offsets[g] : offsets[g + 1]] for g in mine])
        if len(mine)
        else np.empty(0, dtype=np.int64)
    )
    return BatchPlan(indices, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


@dataclass(frozen=True)
class BatchPlan:
    """The batches of one rank's epoch: ``plan[b]`` is batch b's sample indices.

    Batch b is ``indices[offsets[b]:offsets[b + 1]]``, so batches may differ in
    size (dynamic batching); a plan of fixed-size batches keeps no offsets but
    ``batch_size`` (8 bytes per sample in all, not 24 for batches of one).
    ``seed`` and ``epoch`` travel with the plan because random transforms draw
    from an RNG seeded by ``(seed, epoch, sample index)``.
    """

    indices: np.ndarray
    offsets: np.ndarray | None = None
    seed: int = 0
    epoch: int = 0
    batch_size: int = 0
    """Fixed-size plans (``offsets`` None): samples per batch, the last one smaller."""
    num_batches: int = 0
    """Fixed-size plans: the number of batches (fewer than ceil(len / batch_size) with drop_last)."""

    def __post_init__(self) -> None:
        if self.offsets is not None:
            object.__setattr__(self, "num_batches", len(self.offsets) - 1)
        self.indices.setflags(write=False)  # plans are cached and shared between streams

    @classmethod
    def fixed(
        cls, indices: np.ndarray, batch_size: int, drop_last: bool, *, seed: int = 0, epoch: int = 0
    ) -> BatchPlan:
        """Consecutive batches of ``batch_size`` (the last one smaller unless dropped)."""
        count = num_batches(len(indices), batch_size, drop_last)
        return cls(indices, None, seed, epoch, batch_size=batch_size, num_batches=count)

    @property
    def nbytes(self) -> int:
        """Memory the plan holds (what the plan cache counts)."""
        return self.indices.nbytes + (0 if self.offsets is None else self.offsets.nbytes)

    @property
    def sizes(self) -> np.ndarray:
        """Samples per batch."""
        if self.offsets is not None:
            return np.diff(self.offsets)
        starts = np.arange(self.num_batches, dtype=np.int64) * self.batch_size
        return np.minimum(starts + self.batch_size, len(self.indices)) - starts

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, batch: int) -> np.ndarray:
        if not 0 <= batch < self.num_batches:
            raise IndexError(f"batch {batch} out of range for {self.num_batches} batches")
        if self.offsets is None:
            start = batch * self.batch_size
            return self.indices[start : start + self.batch_size]
        return self.indices[self.offsets[batch] : self.offsets[batch + 1]]


def num_batches(num_samples: int, batch_size: int, drop_last: bool) -> int:
    return num_samples // batch_size if drop_last else math.ceil(num_samples / batch_size)


def samples_per_rank(length: int, world_size: int) -> int:
    return math.ceil(length / world_size) if length else 0
