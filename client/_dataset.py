"""``RemoteDataset``: an ``IterableDataset`` whose batches come from a batchwire server."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
from google.protobuf import json_format
from torch.utils.data import IterableDataset, get_worker_info

from batchwire.client import _position, _ranks, _shm
from batchwire.client._channel import BatchClient
from batchwire.client._errors import CHECKPOINT, BatchwireError, FingerprintMismatch, ServerError
from batchwire.client._ledger import PassLedger
from batchwire.client._parallel import Stop, merge_in_order
from batchwire.client._resume import resuming_batches
from batchwire.client._retry import RetryPolicy, call_with_retry
from batchwire.client._stats import StatsRecorder, StreamStats
from batchwire.client._stats import transport as grpc_transport
from batchwire.client._targets import Target
from batchwire.compression import codec as compression_codec
from batchwire.v1 import batchwire_pb2 as pb

log = logging.getLogger("batchwire.client")

_COUNTS_KEPT = 8  # epochs whose batch count is remembered
_FINGERPRINT_LOCK = threading.Lock()  # module-wide: a dataset pickles into DataLoader workers


class RemoteDataset(IterableDataset):
    """Streams the batches of a served dataset, in the order of a local DataLoader.

    Iterating yields exactly what ``DataLoader(ds, batch_size, drop_last=drop_last,
    sampler=DistributedSampler(ds, world_size, rank, shuffle=shuffle, seed=seed))``
    yields after ``sampler.set_epoch(epoch)``. Each new pass is a new epoch (0, 1,
    2, ...), so the order changes between epochs even if ``set_epoch`` is never
    called; ``set_epoch(e)`` pins the next pass to epoch ``e``.

    The dataset tracks its position (epoch, samples consumed, next batch): a
    broken stream is reopened at the next batch (see ``retry``), and
    ``state_dict()`` / ``load_state_dict()`` carry the position across a trainer
    restart. Positions count samples, so ``set_batch_size`` may change the
    batch size between any two batches, and a checkpoint resumes with another
    batch size (and, for the ``"elastic"`` sampler, another world size): see
    NOTE [ Positions in samples ] in ``_position``. Inside
    ``DataLoader(ds, batch_size=None, num_workers=k)`` worker ``w`` streams
    batches ``w, w + k, ...`` and the DataLoader hands them out in order; the
    passes count across the workers (see NOTE [ Passes across DataLoader
    workers ] in ``_ledger``), and each worker's ``state_dict()`` is its own
    share's, which torchdata's ``StatefulDataLoader`` checkpoints and restores.

    Replicas: ``target`` may name several servers with the same config (a list of
    ``host:port``, or a name such as ``dns:///data.ns.svc:50051``); each stream
    goes to one of them (round robin over those that report SERVING), and a
    stream whose replica is lost resumes on another. The dataset's fingerprint
    (``DatasetInfo.fingerprint``, recorded at the first pass and in
    ``state_dict()``) goes with every request: a replica with another config, or
    a dataset changed since a checkpoint, is refused with ``FingerprintMismatch``.

    Args:
        target: the server's ``host:port``; or replicas: a list of ``host:port``
            (or one comma-separated string), or a gRPC name (``dns:///name:port``,
            ``ipv4:10.0.0.5:50051,10.0.0.6:50051``).
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
    SAMPLE_KEY = "sample"  # absent from states saved before positions counted samples
    CONFIG_KEY = "config"
    FINGERPRINT_KEY = "fingerprint"  # the dataset's, once known: a resume needs the same
    WORKER_KEY = "worker"  # only in a DataLoader worker's own state

    def __init__(
        self,
        target: Target,
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
        self._stats = StatsRecorder(dataset, grpc_transport(self._client.target, self.compression))
        # The fingerprint every request carries (None: not asked yet), and where it came from.
        self._fingerprint: str | None = None
        self._fingerprint_from = ""
        self._ledger = PassLedger()  # the next pass, shared with DataLoader workers
        # (epoch, sample, next batch) of the pass underway in this process: batches
        # are counted from sample `sample` of the epoch (see NOTE [ Positions in
        # samples ]); in a DataLoader worker the batch is the next one of the
        # worker's share (w, w + k, ...).
        self._position: tuple[int, int, int] | None = None
        self._reshapes = 0  # set_batch_size() calls: a pass underway starts a new segment
        self._passes_begun = 0  # tells a pass's own position from a later pass's
        self._worker_resume: tuple[int, int, int] | None = None  # a worker's own state, loaded
        self._told_unshared = False
        self._info: pb.DatasetInfo | None = None
        # (epoch, sample, batch size) -> batches of this rank's epoch from that sample on
        self._counts: dict[tuple[int, int, int], int] = {}
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
        if self._fingerprint is None and get_worker_info() is None:
            # Likewise one fingerprint for all workers, so that none starts on another config
            # (one try, no retries: a server that is down is the workers' streams' to wait for).
            with contextlib.suppress(BatchwireError):
                self._known_fingerprint()
        return self.__dict__.copy()

    def fingerprint(self) -> str:
        """The dataset fingerprint this dataset's batches come from (asked of the server once,
        or restored by ``load_state_dict``; empty from a server older than fingerprints)."""
        return call_with_retry(
            self._known_fingerprint, policy=self.retry, what=f"describing {self.dataset!r}"
        )

    def _known_fingerprint(self) -> str:
        """The fingerprint, asked of the server if not known yet. Fails fast (UNAVAILABLE)
        while no server answers: the caller's retry loop (a stream's, a count's) waits."""
        with _FINGERPRINT_LOCK:  # parallel streams: one answer, never one per stream
            if self._fingerprint is None:
                info = self._client.describe(self.dataset, wait_for_ready=False)
                self._info = self._info or info
                self._fingerprint = info.fingerprint
                self._fingerprint_from = f"replica {info.replica}" if info.replica else "the server"
            return self._fingerprint

    def _mismatch(self, error: BaseException) -> FingerprintMismatch | None:
        """The ``FingerprintMismatch`` a server's refusal means, if it is one."""
        if not isinstance(error, ServerError) or error.code != grpc.StatusCode.FAILED_PRECONDITION:
            return None
        actual = error.metadata.get("batchwire-fingerprint")
        if actual is None:
            return None
        return FingerprintMismatch(
            self.dataset,
            expected=self._fingerprint or "",
            actual=actual,
            expected_from=self._fingerprint_from,
            replica=error.metadata.get("batchwire-replica", ""),
        )

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

    def set_batch_size(self, batch_size: int, *, at: Mapping[str, Any] | None = None) -> bool:
        """Continues with ``batch_size`` samples per batch, from the same sample.

        Between two batches of a pass, the next batch the dataset hands out has
        the new size and starts at the first sample not yet handed out (batches
        that ``streams`` read ahead are dropped and streamed again at the new
        size). Between passes, the next pass uses it. With DataLoader workers
        it takes effect at the workers' next pass. ``len()`` then counts the
        batches left under the new size. Every rank of an ``"elastic"`` job
        must change at the same step.

        Args:
            at: a ``state_dict()`` this dataset gave during the pass underway:
                continue from there rather than after the last batch handed out.
                A consumer that reads ahead passes the state of the batch its
                loop holds (``DevicePrefetcher.set_batch_size`` does).

        Returns:
            True when the pass underway continues from ``at``: the batches
            handed out after it are to be dropped.

        Raises:
            ValueError: not a positive integer; or the ``"dynamic"`` sampler in the
                middle of an epoch (its packing depends on the batch size).
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(
                f"batch_size should be a positive integer value, but got batch_size={batch_size}"
            )
        if batch_size == self.batch_size:
            return False
        rewound = False
        if self._position is not None and get_worker_info() is None:
            epoch, sample, batch = self._position  # the pass underway: a new segment
            held = self.batch_size
            if at is not None and at[self.EPOCH_KEY] == epoch:  # else the pass is at its end
                sample, batch = at.get(self.SAMPLE_KEY, 0), at[self.BATCH_KEY]
                held, rewound = at[self.CONFIG_KEY]["batch_size"], True
            self._position = (epoch, self._consumed(sample, batch, batch_size=held), 0)
            self._reshapes += 1
        else:
            epoch, sample, batch = self._ledger.base()
            if batch:  # a loaded position: counted in samples, it holds at any batch size
                self._ledger.reposition(self._consumed(sample, batch), 0)
        self.batch_size = batch_size
        self._ledger.set_batch_size(batch_size)
        return rewound

    def _consumed(
        self, sample: int, batch: int, *, batch_size: int = 0, world_size: int = 0
    ) -> int:
        """Samples consumed at batch ``batch`` counted from ``sample`` (NOTE in ``_position``)."""
        try:
            return _position.consumed(
                self._kind() if batch else "",
                sample,
                batch,
                batch_size or self.batch_size,
                world_size or self.world_size,
            )
        except ValueError as exc:
            raise ValueError(f"dataset {self.dataset!r}: {exc}") from None

    def _kind(self) -> str:
        """The sampler kind the requests resolve to (the config's default when not chosen)."""
        kind = self.sampler.kind if self.sampler is not None else ""
        return kind or self.describe().sampler.kind or "distributed"

    def _base(self, *, ask: bool) -> tuple[int, int, int]:
        """The position set_epoch/load_state_dict pinned; at its epoch's end, the next epoch's start.

        ``ask``: ask the server for the epoch's length when it is not known yet.
        Once passes ran from the base, the server answered lately, so it is asked too.
        """
        epoch, sample, batch = self._ledger.base()
        key = (epoch, sample, self.batch_size)
        known = ask or key in self._counts or self._ledger.passes()
        if (batch or sample) and known and batch >= self._num_batches(epoch, sample):
            epoch, sample, batch = epoch + 1, 0, 0  # saved at an epoch's end: the next epoch
        return epoch, sample, batch

    def _next_pass(self, *, ask: bool) -> tuple[int, int, int]:
        """(epoch, sample, first batch) of the next pass of the main process."""
        epoch, sample, batch = self._base(ask=ask)
        passes = self._ledger.passes()
        return (epoch + passes, 0, 0) if passes else (epoch, sample, batch)

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
                self._stats.set_transport(grpc_transport(self._client.target, self.compression))
        return self._decision

    def describe(self) -> pb.DatasetInfo:
        """The dataset's length and fields, as the server reports them."""
        if self._info is None:
            self._info = self._client.describe(self.dataset)
        return self._info

    def __len__(self) -> int:
        """Batches of this rank's epoch under the current batch size, as the server plans it.

        Counted from where the batch size last changed or a checkpoint with
        another shape resumed (the batches left then); otherwise the whole epoch's.
        """
        epoch, sample, _ = self._position or self._next_pass(ask=True)
        return self._num_batches(epoch, sample)

    def _num_batches(self, epoch: int, sample: int = 0, batch_size: int = 0) -> int:
        # Asked of the server (CountBatches): exact for every sampler, dynamic batching included.
        batch_size = batch_size or self.batch_size
        key = (epoch, sample, batch_size)
        if key not in self._counts:
            if len(self._counts) >= _COUNTS_KEPT:
                self._counts.clear()
            # Under the streams' retry policy: a restart between epochs is an outage to sit out.
            try:
                self._counts[key] = call_with_retry(
                    lambda: self._count(epoch, sample, batch_size),
                    policy=self.retry,
                    what=f"counting the batches of {self._what(epoch, sample)}",
                )
            except ServerError as error:
                mismatch = self._mismatch(error)
                if mismatch is None:
                    raise
                raise mismatch from error
        return self._counts[key]

    def _count(self, epoch: int, sample: int, batch_size: int) -> int:
        self._known_fingerprint()  # the request carries it
        request = self.request(epoch, start_sample=sample, batch_size=batch_size)
        return self._client.count_batches(request).num_batches

    def request(
        self,
        epoch: int,
        start_batch: int = 0,
        *,
        batch_stride: int = 1,
        start_sample: int = 0,
        batch_size: int = 0,
    ) -> pb.StreamBatchesRequest:
        """The request for batches ``start_batch, start_batch + batch_stride, ...`` of ``epoch``,
        counted from sample ``start_sample`` (see NOTE [ Positions in samples ])."""
        return pb.StreamBatchesRequest(
            dataset=self.dataset,
            batch_size=batch_size or self.batch_size,
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
            start_sample=start_sample,
            fingerprint=self._fingerprint or "",
        )

    # -- position ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The position to resume from: the pass underway, else the next pass.

        ``{"epoch": e, "sample": s, "batch": b, "config": {...}}``: the next batch
        to stream is batch ``b`` of epoch ``e`` counted from sample ``s``, so
        ``s + b * batch_size`` samples of this rank's epoch were handed out
        (``"elastic"``: ``s + b * batch_size * world_size`` of the whole epoch);
        ``s`` is 0 unless the batch size changed during the epoch. Plain data, so
        it survives ``json`` and ``torch.save``. A position at an epoch's end is
        the next epoch's start.

        Inside a DataLoader worker the state is the worker's own (``b`` is the
        next batch of its share, and ``"worker": [id, num_workers]`` says so):
        what torchdata's ``StatefulDataLoader`` collects and hands back to the
        same worker on ``load_state_dict``.
        """
        worker = get_worker_info()
        if worker is not None:
            epoch, sample, batch = self._position or self._worker_next_pass(worker)
            state = {
                self.EPOCH_KEY: epoch,
                self.SAMPLE_KEY: sample,
                self.BATCH_KEY: batch,
                self.CONFIG_KEY: self._config(),
                self.WORKER_KEY: [worker.id, worker.num_workers],
            }
            if self._fingerprint:
                state[self.FINGERPRINT_KEY] = self._fingerprint
            return state
        # No call to the server here (it may be down while a trainer checkpoints):
        # when the epoch's length is not known yet, the next pass rolls over instead.
        epoch, sample, batch = self._position or self._next_pass(ask=False)
        if (batch or sample) and batch >= self._counts.get(
            (epoch, sample, self.batch_size), batch + 1
        ):
            epoch, sample, batch = epoch + 1, 0, 0
        state = {
            self.EPOCH_KEY: epoch,
            self.SAMPLE_KEY: sample,
            self.BATCH_KEY: batch,
            self.CONFIG_KEY: self._config(),
        }
        if self._fingerprint:
            state[self.FINGERPRINT_KEY] = self._fingerprint
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Makes the next pass continue at the position ``state`` records.

        A state saved with another batch size continues at the same sample (not
        for the ``"dynamic"`` sampler); with the ``"elastic"`` sampler, also one
        saved by another rank or with another world size (every rank loads the
        same state). States saved before positions counted samples (no
        ``"sample"``) load as before.

        The state's dataset fingerprint goes with the next requests: a server whose
        dataset changed since refuses them, and the pass raises ``FingerprintMismatch``.

        Raises:
            ValueError: ``state`` was saved by a dataset that streams other batches
                (another dataset, seed, rank, ...), by another DataLoader worker
                than this process, or is malformed.
        """
        try:
            epoch, batch, config = (
                state[self.EPOCH_KEY],
                state[self.BATCH_KEY],
                state[self.CONFIG_KEY],
            )
            sample = state.get(self.SAMPLE_KEY, 0)
        except (KeyError, TypeError, AttributeError):
            raise ValueError(
                f"state should be a RemoteDataset.state_dict() with keys "
                f"{[self.EPOCH_KEY, self.BATCH_KEY, self.CONFIG_KEY]}, but got {state!r}"
            ) from None
        numbers = (epoch, batch, sample)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise ValueError(
                f"state should hold non-negative integers, but got epoch={epoch!r}, "
                f"batch={batch!r}, sample={sample!r}"
            )
        saved_by, worker = state.get(self.WORKER_KEY), get_worker_info()
        sample, batch = self._check_config(config, sample, batch, worker_state=saved_by)
        here = None if worker is None else [worker.id, worker.num_workers]
        if saved_by is not None and list(saved_by) != here:
            raise ValueError(
                f"state was saved by DataLoader worker {saved_by[0]} of {saved_by[1]} and holds "
                f"that worker's share only, but this is "
                + ("the main process" if here is None else f"worker {here[0]} of {here[1]}")
                + "; resume it through the same loader (torchdata's StatefulDataLoader)"
            )
        fingerprint = state.get(self.FINGERPRINT_KEY)
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise ValueError(f"state's fingerprint should be a string, but got {fingerprint!r}")
        if fingerprint:
            self._fingerprint, self._fingerprint_from = fingerprint, CHECKPOINT
        if worker is not None and saved_by is not None:
            self._worker_resume = (epoch, sample, batch)
            self._ledger.restore_worker(worker.id, worker.num_workers, epoch)
        else:
            self._worker_resume = None
            self._ledger.rebase(epoch, batch, sample)

    def _check_config(
        self, config: Mapping[str, Any], sample: int, batch: int, *, worker_state: object
    ) -> tuple[int, int]:
        """Refuses a state of other settings; returns (sample, batch) for this dataset's shape."""
        if not isinstance(config, Mapping):
            raise ValueError(f"state's config should be a mapping, but got {config!r}")
        mine = self._config()
        refused = _position.refused_settings(
            config, mine, self._kind, worker=worker_state is not None
        )
        if refused:
            raise ValueError(
                "state was saved by a RemoteDataset with other settings, so resuming "
                "would skip or repeat samples: "
                + ", ".join(
                    f"{key}={config.get(key)!r} (this dataset: {mine[key]!r})" for key in refused
                )
            )
        if (config["batch_size"], config["world_size"]) != (self.batch_size, self.world_size):
            sample = self._consumed(
                sample, batch, batch_size=config["batch_size"], world_size=config["world_size"]
            )
            batch = 0
        return sample, batch

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
            epoch, sample, start = self._next_pass(ask=True)
            self._ledger.start_main_pass()
            stride = 1
        else:  # this DataLoader worker's share: w, w + k, ... (see NOTE in _ledger)
            self._warn_if_unshared()
            self.batch_size = self._ledger.batch_size() or self.batch_size  # persistent workers
            epoch, sample, start = self._worker_next_pass(worker, ask=True)
            self._ledger.start_worker_pass(worker.id)
            self._worker_resume, stride = None, worker.num_workers
        self._position = (epoch, sample, start)
        self._passes_begun += 1
        return self._pass(stride, self._passes_begun)

    def _worker_next_pass(self, worker: Any, *, ask: bool = False) -> tuple[int, int, int]:
        """(epoch, sample, first batch of this worker's share) of the worker's next pass."""
        if self._worker_resume is not None:  # the worker's own state: its share as saved
            return self._worker_resume
        number = self._ledger.worker_passes(worker.id)
        epoch, sample, batch = self._base(ask=ask)
        return (epoch + number, 0, worker.id) if number else (epoch, sample, batch + worker.id)

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

    def _pass(self, stride: int, number: int) -> Iterator[Any]:
        stats, clock = self._stats, time.perf_counter
        epoch, sample, start = self._position
        stats.begin(epoch)
        try:
            asked = clock()
            while True:  # one segment per batch size (set_batch_size starts the next)
                reshapes = self._reshapes
                batches = self._batches(epoch, sample, start, stride, self.batch_size)
                try:
                    for index, batch in batches:
                        self._position = (epoch, sample, index + stride)
                        got = clock()
                        stats.waited(got - asked)
                        yield batch
                        asked = clock()
                        stats.computed(asked - got)
                        if self._reshapes != reshapes:
                            break
                finally:
                    _close(batches)  # read-ahead of the old batch size is dropped
                if self._reshapes == reshapes:
                    break
                epoch, sample, start = self._position  # set_batch_size moved it
            stats.end()
        except GeneratorExit:
            raise  # the consumer stopped early: the next pass is the next epoch
        except BaseException as error:
            # The retry budget was spent, ...: iterating again resumes where this stopped.
            if get_worker_info() is None and self._position is not None:
                epoch, sample, batch = self._position
                self._ledger.rebase(epoch, batch, sample)
            mismatch = self._mismatch(error)
            if mismatch is not None:
                raise mismatch from error
            raise
        finally:
            if self._passes_begun == number:  # not a later pass's position
                self._position = None

    def _batches(
        self, epoch: int, sample: int, start: int, stride: int, batch_size: int
    ) -> Iterator[tuple[int, Any]]:
        what = self._what(epoch, sample)
        if self.streams == 1 and stride == 1 and start == 0:
            return self._share(epoch, sample, start, stride, batch_size, what)  # no need to count
        total = self._num_batches(epoch, sample, batch_size)
        if start >= total:  # a worker whose share was done when its state was saved
            return iter(())
        if self.streams == 1:
            return self._share(epoch, sample, start, stride, batch_size, what)
        # Split the share into `streams` interleaved ones; those that start past the
        # end are empty (and so are all after them), and the server refuses them.
        shares = [start + j * stride for j in range(self.streams)]
        shares = [s for s in shares if s < total]
        step = stride * self.streams
        if len(shares) <= 1:  # no thread for a single stream
            if not shares:
                return iter(())
            return self._share(epoch, sample, shares[0], step, batch_size, what)
        return merge_in_order(
            [
                lambda stop, s=s: self._share(epoch, sample, s, step, batch_size, what, stop)
                for s in shares
            ],
            buffer=self.buffer,
            name="stream",
        )

    def _what(self, epoch: int, sample: int = 0) -> str:
        where = f" from sample {sample}" if sample else ""
        return f"dataset {self.dataset!r} epoch {epoch}{where} rank {self.rank}/{self.world_size}"

    def _share(
        self,
        epoch: int,
        sample: int,
        start: int,
        stride: int,
        batch_size: int,
        what: str,
        stop: Stop | None = None,
    ) -> Iterator[tuple[int, Any]]:
        opened = 0

        def open_stream(first: int) -> Iterator[tuple[int, Any]]:
            nonlocal opened
            opened += 1
            if opened > 1:
                self._stats.reconnected()
            self._known_fingerprint()  # under the share's retry policy, as the stream
            request = self.request(
                epoch, first, batch_stride=stride, start_sample=sample, batch_size=batch_size
            )
            # After a reconnect the server may be another (or restarted): proven again.
            request.shared_memory_nonce = self._decide(again=opened > 1, stream=True).nonce
            report = self._stats.take_report()  # the previous pass, for the server's dashboard
            if report is not None:
                request.trainer_report.CopyFrom(report)
            return self._client.batches(request, self._stats, stop)

        return resuming_batches(
            open_stream,
            start=start,
            stride=stride,
            policy=self.retry,
            what=f"{what} batches {start}::{stride}",
            stop=stop,
            end=lambda: self._num_batches(epoch, sample, batch_size),
        )


def _close(batches: Iterator[Any]) -> None:
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def _sampler_spec(sampler: str | Mapping[str, Any] | None) -> pb.SamplerSpec | None:
    if sampler is None:
        return None
    if isinstance(sampler, str):
        return pb.SamplerSpec(kind=sampler)
    try:
        return pb.SamplerSpec(**sampler)
    except ValueError as exc:
        raise ValueError(f"sampler: {exc}") from None
