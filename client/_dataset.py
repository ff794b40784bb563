"""``RemoteDataset``: an ``IterableDataset`` whose batches come from a batchwire server."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from google.protobuf import json_format
from torch.utils.data import IterableDataset, get_worker_info

from batchwire.client import _ranks
from batchwire.client._channel import BatchClient
from batchwire.client._parallel import merge_in_order
from batchwire.client._resume import resuming_batches
from batchwire.client._retry import RetryPolicy, call_with_retry
from batchwire.compression import codec as compression_codec
from batchwire.v1 import batchwire_pb2 as pb

_COUNTS_KEPT = 8  # epochs whose batch count is remembered


class RemoteDataset(IterableDataset):
    """Streams the batches of a served dataset, in the order of a local DataLoader.

    Iterating yields exactly what ``DataLoader(ds, batch_size, drop_last=drop_last,
    sampler=DistributedSampler(ds, world_size, rank, shuffle=shuffle, seed=seed))``
    yields after ``sampler.set_epoch(epoch)``. Each new pass is a new epoch (0, 1,
    2, ...), so the order changes between epochs even if ``set_epoch`` is never
    called; ``set_epoch(e)`` pins the next pass to epoch ``e``.

    The dataset tracks its position (epoch, next batch): a broken stream is
    reopened at the next batch (see ``retry``), and ``state_dict()`` /
    ``load_state_dict()`` carry the position across a trainer restart. Inside
    ``DataLoader(ds, batch_size=None, num_workers=k)`` worker ``w`` streams
    batches ``w, w + k, ...`` and the DataLoader hands them out in order.

    Args:
        target: the server's ``host:port``.
        dataset: a dataset name the server lists.
        batch_size: samples per batch.
        shuffle, seed: as for ``DistributedSampler``.
        drop_last: drop this rank's last batch when it is short.
        rank, world_size: this trainer's share of the epoch; each one left out
            comes from torch.distributed's default process group when it is
            initialized (as ``DistributedSampler``), else rank 0 of 1. Explicit
            values that disagree with an initialized group win, with a warning.
        timeout: seconds to wait for the server on metadata calls.
        sampler: a sampler kind (``"weighted"``, ``"dynamic"``, ...) or a mapping of
            ``SamplerSpec`` fields, e.g. ``{"kind": "dynamic", "max_tokens": 4096}``;
            ``None`` takes the dataset's configured default.
        streams: concurrent streams over interleaved batch positions, merged back
            in order; more than 1 helps small batches, where one stream waits on
            round trips rather than bandwidth.
        buffer: batches each of the ``streams`` may read ahead (``streams > 1`` only).
        retry: when to reconnect a broken stream and when to give up
            (``RetryPolicy(attempts=0)``: never).
        compression: ``"none"``, ``"lz4"`` or ``"zstd"``: payload compression,
            worth it for compressible data (uint8 images) on a slow link only
            (see benchmarks/RESULTS.md).
    """

    # Keys of state_dict(); CONFIG_KEY holds what must match for a resume to be exact.
    EPOCH_KEY = "epoch"
    BATCH_KEY = "batch"
    CONFIG_KEY = "config"

    def __init__(
        self,
        target: str,
        dataset: str,
        *,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        timeout: float = 10.0,
        sampler: str | Mapping[str, Any] | None = None,
        streams: int = 1,
        buffer: int = 2,
        retry: RetryPolicy | None = None,
        compression: str = "none",
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(
                f"batch_size should be a positive integer value, but got batch_size={batch_size}"
            )
        _ranks.check_explicit(rank, world_size)
        for name, value in (("streams", streams), ("buffer", buffer)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} should be a positive integer, but got {name}={value!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry should be a RetryPolicy or None, but got {retry!r}")
        self.target = target
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self._rank_arg, self._world_size_arg = rank, world_size
        self._shard: tuple[int, int] | None = None  # (rank, world_size), resolved once
        self.sampler = _sampler_spec(sampler)
        self.compression = compression_codec(compression)
        self.streams = streams
        self.buffer = buffer
        self.retry = retry or RetryPolicy()
        self._client = BatchClient(target, timeout=timeout)
        self._next_epoch = 0
        self._resume_batch = 0  # first batch of the next pass (load_state_dict)
        self._position: tuple[int, int] | None = None  # (epoch, next batch) of the pass underway
        self._info: pb.DatasetInfo | None = None
        self._counts: dict[int, int] = {}  # epoch -> batches of this rank's epoch
        if _ranks.group_shard() is not None:
            self._ranks()  # now, so that a disagreement is told where the dataset is made

    @property
    def rank(self) -> int:
        """This trainer's rank (given, else the default process group's, else 0)."""
        return self._ranks()[0]

    @property
    def world_size(self) -> int:
        """Trainers sharing each epoch (given, else the default process group's, else 1)."""
        return self._ranks()[1]

    def _ranks(self) -> tuple[int, int]:
        # Resolved at first use, not per call: a DataLoader worker (no process group
        # there) and a later state_dict() must see the share the pass streamed.
        if self._shard is None:
            self._shard = _ranks.resolve(self._rank_arg, self._world_size_arg, "RemoteDataset")
        return self._shard

    def __getstate__(self) -> dict[str, Any]:
        self._ranks()  # DataLoader workers get the resolved share, never their own guess
        return self.__dict__.copy()

    @property
    def epoch(self) -> int:
        """The epoch the next pass will stream."""
        return self._next_epoch

    def set_epoch(self, epoch: int) -> None:
        """Makes the next pass stream ``epoch`` (as ``DistributedSampler.set_epoch``).

        A position restored by ``load_state_dict`` is kept when ``epoch`` is its epoch.
        """
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch should be a non-negative integer, but got epoch={epoch}")
        if epoch != self._next_epoch:
            self._resume_batch = 0
        self._next_epoch = epoch

    def describe(self) -> pb.DatasetInfo:
        """The dataset's length and fields, as the server reports them."""
        if self._info is None:
            self._info = self._client.describe(self.dataset)
        return self._info

    def __len__(self) -> int:
        """Batches of this rank's epoch (the pass underway, else the next), as the server plans it."""
        return self._num_batches(self._position[0] if self._position else self._next_epoch)

    def _num_batches(self, epoch: int) -> int:
        # Asked of the server (CountBatches): exact for every sampler, dynamic batching included.
        if epoch not in self._counts:
            if len(self._counts) >= _COUNTS_KEPT:
                self._counts.clear()
            # Under the streams' retry policy: a restart between epochs is an outage to sit out.
            self._counts[epoch] = call_with_retry(
                lambda: self._client.count_batches(self.request(epoch)).num_batches,
                policy=self.retry,
                what=f"counting the batches of {self._what(epoch)}",
            )
        return self._counts[epoch]

    def request(
        self, epoch: int, start_batch: int = 0, *, batch_stride: int = 1
    ) -> pb.StreamBatchesRequest:
        """The request for batches ``start_batch, start_batch + batch_stride, ...`` of ``epoch``."""
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
            batch_stride=batch_stride,
            sampler=self.sampler,
            compression=self.compression,
        )

    # -- position ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position to resume from: the pass underway, else the next pass.

        ``{"epoch": e, "batch": b, "config": {...}}``: the next batch to stream is
        batch ``b`` of epoch ``e``; plain data, so it survives ``json`` and
        ``torch.save``. A position at an epoch's end is the next epoch's start.
        """
        epoch, batch = self._position or (self._next_epoch, self._resume_batch)
        # No call to the server here (it may be down while a trainer checkpoints):
        # when the epoch's length is not known yet, the next pass rolls over instead.
        if batch and batch >= self._counts.get(epoch, batch + 1):
            epoch, batch = epoch + 1, 0
        return {self.EPOCH_KEY: epoch, self.BATCH_KEY: batch, self.CONFIG_KEY: self._config()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Makes the next pass continue at the position ``state`` records.

        Raises:
            ValueError: ``state`` was saved by a dataset that streams other batches
                (another dataset, batch size, seed, rank, ...), or is malformed.
        """
        try:
            epoch, batch, config = (
                state[self.EPOCH_KEY],
                state[self.BATCH_KEY],
                state[self.CONFIG_KEY],
            )
        except (KeyError, TypeError):
            raise ValueError(
                f"state should be a RemoteDataset.state_dict() with keys "
                f"{[self.EPOCH_KEY, self.BATCH_KEY, self.CONFIG_KEY]}, but got {state!r}"
            ) from None
        if not isinstance(epoch, int) or epoch < 0 or not isinstance(batch, int) or batch < 0:
            raise ValueError(
                f"state should hold non-negative integers, but got epoch={epoch!r}, batch={batch!r}"
            )
        mine = self._config()
        differ = [
            f"{key}={config.get(key)!r} (this dataset: {mine[key]!r})"
            for key in mine
            if config.get(key) != mine[key]
        ]
        if differ:
            raise ValueError(
                "state was saved by a RemoteDataset with other settings, so resuming "
                "would skip or repeat samples: " + ", ".join(differ)
            )
        self._next_epoch, self._resume_batch = epoch, batch

    def _config(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "rank": self.rank,
            "world_size": self.world_size,
            "sampler": json_format.MessageToDict(self.sampler) if self.sampler else {},
        }

    # -- iteration --------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self._next_epoch, self._resume_batch
        # Counted up front (one call) so that state_dict() at the pass's last batch
        # already names the next epoch's start.
        if start >= self._num_batches(epoch) and start:
            epoch, start = epoch + 1, 0  # saved at an epoch's end: the next epoch, not none
        self._next_epoch, self._resume_batch = epoch + 1, 0
        return self._pass(epoch, start)

    def _pass(self, epoch: int, start: int) -> Iterator[Any]:
        self._position = (epoch, start)
        try:
            for index, batch in self._batches(epoch, start):
                self._position = (epoch, index + 1)
                yield batch
        except GeneratorExit:
            raise  # the consumer stopped early: the next pass is the next epoch
        except BaseException:
            # The retry budget was spent, ...: iterating again resumes where this stopped.
            self._next_epoch, self._resume_batch = self._position
            raise
        finally:
            self._position = None

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[int, Any]]:
        stride = 1
        worker = get_worker_info()
        if worker is not None:  # this DataLoader worker's share: w, w + k, ...
            start, stride = start + worker.id, worker.num_workers
        what = self._what(epoch)
        if self.streams == 1 and stride == 1:
            return self._share(epoch, start, stride, what)
        total = self._num_batches(epoch)
        # Split the share into `streams` interleaved ones; those that start past the
        # end are empty (and so are all after them), and the server refuses them.
        shares = [start + j * stride for j in range(self.streams)]
        shares = [s for s in shares if s < total]
        step = stride * self.streams
        if len(shares) <= 1:  # no thread for a single stream
            return self._share(epoch, shares[0], step, what) if shares else iter(())
        return merge_in_order(
            [lambda stop, s=s: self._share(epoch, s, step, what, stop) for s in shares],
            buffer=self.buffer,
            name="stream",
        )

    def _what(self, epoch: int) -> str:
        return f"dataset {self.dataset!r} epoch {epoch} rank {self.rank}/{self.world_size}"

    def _share(
        self,
        epoch: int,
        start: int,
        stride: int,
        what: str,
        stop: threading.Event | None = None,
    ) -> Iterator[tuple[int, Any]]:
        def open_stream(first: int) -> Iterator[tuple[int, Any]]:
            return self._client.batches(self.request(epoch, first, batch_stride=stride))

        return resuming_batches(
            open_stream,
            start=start,
            stride=stride,
            policy=self.retry,
            what=f"{what} batches {start}::{stride}",
            stop=stop,
            end=lambda: self._num_batches(epoch),
        )


def _sampler_spec(sampler: str | Mapping[str, Any] | None) -> pb.SamplerSpec | None:
    if sampler is None:
        return None
    if isinstance(sampler, str):
        return pb.SamplerSpec(kind=sampler)
    try:
        return pb.SamplerSpec(**sampler)
    except ValueError as exc:
        raise ValueError(f"sampler: {exc}") from None
