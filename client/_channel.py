"""gRPC channels and calls to a batchwire server, one channel per process and target."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

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

_lock = threading.Lock()
_channels: dict[tuple[int, str, tuple[str | None, ...]], grpc.Channel] = {}


def channel(target: str) -> grpc.Channel:
    """The shared channel to ``target`` for this process (a forked child makes its own).

    TLS and token settings come from the environment (see ``_credentials``).
    """
    key = (os.getpid(), target, _credentials.environment())
    with _lock:
        if key not in _channels:
            _channels[key] = _credentials.open_channel(target, _OPTIONS)
        return _channels[key]


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
        """Opens a StreamBatches call; iterate it for ``wire.Chunk`` objects."""
        call = channel(self.target).unary_stream(
            _SERVICE + "StreamBatches",
            request_serializer=pb.StreamBatchesRequest.SerializeToString,
            response_deserializer=wire.parse_chunk,
        )
        return call(request)

    def batches(self, request: pb.StreamBatchesRequest) -> Iterator[tuple[int, object]]:
        """Yields ``(batch_index, batch)`` for one stream; raises ``ServerError`` if it fails.

        The call is cancelled only once the stream is over or its consumer went
        away, so a CANCELLED status raised here is never the client's own doing.
        """
        call = self.stream(request)
        assembler = wire.BatchAssembler(compression.decompress)
        try:
            for chunk in call:
                done = assembler.add(chunk)
                if done is not None:
                    yield done
            if assembler.pending:
                raise StreamCutShort(
                    "the stream ended without an error in the middle of a batch", target=self.target
                )
        except grpc.RpcError as error:
            raise ServerError.from_rpc(error, self.target) from None
        finally:
            call.cancel()
