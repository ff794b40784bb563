"""``RemoteDataset``: an ``IterableDataset`` whose batches come from a batchwire server."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from google.protobuf import json_format
from torch.utils.data import IterableDataset, get_worker_info

from batchwire.client import _ranks, _shm
from batchwire.client._channel import BatchClient
from batchwire.client._ledger import PassLedger
from batchwire.client._parallel import merge_in_order
from batchwire.client._resume import resuming_batches
from batchwire.client._retry import RetryPolicy, call_with_retry
from batchwire.client._stats import StatsRecorder, StreamStats
from batchwire.client._stats import transport as grpc_transport
from batchwire.compression import codec as compression_codec
from batchwire.v1 import batchwire_pb2 as pb

log = logging.getLogger("batchwire.client")

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
    batches ``w, w + k, ...`` and the DataLoader hands them out in order; the
    passes count across the workers (see NOTE [ Passes across DataLoader
    workers ] in ``_ledger``), and each worker's ``state_dict()`` is its own
    share's, which torchdata's ``StatefulDataLoader`` checkpoints and restores.

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
        transport: ``"auto"`` (shared memory when this process proves it can map the
            server's, else bytes over gRPC), ``"shm"`` (require it: ``TransportError``
            saying why not) or ``"grpc"`` (bytes always); ``"auto"`` follows
            ``BATCHWIRE_TRANSPORT`` when set. ``ds.transport`` says which path is taken.
    """

    # Keys of state_dict(); CONFIG_KEY holds what must match for a resume to be exact.
    EPOCH_KEY = "epoch"
    BATCH_KEY = "batch"
    CONFIG_KEY = "config"
    WORKER_KEY = "worker"  # only in a DataLoader worker's own state

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
        transport: str = "auto",
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
        self._transport_wanted = _shm.check_transport(transport)
        self._decision: _shm.Decision | None = None
        self._client = BatchClient(target, timeout=timeout)
        self._stats = StatsRecorder(dataset, grpc_transport(target, self.compression))
        self._ledger = PassLedger()  # the next pass, shared with DataLoader workers
        # (epoch, next batch) of the pass underway in this process; in a DataLoader
        # worker the batch is the next one of the worker's share (w, w + k, ...).
        self._position: tuple[int, int] | None = None
        self._passes_begun = 0  # tells a pass's own position from a later pass's
        self._worker_resume: tuple[int, int] | None = None  # a worker's own state, loaded
        self._told_unshared = False
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
        """The epoch the next pass will stream (passes in DataLoader workers count too)."""
        return self._next_pass(ask=True)[0]

    def set_epoch(self, epoch: int) -> None:
        """Makes the next pass stream ``epoch`` (as ``DistributedSampler.set_epoch``).

        Reaches DataLoader workers too, persistent ones included. A position
        restored by ``load_state_dict`` is kept when ``epoch`` is its epoch.
        """
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch should be a non-negative integer, but got epoch={epoch}")
        if (epoch, self._ledger.passes()) != (self._ledger.base()[0], 0):
            self._ledger.rebase(epoch, 0)

    def _base(self, *, ask: bool) -> tuple[int, int]:
        """The position set_epoch/load_state_dict pinned; at its epoch's end, the next epoch's start.

        ``ask``: ask the server for the epoch's length when it is not known yet.
        Once passes ran from the base, the server answered lately, so it is asked too.
        """
        epoch, batch = self._ledger.base()
        known = ask or epoch in self._counts or self._ledger.passes()
        if batch and known and batch >= self._num_batches(epoch):
            epoch, batch = epoch + 1, 0  # saved at an epoch's end: the next epoch, not none
        return epoch, batch

    def _next_pass(self, *, ask: bool) -> tuple[int, int]:
        """(epoch, first batch) of the next pass of the main process."""
        epoch, batch = self._base(ask=ask)
        passes = self._ledger.passes()
        return (epoch + passes, 0) if passes else (epoch, batch)

    @property
    def transport(self) -> str:
        """``"shm"`` or ``"grpc"``: the path batches take (decided at the first contact)."""
        return self._decide().transport

    def _decide(self, *, again: bool = False, stream: bool = False) -> _shm.Decision:
        """Proves shared memory usable (once, and again after a reconnect), or says why not.

        ``stream``: for a stream about to open, failing as it would (UNAVAILABLE at once
        while the server is down: its RetryPolicy waits).
        """
        previous = self._decision
        if previous is None or again:
            self._decision = self._client.transport(self._transport_wanted, fail_fast=stream)
            if previous is None or previous.transport != self._decision.transport:
                log.info(
                    "dataset %r from %s: batches over %s (%s)",
                    self.dataset,
                    self.target,
                    "shared memory" if self._decision.transport == _shm.SHM else "gRPC",
                    self._decision.reason,
                )
            if self._decision.transport == _shm.SHM:
                self._stats.set_transport(_shm.SHM)
            else:
                self._stats.set_transport(grpc_transport(self.target, self.compression))
        return self._decision

    def describe(self) -> pb.DatasetInfo:
        """The dataset's length and fields, as the server reports them."""
        if self._info is None:
            self._info = self._client.describe(self.dataset)
        return self._info

    def __len__(self) -> int:
        """Batches of this rank's epoch (the pass underway, else the next), as the server plans it."""
        return self._num_batches(self._position[0] if self._position else self.epoch)

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

        Inside a DataLoader worker the state is the worker's own (``b`` is the
        next batch of its share, and ``"worker": [id, num_workers]`` says so):
        what torchdata's ``StatefulDataLoader`` collects and hands back to the
        same worker on ``load_state_dict``.
        """
        worker = get_worker_info()
        if worker is not None:
            epoch, batch = self._position or self._worker_next_pass(worker)
            return {
                self.EPOCH_KEY: epoch,
                self.BATCH_KEY: batch,
                self.CONFIG_KEY: self._config(),
                self.WORKER_KEY: [worker.id, worker.num_workers],
            }
        # No call to the server here (it may be down while a trainer checkpoints):
        # when the epoch's length is not known yet, the next pass rolls over instead.
        epoch, batch = self._position or self._next_pass(ask=False)
        if batch and batch >= self._counts.get(epoch, batch + 1):
            epoch, batch = epoch + 1, 0
        return {self.EPOCH_KEY: epoch, self.BATCH_KEY: batch, self.CONFIG_KEY: self._config()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Makes the next pass continue at the position ``state`` records.

        Raises:
            ValueError: ``state`` was saved by a dataset that streams other batches
                (another dataset, batch size, seed, rank, ...), by another
                DataLoader worker than this process, or is malformed.
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
        saved_by, worker = state.get(self.WORKER_KEY), get_worker_info()
        here = None if worker is None else [worker.id, worker.num_workers]
        if saved_by is not None and list(saved_by) != here:
            raise ValueError(
                f"state was saved by DataLoader worker {saved_by[0]} of {saved_by[1]} and holds "
                f"that worker's share only, but this is "
                + ("the main process" if here is None else f"worker {here[0]} of {here[1]}")
                + "; resume it through the same loader (torchdata's StatefulDataLoader)"
            )
        if worker is not None and saved_by is not None:
            self._worker_resume = (epoch, batch)
            self._ledger.restore_worker(worker.id, worker.num_workers, epoch)
        else:
            self._worker_resume = None
            self._ledger.rebase(epoch, batch)

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
        # The pass is counted (and its position set) here, not when the generator
        # starts: a DataLoader worker and StatefulDataLoader read the state in between.
        worker = get_worker_info()
        if worker is None:
            epoch, start = self._next_pass(ask=True)
            self._ledger.start_main_pass()
            stride = 1
        else:  # this DataLoader worker's share: w, w + k, ... (see NOTE in _ledger)
            self._warn_if_unshared()
            epoch, start = self._worker_next_pass(worker, ask=True)
            self._ledger.start_worker_pass(worker.id)
            self._worker_resume, stride = None, worker.num_workers
        self._position = (epoch, start)
        self._passes_begun += 1
        return self._pass(epoch, start, stride, self._passes_begun)

    def _worker_next_pass(self, worker: Any, *, ask: bool = False) -> tuple[int, int]:
        """(epoch, first batch of this worker's share) of the worker's next pass."""
        if self._worker_resume is not None:  # the worker's own state: its share as saved
            return self._worker_resume
        number = self._ledger.worker_passes(worker.id)
        epoch, batch = self._base(ask=ask)
        return (epoch + number, worker.id) if number else (epoch, batch + worker.id)

    def _warn_if_unshared(self) -> None:
        if not self._ledger.shared and not self._told_unshared:
            self._told_unshared = True
            warnings.warn(
                f"RemoteDataset {self.dataset!r} in a DataLoader worker without its shared "
                "pass record (the dataset was copied without torch's shared-memory pickling): "
                "the workers cannot see earlier passes, so a pass without set_epoch() may "
                "repeat an epoch; call ds.set_epoch(epoch) before each pass",
                stacklevel=2,
            )

    def stats(self) -> StreamStats:
        """This process's figures for the pass underway (live), else the last pass.

        Data wait (the loop waiting in ``next()``) against compute (the loop's time
        between batches), batches, bytes, reconnects, transport, and what the server
        reported; each pass also logs them in one line (see ``_stats``). In a
        DataLoader worker they are that worker's own.
        """
        return self._stats.stats()

    def _pass(self, epoch: int, start: int, stride: int, number: int) -> Iterator[Any]:
        stats, clock = self._stats, time.perf_counter
        stats.begin(epoch)
        try:
            asked = clock()
            for index, batch in self._batches(epoch, start, stride):
                self._position = (epoch, index + stride)
                got = clock()
                stats.waited(got - asked)
                yield batch
                asked = clock()
                stats.computed(asked - got)
            stats.end()
        except GeneratorExit:
            raise  # the consumer stopped early: the next pass is the next epoch
        except BaseException:
            # The retry budget was spent, ...: iterating again resumes where this stopped.
            if get_worker_info() is None and self._position is not None:
                self._ledger.rebase(*self._position)
            raise
        finally:
            if self._passes_begun == number:  # not a later pass's position
                self._position = None

    def _batches(self, epoch: int, start: int, stride: int) -> Iterator[tuple[int, Any]]:
        what = self._what(epoch)
        if self.streams == 1 and stride == 1 and start == 0:
            return self._share(epoch, start, stride, what)  # no need to count
        total = self._num_batches(epoch)
        if start >= total:  # a worker whose share was done when its state was saved
            return iter(())
        if self.streams == 1:
            return self._share(epoch, start, stride, what)
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
        opened = 0

        def open_stream(first: int) -> Iterator[tuple[int, Any]]:
            nonlocal opened
            opened += 1
            if opened > 1:
                self._stats.reconnected()
            request = self.request(epoch, first, batch_stride=stride)
            # After a reconnect the server may be another (or restarted): proven again.
            request.shared_memory_nonce = self._decide(again=opened > 1, stream=True).nonce
            report = self._stats.take_report()  # the previous pass, for the server's dashboard
            if report is not None:
                request.trainer_report.CopyFrom(report)
            return self._client.batches(request, self._stats)

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
