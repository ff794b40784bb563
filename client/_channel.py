"""gRPC channels and calls to a batchwire server, one channel per process and target."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import Protocol

import grpc

from batchwire import compression, wire
from batchwire.client import _credentials
from batchwire.client._errors import ServerError
from batchwire.client._retry import StreamCutShort
from batchwire.v1 import batchwire_pb2 as pb

_SERVICE = "/batchwire.v1.BatchService/"
_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", 4 << 20),
    # Large windows keep multi-MiB chunks flowing at full speed over loopback and LAN.
    ("grpc.http2.lookahead_bytes", 16 << 20),
]

# Keepalive pings find a server host that vanished without a TCP reset (partition,
# power loss): without them a stream would wait for its next chunk forever. The
# server accepts pings every 5 s or more (server/app.py), with or without data.
KEEPALIVE_SECONDS_ENV = "BATCHWIRE_KEEPALIVE_SECONDS"
KEEPALIVE_TIMEOUT_SECONDS_ENV = "BATCHWIRE_KEEPALIVE_TIMEOUT_SECONDS"
KEEPALIVE_SECONDS = 20.0
KEEPALIVE_TIMEOUT_SECONDS = 10.0

_lock = threading.Lock()
_channels: dict[tuple[object, ...], grpc.Channel] = {}


def _seconds(variable: str, default: float) -> float:
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{variable} should be a positive number of seconds, but got {raw!r}")
    return value


def keepalive_options() -> tuple[tuple[str, int], ...]:
    """Ping the server after ``BATCHWIRE_KEEPALIVE_SECONDS`` (20) of silence; drop the
    connection (a retryable UNAVAILABLE) when no answer comes within
    ``BATCHWIRE_KEEPALIVE_TIMEOUT_SECONDS`` (10)."""
    every = _seconds(KEEPALIVE_SECONDS_ENV, KEEPALIVE_SECONDS)
    timeout = _seconds(KEEPALIVE_TIMEOUT_SECONDS_ENV, KEEPALIVE_TIMEOUT_SECONDS)
    return (
        ("grpc.keepalive_time_ms", int(every * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout * 1000)),
        # grpc core (1.85) times a keepalive ping out by this one, not by the
        # keepalive timeout (grpc/grpc#39239); its default is a minute.
        ("grpc.http2.ping_timeout_ms", int(timeout * 1000)),
        # A stream's client sends no data after its request; without this, grpc
        # stops pinging after two pings and a long stall goes unnoticed again.
        ("grpc.http2.max_pings_without_data", 0),
    )


def channel(target: str) -> grpc.Channel:
    """The shared channel to ``target`` for this process (a forked child makes its own).

    TLS and token settings come from the environment (see ``_credentials``), and so
    do the keepalive settings (see ``keepalive_options``).
    """
    keepalive = keepalive_options()
    key = (os.getpid(), target, _credentials.environment(), keepalive)
    with _lock:
        if key not in _channels:
            _channels[key] = _credentials.open_channel(target, [*_OPTIONS, *keepalive])
        return _channels[key]


class BatchObserver(Protocol):
    def batch(self, header: pb.BatchHeader, decode_seconds: float) -> None: ...


class BatchClient:
    """Typed calls to one server; errors become ``ServerError``."""

    def __init__(self, target: str, *, timeout: float = 30.0) -> None:
        self.target = target
        self.timeout = timeout

    def _unary(self, method: str, request, response_type, *, wait_for_ready: bool = True):
        call = channel(self.target).unary_unary(
            _SERVICE + method,
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        try:
            return call(request, timeout=self.timeout, wait_for_ready=wait_for_ready)
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error, self.target) from None

    def list_datasets(self) -> list[pb.DatasetInfo]:
        return list(
            self._unary("ListDatasets", pb.ListDatasetsRequest(), pb.ListDatasetsResponse).datasets
        )

    def describe(self, dataset: str) -> pb.DatasetInfo:
        return self._unary(
            "DescribeDataset", pb.DescribeDatasetRequest(dataset=dataset), pb.DatasetInfo
        )

    def count_batches(self, request: pb.StreamBatchesRequest) -> pb.BatchCount:
        """Batches and samples of ``request``'s epoch (for every sampler kind).

        Fails fast (UNAVAILABLE) while the server is down, as a stream does, so
        that the caller's ``RetryPolicy`` rather than ``timeout`` bounds the wait.
        """
        return self._unary("CountBatches", request, pb.BatchCount, wait_for_ready=False)

    def stream(self, request: pb.StreamBatchesRequest) -> grpc.Call:
        """Opens a StreamBatches call; iterate it for ``wire.Chunk`` objects.

        Unless the request says otherwise, small batches may arrive packed several
        to a message (``wire.BatchAssembler.feed`` unpacks them).
        """
        if not request.max_batches_per_message:
            packed = pb.StreamBatchesRequest()
            packed.CopyFrom(request)
            packed.max_batches_per_message = wire.MAX_BATCHES_PER_MESSAGE
            request = packed
        call = channel(self.target).unary_stream(
            _SERVICE + "StreamBatches",
            request_serializer=pb.StreamBatchesRequest.SerializeToString,
            response_deserializer=wire.parse_chunk,
        )
        return call(request)

    def batches(
        self, request: pb.StreamBatchesRequest, observer: BatchObserver | None = None
    ) -> Iterator[tuple[int, object]]:
        """Yields ``(batch_index, batch)`` for one stream; raises ``ServerError`` if it fails.

        ``observer.batch(header, decode_seconds)`` hears of each batch (see ``_stats``).

        The call is cancelled only once the stream is over or its consumer went
        away, so a CANCELLED status raised here is never the client's own doing.
        """
        call = self.stream(request)
        assembler = wire.BatchAssembler(compression.decompress)
        try:
            for chunk in call:
                decoding = time.perf_counter()
                for header, batch in assembler.feed(chunk):
                    if observer is not None:
                        observer.batch(header, time.perf_counter() - decoding)
                    yield header.batch_index, batch
                    decoding = time.perf_counter()
            if assembler.pending:
                raise StreamCutShort(
                    "the stream ended without an error in the middle of a batch", target=self.target
                )
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error, self.target) from None
        finally:
            call.cancel()
