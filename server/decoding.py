"""Requests decoded inside the call, so that bytes that are no message get INVALID_ARGUMENT.

grpcio decodes a request before the servicer runs; when that fails it answers
INTERNAL (UNKNOWN under ``grpc.aio``) and logs a traceback, per request, for
anyone: health needs no token, nor does any call on a server without tokens.
``DecodeInterceptor`` hands every handler its request as bytes and decodes
it in a wrapper, which ends an undecodable call with INVALID_ARGUMENT naming
the method, and logs nothing.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

_MAX_REASON = 200  # characters of the decoder's own message kept in the status


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's async handler once (see the module docstring)."""

    def __init__(self, on_error: Callable[[], None] = lambda: None) -> None:
        self._on_error = on_error  # counts the refusals (the metrics' INVALID_ARGUMENT)
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, decoding(handler, method, self._on_error))
            self._wrapped[method] = cached
        return cached[1]


def decoding(
    handler: grpc.RpcMethodHandler, method: str, on_error: Callable[[], None] = lambda: None
) -> grpc.RpcMethodHandler:
    """``handler`` taking its request(s) as bytes and decoding them itself."""
    decode = handler.request_deserializer
    behavior = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    if decode is None or not (
        inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)
    ):
        return handler  # nothing to decode, or a sync handler (none is served on the loop)

    async def parse(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return decode(raw)
        except Exception as exc:  # protobuf's DecodeError, or any decoder's complaint
            on_error()
            reason = f"{type(exc).__name__}: {exc}"[:_MAX_REASON]
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"cannot decode the request of {method} ({len(raw)} bytes): {reason}",
            )

    async def parsed_stream(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for raw in requests:
            yield await parse(raw, context)

    streaming_requests = handler.request_streaming
    prepare: Callable[[Any, grpc.aio.ServicerContext], Any]
    if streaming_requests:

        async def prepare(requests, context):
            return parsed_stream(requests, context)
    else:
        prepare = parse

    if inspect.isasyncgenfunction(behavior):

        async def wrapped(request, context):
            responses = behavior(await prepare(request, context), context)
            async with contextlib.aclosing(responses):
                async for response in responses:
                    yield response
    else:

        async def wrapped(request, context):
            return await behavior(await prepare(request, context), context)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(streaming_requests, handler.response_streaming)]
    return make(wrapped, request_deserializer=None, response_serializer=handler.response_serializer)
