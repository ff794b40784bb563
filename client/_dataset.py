"""``RemoteDataset``: an ``IterableDataset`` whose batches come from a batchwire server."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from torch.utils.data import IterableDataset

from batchwire.client._channel import BatchClient
from batchwire.v1 import batchwire_pb2 as pb


class RemoteDataset(IterableDataset):
    """Streams the batches of a served dataset, in the order of a local DataLoader.

    Iterating yields exactly what ``DataLoader(ds, batch_size, drop_last=drop_last,
    sampler=DistributedSampler(ds, world_size, rank, shuffle=shuffle, seed=seed))``
    yields after ``sampler.set_epoch(epoch)``. Each new pass is a new epoch (0, 1,
    2, ...), so the order changes between epochs even if ``set_epoch`` is never
    called; ``set_epoch(e)`` pins the next pass to epoch ``e``.

    Args:
        target: the server's ``host:port``.
        dataset: a dataset name the server lists.
        batch_size: samples per batch.
        shuffle, seed: as for ``DistributedSampler``.
        drop_last: drop this rank's last batch when it is short.
        rank, world_size: this trainer's share of the epoch.
        timeout: seconds to wait for the server on metadata calls.
        sampler: a sampler kind (``"weighted"``, ``"dynamic"``, ...) or a mapping of
            ``SamplerSpec`` fields, e.g. ``{"kind": "dynamic", "max_tokens": 4096}``;
            ``None`` takes the dataset's configured default.
    """

    def __init__(
        self,
        target: str,
        dataset: str,
        *,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        timeout: float = 10.0,
        sampler: str | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(
                f"batch_size should be a positive integer value, but got batch_size={batch_size}"
            )
        if not isinstance(world_size, int) or world_size <= 0:
            raise ValueError(
                f"world_size should be a positive integer value, but got world_size={world_size}"
            )
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank should be in [0, {world_size - 1}], but got rank={rank}")
        self.target = target
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.sampler = _sampler_spec(sampler)
        self._client = BatchClient(target, timeout=timeout)
        self._next_epoch = 0
        self._info: pb.DatasetInfo | None = None

    @property
    def epoch(self) -> int:
        """The epoch the next pass will stream."""
        return self._next_epoch

    def set_epoch(self, epoch: int) -> None:
        """Makes the next pass stream ``epoch`` (as ``DistributedSampler.set_epoch``)."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch should be a non-negative integer, but got epoch={epoch}")
        self._next_epoch = epoch

    def describe(self) -> pb.DatasetInfo:
        """The dataset's length and fields, as the server reports them."""
        if self._info is None:
            self._info = self._client.describe(self.dataset)
        return self._info

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        per_rank = math.ceil(self.describe().length / self.world_size)
        return (
            per_rank // self.batch_size if self.drop_last else math.ceil(per_rank / self.batch_size)
        )

    def request(self, epoch: int, start_batch: int = 0) -> pb.StreamBatchesRequest:
        return pb.StreamBatchesRequest(
            dataset=self.dataset,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world_size,
            drop_last=self.drop_last,
            start_batch=start_batch,
            sampler=self.sampler,
        )

    def __iter__(self) -> Iterator[Any]:
        epoch = self._next_epoch
        self._next_epoch = epoch + 1
        for _, batch in self._client.batches(self.request(epoch)):
            yield batch


def _sampler_spec(sampler: str | Mapping[str, Any] | None) -> pb.SamplerSpec | None:
    if sampler is None:
        return None
    if isinstance(sampler, str):
        return pb.SamplerSpec(kind=sampler)
    try:
        return pb.SamplerSpec(**sampler)
    except ValueError as exc:
        raise ValueError(f"sampler: {exc}") from None
