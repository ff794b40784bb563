"""The gRPC face of the server: a thin layer over the registry, the request planner and the pool.

``StreamBatches`` answers with pre-serialised frames (see ``batchwire.wire``),
so the method is registered by hand with a pass-through serializer instead of
through the generated ``add_BatchServiceServicer_to_server``. The wire format
is unchanged: every frame is a valid ``BatchChunk`` message.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from batchwire import compression
from batchwire.server.config import ServerConfig
from batchwire.server.metrics import Metrics
from batchwire.server.outbox import Outbox
from batchwire.server.pool import BatchFailed, BuiltBatch, PoolClosed, PoolFailed, WorkerPool
from batchwire.server.registry import DatasetEntry, DatasetRegistry, DescribeError
from batchwire.server.requests import InvalidRequest, StreamPlan, echo, plan_stream
from batchwire.v1 import batchwire_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = "batchwire.v1.BatchService"
_POLL_SECONDS = 0.25  # how often a stream waiting on a worker checks that its client is still there

MAX_BATCHES_PER_MESSAGE = 64
"""Most batches packed in one message, whatever a client accepts."""

TASK_BYTES = 1 << 20
TASK_SECONDS = 0.005
MAX_TASK_BATCHES = 16


def _group_size(batch_bytes: int, build_seconds: float | None) -> int:
    """Batches per worker task: one, or several small quick ones.

    A task costs about half a millisecond of fixed CPU across the pool and the
    worker (pipe messages, thread hand-offs, creating and mapping a payload
    file): as much as building a 200 KB batch (benchmarks/RESULTS.md, mnist).
    Batches that are small (``TASK_BYTES`` hold several) and quick to build
    (``TASK_SECONDS`` hold several, by the last task's build time) share a task;
    slow ones go one per task, so their first batch and their latency do not
    wait on a group. Until a build time is known, one per task.
    """
    if batch_bytes <= 0 or build_seconds is None:
        return 1
    by_bytes = TASK_BYTES // batch_bytes
    by_time = int(TASK_SECONDS / max(build_seconds, 1e-6))
    return max(1, min(MAX_TASK_BATCHES, by_bytes, by_time))


def _pool_failed(failure: str, position: int | None = None) -> str:
    where = "try" if position is None else f"resume at batch {position} on"
    return f"this server's worker pool has failed ({failure}); {where} another server"


class BatchService:
    """Implements ``batchwire.v1.BatchService``."""

    def __init__(
        self, registry: DatasetRegistry, pool: WorkerPool, settings: ServerConfig, metrics: Metrics
    ) -> None:
        self._registry = registry
        self._pool = pool
        self._settings = settings
        self._metrics = metrics
        self._stream_slots = threading.BoundedSemaphore(settings.max_concurrent_streams)
        self._stream_ids = itertools.count()
        self._active = 0
        self._active_lock = threading.Lock()
        self._open = threading.Event()  # set once the workers are warm
        self._drain_deadline: float | None = None

    @property
    def active_streams(self) -> int:
        with self._active_lock:
            return self._active

    def open(self) -> None:
        """Starts accepting streams (the server has finished starting)."""
        self._open.set()

    def begin_drain(self, grace: float) -> None:
        """Refuses new streams; open ones end with UNAVAILABLE once ``grace`` seconds pass.

        See NOTE [ Graceful shutdown ] in app.py.
        """
        self._drain_deadline = time.monotonic() + grace

    def _drain_due(self) -> bool:
        deadline = self._drain_deadline
        return deadline is not None and time.monotonic() >= deadline

    def _check_drain(self, context: grpc.ServicerContext, position: int) -> None:
        if self._drain_due():
            self._abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                f"the server is shutting down; resume at batch {position} on another server",
            )

    def _abort(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        self._metrics.errors.labels(code.name).inc()
        context.abort(code, message)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "ListDatasets": grpc.unary_unary_rpc_method_handler(
                    self.list_datasets,
                    request_deserializer=pb.ListDatasetsRequest.FromString,
                    response_serializer=pb.ListDatasetsResponse.SerializeToString,
                ),
                "DescribeDataset": grpc.unary_unary_rpc_method_handler(
                    self.describe_dataset,
                    request_deserializer=pb.DescribeDatasetRequest.FromString,
                    response_serializer=pb.DatasetInfo.SerializeToString,
                ),
                "CountBatches": grpc.unary_unary_rpc_method_handler(
                    self.count_batches,
                    request_deserializer=pb.StreamBatchesRequest.FromString,
                    response_serializer=pb.BatchCount.SerializeToString,
                ),
                "StreamBatches": grpc.unary_stream_rpc_method_handler(
                    self.stream_batches,
                    request_deserializer=pb.StreamBatchesRequest.FromString,
                    response_serializer=None,  # frames are already bytes
                ),
            },
        )

    def list_datasets(
        self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext
    ) -> pb.ListDatasetsResponse:
        infos = []
        for name in self._registry.names():
            entry = self._registry.entries[name]
            try:
                infos.append(entry.info())
            except DescribeError:
                infos.append(pb.DatasetInfo(name=name, length=entry.length, source=entry.source))
        return pb.ListDatasetsResponse(datasets=infos)

    def describe_dataset(
        self, request: pb.DescribeDatasetRequest, context: grpc.ServicerContext
    ) -> pb.DatasetInfo:
        entry = self._lookup(request.dataset, context)
        try:
            return entry.info()
        except DescribeError as exc:
            self._abort(context, grpc.StatusCode.INTERNAL, str(exc))
            raise  # unreachable: abort raises

    def count_batches(
        self, request: pb.StreamBatchesRequest, context: grpc.ServicerContext
    ) -> pb.BatchCount:
        _, stream = self._plan(request, context)
        return pb.BatchCount(
            num_batches=len(stream.plan),
            num_samples=len(stream.plan.indices),
            sampler=stream.sampler,
        )

    def stream_batches(
        self, request: pb.StreamBatchesRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        entry, stream = self._plan(request, context)
        try:
            compression.check_codec(request.compression)
        except compression.CompressionError as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"compression: {exc}")
        if not self._open.is_set():
            self._abort(
                context, grpc.StatusCode.UNAVAILABLE, "the server is starting; retry shortly"
            )
        if self._drain_deadline is not None:
            self._abort(
                context,
                grpc.StatusCode.UNAVAILABLE,
                "the server is shutting down; try another server",
            )
        failure = self._pool.failure
        if failure is not None:
            self._abort(context, grpc.StatusCode.UNAVAILABLE, _pool_failed(failure))
        if not self._stream_slots.acquire(blocking=False):
            self._abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server already has {self._settings.max_concurrent_streams} open streams "
                "(max_concurrent_streams); retry later",
            )
        stream_id = str(next(self._stream_ids))
        parameters = (
            f"peer={context.peer()} stream={stream_id} dataset={entry.name} "
            f"batch_size={request.batch_size} shuffle={request.shuffle} seed={request.seed} "
            f"epoch={request.epoch} rank={request.rank}/{request.world_size} "
            f"drop_last={request.drop_last} start={request.start_batch} end={request.end_batch} "
            f"stride={request.batch_stride}"
        )
        log.info("stream start %s", parameters)
        with self._active_lock:
            self._active += 1
        self._metrics.active_streams.inc()
        started = time.monotonic()
        sent = {"batches": 0, "bytes": 0}
        status = "OK"
        try:
            yield from self._send(
                entry,
                stream.plan,
                stream.positions,
                context,
                sent,
                stream_id,
                request.compression,
                min(request.max_batches_per_message, MAX_BATCHES_PER_MESSAGE),
            )
            if not context.is_active():
                status = "CANCELLED"
        except GeneratorExit:
            status = "CANCELLED"  # the client went away mid-stream
            raise
        except BaseException:
            code = context.code()
            if isinstance(code, grpc.StatusCode):
                status = code.name  # set by _abort, which counted it
            else:
                status = "UNKNOWN"  # an unexpected exception; grpc answers UNKNOWN
                self._metrics.errors.labels(status).inc()
                log.exception("stream %s failed", stream_id)
            raise
        finally:
            self._stream_slots.release()
            with self._active_lock:
                self._active -= 1
            self._metrics.active_streams.dec()
            with contextlib.suppress(KeyError):
                self._metrics.queue_depth.remove(stream_id)
            log.info(
                "stream end %s batches=%d bytes=%d seconds=%.3f status=%s",
                parameters,
                sent["batches"],
                sent["bytes"],
                time.monotonic() - started,
                status,
            )

    def _send(
        self,
        entry: DatasetEntry,
        plan,
        positions: range,
        context: grpc.ServicerContext,
        sent: dict[str, int],
        stream_id: str,
        codec: int = pb.NONE,
        per_message: int = 1,
    ) -> Iterator[bytes]:
        # Keep about `prefetch_batches` batches in the pool per stream: bounded memory
        # while the client is slow, and batches are sent in order whatever finishes first.
        # Small batches go to the workers a few per task (see `_group_size`).
        batch_bytes = self._batch_bytes(entry, plan, positions)
        group = 1  # batches per task; grows for small quick batches once one is timed
        upcoming = iter(positions)
        pending: deque[tuple[list[int], Future[list[BuiltBatch]]]] = deque()
        metrics = self._metrics
        depth = metrics.queue_depth.labels(stream_id)
        # Labelled children looked up once per stream, not per batch.
        build_seconds = metrics.build_seconds.labels(entry.name)
        batches_sent = metrics.batches_sent.labels(entry.name)
        bytes_sent = metrics.bytes_sent.labels(entry.name)

        def on_sent(header: pb.BatchHeader) -> None:
            sent["batches"] += 1
            sent["bytes"] += header.payload_size
            batches_sent.inc()
            bytes_sent.inc(header.payload_size)

        outbox = Outbox(self._settings.chunk_bytes, per_message, on_sent)

        def refill() -> None:
            # prefetch_batches bounds single batches; grouped small ones keep 2 tasks going
            max_tasks = max(1 if group == 1 else 2, -(-self._settings.prefetch_batches // group))
            while len(pending) < max_tasks:
                task_positions = list(itertools.islice(upcoming, group))
                if not task_positions:
                    return
                task = self._pool.submit(
                    entry.name,
                    [plan[position] for position in task_positions],
                    seed=plan.seed,
                    epoch=plan.epoch,
                )
                pending.append((task_positions, task))

        try:
            refill()
            while pending:
                task_positions, future = pending.popleft()
                self._check_drain(context, task_positions[0])
                outcome = self._await(future, context, task_positions[0])
                if outcome is None:
                    future.cancel()
                    return  # the client went away
                built_batches, failure = outcome
                del outcome  # else it keeps this task's mapping alive through the next wait
                if built_batches:
                    build_time = sum(b.build_seconds for b in built_batches) / len(built_batches)
                    group = _group_size(batch_bytes, build_time)
                refill()
                depth.set(sum(len(p) for p, f in pending if f.done()))
                # Fewer built than asked when one failed: those before it still go out.
                for position, built in zip(task_positions, built_batches, strict=False):
                    if self._drain_due():
                        yield from outbox.flush()  # what is packed goes out before the abort
                        self._check_drain(context, position)
                    header = built.header
                    header.batch_index = position
                    build_seconds.observe(built.build_seconds)
                    metrics.worker_busy.inc(built.build_seconds)
                    if header.payload_size > self._settings.max_batch_bytes:
                        yield from outbox.flush()
                        del built  # no mapping may stay in an abort's traceback
                        built_batches.clear()
                        self._abort(
                            context,
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"batch {position} of dataset {entry.name!r} has "
                            f"{header.payload_size} bytes, over the server's "
                            f"max_batch_bytes={self._settings.max_batch_bytes}; "
                            "ask for a smaller batch_size",
                        )
                    # Compressed here, in the stream's thread: lz4/zstd release the GIL, and
                    # this keeps the worker protocol codec-free (benchmarks/RESULTS.md).
                    payload = compression.compress_batch(header, built.payload, codec)
                    yield from outbox.add(header, payload)
                    # Drop the shared-memory mapping (payload may be that very view) before
                    # waiting on the next batch.
                    del built, payload
                yield from outbox.flush()
                # The future (and a failure) hold this very list: emptied, no mapping of a
                # sent batch outlives the send, even in an abort's traceback.
                built_batches.clear()
                if failure is not None:
                    self._abort(context, grpc.StatusCode.INTERNAL, str(failure))
        finally:
            # The stream is over (finished, cancelled, aborted): batches not yet handed
            # to a worker are dropped instead of built for nobody.
            for _, future in pending:
                future.cancel()
            # Done ones hold mapped batches, and grpc may keep an abort's traceback (this
            # frame) until its thread takes the next call: their files stayed in /dev/shm.
            pending.clear()

    def _await(
        self, future: Future[list[BuiltBatch]], context: grpc.ServicerContext, position: int
    ) -> tuple[list[BuiltBatch], BatchFailed | None] | None:
        """The task's batches and, if one failed, why; None if the client went away."""
        while True:
            try:
                return future.result(timeout=_POLL_SECONDS), None
            except FutureTimeout:
                if not context.is_active():
                    return None
                self._check_drain(context, position)
            except BatchFailed as exc:
                return exc.built, exc
            except PoolClosed:
                self._abort(
                    context,
                    grpc.StatusCode.UNAVAILABLE,
                    f"the server is shutting down; resume at batch {position} on another server",
                )
            except PoolFailed as exc:
                self._abort(context, grpc.StatusCode.UNAVAILABLE, _pool_failed(str(exc), position))
            except Exception as exc:
                self._abort(context, grpc.StatusCode.INTERNAL, str(exc))

    def _batch_bytes(self, entry: DatasetEntry, plan, positions: range) -> int:
        """Estimated payload bytes of the stream's first batch (0: unknown)."""
        if not positions:
            return 0
        return (entry.sample_bytes() or 0) * len(plan[positions[0]])

    def _plan(
        self, request: pb.StreamBatchesRequest, context: grpc.ServicerContext
    ) -> tuple[DatasetEntry, StreamPlan]:
        """The dataset and the batch positions a request asks for; aborts on a bad request."""
        entry = self._lookup(request.dataset, context)
        try:
            stream = plan_stream(
                request,
                length=entry.length,
                max_batch_size=self._settings.max_batch_size,
                sampler=entry.dataset.sampler,
            )
        except InvalidRequest as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a planning bug or a MemoryError: this call fails, not the server
            log.exception("planning %s failed", request.dataset)
            self._abort(context, grpc.StatusCode.INTERNAL, f"cannot plan the request: {exc!r}")
        self._check_batch_bytes(entry, stream, context)
        return entry, stream

    def _check_batch_bytes(
        self, entry: DatasetEntry, stream: StreamPlan, context: grpc.ServicerContext
    ) -> None:
        # Refuse before any worker builds (and /dev/shm holds) a batch that will be
        # refused anyway; the check after building still catches variable-size items.
        estimate = self._batch_bytes(entry, stream.plan, stream.positions)
        if estimate > self._settings.max_batch_bytes:
            samples = len(stream.plan[stream.positions[0]])
            self._abort(
                context,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a batch of {samples} samples of dataset {entry.name!r} would have about "
                f"{estimate} bytes ({estimate // samples} per sample), over the server's "
                f"max_batch_bytes={self._settings.max_batch_bytes}; ask for a smaller batch_size",
            )

    def _lookup(self, name: str, context: grpc.ServicerContext) -> DatasetEntry:
        entry = self._registry.get(name)
        if entry is None:
            known = ", ".join(self._registry.names())
            self._abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"unknown dataset {echo(name)}; this server has: {known}",
            )
        return entry
