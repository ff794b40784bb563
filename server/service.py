"""The gRPC face of the server: a thin layer over the registry, the request planner and the pool.

``StreamBatches`` answers with pre-serialised frames (see ``batchwire.wire``),
so the method is registered by hand with a pass-through serializer instead of
through the generated ``add_BatchServiceServicer_to_server``. The wire format
is unchanged: every frame is a valid ``BatchChunk`` message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

from batchwire import wire
from batchwire.server.config import ServerConfig
from batchwire.server.pool import BuiltBatch, PoolClosed, WorkerPool
from batchwire.server.registry import DatasetEntry, DatasetRegistry, DescribeError
from batchwire.server.requests import InvalidRequest, plan_stream
from batchwire.v1 import batchwire_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAME = "batchwire.v1.BatchService"
_POLL_SECONDS = 0.25  # how often a stream waiting on a worker checks that its client is still there


class BatchService:
    """Implements ``batchwire.v1.BatchService``."""

    def __init__(self, registry: DatasetRegistry, pool: WorkerPool, settings: ServerConfig) -> None:
        self._registry = registry
        self._pool = pool
        self._settings = settings
        self._stream_slots = threading.BoundedSemaphore(settings.max_concurrent_streams)

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
            context.abort(grpc.StatusCode.INTERNAL, str(exc))
            raise  # unreachable: abort raises

    def stream_batches(
        self, request: pb.StreamBatchesRequest, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        entry = self._lookup(request.dataset, context)
        try:
            stream = plan_stream(
                request, length=entry.length, max_batch_size=self._settings.max_batch_size
            )
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self._stream_slots.acquire(blocking=False):
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server already has {self._settings.max_concurrent_streams} open streams "
                "(max_concurrent_streams); retry later",
            )
        started = time.monotonic()
        sent = {"batches": 0, "bytes": 0}
        status = "OK"
        try:
            yield from self._send(entry, stream.plan, stream.positions, context, sent)
        except BaseException as exc:
            status = type(exc).__name__
            raise
        finally:
            self._stream_slots.release()
            log.info(
                "stream end peer=%s dataset=%s batch_size=%d shuffle=%s seed=%d epoch=%d rank=%d/%d "
                "start=%d batches=%d bytes=%d seconds=%.3f status=%s",
                context.peer(),
                entry.name,
                request.batch_size,
                request.shuffle,
                request.seed,
                request.epoch,
                request.rank,
                request.world_size,
                request.start_batch,
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
    ) -> Iterator[bytes]:
        # Keep at most `prefetch_batches` batches in the pool per stream: bounded memory
        # while the client is slow, and batches are sent in order whatever finishes first.
        upcoming = iter(positions)
        pending: deque[tuple[int, Future[BuiltBatch]]] = deque()

        def refill() -> None:
            while len(pending) < self._settings.prefetch_batches:
                position = next(upcoming, None)
                if position is None:
                    return
                pending.append((position, self._pool.submit(entry.name, plan[position])))

        refill()
        while pending:
            position, future = pending.popleft()
            built = self._await(future, context)
            if built is None:
                return  # the client went away
            refill()
            header = built.header
            header.batch_index = position
            yield from wire.frames(header, built.payload, self._settings.chunk_bytes)
            sent["batches"] += 1
            sent["bytes"] += header.payload_size
            del built  # drop the shared-memory mapping before waiting on the next batch

    def _await(
        self, future: Future[BuiltBatch], context: grpc.ServicerContext
    ) -> BuiltBatch | None:
        while True:
            try:
                return future.result(timeout=_POLL_SECONDS)
            except FutureTimeout:
                if not context.is_active():
                    return None
            except PoolClosed as exc:
                context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except Exception as exc:
                context.abort(grpc.StatusCode.INTERNAL, str(exc))

    def _lookup(self, name: str, context: grpc.ServicerContext) -> DatasetEntry:
        entry = self._registry.get(name)
        if entry is None:
            known = ", ".join(self._registry.names())
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown dataset {name!r}; this server has: {known}"
            )
        return entry
