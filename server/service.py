"""The gRPC face of the server: a thin layer over the registry, the request planner and the executor.

``StreamBatches`` answers with pre-serialised frames (see ``batchwire.wire``),
so the method is registered by hand with a pass-through serializer instead of
through the generated ``add_BatchServiceServicer_to_server``. The wire format
is unchanged: every frame is a valid ``BatchChunk`` message.

The methods run on the ``grpc.aio`` server's event loop (see NOTE [ The event
loop ] in app.py): a stream holds no thread while it waits on the executor or on
its client, and anything that may block (planning, describing a dataset,
compressing) runs in a bounded thread pool, one for streams and one for the
unary calls, so neither can take the other's threads.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn, TypeVar

import grpc

from batchwire import compression
from batchwire.server.config import ServerConfig
from batchwire.server.executor import (
    BuildError,
    BuiltBatch,
    Executor,
    ExecutorClosed,
    ExecutorFailed,
    Unavailable,
)
from batchwire.server.metrics import Metrics, StreamMeter
from batchwire.server.registry import DatasetEntry, DatasetRegistry, DescribeError
from batchwire.server.requests import InvalidRequest, StreamPlan, echo, plan_stream
from batchwire.server.shared_builds import SharedBuilds
from batchwire.server.shm_delivery import SharedMemory, SharedStream
from batchwire.server.stream import (
    BatchStream,
    BatchTooLarge,
    Draining,
    StreamHooks,
    StreamLimits,
    StreamStopped,
)
from batchwire.v1 import batchwire_pb2 as pb

TRANSIENT_KEY = "batchwire-transient"
"""Trailing metadata of a refusal that passes (the stream limit); see the .proto."""

log = logging.getLogger(__name__)

SERVICE_NAME = "batchwire.v1.BatchService"

CALL_THREADS = 4
"""Threads for the unary calls' blocking work (planning, describing); more calls queue."""
STREAM_SPARE_THREADS = 4
"""Threads for streams' blocking work beyond one per allowed stream."""

_T = TypeVar("_T")

MAX_BATCHES_PER_MESSAGE = 64
"""Most batches packed in one message, whatever a client accepts."""

FAILURE_STATUS: dict[type[BaseException], grpc.StatusCode] = {
    Unavailable: grpc.StatusCode.UNAVAILABLE,  # closed, failed, draining: resume elsewhere
    BatchTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    BuildError: grpc.StatusCode.INTERNAL,  # a batch failed, crashed its worker, timed out
}
"""The status a stream ends with, by the type of what stopped it (the first match in its
MRO); anything else (an executor's bug) is INTERNAL."""


def failure_status(failure: BaseException, position: int) -> tuple[grpc.StatusCode, str]:
    """The status and message that end a stream stopped by ``failure`` at batch ``position``."""
    code = next(
        (FAILURE_STATUS[kind] for kind in type(failure).__mro__ if kind in FAILURE_STATUS),
        grpc.StatusCode.INTERNAL,
    )
    if isinstance(failure, ExecutorFailed):
        return code, _executor_failed(str(failure), position)
    if isinstance(failure, ExecutorClosed | Draining):
        return code, f"the server is shutting down; resume at batch {position} on another server"
    return code, str(failure)


def _executor_failed(failure: str, position: int | None = None) -> str:
    where = "try" if position is None else f"resume at batch {position} on"
    return f"this server cannot build batches ({failure}); {where} another server"


class Refused(Exception):
    """Ends the call with ``code``; raised by the checks, turned into the status by the method."""

    def __init__(
        self, code: grpc.StatusCode, message: str, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.metadata = metadata  # trailing metadata for clients to read (not to parse messages)


class BatchService:
    """Implements ``batchwire.v1.BatchService`` with async methods (see the module docstring)."""

    def __init__(
        self,
        registry: DatasetRegistry,
        executor: Executor,
        settings: ServerConfig,
        metrics: Metrics,
    ) -> None:
        self._registry = registry
        self._executor = executor
        # Streams build through it: identical batches of concurrent streams are built once.
        self._builds = SharedBuilds(
            executor,
            on_shared=lambda dataset: metrics.shared_batches.labels(dataset).inc(),
            held_bytes=settings.shared_builds_bytes,
        )
        for name in registry.names():  # a series per dataset from the start, at 0
            metrics.shared_batches.labels(name)
        self._settings = settings
        self._metrics = metrics
        self.replica = ""  # "HOSTNAME:PORT", set once bound: names this server in DatasetInfo
        self._stream_slots = threading.BoundedSemaphore(settings.max_concurrent_streams)
        self._stream_ids = itertools.count()
        self._active = 0
        self._active_lock = threading.Lock()
        self._open = threading.Event()  # set once the workers are warm
        self._drain_deadline: float | None = None
        self._call_threads = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="batchwire-call")
        self._stream_threads = ThreadPoolExecutor(
            settings.max_concurrent_streams + STREAM_SPARE_THREADS,
            thread_name_prefix="batchwire-stream",
        )
        self._shm = SharedMemory(settings.shm_dir, settings.shm_group)

    def close(self) -> None:
        """Drops blocking work not yet started (the server has stopped)."""
        for threads in (self._call_threads, self._stream_threads):
            threads.shutdown(wait=False, cancel_futures=True)
        self._shm.close()

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

    def _refuse(
        self, code: grpc.StatusCode, message: str, metadata: tuple[tuple[str, str], ...] = ()
    ) -> NoReturn:
        """Counts the error and raises ``Refused``; the method ends the call with it."""
        self._metrics.errors.labels(code.name).inc()
        raise Refused(code, message, metadata)

    async def _blocking(
        self,
        threads: ThreadPoolExecutor,
        context: grpc.aio.ServicerContext,
        function: Callable[..., _T],
        *args: object,
    ) -> _T:
        """``function(*args)`` in ``threads``; a ``Refused`` ends the call with its status."""
        try:
            return await asyncio.get_running_loop().run_in_executor(threads, function, *args)
        except Refused as refused:
            await context.abort(refused.code, refused.message, refused.metadata)
            raise  # unreachable: abort raises

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
                "SharedMemoryOffer": grpc.unary_unary_rpc_method_handler(
                    self.shared_memory_offer,
                    request_deserializer=pb.SharedMemoryOfferRequest.FromString,
                    response_serializer=pb.SharedMemoryOfferResponse.SerializeToString,
                ),
                "StreamBatches": grpc.unary_stream_rpc_method_handler(
                    self.stream_batches,
                    request_deserializer=pb.StreamBatchesRequest.FromString,
                    response_serializer=None,  # frames are already bytes
                ),
            },
        )

    async def list_datasets(
        self, request: pb.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDatasetsResponse:
        return await self._blocking(self._call_threads, context, self._list_datasets)

    async def describe_dataset(
        self, request: pb.DescribeDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.DatasetInfo:
        return await self._blocking(self._call_threads, context, self._describe, request.dataset)

    async def count_batches(
        self, request: pb.StreamBatchesRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchCount:
        _, stream = await self._blocking(self._call_threads, context, self._plan, request)
        return pb.BatchCount(
            num_batches=len(stream.plan),
            num_samples=len(stream.plan.indices),
            sampler=stream.sampler,
        )

    async def shared_memory_offer(
        self, request: pb.SharedMemoryOfferRequest, context: grpc.aio.ServicerContext
    ) -> pb.SharedMemoryOfferResponse:
        return await self._blocking(self._call_threads, context, self._shm.offer)

    def _list_datasets(self) -> pb.ListDatasetsResponse:
        infos = []
        for name in self._registry.names():
            entry = self._registry.entries[name]
            try:
                infos.append(self._info(entry))
            except DescribeError:
                infos.append(
                    pb.DatasetInfo(
                        name=name,
                        length=entry.length,
                        source=entry.source,
                        fingerprint=entry.fingerprint,
                        replica=self.replica,
                    )
                )
        return pb.ListDatasetsResponse(datasets=infos)

    def _describe(self, name: str) -> pb.DatasetInfo:
        entry = self._lookup(name)
        try:
            return self._info(entry)
        except DescribeError as exc:
            self._refuse(grpc.StatusCode.INTERNAL, str(exc))

    def _info(self, entry: DatasetEntry) -> pb.DatasetInfo:
        info = pb.DatasetInfo()
        info.CopyFrom(entry.info())  # the entry's own is shared and cached
        info.replica = self.replica
        return info

    async def stream_batches(
        self, request: pb.StreamBatchesRequest, context: grpc.aio.ServicerContext
    ) -> None:
        # Writes with context.write rather than yielding: a cancelled call (the client
        # went away) raises CancelledError right here, so the slot and the executor's
        # pending tasks are given back at once, not when a generator is collected.
        entry, stream = await self._blocking(self._stream_threads, context, self._plan, request)
        try:
            self._admit(request)
        except Refused as refused:
            await context.abort(refused.code, refused.message, refused.metadata)
        stream_id = str(next(self._stream_ids))
        if request.HasField("trainer_report"):
            report = request.trainer_report
            self._metrics.trainer_reported(entry.name, report.wait_seconds, report.compute_seconds)
        parameters = (
            f"peer={context.peer()} stream={stream_id} dataset={entry.name} "
            f"batch_size={request.batch_size} shuffle={request.shuffle} seed={request.seed} "
            f"epoch={request.epoch} rank={request.rank}/{request.world_size} "
            f"drop_last={request.drop_last} sample={request.start_sample} "
            f"start={request.start_batch} end={request.end_batch} "
            f"stride={request.batch_stride}"
        )
        shared = self._shm.accepts(request.shared_memory_nonce)  # the client proved it maps ours
        if shared:
            parameters += " transport=shm"
        log.info("stream start %s", parameters)
        with self._active_lock:
            self._active += 1
        meter = self._metrics.open_stream(
            stream_id,
            entry.name,
            context.peer(),
            "none" if shared else pb.Compression.Name(request.compression).lower(),
            "shm" if shared else "",
        )
        started = time.monotonic()
        sent = {"batches": 0, "bytes": 0}
        status = "OK"
        try:
            await self._stream(entry, stream, request, context, sent, meter, shared=shared)
        except Refused as refused:
            status = refused.code.name  # counted by _refuse
            await context.abort(refused.code, refused.message, refused.metadata)
        except asyncio.CancelledError:
            status = "CANCELLED"  # the client went away mid-stream, or the server stopped
            raise
        except BaseException:
            status = "UNKNOWN"  # an unexpected exception; grpc answers UNKNOWN
            self._metrics.errors.labels(status).inc()
            log.exception("stream %s failed", stream_id)
            raise
        finally:
            self._stream_slots.release()
            with self._active_lock:
                self._active -= 1
            meter.close()
            log.info(
                "stream end %s batches=%d bytes=%d seconds=%.3f status=%s",
                parameters,
                sent["batches"],
                sent["bytes"],
                time.monotonic() - started,
                status,
            )

    def _admit(self, request: pb.StreamBatchesRequest) -> None:
        """Takes a stream slot, or refuses the stream (bad codec, starting, draining, full)."""
        try:
            compression.check_codec(request.compression)
        except compression.CompressionError as exc:
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT, f"compression: {exc}")
        if not self._open.is_set():
            self._refuse(grpc.StatusCode.UNAVAILABLE, "the server is starting; retry shortly")
        if self._drain_deadline is not None:
            self._refuse(
                grpc.StatusCode.UNAVAILABLE, "the server is shutting down; try another server"
            )
        failure = self._executor.failure
        if failure is not None:
            self._refuse(grpc.StatusCode.UNAVAILABLE, _executor_failed(failure))
        if not self._stream_slots.acquire(blocking=False):
            self._refuse(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server already has {self._settings.max_concurrent_streams} open streams "
                "(max_concurrent_streams); retry later",
                # Unlike a batch over max_batch_bytes, this passes: clients back off and retry.
                ((TRANSIENT_KEY, "stream-limit"),),
            )

    async def _stream(
        self,
        entry: DatasetEntry,
        stream: StreamPlan,
        request: pb.StreamBatchesRequest,
        context: grpc.aio.ServicerContext,
        sent: dict[str, int],
        meter: StreamMeter,
        *,
        shared: bool = False,
    ) -> None:
        """Runs the stream's ``BatchStream``; a failure that stops it becomes ``Refused``.

        ``shared``: payloads go as shared-memory handles (see ``shm_delivery``).
        """

        def on_built(built: BuiltBatch) -> None:
            if (
                not built.shared
            ):  # a shared copy's build was counted by the stream that got it first
                meter.built(built.build_seconds)

        def on_sent(header: pb.BatchHeader) -> None:
            sent["batches"] += 1
            sent["bytes"] += header.payload_size
            meter.sent(header.payload_size)

        codec = request.compression

        async def compress(header: pb.BatchHeader, payload: memoryview) -> object:
            # In a stream thread, off the event loop: lz4/zstd release the GIL, and
            # this keeps the executors codec-free (benchmarks/RESULTS.md).
            return await asyncio.get_running_loop().run_in_executor(
                self._stream_threads, compression.compress_batch, header, payload, codec
            )

        limits = StreamLimits(
            prefetch_batches=self._settings.prefetch_batches,
            chunk_bytes=self._settings.chunk_bytes,
            max_batch_bytes=self._settings.max_batch_bytes,
            per_message=min(request.max_batches_per_message, MAX_BATCHES_PER_MESSAGE),
        )
        handles: SharedStream | None = None
        if shared:
            try:
                handles = self._shm.stream(limits.prefetch_batches, limits.chunk_bytes)
            except OSError as exc:  # /dev/shm full, ...: this stream's payloads go as bytes
                log.warning(
                    "no shared-memory release board for a %s stream (%s): bytes", entry.name, exc
                )
        hooks = StreamHooks(
            shared=handles,
            write=context.write,
            compress=compress if codec != pb.NONE else None,
            draining=self._drain_due,
            on_built=on_built,
            on_sent=on_sent,
            on_depth=meter.set_depth,
            on_waited=meter.waited,
        )
        builds = self._builds.stream(stream.plan, stream.positions)
        batches = BatchStream(
            builds,
            entry.name,
            stream.plan,
            stream.positions,
            limits,
            hooks,
            batch_bytes=self._batch_bytes(entry, stream.plan, stream.positions),
        )
        try:
            await batches.run()
            if handles is not None:
                await handles.finish(self._drain_due)  # every handle mapped before the end
        except StreamStopped as stopped:
            code, message = failure_status(stopped.failure, stopped.position)
            if handles is not None:
                await handles.finish(self._drain_due)  # the batches before the failure arrive
            self._refuse(code, message)
        finally:
            builds.close()  # what was held for this stream alone goes
            if handles is not None:
                handles.close()

    def _batch_bytes(self, entry: DatasetEntry, plan, positions: range) -> int:
        """Estimated payload bytes of the stream's first batch (0: unknown)."""
        if not positions:
            return 0
        return (entry.sample_bytes() or 0) * len(plan[positions[0]])

    def _plan(self, request: pb.StreamBatchesRequest) -> tuple[DatasetEntry, StreamPlan]:
        """The dataset and the batch positions a request asks for; refuses a bad request."""
        entry = self._lookup(request.dataset)
        self._check_fingerprint(entry, request.fingerprint)
        try:
            stream = plan_stream(
                request,
                length=entry.length,
                max_batch_size=self._settings.max_batch_size,
                sampler=entry.dataset.sampler,
            )
        except InvalidRequest as exc:
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a planning bug or a MemoryError: this call fails, not the server
            log.exception("planning %s failed", request.dataset)
            self._refuse(grpc.StatusCode.INTERNAL, f"cannot plan the request: {exc!r}")
        self._check_batch_bytes(entry, stream)
        return entry, stream

    def _check_fingerprint(self, entry: DatasetEntry, expected: str) -> None:
        """Refuses a client whose batches so far came from another config of the dataset."""
        if expected and expected != entry.fingerprint:
            shown = expected if len(expected) <= 100 else echo(expected)
            self._refuse(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"dataset {entry.name!r} on {self.replica or 'this server'} has fingerprint "
                f"{entry.fingerprint}, but the request expects {shown}: this server's "
                "config of the dataset differs from the one the client's batches came from "
                "(another replica, or a checkpoint), so its batches would differ",
                (
                    ("batchwire-fingerprint", entry.fingerprint),
                    ("batchwire-replica", self.replica),
                ),
            )

    def _check_batch_bytes(self, entry: DatasetEntry, stream: StreamPlan) -> None:
        # Refuse before any worker builds (and /dev/shm holds) a batch that will be
        # refused anyway; the check after building still catches variable-size items.
        estimate = self._batch_bytes(entry, stream.plan, stream.positions)
        if estimate > self._settings.max_batch_bytes:
            samples = len(stream.plan[stream.positions[0]])
            self._refuse(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"a batch of {samples} samples of dataset {entry.name!r} would have about "
                f"{estimate} bytes ({estimate // samples} per sample), over the server's "
                f"max_batch_bytes={self._settings.max_batch_bytes}; ask for a smaller batch_size",
            )

    def _lookup(self, name: str) -> DatasetEntry:
        entry = self._registry.get(name)
        if entry is None:
            known = ", ".join(self._registry.names())
            self._refuse(
                grpc.StatusCode.NOT_FOUND,
                f"unknown dataset {echo(name)}; this server has: {known}",
            )
        return entry
