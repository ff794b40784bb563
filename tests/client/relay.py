"""A pass-through gRPC relay in front of a real server, as a proxy or load balancer is.

Frames go through unchanged; ``break_stream`` makes the relay cut the next
stream after a given number of frames, either by cancelling it (what an L7
proxy resetting a stream does: the client sees CANCELLED) or by ending it OK
(a stream cut short without an error status). Later streams pass untouched, so
a client that resumes gets the rest from the real server.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Literal

import grpc

from batchwire.v1 import batchwire_pb2 as pb

_SERVICE = "batchwire.v1.BatchService"
Cut = Literal["cancel", "end"]


class Relay:
    def __init__(self, upstream: str) -> None:
        self._upstream = grpc.insecure_channel(
            upstream, options=[("grpc.max_receive_message_length", -1)]
        )
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self._server.add_generic_rpc_handlers((self._handler(),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._lock = threading.Lock()
        self._cut: tuple[int, Cut] | None = None
        self.cut_streams = 0  # streams the relay really cut

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def break_stream(self, after_frames: int, how: Cut) -> None:
        """Cuts the next stream after it relayed ``after_frames`` frames."""
        with self._lock:
            self._cut = (after_frames, how)

    def _handler(self) -> grpc.GenericRpcHandler:
        def unary(method: str, request_type):
            upstream = self._upstream.unary_unary(
                f"/{_SERVICE}/{method}", request_serializer=request_type.SerializeToString
            )
            return grpc.unary_unary_rpc_method_handler(
                lambda request, context: upstream(request),
                request_deserializer=request_type.FromString,
            )

        return grpc.method_handlers_generic_handler(
            _SERVICE,
            {
                "DescribeDataset": unary("DescribeDataset", pb.DescribeDatasetRequest),
                "CountBatches": unary("CountBatches", pb.StreamBatchesRequest),
                "StreamBatches": grpc.unary_stream_rpc_method_handler(
                    self._stream, request_deserializer=pb.StreamBatchesRequest.FromString
                ),
            },
        )

    def _stream(self, request: pb.StreamBatchesRequest, context: grpc.ServicerContext):
        with self._lock:
            cut, self._cut = self._cut, None
        if cut is not None:
            # Frames of the stream to cut are counted one batch each (no packing);
            # streams passed untouched keep what the client asked for.
            request.max_batches_per_message = 1
        call = self._upstream.unary_stream(
            f"/{_SERVICE}/StreamBatches",
            request_serializer=pb.StreamBatchesRequest.SerializeToString,
        )(request)
        try:
            for number, frame in enumerate(call):
                if cut is not None and number == cut[0]:
                    self.cut_streams += 1
                    if cut[1] == "cancel":
                        context.cancel()
                    return
                yield frame
        except grpc.RpcError as error:
            context.abort(error.code(), error.details() or "")
        finally:
            call.cancel()

    def __enter__(self) -> Relay:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(None)
        self._upstream.close()
